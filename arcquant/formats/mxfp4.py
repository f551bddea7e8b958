"""MXFP4 (OCP MX): E2M1 elements, one E8M0 (power-of-two) scale per 32 elements, no
tensor scale.

Scale choice (stated, as the OCP spec allows several): scale = 2^ceil(log2(amax_b / 6)),
so the block's largest magnitude never clips (the OCP spec's floor(log2(amax)) - 2 may clip
up to 1.5x). The exponent is computed exactly from the float32 bits of amax_b / 6 with
frexp. Stored as uint8 biased exponent (exponent + 127), range 2^-127 .. 2^127.
An all-zero block gets the smallest scale and zero codes.
"""
import torch

from .e2m1 import E2M1_MAX, check_finite, check_last_axis, div_const, e2m1_decode, e2m1_round, pack_nibbles, unpack_nibbles

BLOCK = 32
_BIAS = 127
LIMIT = 2.0 ** 127      # a block above this may round to 2^128, which float32 cannot hold


def quantize(x: torch.Tensor, global_scale=None):
    """x (..., K) -> codes (..., K) uint8, scales (..., K/32) uint8 biased exponents.
    global_scale is accepted for a uniform interface and ignored (MX has none)."""
    check_last_axis(x, BLOCK)
    xb = x.to(torch.float32).unflatten(-1, (-1, BLOCK))                # (..., K/32, 32)
    amax_b = xb.abs().amax(dim=-1, keepdim=True)                       # (..., K/32, 1)
    if bool((amax_b >= LIMIT).any()):
        raise ValueError(f"MXFP4 input has magnitudes >= 2^127 ({float(amax_b.max()):.3g}); rounded to the "
                         "MX grid they overflow float32 - scale the tensor down first")
    v = div_const(amax_b, E2M1_MAX)                                    # (..., K/32, 1)
    mant, exp = torch.frexp(v)                                         # v = mant * 2^exp
    e = torch.where(mant == 0.5, exp - 1, exp)                         # ceil(log2 v), exact
    e = torch.where(v > 0, e, torch.full_like(e, -_BIAS)).clamp(-_BIAS, _BIAS)
    codes = e2m1_round(torch.ldexp(xb, -e.to(torch.float32)))         # power-of-two: exact
    return codes.flatten(-2), (e + _BIAS).to(torch.uint8).squeeze(-1)


def dequantize(codes: torch.Tensor, scales: torch.Tensor, global_scale=None) -> torch.Tensor:
    vals = e2m1_decode(codes).unflatten(-1, (-1, BLOCK))
    e = scales.to(torch.float32).unsqueeze(-1) - _BIAS
    return torch.ldexp(vals, e).flatten(-2)


def fake_quantize(x: torch.Tensor, global_scale=None) -> torch.Tensor:
    check_finite(x, "the MXFP4 input")
    codes, scales = quantize(x)
    return dequantize(codes, scales)


pack = pack_nibbles
unpack = unpack_nibbles
