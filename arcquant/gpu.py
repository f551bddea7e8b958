"""GPU backend: QuantLinear layers computed by the Hopper kernels (arcquant/kernels).

use_kernels(model) gives every QuantLinear the kernel path can run a KernelPath; the others
keep the reference product, and the reason is logged. Per forward on the kernel path:

    x (M, K) bf16 -> tensor scale (static buffer, per token or per batch, on the device)
      -> arc_quantize_activation: gather, NVFP4, residual tail, written as code * block scale
         (exact in bf16) - once per group of layers sharing the input (q/k/v, gate/up)
      -> M <= 16: arc_gemv (the packed weight streamed once, split-K)
         M > 16: arc_matmul_prefill (weight dequantized to bf16, cuBLAS, scales after)

No host synchronisation on this path, so a decode step can be captured in a CUDA graph.
"""
import logging

import torch
import torch.nn.functional as F

from .formats import nvfp4
from .qlinear import QuantLinear

log = logging.getLogger("arcquant")
GEMV_MAX_M = 16
FMA_MAX_M = 4


def gemv_config(m: int, k: int) -> dict:
    """Launch settings of arc_gemv, from the Hopper sweeps (results/bench-paths-v3..v5-h200.json):
    the CUDA-core variant, narrow N tiles and no split for M <= 4; the tensor-core one with
    split-K 8 above."""
    if m <= FMA_MAX_M:
        return dict(fma=True, block_n=2, block_k=1024, split_k=1) if k >= 8192 else \
            dict(fma=True, block_n=4, block_k=512, split_k=1)
    return dict(fma=False, block_n=64, block_k=256, split_k=8)


def kernel_reason(q: QuantLinear) -> str | None:
    """Why the kernel path cannot run this layer, or None if it can."""
    if q.weight_packed.device.type != "cuda":
        return "the layer is not on a CUDA device"
    if torch.cuda.get_device_capability(q.weight_packed.device) < (8, 0):
        return f"compute capability {torch.cuda.get_device_capability(q.weight_packed.device)} < 8.0"
    if q.fmt.name != "nvfp4" or q.act != "fp4":
        return f"only NVFP4 W4A4 layers have kernels (this one: {q.fmt.name}, activations {q.act})"
    if q.rotate is not None or getattr(q, "smooth", None) is not None:
        return "online rotation / smoothing baselines have no kernel"
    if not q.plan.tail_reuses_weight():
        return "the weight tail is stored apart (order 'none'); the kernels read it from the main part"
    return None


class KernelPath:
    """Per-layer device state the kernels need (made once: block_starts reads perm on the host)."""

    def __init__(self, q: QuantLinear):
        from .kernels.act_quant import arc_quantize_activation, block_starts
        from .kernels.decode import arc_gemv
        from .kernels.prefill import arc_matmul_prefill
        self.act_quant, self.gemv, self.prefill = arc_quantize_activation, arc_gemv, arc_matmul_prefill
        self.perm = q.perm.to(torch.int32).contiguous()
        self.starts = block_starts(self.perm)
        self.s, self.pad = q.s, q.k_padded - q.in_features

    def global_scale(self, q: QuantLinear, x: torch.Tensor) -> torch.Tensor:
        if q.act_scale == "static":
            return q.input_global_scale
        amax = x.abs().amax(-1) if q.act_scale == "token" else x.abs().amax()
        return nvfp4.global_scale_from_amax(amax.float())             # (M,) or ()

    def quantize(self, q: QuantLinear, x2: torch.Tensor):
        if self.pad:
            x2 = F.pad(x2, (0, self.pad))
        x2 = x2.contiguous()
        gs = self.global_scale(q, x2)
        _, _, xd = self.act_quant(x2, self.perm, self.s, gs, dequantized=torch.bfloat16,
                                           packed=False, starts=self.starts)
        return gs, xd                                                  # xd (M, Kp+s) bf16

    def forward(self, q: QuantLinear, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, q.in_features)
        if x2.dtype not in (torch.bfloat16, torch.float16):
            x2 = x2.to(torch.bfloat16)
        quant = lambda t: self.quantize(q, t)
        gs, xd = q.shared.get(x2, quant) if q.shared else quant(x2)
        m, out_dtype = xd.shape[0], x.dtype if x.dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
        if m <= GEMV_MAX_M:
            y = self.gemv(xd, gs, q.weight_packed, q.weight_scale, q.weight_global_scale, self.s, q.bias,
                         out_dtype=out_dtype, **gemv_config(m, q.k_padded))
        else:
            y = self.prefill(xd, gs, q.weight_packed, q.weight_scale, q.weight_global_scale, self.s,
                                   q.bias, out_dtype=out_dtype)
        return y.to(x.dtype).reshape(*x.shape[:-1], q.out_features)


def use_kernels(model, enable: bool = True) -> dict:
    """Switch every QuantLinear the kernels can run to them (enable=False: back to the reference).
    -> {"kernels": n, "reference": n, "reasons": {reason: count}}; the split is logged."""
    counts = {"kernels": 0, "reference": 0, "reasons": {}}
    for mod in model.modules():
        if not isinstance(mod, QuantLinear):
            continue
        reason = kernel_reason(mod) if enable else "reference backend requested"
        mod.kernel = KernelPath(mod) if reason is None else None
        if reason is None:
            counts["kernels"] += 1
        else:
            counts["reference"] += 1
            counts["reasons"][reason] = counts["reasons"].get(reason, 0) + 1
    log.info("arcquant backend: triton kernels for %d layers, reference for %d %s", counts["kernels"],
             counts["reference"], counts["reasons"] or "")
    return counts
