"""RMSNorm (Triton) as transformers' Llama-family RMSNorm computes it, and its oracle.

    y = weight * (x.float() * rsqrt(mean(x.float()^2) + eps)).to(dtype)

x (M, N) rows (last dim contiguous), weight (N,) of x's dtype. One program per row, N <= MAX_N.
The eager module runs this as ~7 kernels (casts, square, mean, rsqrt, two products); the BF16
model in the engine then pays per norm what the quantized model's fused norm + quantize kernel
does not, so the engine gives both models this kernel (engine_fusion.py). Equal to the oracle
but for the order of the sum of squares: a normalized value may move by one ulp of the dtype.
"""
import torch
import triton
import triton.language as tl

from .fp4_jit import round_to
from .pdl import pdl_enter, triton_args
from .rope_cache import DTYPES

MAX_N = 16384


@triton.jit
def _rmsnorm_kernel(x, w, y, N, sx, sy, eps, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
    pdl_enter(PDL)                                                # kernels/pdl.py
    row = tl.program_id(0)
    i = tl.arange(0, BLOCK)
    m = i < N
    dt: tl.constexpr = y.dtype.element_ty
    v = tl.load(x + row * sx + i, mask=m, other=0.0).to(tl.float32)
    r = 1.0 / tl.sqrt_rn(tl.sum(v * v, axis=0) / N + eps)
    n = round_to(v * r, dt)
    out = round_to(tl.load(w + i, mask=m).to(tl.float32) * n, dt)
    tl.store(y + row * sy + i, out.to(dt), mask=m)


def rmsnorm_reason(x: torch.Tensor, weight: torch.Tensor) -> str | None:
    """Why the kernel cannot take this input (None: it can)."""
    if x.dtype not in DTYPES or weight.dtype != x.dtype:
        return f"input {x.dtype} with weight {weight.dtype} (the kernel takes one of {DTYPES} for both)"
    if x.shape[-1] > MAX_N or weight.shape != (x.shape[-1],):
        return f"rows of {x.shape[-1]} with weight {tuple(weight.shape)} (at most {MAX_N}, weight (N,))"
    if x.stride(-1) != 1 or weight.device != x.device:
        return "a strided last dimension or a weight on another device"
    return None


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x (..., N) -> the normalized, weighted rows, x's shape and dtype."""
    reason = rmsnorm_reason(x, weight)
    if reason is not None:
        raise ValueError(f"rmsnorm: {reason}")
    n = x.shape[-1]
    x2 = x.reshape(-1, n)                                              # (M, N), a view when rows are dense
    y = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    if x2.shape[0]:
        _rmsnorm_kernel[(x2.shape[0],)](x2, weight, y, n, x2.stride(0), y.stride(0), float(eps),
                                        BLOCK=triton.next_power_of_2(n), **triton_args(x.device, x2.shape[0]))
    return y.view(x.shape)


def rmsnorm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The oracle, in transformers' operation order (fp32 statistics, rounded to x's dtype, times
    weight); also the oracle of the CUDA RMSNorm + quantize kernel's y (cuda_act.py)."""
    v = x.float()
    return weight * (v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
