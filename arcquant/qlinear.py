"""The quantized linear layer (reference backend: plain torch, runs anywhere).

One class covers every method: weights are stored packed (4-bit codes, block scales,
tensor scale) in the plan's column order; the activation is quantized per `act`:
    none  weights only (w4a16)
    fp8   FP8 E4M3 per token (w4a8)
    fp4   the format of the weights, augmented by the plan's residual tail (rtn: s = 0, arc)
    mixed Atom: the plan's last s channels in FP8 E4M3 (per-token / per-row scales), the rest
          in the 4-bit format; GEMM depth K
Optional input transforms (baselines.py), applied to the padded input before all of this
and folded into the stored weight: a rotation (block size and seed; the matrix is rebuilt,
not stored) and SmoothQuant scales (buffer `smooth`).
Layers that read the same input (q/k/v, gate/up) hold the same SharedInput, so the
activation is quantized once per forward for the whole group.
NVFP4 activations on a CUDA device are quantized by the fused Triton kernel (same bits, a
few launches instead of dozens: evaluation on a GPU is not launch-bound);
ARCQUANT_ACT_BACKEND=reference keeps plain torch, =triton asks for the kernel anywhere
(on a CPU through TRITON_INTERPRET=1).
"""
import logging
import os

import torch
from torch import nn

from . import arc, baselines
from .formats import fp8, get_format

ACTS = ("none", "fp8", "fp4", "mixed")
ACT_BACKENDS = ("auto", "reference", "triton")
log = logging.getLogger("arcquant")
_logged: set = set()


def act_backend(x: torch.Tensor) -> str:
    """'triton' or 'reference' for quantizing activation x (ARCQUANT_ACT_BACKEND, default auto:
    the kernel on a CUDA device)."""
    choice = os.environ.get("ARCQUANT_ACT_BACKEND", "auto")
    if choice not in ACT_BACKENDS:
        raise ValueError(f"ARCQUANT_ACT_BACKEND={choice!r}; valid: {', '.join(ACT_BACKENDS)}")
    use = ("triton" if x.is_cuda else "reference") if choice == "auto" else choice
    if (use, x.device.type) not in _logged:
        _logged.add((use, x.device.type))
        log.info("NVFP4 activation quantization of the reference layers on %s: %s", x.device.type,
                 "fused Triton kernel (exact)" if use == "triton" else "plain torch")
    return use


class FiniteCheck:
    """NaN / Inf in a layer's input is an error (no 4-bit format holds them). On the CPU it is
    checked at once; on a GPU a per-device flag (the running max of the inputs' amax, which NaN and
    Inf carry) is read every `every` checks and at the end of each forward of a model that
    install()ed it - not one host sync per layer, which stalls the card's queue."""

    def __init__(self, every: int = 64):
        self.every, self.count, self.worst = every, 0, {}

    def check(self, x: torch.Tensor, amax: torch.Tensor, what: str) -> None:
        """amax: max |x| (any shape; NaN if x holds NaN)."""
        if not self.deferred(x):
            arc.check_finite(x, what)
            return
        if amax.numel() == 0:                                            # no rows (an expert no token chose)
            return
        m = amax.amax()                                                  # NaN / Inf propagate
        w = self.worst.get(x.device)
        self.worst[x.device] = m if w is None else torch.maximum(w, m)
        self.count += 1
        if self.count >= self.every:
            self.flush()

    @staticmethod
    def deferred(x: torch.Tensor) -> bool:
        return x.is_cuda and not torch.compiler.is_compiling()

    def flush(self, *_) -> None:
        if torch.compiler.is_compiling():                    # a traced forward: read on the next eager one
            return
        worst, self.worst, self.count = self.worst, {}, 0
        for dev, w in worst.items():
            if not torch.isfinite(w).item():
                raise ValueError(f"NaN or Inf in the activations of a quantized layer on {dev} (read within the "
                                 f"last {self.every} layer calls); 4-bit formats cannot represent them (check the input)")

    def install(self, model: nn.Module) -> None:
        """Read the flags at the end of every forward of `model` (once per model)."""
        if not getattr(model, "_arcquant_finite_check", False):
            model.register_forward_hook(self.flush)
            model._arcquant_finite_check = True


FINITE = FiniteCheck()


class SharedInput:
    """Caches the quantized activation of the last input seen by one group of layers."""

    def __init__(self):
        self.x, self.version, self.value = None, None, None

    def get(self, x, compute):
        if torch.compiler.is_compiling():                 # traced: no Python-side cache (compute each time)
            return compute(x)
        if self.x is x and self.version == x._version:
            return self.value
        self.x, self.version, self.value = x, x._version, compute(x)
        return self.value


class QuantLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, fmt: str, act: str, act_scale: str,
                 plan: arc.ArcPlan, qw: arc.QuantizedWeight, weight_gs: torch.Tensor,
                 input_gs: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                 rotate: tuple | None = None, smooth: torch.Tensor | None = None, tail8=None, wres=None):
        super().__init__()
        if act not in ACTS:
            raise ValueError(f"act={act!r}; valid: {', '.join(ACTS)}")
        self.in_features, self.out_features = in_features, out_features
        self.fmt, self.act, self.act_scale = get_format(fmt), act, act_scale
        self.k_padded = plan.k
        pack = self.fmt.module.pack
        self.register_buffer("weight_packed", pack(qw.codes))            # (N, Kp/2) uint8
        self.register_buffer("weight_scale", qw.scales)                  # (N, Kp/B)
        # each layer owns its tensors (a group shares values, never storage: tied-storage
        # de-duplication at save time must not drop them)
        self.register_buffer("weight_global_scale", weight_gs.reshape(()).float().clone())
        self.register_buffer("perm", plan.perm.to(torch.int32).clone())  # (Kp,)
        self.register_buffer("tail", plan.tail.to(torch.int32).clone())  # (s,)
        if qw.tail_codes is not None:
            self.register_buffer("weight_tail_packed", pack(qw.tail_codes))  # (N, s/2)
            self.register_buffer("weight_tail_scale", qw.tail_scales)        # (N, s/B)
        if input_gs is not None:
            self.register_buffer("input_global_scale", input_gs.reshape(()).float().clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.rotate = None if rotate is None else (int(rotate[0]), int(rotate[1]))   # (block, seed)
        if smooth is not None:
            self.register_buffer("smooth", smooth.float().clone())                 # (Kp,)
        if wres is not None:                                                        # arc+wres
            self.register_buffer("weight_res_packed", pack(wres[0]))              # (N, s/2)
            self.register_buffer("weight_res_scale", wres[1])                     # (N, s/B)
        if tail8 is not None:
            self.register_buffer("weight_tail8", tail8[0])                         # (N, s) e4m3
            self.register_buffer("weight_tail8_scale", tail8[1])                   # (N, 1) f32
        self.shared: SharedInput | None = None
        self.input_amax: float | None = None    # calibration max |x| (W4A4): engines' static scale
        self._w_aug = None                                               # dequantized cache
        self.kernel = None                # gpu.KernelPath when the GPU kernels run this layer
        self._tail_last = None            # plan's tail = its last s channels (the fused kernel's case)

    # ---- construction --------------------------------------------------------------------
    @classmethod
    def from_linear(cls, linear: nn.Linear, fmt: str, act: str, act_scale: str, plan: arc.ArcPlan,
                    weight_gs: torch.Tensor, input_gs: torch.Tensor | None = None,
                    rotate: tuple | None = None, smooth: torch.Tensor | None = None,
                    hessian: torch.Tensor | None = None, weight_residual: bool = False) -> "QuantLinear":
        """hessian (Kp, Kp): round the weight by GPTQ (arcquant/gptq.py) instead of to nearest.
        weight_residual: also store the tail weights' rounding error (arc.weight_residual)."""
        w = linear.weight.detach().to(torch.float32)
        if not torch.isfinite(w).all():
            raise FloatingPointError("NaN or Inf in the weights")
        w = transform_input(arc.pad_k(w, plan.k), rotate, None)         # (N, Kp) rotated
        if smooth is not None:
            w = w * smooth.to(w.device)                                  # x / s  <->  W * s
        if hessian is None:
            qw = arc.quantize_weight(w, plan, get_format(fmt), weight_gs)
        else:
            from .gptq import gptq_nvfp4
            if not plan.tail_reuses_weight():
                raise ValueError("GPTQ rounding needs a residual tail that reuses the main part (order blocks/sorted)")
            p = plan.perm
            qw = arc.QuantizedWeight(*gptq_nvfp4(w[:, p], hessian.to(w.device)[p][:, p], weight_gs), None, None)
        tail8 = _quantize_tail8(w[:, plan.tail]) if act == "mixed" else None
        wres = arc.weight_residual(w, qw, plan, get_format(fmt), weight_gs) if weight_residual and plan.s else None
        return cls(linear.in_features, linear.out_features, fmt, act, act_scale, plan, qw,
                   weight_gs, input_gs, linear.bias, rotate, smooth, tail8, wres)

    @property
    def plan(self) -> arc.ArcPlan:
        plan = arc.ArcPlan(self.perm.long(), self.tail.long())
        plan._reuses = self._tail_is_last()
        return plan

    def _tail_is_last(self) -> bool:
        """The plan's tail is its last s channels (stored once; the fused kernel's case)."""
        if self._tail_last is None:                                     # one host check per layer
            self._tail_last = arc.ArcPlan(self.perm.long(), self.tail.long()).tail_reuses_weight()
        return self._tail_last

    @property
    def s(self) -> int:
        return self.tail.numel()

    @property
    def weight_residual(self) -> bool:
        """arc+wres: the tail's weight rounding error is stored (depth K+2s)."""
        return hasattr(self, "weight_res_packed")

    @property
    def avg_bits(self) -> float:
        """Weight bits per original weight element: bits/elem * (K+s)/K (the spec's figure);
        arc+wres: (K+2s)/K; Atom: 4-bit format on K-s channels and 8 bits on s."""
        if self.act == "mixed":
            return (self.fmt.bits_per_element * (self.k_padded - self.s) + 8 * self.s) / self.in_features
        extra = self.s * (2 if self.weight_residual else 1)
        return self.fmt.bits_per_element * (self.k_padded + extra) / self.in_features

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, fmt={self.fmt.name}, act={self.act}, "
                f"act_scale={self.act_scale}, s={self.s}, bias={self.bias is not None}"
                + (", weight_residual=True" if self.weight_residual else ""))

    # ---- reference forward -------------------------------------------------------------------
    def quantized_weight(self) -> arc.QuantizedWeight:
        unpack = self.fmt.module.unpack
        tail = getattr(self, "weight_tail_packed", None)
        return arc.QuantizedWeight(unpack(self.weight_packed), self.weight_scale,
                                   None if tail is None else unpack(tail),
                                   getattr(self, "weight_tail_scale", None))

    def dequantized_weight(self) -> torch.Tensor:
        """(N, Kp+s) float32: dequant(W_aug) ((N, Kp) for Atom; arc+wres: R_W added to the main
        tail columns), cached after the first call."""
        if self._w_aug is None or self._w_aug.device != self.weight_packed.device:
            if self.act == "mixed":
                qw, k = self.quantized_weight(), self.k_padded
                main = self.fmt.dequantize(qw.codes, qw.scales, self.weight_global_scale)[:, : k - self.s]
                tail = self.weight_tail8.to(torch.float32) * self.weight_tail8_scale
                self._w_aug = torch.cat([main, tail], 1)
            else:
                codes, scales = arc.augmented_weight(self.quantized_weight(), self.plan, self.fmt.block)
                self._w_aug = self.fmt.dequantize(codes, scales, self.weight_global_scale)
                if self.weight_residual:          # Q1_tail * R_W folded onto Q1's tail columns: the
                    k, s = self.k_padded, self.s  # K+2s product, summed in another order
                    self._w_aug[:, k - s: k] += self.fmt.dequantize(
                        self.fmt.module.unpack(self.weight_res_packed), self.weight_res_scale, self.weight_global_scale)
        return self._w_aug

    def _activation_global_scale(self, x: torch.Tensor) -> torch.Tensor:
        return self._scale_and_amax(x)[0]

    def _scale_and_amax(self, x: torch.Tensor):
        """-> (tensor scale of x for this layer's act_scale, amax of |x| (per row for 'token'))."""
        amax = x.abs().amax(-1, keepdim=True) if self.act_scale == "token" else x.abs().amax()
        gs = self.input_global_scale if self.act_scale == "static" else self.fmt.global_scale(amax)
        return gs, amax

    def quantize_input(self, x2d: torch.Tensor) -> torch.Tensor:
        """x (M, K) -> dequant(X_aug) (M, Kp+s) float32 for the reference GEMM."""
        x = transform_input(arc.pad_k(x2d.to(torch.float32), self.k_padded), self.rotate,
                            getattr(self, "smooth", None))
        if self.act == "none":
            return x[:, self.perm.long()]
        if self.act == "fp8":
            return fp8.fake_quantize_per_row(x[:, self.perm.long()])
        if self.act == "mixed":
            return self._quantize_mixed(x[:, self.perm.long()])
        gs, amax = self._scale_and_amax(x)
        FINITE.check(x, amax, "the activations")
        if self._kernel_quantizes(x):                     # the fused kernel: code * block scale, exact
            from .kernels.act_quant import arc_quantize_activation_gemv
            xq, _, _ = arc_quantize_activation_gemv(x.contiguous(), self.perm, self.s, gs, out="bfloat16")
            return xq.to(torch.float32) / gs              # as nvfp4.dequantize: one rounding
        codes, scales = arc.quantize_activation(x, self.plan, self.fmt, gs, check=False)
        return self.fmt.dequantize(codes, scales, gs)

    def _kernel_quantizes(self, x: torch.Tensor) -> bool:
        """The fused kernel covers NVFP4 with the tail at the end of the plan (orders blocks and
        sorted; 'none' keeps its tail elsewhere); torch.compile traces the plain torch ops."""
        if self.fmt.name != "nvfp4" or torch.compiler.is_compiling() or act_backend(x) != "triton":
            return False                                               # traced: plain torch, as before
        return self._tail_is_last() and self.perm.device == x.device

    def _quantize_mixed(self, xp: torch.Tensor) -> torch.Tensor:
        """Atom: (M, Kp) in plan order -> [4-bit main (Kp-s), FP8 outliers (s)], the main part's
        tensor scale taken from the main channels alone."""
        main, tail = xp[:, : self.k_padded - self.s], xp[:, self.k_padded - self.s:]
        gs = self._activation_global_scale(main)
        main = self.fmt.dequantize(*self.fmt.quantize(main, gs), gs)
        return torch.cat([main, fp8.fake_quantize_per_row(tail) if self.s else tail], 1)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """x (..., K) -> (..., N); with residual (..., N) of x's dtype: residual + that, as the decoder
        layer adds it (the GEMVs add it in their epilogue: the same bits, one kernel fewer)."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input has {x.shape[-1]} features, this layer expects {self.in_features}")
        if residual is not None and (residual.shape != (*x.shape[:-1], self.out_features) or residual.dtype != x.dtype):
            raise ValueError(f"residual {residual.dtype} {tuple(residual.shape)} does not match this layer's output "
                             f"{x.dtype} {(*x.shape[:-1], self.out_features)}")
        if self.kernel is not None:
            if x.device != self.weight_packed.device:
                raise ValueError(f"input on {x.device}, this layer's weights on {self.weight_packed.device}")
            return self.kernel.forward(self, x, residual)
        flat = lambda t: self.quantize_input(t.reshape(-1, self.in_features))  # (M, K) -> (M, Kp+s)
        xq = self.shared.get(x, flat) if self.shared else flat(x)
        y = arc.augmented_matmul(xq, self.dequantized_weight())              # (M, N) float32
        if self.bias is not None:
            y = y + self.bias.to(torch.float32)
        y = y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        return y if residual is None else residual + y


def _quantize_tail8(w_tail: torch.Tensor):
    """Atom's 8-bit weight branch (N, s): FP8 E4M3 with one scale per row (s may be 0)."""
    if w_tail.shape[1] == 0:
        return w_tail.to(torch.float8_e4m3fn), torch.ones(w_tail.shape[0], 1)
    return fp8.quantize_per_row(w_tail)


def transform_input(x: torch.Tensor, rotate: tuple | None, smooth: torch.Tensor | None) -> torch.Tensor:
    """The baselines' input transform on a padded (M, Kp) input: rotation, then smoothing."""
    if rotate is not None:
        x = baselines.rotate(x, baselines.rotation_matrix(x.shape[-1], *rotate, device=x.device))
    if smooth is not None:
        x = x / smooth
    return x
