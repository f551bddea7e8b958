"""Triton kernels against the pure-torch oracle, on the CPU through the Triton interpreter.

Activation quantization must be bit-exact (codes and scale bits); the GEMM computes the same
exact products as the reference and may differ only by fp32 summation order."""
import os
import re

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")   # before triton is imported: CPU interpreter
triton = pytest.importorskip("triton", reason="triton is a test dependency (pip install -e .[test])")

from arcquant import arc                                   # noqa: E402
from arcquant.formats import get_format, nvfp4            # noqa: E402
from arcquant.kernels.act_quant import arc_quantize_activation, block_starts  # noqa: E402
from arcquant.kernels.arc_gemm import arc_gemm            # noqa: E402
from arcquant.kernels.decode import arc_gemv              # noqa: E402
from arcquant.kernels.prefill import arc_matmul_prefill, dequantize_codes, scale_rows  # noqa: E402

F = get_format("nvfp4")


def make_case(m, k, s, order, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    # channel magnitudes over 6 decades: subnormal block scales and saturation both occur
    x = torch.randn(m, k, generator=g) * torch.logspace(-4, 2, k)[torch.randperm(k, generator=g)]
    x = x.to(dtype)
    st = arc.ChannelStats(k, 0.125, F)
    st.update(x.float())
    return x, arc.make_plan(st, k, s, order, 16)


def global_scale(x, mode):
    xf = x.float()
    return F.global_scale(xf.abs().amax(1, keepdim=True) if mode == "token" else xf.abs().amax())


@pytest.mark.parametrize("m,k,s,order,mode,dtype", [
    (3, 64, 16, "sorted", "token", torch.float32),
    (5, 128, 32, "blocks", "dynamic", torch.bfloat16),
    (1, 48, 0, "sorted", "token", torch.float32),
    (4, 160, 160, "blocks", "token", torch.float16),
    (7, 208, 48, "sorted", "dynamic", torch.float32),     # (K+s)/16 = 16: not a multiple of 8 blocks
])
def test_activation_kernel_bit_exact(m, k, s, order, mode, dtype):
    x, plan = make_case(m, k, s, order, seed=m * k + s, dtype=dtype)
    gs = global_scale(x, mode)
    ref_codes, ref_scales = arc.quantize_activation(x.float(), plan, F, gs)
    perm = plan.perm.to(torch.int32)
    starts = block_starts(perm)
    assert (starts is not None) == (order == "blocks")
    for st in {None, starts} if starts is not None else (None,):
        for nb in (64, 2):                                       # programs before the tail skip the residual
            codes, scales = arc_quantize_activation(x, perm, s, gs, blocks_per_program=nb, starts=st)
            assert torch.equal(codes, nvfp4.pack(ref_codes))
            assert torch.equal(scales.view(torch.uint8), ref_scales.view(torch.uint8))


def test_activation_kernel_special_values():
    x = torch.zeros(2, 32)
    x[0, :16] = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, -0.0, -0.25, -5.0, 0, 0, 0, 0, 6.0])
    x[1, 16:] = -1e-3                                      # all-negative block, tiny
    plan = arc.ArcPlan.identity(32)
    for gs in (torch.tensor(1.0), torch.tensor(448.0 * 6 / 6.0), global_scale(x, "token")):
        rc, rs = arc.quantize_activation(x, plan, F, gs)
        c, sc = arc_quantize_activation(x, plan.perm.to(torch.int32), 0, gs)
        assert torch.equal(c, nvfp4.pack(rc)) and torch.equal(sc.view(torch.uint8), rs.view(torch.uint8))


def _reference_case(m, n, k, s, mode, bias, order="blocks"):
    """-> operands and the float64 product of the reference (dequantized) augmented operands."""
    x, plan = make_case(m, k, s, order, seed=n + k + m)
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(n))
    gsx, gsw = global_scale(x, mode), F.global_scale(w.abs().amax())
    xa = F.dequantize(*arc.quantize_activation(x, plan, F, gsx), gsx)
    qw = arc.quantize_weight(w, plan, F, gsw)
    wa = F.dequantize(*arc.augmented_weight(qw, plan, 16), gsw)
    b = torch.randn(n) if bias else None
    ref = xa.double() @ wa.double().t() + (0 if b is None else b.double())
    return x, plan, gsx, gsw, qw, b, ref


@pytest.mark.parametrize("m,n,k,s,mode,bias,split", [(3, 40, 80, 16, "token", True, 1),
                                                     (17, 64, 128, 64, "dynamic", False, 1),
                                                     (1, 24, 48, 0, "token", False, 1),
                                                     (5, 33, 96, 96, "token", True, 3),
                                                     (2, 40, 208, 48, "dynamic", True, 4)])
@pytest.mark.parametrize("even_odd", [True, False])
def test_gemm_matches_reference_product(m, n, k, s, mode, bias, split, even_odd):
    x, plan, gsx, gsw, qw, b, ref = _reference_case(m, n, k, s, mode, bias, order="sorted")
    xc, xs = arc_quantize_activation(x, plan.perm.to(torch.int32), s, gsx)
    y = arc_gemm(xc, xs, gsx, nvfp4.pack(qw.codes), qw.scales, gsw, s, bias=b, out_dtype=torch.float32,
                 block_m=16, block_n=16, block_k=32, split_k=split, even_odd=even_odd)
    assert ((y.double() - ref).norm() / ref.norm()).item() < 1e-6


@pytest.mark.parametrize("m,k,s,dtype", [(3, 64, 16, torch.float16), (2, 208, 48, torch.bfloat16),
                                         (1, 48, 0, torch.float16)])
def test_activation_kernel_dequantized_output_is_code_times_scale(m, k, s, dtype):
    x, plan = make_case(m, k, s, "sorted", seed=k + s)
    gs = global_scale(x, "token")
    c, sc = arc.quantize_activation(x, plan, F, gs)
    want = F.dequantize(c, sc, torch.tensor(1.0))                  # code * block scale
    codes, scales, xd = arc_quantize_activation(x, plan.perm.to(torch.int32), s, gs, dequantized=dtype)
    assert torch.equal(codes, nvfp4.pack(c)) and xd.dtype == dtype
    assert torch.equal(xd.float(), want)                           # exact in 16 bits
    _, _, xd2 = arc_quantize_activation(x, plan.perm.to(torch.int32), s, gs, dequantized=dtype, packed=False)
    assert torch.equal(xd2, xd)


@pytest.mark.parametrize("m,n,k,s,mode,bias,split", [(1, 40, 80, 16, "token", True, 1),
                                                     (16, 64, 128, 64, "dynamic", False, 2),
                                                     (5, 33, 96, 96, "token", True, 3),
                                                     (2, 24, 48, 0, "dynamic", False, 1)])
def test_decode_gemv_matches_reference_product(m, n, k, s, mode, bias, split):
    x, plan, gsx, gsw, qw, b, ref = _reference_case(m, n, k, s, mode, bias)
    _, _, xd = arc_quantize_activation(x, plan.perm.to(torch.int32), s, gsx, dequantized=torch.float16,
                                       packed=False)
    for fma in (False, True):
        y = arc_gemv(xd, gsx, nvfp4.pack(qw.codes), qw.scales, gsw, s, bias=b, out_dtype=torch.float32,
                     block_n=16, block_k=32, split_k=split, fma=fma)
        assert ((y.double() - ref).norm() / ref.norm()).item() < 1e-6


@pytest.mark.parametrize("per_row,cols", [(True, "one"), (False, "one"), (True, "stacked"), (False, "each")])
def test_scale_rows_epilogue_roundings(per_row, cols):
    """prefill.scale_rows (the epilogue the CUDA kernel is checked against, scripts/bench_dequant.py):
    y = T(T(y * 1 / (xgs[m] * wgs[n])) + bias[n]) with an fp32 product and division - written here
    from numpy float32 arithmetic, for one weight scale, one per column and a stacked group's runs."""
    import numpy as np
    g = torch.Generator().manual_seed(7)
    m, n = 5, 24
    y = (torch.randn(m, n, generator=g) * 30).bfloat16()
    xgs = torch.rand(m if per_row else 1, generator=g) * 300 + 1
    wgs = {"one": torch.rand(1, generator=g) + 0.3, "each": torch.rand(n, generator=g) + 0.3,
           "stacked": torch.tensor([0.7] * 12 + [1.3] * 6 + [0.45] * 6)}[cols]
    bias = torch.randn(n, generator=g).bfloat16()
    xf, wf = xgs.numpy().astype(np.float32), wgs.numpy().astype(np.float32)
    inv = np.float32(1) / (xf.reshape(-1, 1) * wf.reshape(1, -1))               # fp32, one rounding each
    step = torch.from_numpy(y.float().numpy() * inv).bfloat16()                   # fp32 product, RNE to bf16
    want = (step.float() + bias.float()).bfloat16()
    got = scale_rows(y.clone(), xgs, wgs, bias, cuda=False)
    assert torch.equal(got, want)
    with pytest.raises(ValueError, match=r"1 or N = 24 weight scales \(got 3\)"):
        scale_rows(y.clone(), xgs, torch.ones(3))
    with pytest.raises(ValueError, match=r"1 or M = 5 activation scales \(got 2\)"):
        scale_rows(y.clone(), torch.ones(2), wgs)


@pytest.mark.parametrize("m,n,k,s,mode,bias", [(20, 40, 80, 16, "token", True), (3, 24, 48, 0, "dynamic", False)])
def test_prefill_dequantize_then_matmul(m, n, k, s, mode, bias):
    x, plan, gsx, gsw, qw, b, ref = _reference_case(m, n, k, s, mode, bias)
    wd = dequantize_codes(nvfp4.pack(qw.codes), qw.scales, s, torch.float16)
    codes, scales = arc.augmented_weight(qw, plan, 16)
    assert torch.equal(wd.float(), F.dequantize(codes, scales, torch.tensor(1.0)))   # exact
    with pytest.raises(ValueError, match="CUDA dequantization kernel needs CUDA tensors"):
        dequantize_codes(nvfp4.pack(qw.codes), qw.scales, s, torch.float16, cuda=True)
    with pytest.raises(ValueError, match="CUDA epilogue needs a CUDA"):
        scale_rows(torch.zeros(2, 8, dtype=torch.bfloat16), torch.ones(2), torch.ones(1), cuda=True)
    _, _, xd = arc_quantize_activation(x, plan.perm.to(torch.int32), s, gsx, dequantized=torch.bfloat16,
                                       packed=False)
    y = arc_matmul_prefill(xd, gsx, nvfp4.pack(qw.codes), qw.scales, gsw, s, bias=b, out_dtype=torch.float32)
    assert ((y.double() - ref).norm() / ref.norm()).item() < 1e-6


def test_kernel_bad_input_is_named():
    x = torch.randn(2, 32)
    perm = torch.arange(32, dtype=torch.int32)
    with pytest.raises(TypeError, match="dtype torch.int64"):
        arc_quantize_activation(x.long(), perm, 0, torch.tensor(1.0))
    with pytest.raises(ValueError, match="contiguous"):
        arc_quantize_activation(torch.randn(32, 2).t(), perm, 0, torch.tensor(1.0))
    with pytest.raises(ValueError, match=r"perm must be int32 of shape \(32,\)"):
        arc_quantize_activation(x, perm.long(), 0, torch.tensor(1.0))
    with pytest.raises(ValueError, match="K=40 and s=0 must be multiples of 16"):
        arc_quantize_activation(torch.randn(2, 40), torch.arange(40, dtype=torch.int32), 0, torch.tensor(1.0))
    xc, xs = arc_quantize_activation(x, perm, 16, torch.tensor(1.0))
    wc, ws = torch.zeros(8, 16, dtype=torch.uint8), torch.zeros(8, 2).to(torch.float8_e4m3fn)
    with pytest.raises(ValueError, match=r"xc shape \(2, 24\) != \(2, 32\) for K=32, s=32"):
        arc_gemm(xc, xs, torch.tensor(1.0), wc, ws, torch.tensor(1.0), 32)
    with pytest.raises(ValueError, match="M <= 16 rows, got M=17"):
        arc_gemv(torch.zeros(17, 48, dtype=torch.float16), torch.tensor(1.0), wc, ws, torch.tensor(1.0), 16)
    with pytest.raises(ValueError, match=r"xd must be contiguous \(2, 48\)"):
        arc_gemv(torch.zeros(2, 40, dtype=torch.float16), torch.tensor(1.0), wc, ws, torch.tensor(1.0), 16)


# ---- the CUDA GEMV's operands and decode trick (the kernels themselves run in scripts/bench_cuda_gemv.py)
from arcquant.formats import e2m1                                          # noqa: E402
from arcquant.kernels.act_quant import arc_quantize_activation_gemv       # noqa: E402
from arcquant.kernels.cuda_gemv import (arc_gemm_mma, arc_gemv_int8, fp16_gemm_reference,  # noqa: E402
                                        from_mma_order, int8_gemv_reference, mma_decode_reference,
                                        prmt_reference, to_mma_order)


@pytest.mark.parametrize("m,k,s,order,mode", [(3, 64, 16, "sorted", "token"), (2, 208, 48, "blocks", "dynamic"),
                                              (1, 48, 0, "blocks", "token"), (4, 96, 96, "sorted", "token")])
def test_activation_kernel_int8_output(m, k, s, order, mode):
    x, plan = make_case(m, k, s, order, seed=3 * k + s, dtype=torch.bfloat16)
    gs = global_scale(x, mode)
    codes, scales = arc.quantize_activation(x.float(), plan, F, gs)
    perm = plan.perm.to(torch.int32)
    xi, xs, gs_out = arc_quantize_activation_gemv(x, perm, s, gs if mode == "dynamic" else None,
                                                  starts=block_starts(perm), blocks_per_program=2)
    assert xi.dtype == torch.int8 and torch.equal(xi.float(), 2 * e2m1.e2m1_decode(codes))
    assert torch.equal(xs.view(torch.uint8), scales.view(torch.uint8))
    assert torch.equal(gs_out.reshape(-1), gs.reshape(-1))               # in-kernel per-token scale: same bits


@pytest.mark.parametrize("col", [5, 200])
def test_activation_kernel_row_amax_over_several_tiles(col, monkeypatch):
    """The in-kernel per-token scale reads the row AMAX_TILE values at a time: with tiles of 32, a
    208-wide row takes 7 (the last one partial), and the row's largest value - in the first tile or
    the last - sets the scale bits the reference computes."""
    from arcquant.kernels import act_quant
    monkeypatch.setattr(act_quant, "AMAX_TILE", 32)
    x, plan = make_case(2, 208, 48, "blocks", seed=col, dtype=torch.bfloat16)
    x[:, col] = torch.tensor([-1344.0, 5376.0], dtype=torch.bfloat16)     # each row's amax, sign differing
    gs = global_scale(x, "token")
    codes, scales = arc.quantize_activation(x.float(), plan, F, gs)
    perm = plan.perm.to(torch.int32)
    xi, xs, gs_out = arc_quantize_activation_gemv(x, perm, 48, None, starts=block_starts(perm), blocks_per_program=2)
    assert torch.equal(gs_out.reshape(-1), gs.reshape(-1))
    assert gs_out.tolist() == [2.0, 0.5]                                 # 2688 / amax
    assert torch.equal(xi.float(), 2 * e2m1.e2m1_decode(codes)) and torch.equal(xs.view(torch.uint8),
                                                                                 scales.view(torch.uint8))


@pytest.mark.parametrize("out", ["bfloat16", "int8"])
def test_activation_kernel_many_rows_scale_pass(out, monkeypatch):
    """M > ROW_AMAX_MAX_M rows of K > ROW_AMAX_MAX_K: the per-token scale comes from one amax
    pass, not from the kernel; the operands and scale bits are the same as the reference's."""
    from arcquant.kernels import act_quant
    monkeypatch.setattr(act_quant, "ROW_AMAX_MAX_K", 32)                  # K = 64 counts as long here
    m = act_quant.ROW_AMAX_MAX_M + 8
    x, plan = make_case(m, 64, 32, "blocks", seed=11, dtype=torch.bfloat16)
    gs = global_scale(x, "token")
    codes, scales = arc.quantize_activation(x.float(), plan, F, gs)
    perm = plan.perm.to(torch.int32)
    xq, xs, gs_out = arc_quantize_activation_gemv(x, perm, 32, None, starts=block_starts(perm), out=out)
    assert torch.equal(gs_out.reshape(-1), gs.reshape(-1))
    if out == "int8":
        assert torch.equal(xq.float(), 2 * e2m1.e2m1_decode(codes)) and torch.equal(xs.view(torch.uint8),
                                                                                     scales.view(torch.uint8))
    else:
        assert torch.equal(xq.float(), F.dequantize(codes, scales, torch.tensor(1.0)))


def test_prmt_decode_of_e2m1_codes_is_twice_the_value():
    """The CUDA GEMV's decode (Codes8 in csrc/arc_gemv.cu), emulated with PTX prmt semantics,
    against the format's own E2M1 decode, for every code in every nibble position."""
    lo, hi, signs, high = 0x03020100, 0x0C080604, 0x88888888, 0x80808080
    g = torch.Generator().manual_seed(0)
    words = torch.cat([torch.randint(0, 2 ** 32, (4000,), generator=g, dtype=torch.int64),
                       torch.tensor([sum(c << 4 * i for i in range(8)) for c in range(16)])])
    flipped = words ^ signs
    parts = {"p0": prmt_reference(lo, hi, words & 0xFFFF), "p1": prmt_reference(lo, hi, words >> 16),
             "n0": prmt_reference(lo, hi, flipped & 0xFFFF), "n1": prmt_reference(lo, hi, flipped >> 16)}
    want = 2 * e2m1.e2m1_decode(torch.stack([(words >> 4 * i) & 0xF for i in range(8)], 1).to(torch.uint8))

    def as_int8(w):                                                        # int64 words -> (n, 4) int8 values
        b = torch.stack([(w >> 8 * i) & 0xFF for i in range(4)], 1)
        return torch.where(b >= 128, b - 256, b).float()

    split = torch.cat([as_int8(parts["p0"]) - as_int8(parts["n0"]), as_int8(parts["p1"]) - as_int8(parts["n1"])], 1)
    swar = lambda p, n: (((p | high) - n) ^ high) & 0xFFFFFFFF
    signed = torch.cat([as_int8(swar(parts["p0"], parts["n0"])), as_int8(swar(parts["p1"], parts["n1"]))], 1)
    assert torch.equal(split, want) and torch.equal(signed, want)


@pytest.mark.parametrize("m,n,k,s,mode,bias", [(1, 40, 96, 32, "token", True), (5, 24, 64, 0, "dynamic", False),
                                               (8, 16, 128, 128, "token", True)])
def test_int8_gemv_reference_is_the_arc_product(m, n, k, s, mode, bias):
    x, plan, gsx, gsw, qw, b, ref = _reference_case(m, n, k, s, mode, bias)
    perm = plan.perm.to(torch.int32)
    xi, xs, gs = arc_quantize_activation_gemv(x, perm, s, gsx if mode == "dynamic" else None)
    y = int8_gemv_reference(xi, xs, gs, nvfp4.pack(qw.codes), qw.scales, gsw, s, b)
    assert ((y - ref).norm() / ref.norm()).item() < 1e-6


def test_cuda_gemv_bad_input_is_named():
    wc, ws = torch.zeros(8, 16, dtype=torch.uint8), torch.zeros(8, 2).to(torch.float8_e4m3fn)
    xs = torch.zeros(1, 3).to(torch.float8_e4m3fn)
    one = torch.tensor(1.0)
    with pytest.raises(ValueError, match="K=48 is not a multiple of 32"):
        arc_gemv_int8(torch.zeros(1, 64, dtype=torch.int8), xs, one, torch.zeros(8, 24, dtype=torch.uint8),
                      torch.zeros(8, 3).to(torch.float8_e4m3fn), one, 16)
    with pytest.raises(ValueError, match="1 <= M <= 8, got M=9"):
        arc_gemv_int8(torch.zeros(9, 48, dtype=torch.int8), xs, one, wc, ws, one, 16)
    with pytest.raises(ValueError, match=r"u=4: give 1, or 2 / 4 for M <= 2 \(got M=3\)"):
        arc_gemv_int8(torch.zeros(3, 48, dtype=torch.int8), xs, one, wc, ws, one, 16, u=4)
    with pytest.raises(ValueError, match=r"xi must be contiguous int8 \(1, 48\)"):
        arc_gemv_int8(torch.zeros(1, 48, dtype=torch.int16), xs, one, wc, ws, one, 16)
    with pytest.raises(ValueError, match="one CUDA device: xi on cpu"):
        arc_gemv_int8(torch.zeros(1, 48, dtype=torch.int8), xs, one, wc, ws, one, 16)
    odd = torch.zeros(4, dtype=torch.uint8)[1:].view(1, 3).view(torch.float8_e4m3fn)   # one byte past an allocation
    with pytest.raises(ValueError, match="xs and ws must start on a 2-byte boundary"):
        arc_gemv_int8(torch.zeros(1, 48, dtype=torch.int8), odd, one, wc, ws, one, 16)
    from arcquant.kernels.cuda_gemv import tensor_scales             # stacked layers: one scale per row
    assert tensor_scales(one, 8).shape == (1,) and tensor_scales(torch.ones(8, 1), 8).shape == (8,)
    with pytest.raises(ValueError, match=r"wgs holds 3 values: give one tensor scale or one per output row \(N = 8\)"):
        tensor_scales(torch.ones(3), 8)


def test_mma_decode_places_e2m1_codes_as_fp16_bits_exactly():
    """The MMA kernels' decode8 (csrc/arc_gemv.cu), emulated: a word of 8 codes -> 4 half2 holding
    codes (j, j + 4) as their E2M1 value * 2^-14, for every code in every nibble; and times every
    finite E4M3 block scale (subnormals too) the fp16 product is exact - the value the kernel feeds
    the MMA is code * scale * 2^-14 with no rounding."""
    g = torch.Generator().manual_seed(0)
    words = torch.cat([torch.randint(0, 2 ** 32, (2000,), generator=g, dtype=torch.int64),
                       torch.tensor([sum(c << 4 * i for i in range(8)) for c in range(16)])])
    h = mma_decode_reference(words)                                        # (n, 4) words
    got = torch.stack([h & 0xFFFF, h >> 16], -1).to(torch.int32).to(torch.int16).view(torch.float16)   # (n, 4, 2)
    codes = torch.stack([(words >> 4 * i) & 0xF for i in range(8)], 1).to(torch.uint8)
    want = e2m1.e2m1_decode(codes)[:, [0, 4, 1, 5, 2, 6, 3, 7]].reshape(-1, 4, 2)   # to_mma_order of the word
    assert torch.equal(got.float() * 2 ** 14, want)
    assert torch.equal(torch.signbit(got.float()), torch.signbit(want))
    scales = torch.arange(1, 127, dtype=torch.uint8).view(torch.float8_e4m3fn).to(torch.float16)   # all finite > 0
    prod = got.flatten()[:, None] * scales[None, :]                        # fp16 x fp16, rounded to fp16
    assert torch.equal(prod.double(), got.flatten().double()[:, None] * scales.double()[None, :])



def test_dequant_decode_widened_times_scale_is_code_times_scale_in_bf16_and_fp16():
    """csrc/arc_dequant.cu's decode_word, emulated: the same fp16 placement, widened to fp32 and
    multiplied by block scale * 2^14, then rounded to bf16 / fp16 - equal to code * scale (the
    reference dequantization) for every code and every finite positive E4M3 scale: both
    multiplications and the final rounding are exact."""
    words = torch.tensor([sum(c << 4 * i for i in range(8)) for c in range(16)])   # every code, every nibble
    h = mma_decode_reference(words)
    placed = torch.stack([h & 0xFFFF, h >> 16], -1).to(torch.int32).to(torch.int16).view(torch.float16)
    scales = torch.arange(1, 127, dtype=torch.uint8).view(torch.float8_e4m3fn).float()   # (126,)
    wide = placed.float().reshape(-1, 1) * (scales * 2 ** 14)              # fp32 products, (16 * 8, 126)
    codes = torch.stack([(words >> 4 * i) & 0xF for i in range(8)], 1).to(torch.uint8)
    want = (e2m1.e2m1_decode(codes)[:, [0, 4, 1, 5, 2, 6, 3, 7]].reshape(-1, 1).double()
            * scales.double())                                             # exact in float64
    assert torch.equal(wide.double(), want)
    for dt in (torch.bfloat16, torch.float16):
        assert torch.equal(wide.to(dt).double(), want)
        assert torch.equal(torch.signbit(wide.to(dt)), torch.signbit(want))
def test_mma_order_round_trips_and_pairs_columns_j_and_j_plus_4():
    x = torch.arange(48.).reshape(2, 24)
    y = to_mma_order(x)
    assert y[0, :8].tolist() == [0, 4, 1, 5, 2, 6, 3, 7] and y[1, 8:16].tolist() == [32, 36, 33, 37, 34, 38, 35, 39]
    assert torch.equal(from_mma_order(y), x)


def test_fp16_gemm_reference_is_the_arc_product():
    x, plan, gsx, gsw, qw, b, ref = _reference_case(5, 24, 96, 32, "token", True)
    xd, none, gs = arc_quantize_activation_gemv(x, plan.perm.to(torch.int32), 32, None, out="mma")
    assert none is None and xd.dtype == torch.float16
    y = fp16_gemm_reference(xd, gs, nvfp4.pack(qw.codes), qw.scales, gsw, 32, b)
    assert ((y - ref).norm() / ref.norm()).item() < 1e-6
    with pytest.raises(ValueError, match="1 <= M <= 64, got M=65"):
        arc_gemm_mma(torch.zeros(65, 128, dtype=torch.float16), gs, nvfp4.pack(qw.codes), qw.scales, gsw, 32)
    with pytest.raises(ValueError, match="one CUDA device: xd on cpu"):
        arc_gemm_mma(xd, gs, nvfp4.pack(qw.codes), qw.scales, gsw, 32)


def test_pipelined_mma_gemv_takes_whole_stages_and_names_what_it_refuses():
    """The cp.async-pipelined MMA GEMV (run on the GPU by scripts/bench_mma_pipe.py: bit-equal to
    arc_gemm_mma with the same kw and within 1e-6 of fp16_gemm_reference on 720 cases) copies
    whole stages of kw * 128 columns; other shapes are named, and arc_gemm_mma(st > 0) falls back
    to the unpipelined kernel for them."""
    from arcquant.kernels.cuda_gemv import arc_gemm_mma_pipe, pipe_shape_reason
    wc, ws = torch.zeros(32, 2048, dtype=torch.uint8), torch.zeros(32, 256, dtype=torch.uint8)
    xd = torch.zeros(8, 4096 + 64, dtype=torch.float16)
    assert pipe_shape_reason(xd, wc, ws, 4) is None and pipe_shape_reason(xd, wc, ws, 8) is None
    assert "K=3584 is not a multiple" in pipe_shape_reason(xd, wc[:, :1792], ws[:, :224], 8)
    assert pipe_shape_reason(xd, wc[:, :1792], ws[:, :224], 4) is None         # 3584 = 7 * 512
    assert "1 <= M <= 16, got M=17" in pipe_shape_reason(torch.zeros(17, 4160, dtype=torch.float16), wc, ws, 4)
    shifted = torch.zeros(8 * 4160 + 4, dtype=torch.float16)[4:].view(8, 4160)          # starts 8 bytes in
    assert "16-byte boundaries" in pipe_shape_reason(shifted, wc, ws, 4)
    gs = torch.ones(8)
    with pytest.raises(ValueError, match=re.escape("kw=2, st=3: the pipelined MMA GEMV takes kw in (4, 8)")):
        arc_gemm_mma_pipe(xd, gs, wc, ws.view(torch.float8_e4m3fn), torch.ones(()), 64, kw=2)
    with pytest.raises(ValueError, match="one CUDA device: xd on cpu"):
        arc_gemm_mma_pipe(xd, gs, wc, ws.view(torch.float8_e4m3fn), torch.ones(()), 64, st=3, xs=True)


def test_the_default_build_holds_every_pipelined_setting_the_model_takes(monkeypatch):
    """cuda_gemv.PIPE_SETTINGS (the pipelined kernels built by default) = the .cu's dispatch cases,
    and is exactly the set gpu.mma_config picks over a grid of shapes; others are named (and
    arc_gemm_mma falls back to the unpipelined kernel), unless ARCQUANT_EXT_SWEEP=1 builds them all."""
    from arcquant.gpu import mma_config
    from arcquant.kernels.cuda_gemv import PIPE_SETTINGS, SRCS, _sweep_build, pipe_built_reason
    cases = re.findall(r"case (\d{4}): launch_pipe<(\d), (\d), (\d), (true|false)>", SRCS[0].read_text())
    built = {(int(t), int(kw), int(st), xs == "true") for _, t, kw, st, xs in cases}
    assert built == PIPE_SETTINGS                                       # and each case key spells its settings
    assert all(key == f"{t}{kw}{st}{int(xs == 'true')}" for key, t, kw, st, xs in cases)
    taken = {(1 if m <= 8 else 2, c["kw"], c["st"], c["xs"]) for m in range(1, 65)
             for n in (896, 1536, 3584, 4096, 4608, 6144, 14336, 16384, 28672, 32768, 37888, 60000)
             for k in (512, 896, 1024, 3584, 4096, 8192, 14336, 16384, 18944) if (c := mma_config(m, n, k)).get("st")}
    assert taken == PIPE_SETTINGS
    monkeypatch.delenv("ARCQUANT_EXT_SWEEP", raising=False)
    _sweep_build.cache_clear()
    assert pipe_built_reason(8, 4, 2, False) is None and pipe_built_reason(16, 4, 4, True) is None
    assert "kw=8, st=4, xs=False at M=4 is not in the default build" in pipe_built_reason(4, 8, 4, False)
    monkeypatch.setenv("ARCQUANT_EXT_SWEEP", "1")
    _sweep_build.cache_clear()
    try:
        assert pipe_built_reason(4, 8, 2, False) is None
    finally:
        _sweep_build.cache_clear()                                      # the next reader sees the restored env


def test_cuda_activation_kernel_routing_and_refusals():
    """The CUDA activation kernel (run on the GPU by scripts/sweep_act.py and bench_cuda_gemv.py,
    bit-exact against the reference there) takes bf16 / fp16 CUDA rows in the whole-block order;
    everything else stays on Triton with the reason named."""
    from arcquant.kernels import act_quant
    from arcquant.kernels.cuda_act import arc_act_quant_cuda, ctas_per_row, cuda_act_reason
    x, plan = make_case(2, 64, 16, "blocks", seed=1, dtype=torch.bfloat16)
    starts = block_starts(plan.perm.to(torch.int32))
    assert "arbitrary ('sorted') permutation" in cuda_act_reason(x, None)
    assert "needs a CUDA tensor, got cpu" in cuda_act_reason(x, starts)
    assert not act_quant._cuda(x, starts)                                # CPU: the Triton / reference path
    with pytest.raises(ValueError, match="needs a CUDA tensor"):
        arc_act_quant_cuda(x, starts, 16)
    with pytest.raises(ValueError, match="out='fp8': use one of int8, mma, bfloat16, packed"):
        arc_act_quant_cuda(x, starts, 16, out="fp8")
    with pytest.raises(ValueError, match=r"ctas=-1: give 0 \(the wrapper's choice\)"):
        arc_act_quant_cuda(x, starts, 16, ctas=-1)
    assert ctas_per_row(1, 952) == 8 and ctas_per_row(4096, 952) == 1 and ctas_per_row(100, 952) == 8
    assert ctas_per_row(300, 272) == 3 and ctas_per_row(600, 272) == 2
    assert ctas_per_row(0, 272) == 3                                     # no rows: no division by zero


def test_cuda_activation_kernel_takes_many_rows_or_deep_ones(monkeypatch):
    """Which sizes go to the CUDA activation kernel where it can run (results/act-crossover-h200.json):
    at least 33 rows, or any rows deeper than 16384 (Qwen2.5-7B down_proj's 18944: CUDA 11 vs Triton
    15 us at one token); Triton for decode rows of K <= 16384 (it is 0.6-1.5 us faster there)."""
    from arcquant.kernels import act_quant, cuda_act
    monkeypatch.setattr(cuda_act, "cuda_act_reason", lambda x, starts: None)     # as on a GPU that builds it
    routed = lambda m, k: act_quant._cuda(torch.empty(m, k, dtype=torch.bfloat16), None)
    assert routed(33, 4096) and routed(1, 18944) and routed(16, 16400) and routed(4096, 14336)
    assert not routed(32, 4096) and not routed(1, 14336) and not routed(8, 16384)
    monkeypatch.setattr(act_quant, "CUDA_KERNEL", False)
    assert not routed(4096, 18944)


def test_cuda_norm_kernel_refuses_a_bad_cta_count():
    """The fused RMSNorm kernel's CTAs a row (its decode split; equal bits for every count on the
    GPU, scripts/check_norm_kernel.py): a count out of range is named before anything runs."""
    from arcquant.kernels.cuda_act import arc_rmsnorm_act_cuda
    x, plan = make_case(2, 64, 16, "blocks", seed=1, dtype=torch.bfloat16)
    starts = block_starts(plan.perm.to(torch.int32))
    for bad in (-1, 65):
        with pytest.raises(ValueError, match=rf"ctas={bad}: give 0 \(the kernel's choice\) or 1..64 CTAs a row"):
            arc_rmsnorm_act_cuda(x, torch.ones(64, dtype=torch.bfloat16), 1e-5, starts, 16, ctas=bad)
    with pytest.raises(ValueError, match="needs a CUDA tensor"):
        arc_rmsnorm_act_cuda(x, torch.ones(64, dtype=torch.bfloat16), 1e-5, starts, 16, ctas=8)


def test_cuda_extension_declarations_match_the_sources():
    """The CUDA extension's bindings (cuda_gemv.FUNCTIONS, declared in DECL) match the host functions
    the .cu sources define, parameter for parameter: a mismatch otherwise shows only when the
    extension is built on a GPU machine."""
    from arcquant.kernels.cuda_gemv import DECL, FUNCTIONS, SRCS
    norm = lambda s: re.sub(r"\s+", " ", s).strip()                    # noqa: E731
    decls = [norm(d) for d in DECL.split(";") if d.strip()]
    names = [re.match(r"void (\w+)\(", d).group(1) for d in decls]
    assert sorted(names) == sorted(FUNCTIONS)
    src = "\n".join(f.read_text() for f in SRCS)
    for name, d in zip(names, decls):
        found = re.findall(r"\nvoid " + name + r"\((.*?)\)\s*\{", src, re.S)
        assert len(found) == 1, name
        assert norm(f"void {name}({found[0]})") == d, name


def test_an_older_gpu_keeps_the_triton_kernels_with_the_reason_logged(monkeypatch, caplog):
    """A CUDA device below compute capability 8.0 (no int8 dot product / E4M3 convert the CUDA
    kernels use) is refused by name, once, in the log; its calls stay on the Triton kernels.
    (torch.cuda.get_device_capability stands in for such a card.)"""
    import logging
    from arcquant.kernels import cuda_gemv
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    dev = torch.device("cuda", 3)                                         # a device no other test asks about
    assert cuda_gemv.unavailable_reason(dev) == "the CUDA GEMV needs compute capability >= 8.0, got (7, 5)"
    assert cuda_gemv.unavailable_reason(torch.device("cpu")) == "the CUDA GEMV needs a CUDA device, got cpu"
    cuda_gemv.logged_reason.cache_clear()
    with caplog.at_level(logging.INFO, logger="arcquant"):
        for _ in range(3):
            assert "compute capability >= 8.0" in cuda_gemv.logged_reason(dev, "GEMV")
    said = [r.getMessage() for r in caplog.records if "GEMV: Triton" in r.getMessage()]
    assert said == ["GEMV: Triton (the CUDA GEMV needs compute capability >= 8.0, got (7, 5))"]
    cuda_gemv.logged_reason.cache_clear()


def test_signed_zeros_are_kept_bit_for_bit():
    """E2M1 code 8 is -0: the Triton kernels' decoded values keep the sign as the reference does
    (Triton's unary minus is 0 - x, which gave +0 for code 8), so the dequantized weight, the
    dequantized activation and a tail residual taken from a -0 input match the reference bit for bit,
    not only as values (torch.equal calls -0 and +0 equal)."""
    bits = lambda t: t.float().view(torch.int32)
    codes = torch.tensor([[0x88, 0x08, 0x80, 0x31] * 4, [0x8F, 0x7A, 0x88, 0x00] * 4], dtype=torch.uint8)
    scales = torch.tensor([[1.5, 0.25], [3.0, 448.0]]).to(torch.float8_e4m3fn)
    ref = F.dequantize(nvfp4.unpack(codes), scales, torch.tensor(1.0))
    ref = torch.cat([ref, ref[:, -16:]], 1)
    for dt in (torch.float32, torch.bfloat16):
        assert torch.equal(bits(dequantize_codes(codes, scales, 16, dt)), bits(ref.to(dt)))
    m, k, s = 2, 64, 16
    x, plan = make_case(m, k, s, "sorted", seed=7)
    x[:, ::3] = -0.0                                               # -0 inputs, tail channels among them
    x[:, plan.perm[k - s:][::2]] = -0.0
    gs = global_scale(x, "token")
    c, sc = arc.quantize_activation(x, plan, F, gs)
    codes_k, _, xd = arc_quantize_activation(x, plan.perm.to(torch.int32), s, gs, dequantized=torch.bfloat16)
    assert torch.equal(codes_k, nvfp4.pack(c))                     # the residual of a -0 input: code 0
    assert torch.equal(bits(xd), bits(F.dequantize(c, sc, torch.tensor(1.0)).to(torch.bfloat16)))


def _kernel_bodies(src: str) -> dict:
    """name -> text of each __global__ / __device__ function defined in CUDA source `src`, from its
    signature to the closing brace of its body (braces counted)."""
    out = {}
    for m in re.finditer(r"(?:__global__|__device__)[^;{]*?\b(\w+)\s*\((?:[^(){}]|\([^()]*\))*\)\s*\{", src):
        depth, i = 1, m.end()
        while depth:
            depth += {"{": 1, "}": -1}.get(src[i], 0)
            i += 1
        out.setdefault(m.group(1), "")
        out[m.group(1)] += src[m.start():i]
    return out


def test_every_kernel_launched_with_pdl_waits_before_touching_memory():
    """Programmatic dependent launch (kernels/pdl.py) lets a kernel start while the one before it
    still writes: every kernel launched through arc::launch (every __global__ not launched with
    <<<>>>) must begin with arc::pdl_enter() - in its body or the body it calls first - and every
    Triton kernel taking PDL with the launch-dependents and wait calls, before any load, or it
    reads stale values on a Hopper GPU (a permutation read before the wait did, v39)."""
    from arcquant.kernels.cuda_gemv import HEADER, SRCS
    src = "\n".join(f.read_text() for f in [HEADER, *SRCS])
    bodies = _kernel_bodies(src)
    plain = set(re.findall(r"(\w+)(?:<[^<>;]*>)?<<<", src))                # launched without the attribute
    launched = {k for k, b in bodies.items() if "__global__" in b and k not in plain}
    assert {"arc_gemv_kernel", "arc_act_kernel", "arc_rmsnorm_act_kernel", "arc_silu_mul_kernel",
            "arc_silu_mul_act_kernel", "arc_gemm_mma_pipe_kernel", "arc_gemm_mma_kernel"} <= launched
    first = lambda body: re.sub(r"//[^\n]*", "", body.split("{", 1)[1]).split(";")     # noqa: E731
    for k in launched:
        stmts = [t.strip() for t in first(bodies[k])]
        if "arc::pdl_enter()" not in stmts:                              # a body in one call: mma_body
            stmts = [t.strip() for t in first(bodies[re.match(r"(\w+)<", stmts[0]).group(1)])]
        lead = [t for t in stmts[:stmts.index("arc::pdl_enter()")] if t]
        assert all(t.startswith(("using ", "constexpr ")) for t in lead), (k, lead)
    import ast
    import inspect
    from arcquant.kernels import pdl
    seen = 0
    for name, fn in _pdl_triton_kernels().items():
        body = ast.parse(inspect.getsource(fn.fn)).body[0].body
        body = body[1:] if isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) else body  # docstring
        assert ast.unparse(body[0]) == "pdl_enter(PDL)", (name, ast.unparse(body[0]))   # its first statement
        seen += 1
    assert seen == 5
    helper = inspect.getsource(pdl.pdl_enter.fn)
    assert helper.index("gdc_launch_dependents()") < helper.index("gdc_wait()")


def _pdl_triton_kernels() -> dict:
    """name -> every Triton kernel of the package taking a PDL constexpr."""
    import inspect
    from arcquant.kernels import act_quant, decode_attention, pdl, rmsnorm, rope_cache
    return {name: fn for mod in (act_quant, decode_attention, rmsnorm, rope_cache) for name, fn in vars(mod).items()
            if hasattr(fn, "fn") and fn is not pdl.pdl_enter and "PDL: tl.constexpr" in inspect.getsource(fn.fn)}


# Each PDL Triton kernel compiled for sm_90 as the model launches it: the types of its
# non-constexpr arguments other than i32 and its constexprs (PDL on).
PDL_COMPILE = {
    "rmsnorm._rmsnorm_kernel": ({"x": "*bf16", "w": "*bf16", "y": "*bf16", "eps": "fp32"}, {"BLOCK": 4096}),
    "act_quant._arc_act_quant_kernel": (
        {"x_ptr": "*bf16", "perm_ptr": "*i32", "gs_ptr": "*fp32", "codes_ptr": "*u8", "scales_ptr": "*u8",
         "xd_ptr": "*i8", "xi_ptr": "*i8"},
        {"GS_PER_ROW": True, "NB": 16, "PACKED": False, "DEQUANTIZED": False, "INT8": True, "ROW_AMAX": True,
         "ROW_TILES": 4, "AMAX_TILE": 1024, "BLOCK_PERM": True, "MMA_ORDER": False}),
    "decode_attention._decode_attention_kernel": (
        {"q": "*bf16", "k": "*bf16", "v": "*bf16", "mask": "*i1", "nvalid": "*i64", "o": "*bf16", "wacc": "*fp32",
         "wml": "*fp32", "scale": "fp32"}, {"D": 128, "GP": 16, "BN": 64, "PER": 4, "SPLIT": True, "F32": False}),
    "decode_attention._combine_kernel": ({"wacc": "*fp32", "wml": "*fp32", "o": "*bf16"}, {"D": 128, "SP": 4}),
    "rope_cache._rope_cache_kernel": (
        {n: "*bf16" for n in ("q", "k", "v", "cos", "sin", "qo", "kc", "vc")} | {"start": "*i64"},
        {"HALF": 64, "BLOCK": 64}),
}

PTX_ORDER = """
import importlib, json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
out = {}
for key, (types, consts) in json.loads(sys.argv[1]).items():
    mod, name = key.split(".")
    fn = getattr(importlib.import_module("arcquant.kernels." + mod), name)
    sig = {p.name: "constexpr" if p.is_constexpr else types.get(p.name, "i32") for p in fn.params}
    consts = dict(consts, PDL=True)
    assert set(consts) == {p.name for p in fn.params if p.is_constexpr}, key
    ptx = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32)).asm["ptx"]
    lines = [line.strip() for line in ptx.splitlines()]
    at = lambda ops: min([i for i, line in enumerate(lines) if any(op in line.split("//")[0] for op in ops)] or [-1])
    out[key] = [at(["griddepcontrol.launch_dependents"]), at(["griddepcontrol.wait"]), at(["ld.global", "st.global"])]
print(json.dumps(out))
"""


def test_pdl_triton_kernels_wait_before_their_first_memory_access_in_the_ptx():
    """The code generated for sm_90 (compiled here, no GPU needed; in a child process, since this
    one runs Triton through the interpreter) with PDL on: in every PDL Triton kernel the
    launch-dependents and wait instructions come before its first global load or store."""
    import json
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", PTX_ORDER, json.dumps(PDL_COMPILE)], capture_output=True, text=True,
                          env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    order = json.loads(done.stdout.splitlines()[-1])
    assert set(order) == set(PDL_COMPILE) and len(order) == len(_pdl_triton_kernels())
    for key, (launch, wait, access) in order.items():
        assert 0 <= launch < wait < access, (key, launch, wait, access)


def test_pdl_is_off_for_the_cpu_and_the_interpreter_and_switchable():
    """PDL only where a Hopper-or-later GPU runs the kernels: the Triton launch arguments are
    empty on the CPU (and under the interpreter), and set_pdl switches the setting (on, and the
    most token rows a call may have) that a CUDA extension built later (or already) is given."""
    from arcquant.kernels import pdl
    assert pdl.triton_args(torch.device("cpu"), 1) == {}
    before, rows = pdl.enabled(), pdl.max_rows()
    try:
        pdl.set_pdl(False)
        assert not pdl.enabled() and pdl.max_rows() == rows
        pdl.set_pdl(True, 4)
        assert pdl.enabled() and pdl.max_rows() == 4
        assert pdl.triton_args(torch.device("cpu"), 1) == {}
        with pytest.raises(ValueError, match="max_rows=-1"):
            pdl.set_pdl(True, -1)
    finally:
        pdl.set_pdl(before, rows)
