"""Triton device functions shared by the kernels: decoding E2M1 codes and E4M3 scale bits, the
augmented depth's tail mapping, and rounding fp32 to a 16-bit dtype."""
import triton
import triton.language as tl


@triton.jit
def e4m3_decode(bits):
    """uint8 E4M3 bits -> fp32 value (exact, subnormals included)."""
    b = bits.to(tl.int32)
    exp = (b >> 3) & 15
    man = (b & 7).to(tl.float32)
    p2 = ((exp - 10 + 127) << 23).to(tl.float32, bitcast=True)          # 2^(exp-10)
    return tl.where(exp == 0, man * 0.001953125, (man + 8.0) * p2)       # subnormal: man * 2^-9


@triton.jit
def e2m1_decode(code):
    """4-bit E2M1 code (sign bit 3) -> fp32 value."""
    mag = (code & 7).to(tl.int32)
    val = tl.where(mag < 4, mag.to(tl.float32) * 0.5,
                   tl.where(mag < 6, (mag - 2).to(tl.float32), tl.where(mag == 6, 4.0, 6.0)))
    return tl.where((code & 8) != 0, val * -1.0, val)              # not -val: Triton's minus is 0 - x (+0 for code 8)


@triton.jit
def tail_to_main(idx, WIDTH: tl.constexpr, K, S):
    """Index of a unit of WIDTH columns along the augmented depth K+s -> the unit it reads:
    the tail (columns K..K+s-1) repeats the main columns K-s..K-1, stored once."""
    return tl.where(idx * WIDTH >= K, idx - S // WIDTH, idx)


@triton.jit
def round_to(x, dt: tl.constexpr):
    """fp32 x rounded to dtype dt (nearest, ties to even), as an fp32. bf16 in integer ops: the
    interpreter's float -> bf16 convert truncates; the result then converts to bf16 exactly."""
    if dt == tl.bfloat16:
        b = x.to(tl.uint32, bitcast=True)
        b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
        return b.to(tl.float32, bitcast=True)
    else:
        return x.to(dt).to(tl.float32)
