"""E2M1 (FP4) elements shared by NVFP4 and MXFP4, and 4-bit nibble packing.

Code layout (4 bits): bit 3 = sign, bits 0..2 = magnitude index into E2M1_VALUES.
Rounding is round-to-nearest with ties to the even code, saturating at +/-6:
0.25 -> 0, 0.75 -> 1, 1.25 -> 1, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4.
-0 (and a negative value that rounds to 0) keeps its sign bit: code 0b1000.
"""
import torch

E2M1_MAX = 6.0
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # magnitude of codes 0..7

# Decision points between neighbouring codes. Inclusive (>=) where the tie goes up to an
# even code (0.75 -> code 2, 1.75 -> 4, 3.5 -> 6), exclusive (>) where it stays on the even
# code below (0.25 -> 0, 1.25 -> 2, 2.5 -> 4, 5 -> 6).
_UP_INCLUSIVE = (0.75, 1.75, 3.5)
_UP_EXCLUSIVE = (0.25, 1.25, 2.5, 5.0)


_CONSTANTS: dict = {}


def _constant(values: tuple, device: torch.device) -> torch.Tensor:
    """float32 tensor of `values` on `device`, made once (no host-to-device copy per call)."""
    key = (values, str(device))
    if key not in _CONSTANTS:
        _CONSTANTS[key] = torch.tensor(values, dtype=torch.float32, device=device)
    return _CONSTANTS[key]


def e2m1_round(x: torch.Tensor) -> torch.Tensor:
    """Float tensor (already divided by its block scale) -> uint8 codes 0..15, same shape.
    magnitude code = #(points t <= |x|, inclusive) + #(points t < |x|, exclusive)."""
    a = x.abs().to(torch.float32)
    mag = (torch.bucketize(a, _constant(_UP_INCLUSIVE, x.device), right=True)        # t <= a
           + torch.bucketize(a, _constant(_UP_EXCLUSIVE, x.device), right=False))   # t < a
    return mag.to(torch.uint8) | (torch.signbit(x).to(torch.uint8) << 3)


def e2m1_decode(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes 0..15 -> float32 values, same shape (-0 for code 8)."""
    table = _constant(E2M1_VALUES + tuple(-v for v in E2M1_VALUES), codes.device)
    return table[codes.long()]


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """(..., K) uint8 codes 0..15 -> (..., K/2) uint8; element 2i low nibble, 2i+1 high."""
    if codes.shape[-1] % 2:
        raise ValueError(f"cannot pack an odd number of 4-bit codes ({codes.shape[-1]}); "
                         "pad the last axis to an even length first")
    c = codes.to(torch.uint8)
    return c[..., 0::2] | (c[..., 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """(..., K/2) uint8 -> (..., K) uint8 codes 0..15."""
    lo, hi = packed & 0x0F, packed >> 4
    return torch.stack((lo, hi), dim=-1).flatten(-2)


def div_const(t: torch.Tensor, c: float) -> torch.Tensor:
    """t / c as an IEEE division on every device. (PyTorch on CUDA turns division by a Python
    scalar into multiplication by its reciprocal, which rounds differently: the reference
    must not depend on the device.)"""
    return t / torch.full_like(t, c)


def check_finite(x: torch.Tensor, what: str) -> None:
    """ValueError naming `what` when x holds NaN or Inf (no 4-bit format represents them)."""
    if not torch.isfinite(x).all():
        raise ValueError(f"NaN or Inf in {what}; 4-bit formats cannot represent them (check the input)")


def check_last_axis(x: torch.Tensor, block: int, unit: str = "block size") -> None:
    """Refuse a last axis that is not a whole number of blocks, saying what to do."""
    if x.shape[-1] % block:
        raise ValueError(f"last axis {x.shape[-1]} is not a multiple of the {unit} {block}; "
                         "zero-pad it to a multiple (padding with zeros is exact)")
