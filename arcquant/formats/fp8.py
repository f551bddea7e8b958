"""FP8 E4M3 with one float32 scale per row (per token): the activation side of W4A8.

scale = amax_row / 448; q = e4m3(x / scale) (round-to-nearest-even); dequant = q * scale.
An all-zero row gets scale 1.
"""
import torch

from .e2m1 import div_const

E4M3_MAX = 448.0


def quantize_per_row(x: torch.Tensor):
    """x (..., K) -> q (..., K) float8_e4m3fn, scale (..., 1) float32."""
    xf = x.to(torch.float32)
    amax = xf.abs().amax(dim=-1, keepdim=True)
    scale = torch.where(amax > 0, div_const(amax, E4M3_MAX), torch.ones_like(amax))
    return (xf / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn), scale


def fake_quantize_per_row(x: torch.Tensor) -> torch.Tensor:
    q, scale = quantize_per_row(x)
    return q.to(torch.float32) * scale


def fake_quantize_blocks(x: torch.Tensor, block: int = 32) -> torch.Tensor:
    """MXFP8-style reference: E4M3 elements, power-of-two scale per `block` along K
    (scale = 2^ceil(log2(amax_b / 448))). Used only as an error yardstick."""
    xb = x.to(torch.float32).unflatten(-1, (-1, block))
    v = div_const(xb.abs().amax(dim=-1, keepdim=True), E4M3_MAX)
    mant, exp = torch.frexp(v)
    e = torch.where(mant == 0.5, exp - 1, exp).clamp(-127, 127).to(torch.float32)
    q = torch.ldexp(xb, -e).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).to(torch.float32)
    return torch.ldexp(q, e).flatten(-2)
