"""NVFP4: E2M1 elements, one E4M3 block scale per 16 elements along the last axis (K),
and a float32 tensor ("global") scale.

Internal convention (the compressed-tensors / vLLM one):
    global_scale = 448 * 6 / amax(|x|)
    dequant      = code_value * block_scale / global_scale
ModelOpt / TensorRT-LLM store the reciprocal (weight_scale_2 = 1 / global_scale); the
exporters convert.

Quantizing a block b (the hardware recipe; kernels reproduce it bit for bit):
    s_b   = e4m3(min(amax_b / 6 * global_scale, 448))      round-to-nearest-even
    codes = e2m1(x * (global_scale / s_b))                  0 where s_b == 0
The global scale may be a scalar tensor (per-tensor) or shaped (..., 1) (one per row,
e.g. per token).
"""
import torch

from .e2m1 import (E2M1_MAX, check_finite, check_last_axis, div_const, e2m1_decode, e2m1_round, pack_nibbles,
                   unpack_nibbles)

BLOCK = 16
E4M3_MAX = 448.0
# Smallest amax we scale from: keeps 448*6/amax finite in float32. Below it the tensor is
# treated as if its amax were this value (its blocks then round to 0 or tiny codes).
_AMAX_FLOOR = 1e-30


def global_scale_from_amax(amax: torch.Tensor) -> torch.Tensor:
    """amax(|x|) -> float32 global scale 448*6/amax (a zero amax gives a finite scale)."""
    amax = amax.to(torch.float32).clamp(min=_AMAX_FLOOR)
    return torch.full_like(amax, E4M3_MAX * E2M1_MAX) / amax


def to_e4m3(x: torch.Tensor) -> torch.Tensor:
    """Non-negative float32 -> float8_e4m3fn, round-to-nearest-even, saturating at 448."""
    return x.clamp(max=E4M3_MAX).to(torch.float8_e4m3fn)


def quantize(x: torch.Tensor, global_scale: torch.Tensor):
    """x (..., K) float -> codes (..., K) uint8 0..15, scales (..., K/16) float8_e4m3fn."""
    check_last_axis(x, BLOCK)
    gs = torch.as_tensor(global_scale, dtype=torch.float32, device=x.device)
    xb = x.to(torch.float32).unflatten(-1, (-1, BLOCK))               # (..., K/16, 16)
    gsb = gs.unsqueeze(-1) if gs.dim() else gs                         # broadcast per block
    amax_b = xb.abs().amax(dim=-1, keepdim=True)                       # (..., K/16, 1)
    scale = to_e4m3(div_const(amax_b, E2M1_MAX) * gsb)                           # (..., K/16, 1) e4m3
    sf = scale.to(torch.float32)
    recip = torch.where(sf > 0, gsb / sf, torch.zeros_like(sf))       # one division per block
    codes = e2m1_round(xb * recip)                                     # (..., K/16, 16)
    return codes.flatten(-2), scale.squeeze(-1)


def dequantize(codes: torch.Tensor, scales: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """codes (..., K) uint8, scales (..., K/16) e4m3 -> float32 (..., K)."""
    gs = torch.as_tensor(global_scale, dtype=torch.float32, device=codes.device)
    vals = e2m1_decode(codes).unflatten(-1, (-1, BLOCK))               # (..., K/16, 16)
    gsb = gs.unsqueeze(-1) if gs.dim() else gs
    out = vals * scales.to(torch.float32).unsqueeze(-1) / gsb          # code*s exact, one rounding
    return out.flatten(-2)


def fake_quantize(x: torch.Tensor, global_scale=None) -> torch.Tensor:
    """Round x to the NVFP4 grid along its last axis; float32, same shape.

    global_scale: compressed-tensors convention 448*6/amax; computed from x when None.
    """
    check_finite(x, "the NVFP4 input")
    if global_scale is None:
        global_scale = global_scale_from_amax(x.abs().amax())
    codes, scales = quantize(x, global_scale)
    return dequantize(codes, scales, global_scale)


pack = pack_nibbles
unpack = unpack_nibbles
