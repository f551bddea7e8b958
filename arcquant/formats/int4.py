"""INT4: symmetric, one float32 scale per group of 128 along the last axis.

scale = amax_g / 7; code = clamp(round_half_even(x / scale), -7, 7); an all-zero group has
scale 0 and codes 0. Codes are stored as 4-bit two's complement nibbles (-7 -> 0b1001).
"""
import torch

from .e2m1 import check_finite, check_last_axis, div_const, pack_nibbles, unpack_nibbles

BLOCK = 128
QMAX = 7


def quantize(x: torch.Tensor, global_scale=None):
    """x (..., K) -> codes (..., K) uint8 nibbles, scales (..., K/128) float32."""
    check_last_axis(x, BLOCK, "group size")
    xb = x.to(torch.float32).unflatten(-1, (-1, BLOCK))                # (..., K/128, 128)
    scale = div_const(xb.abs().amax(dim=-1, keepdim=True), QMAX)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(xb / safe).clamp(-QMAX, QMAX).to(torch.int8)      # round half to even
    return (q.flatten(-2) & 0x0F).to(torch.uint8), scale.squeeze(-1)


def dequantize(codes: torch.Tensor, scales: torch.Tensor, global_scale=None) -> torch.Tensor:
    signed = codes.to(torch.int16)
    signed = torch.where(signed >= 8, signed - 16, signed).to(torch.float32)
    return (signed.unflatten(-1, (-1, BLOCK)) * scales.unsqueeze(-1)).flatten(-2)


def fake_quantize(x: torch.Tensor, global_scale=None) -> torch.Tensor:
    check_finite(x, "the INT4 input")
    codes, scales = quantize(x)
    return dequantize(codes, scales)


pack = pack_nibbles
unpack = unpack_nibbles
