"""The kernels as torch custom ops (torch.library), so torch.compile traces each as one node
and CUDA graphs capture them, with a backend choice per device.

    torch.ops.arcquant.quantize_act(x, perm, starts, s, gs, out) -> (xq, scales, gs)
    torch.ops.arcquant.rmsnorm_quantize_act(x, weight, eps, perm, starts, s, gs, out) -> (y, xq, scales, gs)
    torch.ops.arcquant.silu_mul_quantize_act(g, u, xgs, wgu, perm, starts, s, gs, out) -> (xq, scales, gs)
    torch.ops.arcquant.silu_mul(g, u) -> F.silu(g) * u, contiguous (M, K)
    torch.ops.arcquant.gemv_int8(xi, xs, xgs, wc, ws, wgs, bias, s, nr, kw, out_dtype, u=1, residual=None)
    torch.ops.arcquant.gemm_mma(xd, xgs, wc, ws, wgs, bias, s, kw, occ, out_dtype, st=0, xs=False, residual=None)
        (xd: "mma"; residual (M, N) of out_dtype: added to the rounded product in the epilogue)
    torch.ops.arcquant.gemv_triton(xd, xgs, wc, ws, wgs, bias, s, fma, block_n, block_k, split_k, out_dtype)
    torch.ops.arcquant.prefill(xd, xgs, wc, ws, wgs, bias, s, out_dtype)
    torch.ops.arcquant.prefill_unscaled(xd, wc, ws, s) -> xd @ dequant(W)^T, no tensor scales

Outside torch.compile the callers (gpu.KernelPath) call the same Python bodies directly, from
EAGER: the dispatcher's per-call work (~10 - 100 us of host time an op, more than some kernels
take) is then not paid on the eager path, where a prefill's host time is the bottleneck
(scripts/host_prefill.py). Under torch.compile, OPS (one graph node each).

Backends: "kernels" (Triton / CUDA) on CUDA tensors; on CPU tensors "reference" (the
pure-torch oracles: arc.quantize_activation, float64 products) unless the backend is set to
"triton", which runs the Triton kernels through the interpreter (tests). set_backend logs the
choice. Every op has a fake (meta) implementation giving output shapes and dtypes only.
Shapes and dtypes are checked by the kernel wrappers they call (clear messages). E4M3 scales
cross the op boundary as their uint8 bits (ws.view(torch.uint8)).
"""
import logging
from contextlib import contextmanager
from types import SimpleNamespace

import torch
from torch import Tensor
from torch.library import custom_op

log = logging.getLogger("arcquant")
BACKENDS = ("auto", "reference", "triton")
_state = {"cpu": "auto"}


def set_backend(name: str) -> None:
    """How ops run on CPU tensors: auto/reference (the oracles) or triton (the interpreter)."""
    if name not in BACKENDS:
        raise ValueError(f"backend {name!r}; valid: {', '.join(BACKENDS)}")
    _state["cpu"] = name
    log.info("arcquant ops backend on CPU tensors: %s", "triton (interpreter)" if name == "triton" else "reference")


@contextmanager
def backend(name: str):
    old = _state["cpu"]
    set_backend(name)
    try:
        yield
    finally:
        _state["cpu"] = old


def _reference(x: Tensor) -> bool:
    return x.device.type == "cpu" and _state["cpu"] != "triton"


def runs_kernels(x: Tensor) -> bool:
    """Whether the kernels (not the oracles) take this tensor: CUDA, or CPU with backend "triton"."""
    return not _reference(x)


XQ_DTYPES = {"int8": torch.int8, "mma": torch.float16, "bfloat16": torch.bfloat16}   # quantize_act's `out`


# ---- activation quantization ---------------------------------------------------------------
def _quantize_act(x: Tensor, perm: Tensor, starts: Tensor | None, s: int, gs: Tensor | None,
                 out: str) -> tuple[Tensor, Tensor, Tensor]:
    """x (M, K) -> xq (M, K+s) (int8: 2 * E2M1 value; bfloat16: code * block scale; mma: the same in
    float16, each 8 columns in the tensor-core GEMV's order, cuda_gemv.to_mma_order),
    scales (M, (K+s)/16) E4M3 bits as uint8 (int8) or (0, 0), gs (M,) or as given."""
    if _reference(x):
        return _quantize_act_reference(x, perm, s, gs, out)
    from .act_quant import arc_quantize_activation_gemv
    xq, scales, g = arc_quantize_activation_gemv(x, perm, s, gs, starts, out)
    return _act_outputs(x, xq, scales, g, gs)


def _act_outputs(x: Tensor, xq: Tensor, scales: Tensor | None, g: Tensor, gs: Tensor | None) -> tuple:
    """A kernel's activation outputs as the ops return them: E4M3 scales as their bits (or an
    empty (0, 0)), the tensor scale cloned when it was given (an op's output may not alias its input)."""
    g = g if gs is None else g.clone()
    return xq, (scales.view(torch.uint8) if scales is not None else x.new_empty(0, 0, dtype=torch.uint8)), g


quantize_act = custom_op("arcquant::quantize_act", _quantize_act, mutates_args=())


@quantize_act.register_fake
def _(x, perm, starts, s, gs, out):
    return _quantize_act_fake(x, s, gs, out)


def _quantize_act_fake(x, s, gs, out):
    m, k = x.shape
    xq = x.new_empty(m, k + s, dtype=XQ_DTYPES[out])
    scales = x.new_empty(m if out == "int8" else 0, (k + s) // 16 if out == "int8" else 0, dtype=torch.uint8)
    return xq, scales, x.new_empty(m if gs is None else gs.numel(), dtype=torch.float32)


def _quantize_act_reference(x, perm, s, gs, out):
    from .. import arc
    from ..formats import e2m1, get_format
    fmt = get_format("nvfp4")
    xf, k = x.float(), x.shape[1]
    g = fmt.global_scale(xf.abs().amax(-1)) if gs is None else gs.float().reshape(-1).clone()
    plan = arc.ArcPlan(perm.long(), perm.long()[k - s:])
    codes, scales = arc.quantize_activation(xf, plan, fmt, g.reshape(-1, 1) if g.numel() > 1 else g.reshape(()))
    if out == "int8":
        return (2 * e2m1.e2m1_decode(codes)).to(torch.int8), scales.view(torch.uint8), g
    xq = fmt.dequantize(codes, scales, torch.tensor(1.0)).to(XQ_DTYPES[out])      # code * block scale
    if out == "mma":
        from .cuda_gemv import to_mma_order
        xq = to_mma_order(xq)
    return xq, x.new_empty(0, 0, dtype=torch.uint8), g


def _rmsnorm_quantize_act(x: Tensor, weight: Tensor, eps: float, perm: Tensor, starts: Tensor | None, s: int,
                         gs: Tensor | None, out: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """RMSNorm then quantize_act: x (M, K) -> (y (M, K) normalized, xq, scales, gs) - the CUDA
    kernel on CUDA tensors (cuda_act.arc_rmsnorm_act_cuda), the reference on CPU."""
    from .cuda_act import arc_rmsnorm_act_cuda
    from .rmsnorm import rmsnorm_reference
    if x.device.type == "cpu":
        y = rmsnorm_reference(x, weight, eps)
        return (y,) + tuple(_quantize_act_reference(y, perm, s, gs, out))
    if out not in XQ_DTYPES:                                      # the op's outputs; "packed" is not one
        raise ValueError(f"out={out!r}: use one of {', '.join(XQ_DTYPES)}")
    y, xq, scales, g = arc_rmsnorm_act_cuda(x, weight, eps, starts, s, gs, out)
    return (y,) + _act_outputs(x, xq, scales, g, gs)


rmsnorm_quantize_act = custom_op("arcquant::rmsnorm_quantize_act", _rmsnorm_quantize_act, mutates_args=())


@rmsnorm_quantize_act.register_fake
def _(x, weight, eps, perm, starts, s, gs, out):
    return (torch.empty_like(x),) + _quantize_act_fake(x, s, gs, out)


def _silu_mul_quantize_act(g: Tensor, u: Tensor, xgs: Tensor | None, wgu: Tensor | None, perm: Tensor,
                           starts: Tensor | None, s: int, gs: Tensor | None, out: str) -> tuple[Tensor, Tensor, Tensor]:
    """quantize_act of F.silu(g') * u' (the input of down_proj), g' = T(g / (xgs[m] * wgu[0])),
    u' = T(u / (xgs[m] * wgu[1])) as prefill.scale_rows forms them when xgs is given (prefill_unscaled
    outputs: xgs the activation tensor scales, wgu gate's and up's weight tensor scales), else g, u -
    one CUDA kernel on CUDA tensors (cuda_act.arc_silu_mul_act_cuda; g and u may be the two halves
    of one stacked product), the reference on CPU."""
    from .cuda_act import arc_silu_mul_act_cuda, silu_mul_reference
    if g.device.type == "cpu":
        return _quantize_act_reference(silu_mul_reference(g, u, xgs, wgu), perm, s, gs, out)
    if out not in XQ_DTYPES:
        raise ValueError(f"out={out!r}: use one of {', '.join(XQ_DTYPES)}")
    xq, scales, gg = arc_silu_mul_act_cuda(g, u, starts, s, gs, out, xgs, wgu)
    return _act_outputs(g, xq, scales, gg, gs)


silu_mul_quantize_act = custom_op("arcquant::silu_mul_quantize_act", _silu_mul_quantize_act, mutates_args=())


@silu_mul_quantize_act.register_fake
def _(g, u, xgs, wgu, perm, starts, s, gs, out):
    return _quantize_act_fake(g, s, gs, out)


def _silu_mul(g: Tensor, u: Tensor) -> Tensor:
    """F.silu(g) * u (the decode MLP's input of down_proj): one CUDA kernel where it takes g and u
    (cuda_act.arc_silu_mul_cuda: the halves of a stacked product without torch's strided path), else
    torch's two ops - the same bits."""
    from .cuda_act import arc_silu_mul_cuda, silu_mul_reference, silu_mul_rows_ok
    if silu_mul_rows_ok(g, u) and runs_kernels(g):
        return arc_silu_mul_cuda(g, u)
    return silu_mul_reference(g, u)


silu_mul = custom_op("arcquant::silu_mul", _silu_mul, mutates_args=())


@silu_mul.register_fake
def _(g, u):
    return torch.empty(g.shape, dtype=g.dtype, device=g.device)


# ---- products ------------------------------------------------------------------------------
def _e4m3(bits: Tensor | None) -> Tensor | None:
    return None if bits is None else bits.view(torch.float8_e4m3fn)


def _product_reference(xq, xs, xgs, wc, ws, wgs, bias, s, out_dtype, mma_order=False, residual=None):
    from .cuda_gemv import fp16_gemm_reference, int8_gemv_reference
    xs, ws = _e4m3(xs), _e4m3(ws)
    y = int8_gemv_reference(xq, xs, xgs, wc, ws, wgs, s, bias) if xq.dtype == torch.int8 else \
        fp16_gemm_reference(xq, xgs, wc, ws, wgs, s, bias, mma_order)
    y = y.to(out_dtype)
    return y if residual is None else residual + y


def _out_fake(x: Tensor, wc: Tensor, out_dtype: torch.dtype) -> Tensor:
    return x.new_empty(x.shape[0], wc.shape[0], dtype=out_dtype)


def _gemv_int8(xi: Tensor, xs: Tensor, xgs: Tensor, wc: Tensor, ws: Tensor, wgs: Tensor, bias: Tensor | None,
               s: int, nr: int, kw: int, out_dtype: torch.dtype, u: int = 1, residual: Tensor | None = None) -> Tensor:
    if xi.device.type == "cpu":                                   # no CUDA kernel on CPU: the oracle
        return _product_reference(xi, xs, xgs, wc, ws, wgs, bias, s, out_dtype, residual=residual)
    from .cuda_gemv import arc_gemv_int8
    return arc_gemv_int8(xi, _e4m3(xs), xgs, wc, _e4m3(ws), wgs, s, bias, out_dtype, nr, kw, u, residual)


gemv_int8 = custom_op("arcquant::gemv_int8", _gemv_int8, mutates_args=())


@gemv_int8.register_fake
def _(xi, xs, xgs, wc, ws, wgs, bias, s, nr, kw, out_dtype, u=1, residual=None):
    return _out_fake(xi, wc, out_dtype)


def _gemm_mma(xd: Tensor, xgs: Tensor, wc: Tensor, ws: Tensor, wgs: Tensor, bias: Tensor | None, s: int, kw: int,
              occ: bool, out_dtype: torch.dtype, st: int = 0, xs: bool = False,
              residual: Tensor | None = None) -> Tensor:
    if xd.device.type == "cpu":                                  # xd: the "mma" operand
        return _product_reference(xd, None, xgs, wc, ws, wgs, bias, s, out_dtype, mma_order=True, residual=residual)
    from .cuda_gemv import arc_gemm_mma
    return arc_gemm_mma(xd, xgs, wc, _e4m3(ws), wgs, s, bias, out_dtype, kw, occ, st, xs, residual)


gemm_mma = custom_op("arcquant::gemm_mma", _gemm_mma, mutates_args=())


@gemm_mma.register_fake
def _(xd, xgs, wc, ws, wgs, bias, s, kw, occ, out_dtype, st=0, xs=False, residual=None):
    return _out_fake(xd, wc, out_dtype)


def _gemv_triton(xd: Tensor, xgs: Tensor, wc: Tensor, ws: Tensor, wgs: Tensor, bias: Tensor | None, s: int,
                fma: bool, block_n: int, block_k: int, split_k: int, out_dtype: torch.dtype) -> Tensor:
    if _reference(xd):
        return _product_reference(xd, None, xgs, wc, ws, wgs, bias, s, out_dtype)
    from .decode import arc_gemv
    return arc_gemv(xd, xgs, wc, _e4m3(ws), wgs, s, bias, out_dtype=out_dtype, block_n=block_n, block_k=block_k,
                    split_k=split_k, fma=fma)


gemv_triton = custom_op("arcquant::gemv_triton", _gemv_triton, mutates_args=())


@gemv_triton.register_fake
def _(xd, xgs, wc, ws, wgs, bias, s, fma, block_n, block_k, split_k, out_dtype):
    return _out_fake(xd, wc, out_dtype)


def _prefill(xd: Tensor, xgs: Tensor, wc: Tensor, ws: Tensor, wgs: Tensor, bias: Tensor | None, s: int,
            out_dtype: torch.dtype) -> Tensor:
    if _reference(xd):
        return _product_reference(xd, None, xgs, wc, ws, wgs, bias, s, out_dtype)
    from .prefill import arc_matmul_prefill
    return arc_matmul_prefill(xd, xgs, wc, _e4m3(ws), wgs, s, bias, out_dtype=out_dtype)


prefill = custom_op("arcquant::prefill", _prefill, mutates_args=())


@prefill.register_fake
def _(xd, xgs, wc, ws, wgs, bias, s, out_dtype):
    return _out_fake(xd, wc, out_dtype)


def _prefill_unscaled(xd: Tensor, wc: Tensor, ws: Tensor, s: int) -> Tensor:
    """xd (M, K+s) (code * block scale) x the augmented weight's code * block scale -> (M, N) in
    xd's dtype, without the tensor scales (the consumer applies them: silu_mul_quantize_act)."""
    if _reference(xd):
        one = torch.ones((), dtype=torch.float32)
        return _product_reference(xd, None, one, wc, ws, one, None, s, xd.dtype)
    from .prefill import matmul_unscaled
    return matmul_unscaled(xd, wc, _e4m3(ws), s)


prefill_unscaled = custom_op("arcquant::prefill_unscaled", _prefill_unscaled, mutates_args=())


@prefill_unscaled.register_fake
def _(xd, wc, ws, s):
    return _out_fake(xd, wc, xd.dtype)


OPS = torch.ops.arcquant                                           # the namespace, once registered
EAGER = SimpleNamespace(quantize_act=_quantize_act, rmsnorm_quantize_act=_rmsnorm_quantize_act,
                        silu_mul_quantize_act=_silu_mul_quantize_act, silu_mul=_silu_mul, gemv_int8=_gemv_int8,
                        gemm_mma=_gemm_mma, gemv_triton=_gemv_triton, prefill=_prefill,
                        prefill_unscaled=_prefill_unscaled)


def current(eager=EAGER):
    """The ops to call now: OPS while torch.compile traces (one node each), else `eager`."""
    return OPS if torch.compiler.is_compiling() else eager
