"""Format semantics pinned by hand-checked values and slow, obviously-correct references."""
import math

import pytest
import torch

from arcquant.formats import fp8, get_format, int4, mxfp4, nvfp4
from arcquant.formats.e2m1 import E2M1_VALUES, e2m1_decode, e2m1_round, pack_nibbles, unpack_nibbles


# ---- slow references ---------------------------------------------------------------------
def slow_e2m1(v: float) -> int:
    """Nearest E2M1 magnitude, ties to the even code, saturating; sign bit from the sign."""
    a = min(abs(v), 6.0)
    best = min(range(8), key=lambda c: (abs(E2M1_VALUES[c] - a), c % 2))
    return best | (8 if math.copysign(1.0, v) < 0 else 0)


def e4m3_value(bits: int) -> float:
    e, m = (bits >> 3) & 0xF, bits & 0x7
    return (m / 8) * 2.0 ** -6 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7)


E4M3_POS = [e4m3_value(b) for b in range(0x7F)]  # 0x7F is NaN in e4m3fn


def slow_e4m3(v: float) -> float:
    """Non-negative float -> nearest E4M3 value, ties to even mantissa, saturating at 448."""
    v = min(v, 448.0)
    best = min(range(0x7F), key=lambda b: (abs(E4M3_POS[b] - v), b % 2))
    return E4M3_POS[best]


def slow_nvfp4_fake(x: torch.Tensor, gs: float) -> torch.Tensor:
    out = torch.empty_like(x, dtype=torch.float32)
    gs32 = torch.tensor(gs, dtype=torch.float32)
    for r in range(x.shape[0]):
        for b in range(0, x.shape[1], 16):
            blk = x[r, b:b + 16].float()
            amax = blk.abs().max()
            s = slow_e4m3((amax / 6 * gs32).item())
            s32 = torch.tensor(s, dtype=torch.float32)
            for i in range(16):
                if s == 0:
                    out[r, b + i] = 0.0
                    continue
                scaled = (blk[i] * (gs32 / s32)).item()
                code = slow_e2m1(scaled)
                val = E2M1_VALUES[code & 7] * (-1 if code & 8 else 1)
                out[r, b + i] = (torch.tensor(val * s, dtype=torch.float32) / gs32)
    return out


# ---- E2M1 -----------------------------------------------------------------------------------
@pytest.mark.parametrize("value,expected", [
    (0.0, 0.0), (0.25, 0.0), (0.26, 0.5), (0.75, 1.0), (1.25, 1.0), (1.75, 2.0), (2.5, 2.0),
    (3.5, 4.0), (5.0, 4.0), (5.01, 6.0), (6.0, 6.0), (7.0, 6.0), (1e9, 6.0), (0.5, 0.5),
    (-0.75, -1.0), (-5.0, -4.0), (-2.5, -2.0), (-100.0, -6.0),
])
def test_e2m1_ties_to_even_and_saturation(value, expected):
    code = e2m1_round(torch.tensor([value]))
    assert e2m1_decode(code).item() == expected


def test_e2m1_negative_zero_keeps_sign_bit():
    codes = e2m1_round(torch.tensor([-0.0, 0.0, -0.1, -0.25]))
    assert codes.tolist() == [8, 0, 8, 8]
    assert torch.signbit(e2m1_decode(codes)).tolist() == [True, False, True, True]


def test_e2m1_symmetric():
    x = torch.randn(4096) * 4
    assert torch.equal(e2m1_decode(e2m1_round(-x)), -e2m1_decode(e2m1_round(x)))


def test_e2m1_matches_slow_reference_on_random_and_grid_points():
    grid = torch.tensor([v + d for v in (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
                         for d in (-1e-6, 0.0, 1e-6)])
    x = torch.cat([torch.randn(3000) * 3, grid, -grid])
    fast = e2m1_round(x).tolist()
    assert fast == [slow_e2m1(v) for v in x.tolist()]


def test_e2m1_by_one_rounded_add_equals_the_thresholds():
    """The CUDA activation kernel's E2M1 rounding (csrc/arc_act.cu e2m1_mag / e2m1_code: |q| plus
    P = max(2^floor(log2 |q|), 1) * 1.5 * 2^22 rounded once to nearest-even, minus P, clamped at 6
    (fminf: a NaN sum, from |q| = inf, gives 6); the code from 2|v|'s exponent and top mantissa
    bit), written in torch float32, against e2m1_round on every tie, its float32 neighbours, a fine
    grid, random magnitudes over the whole float32 range (subnormals to overflow), saturation, -0."""
    g = torch.Generator().manual_seed(0)
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.0, 2.5, 3.5, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 1e30, 3e38,
                         float("inf"), 0.0, 1e-40])
    wide = torch.rand(200_000, generator=g) * 2.0 ** torch.randint(-149, 128, (200_000,), generator=g).float()
    a = torch.cat([ties, torch.linspace(0, 9, 200_001), wide])
    a = torch.cat([a, torch.nextafter(a, torch.full_like(a, float("inf"))), torch.nextafter(a, torch.zeros_like(a))])
    q = torch.cat([a, -a, torch.tensor([-0.0])])
    a = q.abs()
    big_p = torch.clamp_min((a.view(torch.int32) & 0x7F800000).view(torch.float32), 1.0) * 6291456.0   # exact
    r = (a + big_p) - big_p                                               # one RNE add; the subtraction is exact
    mag = torch.clamp_max(torch.nan_to_num(r, nan=6.0), 6.0)              # fminf(NaN, 6) = 6
    v2 = 2 * mag
    code = torch.where(v2 < 2, v2.to(torch.int32), (v2.view(torch.int32) >> 22) - 254)
    code = code | (torch.signbit(q).to(torch.int32) << 3)
    ref = e2m1_round(q)
    assert torch.equal(code, ref.to(torch.int32))
    assert torch.equal(torch.copysign(mag, q), e2m1_decode(ref))


def test_pack_unpack_roundtrip_and_nibble_order():
    codes = torch.randint(0, 16, (5, 64), dtype=torch.uint8)
    packed = pack_nibbles(codes)
    assert packed.shape == (5, 32) and packed.dtype == torch.uint8
    assert torch.equal(unpack_nibbles(packed), codes)
    assert pack_nibbles(torch.tensor([[0x3, 0xA]], dtype=torch.uint8)).item() == 0xA3
    with pytest.raises(ValueError, match="odd number"):
        pack_nibbles(torch.zeros(1, 3, dtype=torch.uint8))


# ---- E4M3 scale conversion ------------------------------------------------------------------
def test_e4m3_conversion_matches_slow_reference():
    vals = torch.cat([torch.rand(2000) * 500, torch.rand(500) * 2 ** -6, torch.tensor(
        [0.0, 2 ** -9, 2 ** -10, 3 * 2 ** -11, 448.0, 449.0, 464.0, 1e6, 240.0, 232.0])])
    fast = nvfp4.to_e4m3(vals).to(torch.float32).tolist()
    assert fast == [slow_e4m3(v) for v in vals.tolist()]


# ---- NVFP4 ----------------------------------------------------------------------------------
def test_nvfp4_matches_slow_reference_random():
    torch.manual_seed(0)
    x = torch.randn(7, 64) * torch.logspace(-3, 2, 64)  # wide dynamic range across blocks
    gs = nvfp4.global_scale_from_amax(x.abs().max())
    assert torch.equal(nvfp4.fake_quantize(x, gs), slow_nvfp4_fake(x, gs.item()))


def test_nvfp4_block_with_negative_largest_magnitude_does_not_clip():
    x = torch.tensor([[-6.0, 1.0] + [0.5] * 14])
    y = nvfp4.fake_quantize(x)
    assert y[0, 0].item() == -6.0  # a signed max (the reference code's bug) would clip this


def test_nvfp4_all_zero_block_and_zero_tensor():
    x = torch.zeros(2, 32)
    x[1, 16:] = torch.linspace(-3, 3, 16)
    codes, scales = nvfp4.quantize(x, nvfp4.global_scale_from_amax(x.abs().max()))
    assert scales.to(torch.float32)[:, 0].tolist() == [0.0, 0.0]
    assert torch.equal(nvfp4.fake_quantize(torch.zeros(3, 16)), torch.zeros(3, 16))


def test_nvfp4_saturation_at_6_and_448():
    x = torch.tensor([[6.0] + [0.0] * 15])
    codes, scales = nvfp4.quantize(x, nvfp4.global_scale_from_amax(torch.tensor(6.0)))
    assert scales.to(torch.float32).item() == 448.0 and codes[0, 0].item() == 7
    # a static global scale smaller than the data: the block scale saturates at 448 and
    # values saturate at 6 * 448 / gs
    gs = torch.tensor(448.0 * 6 / 10.0)
    y = nvfp4.dequantize(*nvfp4.quantize(torch.tensor([[100.0] + [0.0] * 15]), gs), gs)
    assert y[0, 0].item() == pytest.approx(10.0)


def test_nvfp4_subnormal_block_scales():
    # tensor amax 1000, a block with amax 0.01: scale = 0.01/6*2.688 = 0.00448 -> subnormal
    x = torch.zeros(1, 32)
    x[0, 0] = 1000.0
    x[0, 16] = 0.01
    gs = nvfp4.global_scale_from_amax(x.abs().max())
    _, scales = nvfp4.quantize(x, gs)
    s = scales.to(torch.float32)[0, 1].item()
    assert s == slow_e4m3(0.01 / 6 * gs.item()) and s < 2 ** -6  # subnormal E4M3
    assert torch.equal(nvfp4.fake_quantize(x, gs), slow_nvfp4_fake(x, gs.item()))


def test_nvfp4_per_row_global_scale_and_symmetry():
    x = torch.randn(5, 48) * torch.tensor([[1.0], [10], [0.1], [100], [3]])
    gs = nvfp4.global_scale_from_amax(x.abs().amax(-1, keepdim=True))  # (5, 1)
    y = nvfp4.fake_quantize(x, gs)
    for r in range(5):
        assert torch.equal(y[r:r + 1], nvfp4.fake_quantize(x[r:r + 1], gs[r]))
    assert torch.equal(nvfp4.fake_quantize(-x, gs), -y)


def test_nvfp4_pack_roundtrip_dequant_identical():
    x = torch.randn(6, 96)
    gs = nvfp4.global_scale_from_amax(x.abs().max())
    codes, scales = nvfp4.quantize(x, gs)
    again = nvfp4.dequantize(nvfp4.unpack(nvfp4.pack(codes)), scales, gs)
    assert torch.equal(again, nvfp4.fake_quantize(x, gs))


def test_nvfp4_bad_input():
    with pytest.raises(ValueError, match="multiple of the block size 16"):
        nvfp4.fake_quantize(torch.randn(2, 20))
    with pytest.raises(ValueError, match="NaN or Inf"):
        nvfp4.fake_quantize(torch.tensor([[float("nan")] * 16]))


def test_nvfp4_error_is_nvfp4_like():
    x = torch.randn(64, 256)
    err = (nvfp4.fake_quantize(x) - x).norm() / x.norm()
    assert 0.05 < err < 0.13  # ~ 0.09 for Gaussian data


# ---- MXFP4 / INT4 / FP8 ---------------------------------------------------------------------
def test_mxfp4_power_of_two_scale_exact_exponent():
    x = torch.zeros(3, 32)
    x[0, 0] = 6.0      # amax/6 = 1     -> exponent 0
    x[1, 0] = 6.0001   # just over      -> exponent 1
    x[2, 0] = 3.0      # amax/6 = 0.5   -> exponent -1
    _, scales = mxfp4.quantize(x)
    assert (scales.to(torch.int32) - 127).tolist() == [[0], [1], [-1]]


def test_mxfp4_refuses_magnitudes_that_overflow_its_grid():
    limit = torch.tensor(2.0 ** 127)
    x = torch.ones(2, 64)
    x[1, 40] = -torch.nextafter(limit, torch.tensor(0.0))     # the largest magnitude that still fits
    codes, scales = mxfp4.quantize(x)
    assert torch.isfinite(mxfp4.dequantize(codes, scales)).all()
    x[1, 41] = -limit
    with pytest.raises(ValueError, match=r"magnitudes >= 2\^127 \(1.7e\+38\)"):
        mxfp4.quantize(x)


def test_mxfp4_matches_slow_reference():
    x = torch.randn(4, 64) * 3
    y = mxfp4.fake_quantize(x)
    for r in range(4):
        for b in range(0, 64, 32):
            blk = x[r, b:b + 32]
            scale = 2.0 ** math.ceil(math.log2(blk.abs().max().item() / 6))
            ref = [E2M1_VALUES[slow_e2m1(v / scale) & 7] * (1 if v >= 0 else -1) * scale
                   for v in blk.tolist()]
            assert y[r, b:b + 32].tolist() == ref


def test_int4_symmetric_group_128():
    x = torch.randn(3, 256)
    codes, scales = int4.quantize(x)
    assert scales.shape == (3, 2)
    y = int4.dequantize(int4.unpack(int4.pack(codes)), scales)
    g = x.unflatten(-1, (2, 128))
    s = g.abs().amax(-1, keepdim=True) / 7
    ref = (torch.round(g / s).clamp(-7, 7) * s).flatten(-2)
    assert torch.equal(y, ref)
    assert torch.equal(int4.fake_quantize(torch.zeros(1, 128)), torch.zeros(1, 128))


def test_fp8_per_row():
    x = torch.randn(4, 64) * torch.tensor([[1.0], [1e-3], [1e3], [0.0]])
    y = fp8.fake_quantize_per_row(x)
    assert torch.equal(y[3], torch.zeros(64))
    assert ((y - x).norm() / x.norm()).item() < 0.04
    assert torch.equal(y.abs().amax(-1)[:3], x.abs().amax(-1)[:3])  # row max exact


def test_get_format_lists_valid_names():
    with pytest.raises(ValueError, match="nvfp4, mxfp4, int4"):
        get_format("fp3")
    assert get_format("nvfp4").bits_per_element == 4.5
