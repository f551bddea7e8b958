"""GPU backend: QuantLinear layers computed by the Hopper kernels (arcquant/kernels).

use_kernels(model) gives every QuantLinear the kernel path can run a KernelPath; the others
keep the reference product, and the reason is logged. Per forward on the kernel path:

    x (M, K) bf16 -> tensor scale (static buffer, per token or per batch, on the device)
      -> arc_quantize_activation: gather, NVFP4, residual tail, written as code * block scale
         (exact in bf16) - once per group of layers sharing the input (q/k/v, gate/up)
      -> CUDA kernels (kernels/cuda_gemv.py) where nvcc can build them; the activation kernel
         computes the per-token tensor scale itself:
           M <= 2:  integer GEMV (int8 activations, PRMT/DP4A dots per 16-block)
           M <= 32: tensor-core GEMV (weights decoded to fp16 in registers, mma.sync)
         without them, M <= 16: arc_gemv (Triton; the packed weight streamed once, split-K)
      -> larger M: arc_matmul_prefill (weight dequantized to bf16, cuBLAS, scales after)

With stack_groups (use_kernels does it), the layers of a q/k/v or gate/up group share one
stacked weight: one decode GEMV launch per group, one dequantization + GEMM at prefill (StackedGroup).
With fuse_norms (use_kernels does it too), the RMSNorm in front of q/k/v and gate/up
runs as one CUDA kernel with the activation quantization (FusedNormQuant): the normalized rows
and the group's quantized operand in one pass, the operand handed to the layers through their
SharedInput cache. With fuse_mlps (use_kernels does it as well), a SiLU-gated MLP's prefill
hands gate and up's unscaled cuBLAS products to one kernel that scales them, forms SiLU(gate) * up
and quantizes it for down_proj (fused_mlp_forward).

No host synchronisation on this path, so a decode step can be captured in a CUDA graph.
"""
import functools
import logging

import torch
import torch.nn.functional as F

from .formats import nvfp4
from .kernels import pdl
from .kernels.ops import current
from .qlinear import QuantLinear
from .stacking import SharedProduct

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


INT8_MAX_M, MMA_MAX_M = 2, 32
WIDE_N = 16384                 # output rows from which the tensor-core GEMV has blocks enough (kw small)
VERY_WIDE_N = 32768            # ... and from which 9 - 16 tokens do better with kw = 4 and occ (mma_config)


def cuda_gemv_config(m: int, k: int, n: int | None = None) -> dict:
    """Launch settings of the integer GEMV (M <= 2 in the model), from the H200 sweeps
    (results/cuda-gemv-h200.json, results/cuda-gemv-u-h200.json; since v37 the chain timing of
    results/sweep-chain-h200.json: back to back on weights not in L2, as the model runs them):
    2 output rows a block and 2 warps along K for layers of N <= 4096 rows (o_proj, down_proj: ~N/2
    one-warp blocks leave SMs short of warps; since the tail-free loop of v38, 2 rows beat 4 there -
    Llama down 11.98 -> 11.37 us, o 5.72 -> 5.47 at M = 1); otherwise 4 rows a block (2 for K < 8192 -
    one token, or two and N < 16384), 2 warps along K for deep calls; one step's weight loads at a
    time (u = 1: issuing 2 or 4 steps' loads first was no faster, and u = 2 cost ~10 % in the model's
    decode step). n None: as for wide layers."""
    if n is not None and n <= 4096 and m <= 2:                     # o_proj- and down_proj-sized
        return dict(nr=2, kw=2, u=1)
    narrow = m == 1 or (m == 2 and n is not None and n < WIDE_N)
    return dict(nr=2 if narrow and k < 8192 else 4, kw=2 if k >= 8192 and m <= 4 else 1, u=1)


def mma_config(m: int, n: int, k: int, pipelined: bool = True) -> dict:
    """Launch settings of the tensor-core GEMV, from the H200 sweeps (results/cuda-gemv-h200.json,
    results/cuda-gemv-v10-h200.json): kw warps splitting the depth - many for layers of few
    output rows (few blocks of 16 rows), few for wide ones (enough blocks already); occ: the
    register-bounded entry point, which wins for M > 16 (4 token tiles: 150 -> 128 registers,
    3 -> 4 blocks per SM). Wide means N >= 16384 rows (gate/up), not N * K: Qwen2.5-7B's
    down_proj (N 3584, K 18944) has only 224 blocks and needs kw = 8 (35 vs 51 us at M = 4..8,
    44 vs 213 us at M = 16 in those sweeps). Very wide (N >= 32768, Qwen2.5-7B gate/up's 2368 blocks)
    at 9 - 16 tokens: kw = 4 with occ (76.0 vs 103.4 us for kw = 1 at M = 16 in cuda-gemv-v10; Llama's
    gate/up, 1792 blocks, keeps kw = 1: 66.1 vs 84.4 us).
    st / xs: the cp.async-pipelined kernel (whole stages: K % (kw * 128) == 0), from the same-run
    sweep after the shift-and-mask decode (v26, results/mma-pipe-v5-h200.json, us at M = 3 / 4 / 8
    against the unpipelined kernel): up to 8 tokens for every layer with K % 512 == 0 - wide ones
    (gate/up) with kw 4, 2 stages, activations from L2 (Llama 39.0 / 38.8 / 42.5 vs 45.8 / 46.8 /
    50.5; Qwen 42.8 / 43.5 / 49.6 vs 53.9 / 55.0 / 58.9), the others with 3 stages and activations
    staged, kw 8 where K % 1024 == 0 and K >= 8192 (Llama down 23.9 / 24.1 / 25.0 vs 33.9 / 34.3 / 35.8
    at kw 8; Qwen down, kw 4: 32.2 / 32.2 / 33.2 vs 40.0 / 41.0 / 43.6; Llama o 12.5 / 12.6 / 13.2 vs
    14.3 / 14.3 / 14.8; Qwen q/k/v 14.3 / 14.7 / 15.2 vs 14.1 / 14.1 / 14.6, the one small loss kept
    for one rule). At 9 - 16 tokens only very wide layers (Qwen gate/up M = 16: 72.4 vs 81.2) and deep
    ones with K % 1024 == 0 (Llama down: 33.3 vs 35.2); Llama gate/up keeps kw = 1 (62.8 vs 64.7 here,
    62.5 - 73.7 in v25's two runs). pipelined=False: the unpipelined kernel everywhere (for A/B timing:
    pipelined_gemv)."""
    wide = n >= WIDE_N
    if pipelined and m <= 8 and 4096 < n < WIDE_N and k < 8192:   # q/k/v-sized (chain sweep, v37)
        return dict(kw=8, occ=False, st=2, xs=False) if k % 1024 == 0 else dict(kw=8, occ=False)
    if pipelined and m <= 8 and k % 512 == 0:         # the pipelined kernel, whole stages of kw * 128
        if wide:
            return dict(kw=4, occ=False, st=2, xs=False)
        return dict(kw=8 if k >= 8192 and k % 1024 == 0 else 4, occ=False, st=3, xs=True)
    if m <= 8:
        return dict(kw=4 if wide else 8, occ=False)
    if m <= 16:
        if pipelined and n >= VERY_WIDE_N and k % 512 == 0:
            return dict(kw=4, occ=False, st=3, xs=True)
        if pipelined and k >= 8192 and k % 1024 == 0:
            return dict(kw=4, occ=False, st=4, xs=True)
        if n >= VERY_WIDE_N:
            return dict(kw=4, occ=True)
        return dict(kw=1 if wide else 8 if k >= 8192 or n <= 4096 else 4, occ=False)
    return dict(kw=8 if n <= 4096 and not wide else 4, occ=True)


_PIPELINED = [True]


def pipelined_gemv(enable: bool) -> None:
    """Whether the decode GEMVs take the cp.async-pipelined tensor-core kernel where mma_config
    chooses it (default) or the unpipelined one everywhere - for same-run A/B timing
    (bench.decode_pipeline_ab). A captured CUDA graph keeps the kernels it captured."""
    _PIPELINED[0] = bool(enable)
    log.info("arcquant decode GEMVs: pipelined tensor-core kernel %s", "on" if enable else "off")


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
    if q.weight_residual:
        return "the weight residual tail (arc+wres, depth K+2s) has no kernel yet"
    if not q.plan.tail_reuses_weight():
        return "the weight tail is stored apart (order 'none'); the kernels read it from the main part"
    return None


def _weight_operands(q: QuantLinear) -> tuple:
    """The layer's weight as the kernels take it: (codes, E4M3 scales as their bits, tensor scale)."""
    return q.weight_packed, q.weight_scale.view(torch.uint8), q.weight_global_scale


class KernelPath:
    """Per-layer device state the kernels need (made once: block_starts reads perm on the host).
    The kernels are torch custom ops (kernels/ops.py: torch.ops.arcquant.*); `run` gives them as
    called: the ops under torch.compile, their Python bodies directly otherwise (ops.EAGER: no
    dispatcher work on the eager path, whose prefill is host-bound)."""

    def __init__(self, q: QuantLinear):
        from .kernels import ops
        from .kernels.act_quant import block_starts
        from .kernels.cuda_gemv import gemv_shape_reason
        self.ops = ops.EAGER                                                  # tests may spy on these
        self.perm = q.perm.to(torch.int32).contiguous()
        self.starts = block_starts(self.perm)
        self.s, self.pad = q.s, q.k_padded - q.in_features
        self.bias32 = None if q.bias is None else q.bias.detach().float().contiguous()
        self.bias16 = None if q.bias is None else self.bias32.to(torch.bfloat16)    # the prefill's (exact: bf16 weights)
        self.weight = _weight_operands(q)
        self.cuda_reason = _cuda_gemv_reason(q)
        self.int8_max_m = INT8_MAX_M if gemv_shape_reason(q.k_padded, q.s) is None else 0   # needs K % 32
        self.group: StackedGroup | None = None                                # stack_groups

    @property
    def run(self):
        """The ops as called now: torch.ops.arcquant while torch.compile traces, else self.ops."""
        return current(self.ops)

    def global_scale(self, q: QuantLinear, x: torch.Tensor) -> torch.Tensor:
        if q.act_scale == "static":
            return q.input_global_scale
        return nvfp4.global_scale_from_amax(x.abs().amax().float())             # dynamic: whole batch

    def quantize(self, q: QuantLinear, x2: torch.Tensor, out: str):
        """-> (xq, scales, gs): the activation operand as `out` (int8 / mma / bfloat16)."""
        if self.pad:
            x2 = F.pad(x2, (0, self.pad))
        x2 = x2.contiguous()
        gs = None if q.act_scale == "token" else self.global_scale(q, x2)    # per token: in the kernel
        return self.run.quantize_act(x2, self.perm, self.starts, self.s, gs, out)

    def path(self, m: int) -> str:
        if self.cuda_reason is None and m <= MMA_MAX_M:
            return "int8" if m <= self.int8_max_m else "mma"
        return "bfloat16"

    def operand(self, q: QuantLinear, x: torch.Tensor) -> tuple:
        """x (..., K) -> (M, output dtype, (kind, xq, xs, gs)): the activation operand of q's path,
        taken from (or left in) the group's SharedInput cache."""
        x2 = x.reshape(-1, q.in_features)
        if x2.dtype not in (torch.bfloat16, torch.float16):
            x2 = x2.to(torch.bfloat16)
        out_dtype = x.dtype if x.dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
        m, kind = x2.shape[0], self.path(x2.shape[0])
        quant = lambda _: (kind,) + tuple(self.quantize(q, x2, kind))
        value = q.shared.get(x, quant) if q.shared else quant(x)             # keyed on the layer input
        if value[0] != kind:                                                  # cached for another path
            value = quant(x)
        return m, out_dtype, value

    def forward(self, q: QuantLinear, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """q(x), plus residual when given (checked by QuantLinear.forward): added in the CUDA GEMVs'
        epilogue where the output dtype is x's, else by torch afterwards - the same bits."""
        m, out_dtype, value = self.operand(q, x)
        kind, xq, xs, gs = value
        stacked = self.group is not None and not torch.compiler.is_compiling()
        fuse = residual is not None and kind in ("int8", "mma") and not stacked and out_dtype == x.dtype
        if stacked:
            y = self.group.output(q, value, out_dtype)                         # q's columns (a view)
        else:
            y = self.product(kind, m, xq, xs, gs, self.weight, self.bias32, q.out_features, q.k_padded, out_dtype,
                             self.bias16, residual.reshape(m, q.out_features).contiguous() if fuse else None)
        y = y.to(x.dtype).reshape(*x.shape[:-1], q.out_features)
        return y if residual is None or fuse else residual + y

    def product(self, kind, m, xq, xs, gs, w, bias, n, k, out_dtype, bias16=None, residual=None):
        """The quantized operand times the packed weight w (N rows): one GEMV launch, or the
        prefill's dequantization, GEMM and epilogue. bias: fp32 (N,); bias16: the same in bf16,
        which the prefill's epilogue adds (given: no conversion a call). residual (M, N) of
        out_dtype: added by the CUDA GEMVs' epilogue (kinds int8 / mma only)."""
        ops = self.run
        if kind == "int8":
            return ops.gemv_int8(xq, xs, gs, *w, bias, self.s, out_dtype=out_dtype, **cuda_gemv_config(m, k, n),
                                 residual=residual)
        if kind == "mma":
            return ops.gemm_mma(xq, gs, *w, bias, self.s, out_dtype=out_dtype, **mma_config(m, n, k, _PIPELINED[0]),
                                residual=residual)
        if residual is not None:
            raise ValueError(f"the {kind} product takes no residual (the CUDA GEMVs do)")
        if m <= GEMV_MAX_M:
            return ops.gemv_triton(xq, gs, *w, bias, self.s, out_dtype=out_dtype, **gemv_config(m, k))
        return ops.prefill(xq, gs, *w, bias if bias16 is None else bias16, self.s, out_dtype=out_dtype)


class StackedGroup:
    """The layers of one SharedInput group (q/k/v, gate/up) as one weight: their packed codes and
    block scales stacked row-wise in one tensor (each layer's buffers become row views of it - no
    copy kept, state-dict keys unchanged), the tensor scales as one value per row, the biases
    concatenated; one product computes the whole group - one decode GEMV launch, or at prefill one
    dequantization, one GEMM and one epilogue (its weight scale per column) - and each layer returns
    its columns, a view. Outputs equal the per-layer launches' (same per-row arithmetic; the
    tensor-core GEMV's depth split and cuBLAS's choice of kernel may differ with the stacked N)."""

    def __init__(self, layers: list):
        self.layers = layers
        wc = torch.cat([q.weight_packed for q in layers])                      # (sum N, K/2)
        ws = torch.cat([q.weight_scale for q in layers])                       # (sum N, K/16)
        wgs = torch.cat([q.weight_global_scale.reshape(1).expand(q.out_features) for q in layers])
        self.rows, off = {}, 0                                                # id(layer) -> (member, its rows)
        for i, q in enumerate(layers):
            n = q.out_features
            q.weight_packed, q.weight_scale = wc[off:off + n], ws[off:off + n]   # buffers -> views
            q.kernel.weight = _weight_operands(q)
            self.rows[id(q)], off = (i, slice(off, off + n)), off + n
        self.weight = (wc, ws.view(torch.uint8), wgs.contiguous())
        self.bias = None if all(q.bias is None for q in layers) else torch.cat(
            [q.kernel.bias32 if q.bias is not None else wc.new_zeros(q.out_features, dtype=torch.float32)
             for q in layers])
        self.bias16 = None if self.bias is None else self.bias.to(torch.bfloat16)
        self.product = SharedProduct(len(layers))

    def output(self, q: QuantLinear, value: tuple, out_dtype) -> torch.Tensor:
        """q's columns of the group's (M, sum N) product for this quantized operand (its SharedInput
        value), computed once for the group."""
        kind, xq, xs, gs = value
        member, rows = self.rows[id(q)]
        y = self.product.take(xq, member, lambda: q.kernel.product(
            kind, xq.shape[0], xq, xs, gs, self.weight, self.bias, self.weight[0].shape[0], q.k_padded, out_dtype,
            self.bias16))
        return y[:, rows]

    def unstack(self) -> None:
        """Give each layer its own storage and its own launch back (use_kernels(enable=False))."""
        for q in self.layers:
            q.weight_packed, q.weight_scale = q.weight_packed.clone(), q.weight_scale.clone()
            if q.kernel is not None:
                q.kernel.weight, q.kernel.group = _weight_operands(q), None


def _cuda_gemv_reason(q: QuantLinear) -> str | None:
    from .kernels.cuda_gemv import unavailable_reason
    if q.weight_packed.data_ptr() % 16:
        return "the packed weight does not start on a 16-byte boundary"
    return unavailable_reason(q.weight_packed.device)


NORMS = {"LlamaRMSNorm", "MistralRMSNorm", "MixtralRMSNorm", "Qwen2RMSNorm", "Qwen2MoeRMSNorm", "Qwen3RMSNorm",
         "Qwen3MoeRMSNorm"}                                    # weight * T(x * rsqrt(mean(x^2) + eps))
NORM_CONSUMERS = {"input_layernorm": ("self_attn", "q_proj"), "post_attention_layernorm": ("mlp", "gate_proj")}


class FusedNormQuant(torch.nn.Module):
    """An RMSNorm that also quantizes its output for the layers reading it, in one kernel
    (torch.ops.arcquant.rmsnorm_quantize_act), for every input size (the operand of the consumer's
    path: int8 / mma for the decode GEMVs, bfloat16 for prefill), and leaves the operand in
    their SharedInput cache; under torch.compile or for another dtype: the norm as it was."""

    def __init__(self, norm: torch.nn.Module, consumer: QuantLinear):
        super().__init__()
        self.weight = norm.weight                                      # same parameter, same state-dict key
        self._norm, self._consumer = (norm,), (consumer,)             # tuples: not submodules
        self.eps = float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))

    @property
    def norm(self) -> torch.nn.Module:
        return self._norm[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self._consumer[0]
        kp = q.kernel
        if kp is None or torch.compiler.is_compiling() or x.dtype != self.weight.dtype:
            return self.norm(x)
        kind = kp.path(x.numel() // x.shape[-1])                      # the prefill operand too (bfloat16)
        gs = None if q.act_scale == "token" else q.input_global_scale
        y, xq, xs, g = kp.run.rmsnorm_quantize_act(x.reshape(-1, x.shape[-1]).contiguous(), self.weight,
                                                   self.eps, kp.perm, kp.starts, kp.s, gs, kind)
        y = y.reshape(x.shape)
        q.shared.x, q.shared.version, q.shared.value = y, y._version, (kind, xq, xs, g)
        return y


GATED_MLPS = {"LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP"}      # down_proj(act_fn(gate_proj(x)) * up_proj(x))
SILU = {"SiLU", "SiLUActivation"}


def fused_mlp_forward(mlp, x: torch.Tensor, wgu: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
    """A gated MLP's forward whose prefill-sized calls (the cuBLAS path) hand gate and up's unscaled
    products to one kernel (ops.silu_mul_quantize_act) that applies their tensor scales, SiLU(gate)
    * up and down_proj's activation quantization: the two scale epilogues, the SiLU, the product
    and h never go through memory. With gate and up stacked (StackedGroup) their products are one
    dequantization and one GEMM, (M, 2I), the kernel reading its two halves. The same bits as the
    unfused forward (the kernel repeats scale_rows', F.silu's and the product's roundings; cuBLAS
    may pick another kernel for the stacked N). At decode sizes gate and up run as before and
    SiLU(gate) * up is one kernel (ops.silu_mul: torch's bits, without torch's strided elementwise
    path for the stacked GEMV's column views); under torch.compile the unfused forward.
    wgu: gate's and up's weight tensor scales, (2,) fp32 (fuse_mlps makes it once). residual (the
    decoder layer's, engine_fusion.mlp_residual): residual + the output, added by down_proj's GEMV
    at decode sizes (QuantLinear.forward), by torch at prefill sizes."""
    gate, up, down = mlp.gate_proj, mlp.up_proj, mlp.down_proj
    kg, ku, kd = gate.kernel, up.kernel, down.kernel
    m = x.numel() // x.shape[-1]
    if torch.compiler.is_compiling() or x.dtype != torch.bfloat16 or None in (kg, ku, kd):
        return down(mlp.act_fn(gate(x)) * up(x), residual=residual)
    if m <= GEMV_MAX_M or kg.path(m) != "bfloat16":                     # decode: SiLU * up as one kernel
        g, u = gate(x), up(x)                                            # views of the stacked GEMV's output
        return down(kd.run.silu_mul(g.reshape(m, -1), u.reshape(m, -1)).reshape(g.shape), residual=residual)
    ops = kd.run
    _, _, (_, xq, _, xgs) = kg.operand(gate, x)                          # shared with up_proj
    group, inter = kg.group, gate.out_features
    if group is not None and group is ku.group and group.layers == [gate, up] and inter % 8 == 0:
        gu = ops.prefill_unscaled(xq, group.weight[0], group.weight[1], kg.s)   # (M, 2I) bf16, no tensor scales
        graw, uraw = gu[:, :inter], gu[:, inter:]
    else:
        graw = ops.prefill_unscaled(xq, kg.weight[0], kg.weight[1], kg.s)   # (M, I)
        uraw = ops.prefill_unscaled(xq, ku.weight[0], ku.weight[1], ku.s)
    gs = None if down.act_scale == "token" else down.input_global_scale
    hq, hs, hgs = ops.silu_mul_quantize_act(graw, uraw, xgs, wgu, kd.perm, kd.starts, kd.s, gs, "bfloat16")
    y = kd.product("bfloat16", m, hq, hs, hgs, kd.weight, kd.bias32, down.out_features, down.k_padded, torch.bfloat16,
                   kd.bias16)
    y = y.reshape(*x.shape[:-1], down.out_features)
    return y if residual is None else residual + y


def _gate_up_scales(gate: QuantLinear, up: QuantLinear) -> torch.Tensor:
    """(2,) fp32: gate's and up's weight tensor scales, as silu_mul_quantize_act takes them."""
    return torch.cat([gate.weight_global_scale.float().reshape(1), up.weight_global_scale.float().reshape(1)])


def _mlp_fusable(mlp) -> str | None:
    """Why mlp's prefill cannot run fused_mlp_forward (None: it can)."""
    from .kernels.cuda_act import SILU_MAX_K
    if type(mlp).__name__ not in GATED_MLPS or type(getattr(mlp, "act_fn", None)).__name__ not in SILU:
        return f"{type(mlp).__name__} is not a SiLU-gated MLP of a known family"
    gate, up, down = mlp.gate_proj, mlp.up_proj, mlp.down_proj
    if not all(isinstance(q, QuantLinear) and q.kernel is not None for q in (gate, up, down)):
        return "a projection is not on the kernel path"
    if down.kernel.cuda_reason is not None:
        return f"the fused kernel is CUDA: {down.kernel.cuda_reason}"
    if gate.shared is None or gate.shared is not up.shared or gate.kernel.pad or up.kernel.pad:
        return "gate_proj and up_proj do not share one unpadded quantized input"
    if gate.bias is not None or up.bias is not None:
        return "gate_proj / up_proj carry a bias"
    if down.kernel.starts is None or down.kernel.pad or down.in_features > SILU_MAX_K:
        return f"down_proj: no whole-block order, a padded input or K > {SILU_MAX_K}"
    if down.act_scale not in ("token", "static"):
        return f"down_proj's activation scale {down.act_scale!r} needs the whole batch's amax"
    return None


def fuse_mlps(model, enable: bool = True) -> dict:
    """Give each SiLU-gated MLP whose three projections run the CUDA kernels fused_mlp_forward for
    its prefill (an instance attribute: state dict unchanged; enable=False: removed).
    -> {"fused": n, "reasons": {reason: count}}."""
    counts = {"fused": 0, "reasons": {}}
    for mlp in model.modules():
        if not isinstance(getattr(mlp, "down_proj", None), QuantLinear):
            continue
        if "forward" in vars(mlp) and getattr(mlp.forward, "func", None) is fused_mlp_forward:
            del mlp.forward
        if not enable:
            continue
        reason = _mlp_fusable(mlp)
        if reason is None:
            mlp.forward = functools.partial(fused_mlp_forward, mlp, wgu=_gate_up_scales(mlp.gate_proj, mlp.up_proj))
            counts["fused"] += 1
        else:
            counts["reasons"][reason] = counts["reasons"].get(reason, 0) + 1
    return counts


def _fusable(q, group: list) -> str | None:
    """Why the norm in front of q's group cannot be fused (None: it can)."""
    from .kernels.cuda_act import NORM_MAX_K
    if q.shared is None or any(m.kernel is None or m.kernel.cuda_reason is not None for m in group):
        return "a layer of the group is not on the CUDA kernels"
    if q.kernel.starts is None or q.kernel.pad or q.in_features > NORM_MAX_K:
        return "no whole-block order, padded input or K > %d" % NORM_MAX_K
    if q.act_scale not in ("token", "static"):
        return f"activation scale {q.act_scale!r} needs the whole batch's amax"
    return None


def shared_groups(model) -> dict:
    """{id(SharedInput): [the QuantLinears reading it, in module order]}."""
    groups = {}
    for mod in model.modules():
        if isinstance(mod, QuantLinear) and mod.shared is not None:
            groups.setdefault(id(mod.shared), []).append(mod)
    return groups


def fuse_norms(model, enable: bool = True) -> dict:
    """Swap each decoder layer's RMSNorm in front of a kernel-path q/k/v or gate/up group for a
    FusedNormQuant (enable=False: back). -> {"fused": n, "reasons": {reason: count}}."""
    groups = shared_groups(model)
    counts = {"fused": 0, "reasons": {}}
    for layer in model.modules():
        for name, (parent, child) in NORM_CONSUMERS.items():
            norm, q = getattr(layer, name, None), getattr(getattr(layer, parent, None), child, None)
            if isinstance(norm, FusedNormQuant):
                norm = norm.norm
                setattr(layer, name, norm)
            if norm is None or not isinstance(q, QuantLinear) or not enable:
                continue
            reason = _fusable(q, groups.get(id(q.shared), [q])) if type(norm).__name__ in NORMS else \
                f"{type(norm).__name__} is not a Llama-style RMSNorm"
            if reason is None:                                         # implies a CUDA kernel path
                setattr(layer, name, FusedNormQuant(norm, q))
                counts["fused"] += 1
            else:
                counts["reasons"][reason] = counts["reasons"].get(reason, 0) + 1
    return counts


def _stackable(group: list) -> str | None:
    """Why a SharedInput group cannot run as one stacked GEMV (None: it can)."""
    q0 = group[0]
    if len(group) < 2 or any(q.kernel is None or q.kernel.cuda_reason is not None for q in group):
        return "a layer of the group is not on the CUDA GEMVs"
    if q0.k_padded % 32:
        return f"K = {q0.k_padded} is not a multiple of 32 (row views would lose 16-byte alignment)"
    if any(q.s != q0.s or q.k_padded != q0.k_padded or q.act_scale != q0.act_scale
           or not torch.equal(q.perm, q0.perm) for q in group[1:]):
        return "the layers' plans or activation scales differ"
    return None


def stack_groups(model, enable: bool = True) -> dict:
    """Give each q/k/v and gate/up group on the CUDA GEMVs one stacked weight (StackedGroup):
    one decode launch per group instead of one per layer. enable=False: back to per-layer
    storage. -> {"stacked": n, "reasons": {reason: count}}."""
    groups = shared_groups(model)
    counts = {"stacked": 0, "reasons": {}}
    for group in groups.values():
        old = next((q.kernel.group for q in group if q.kernel is not None and q.kernel.group is not None), None)
        if old is not None:
            old.unstack()
        reason = _stackable(group) if enable else "disabled"
        if reason is None:
            stacked = StackedGroup(group)
            for q in group:
                q.kernel.group = stacked
            counts["stacked"] += 1
        elif enable:
            counts["reasons"][reason] = counts["reasons"].get(reason, 0) + 1
    return counts


def use_kernels(model, enable: bool = True) -> dict:
    """Switch every QuantLinear the kernels can run to them (enable=False: back to the reference).
    -> {"kernels": n, "reference": n, "reasons": {reason: count}}; the split is logged."""
    counts = {"kernels": 0, "reference": 0, "reasons": {}, "cuda_gemv": 0}
    slow = set()                                                      # why some kernel layers lack the CUDA GEMVs
    stack_groups(model, enable=False)                                 # per-layer storage before rebuilding
    for mod in model.modules():
        if not isinstance(mod, QuantLinear):
            continue
        reason = kernel_reason(mod) if enable else "reference backend requested"
        mod.kernel = KernelPath(mod) if reason is None else None
        if reason is None:
            counts["kernels"] += 1
            if mod.kernel.cuda_reason is None:
                counts["cuda_gemv"] += 1
            else:
                slow.add(mod.kernel.cuda_reason)
        else:
            counts["reference"] += 1
            counts["reasons"][reason] = counts["reasons"].get(reason, 0) + 1
    norms = fuse_norms(model, enable and counts["cuda_gemv"] > 0)
    counts["fused_norms"] = norms["fused"]
    stacks = stack_groups(model, enable and counts["cuda_gemv"] > 0)
    counts["stacked_groups"] = stacks["stacked"]
    mlps = fuse_mlps(model, enable and counts["cuda_gemv"] > 0)
    counts["fused_mlps"] = mlps["fused"]
    counts["pdl"] = pdl.describe(next((p.device for p in model.parameters()), torch.device("cpu")))
    log.info("arcquant backend: kernels for %d layers (decode GEMV in CUDA for %d%s), reference for %d %s; "
             "RMSNorm fused with the activation kernel for %d groups %s; %d groups stacked into one GEMV %s; "
             "prefill SiLU*up fused with down_proj's activation kernel in %d MLPs %s; %s",
             counts["kernels"], counts["cuda_gemv"], f"; Triton for the rest: {sorted(slow)}" if slow else "",
             counts["reference"], counts["reasons"] or "", norms["fused"], norms["reasons"] or "",
             stacks["stacked"], stacks["reasons"] or "", mlps["fused"], mlps["reasons"] or "", counts["pdl"])
    return counts

