"""Triton kernels against the pure-torch oracle, on the CPU through the Triton interpreter.

Activation quantization must be bit-exact (codes and scale bits); the GEMM computes the same
exact products as the reference and may differ only by fp32 summation order."""
import os

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")   # before triton is imported: CPU interpreter
triton = pytest.importorskip("triton", reason="triton is a test dependency (pip install -e .[test])")

from arcquant import arc                                   # noqa: E402
from arcquant.formats import get_format, nvfp4            # noqa: E402
from arcquant.kernels.act_quant import arc_quantize_activation, block_starts  # noqa: E402
from arcquant.kernels.arc_gemm import arc_gemm            # noqa: E402
from arcquant.kernels.decode import arc_gemv              # noqa: E402
from arcquant.kernels.prefill import arc_matmul_prefill, dequantize_codes  # noqa: E402

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


@pytest.mark.parametrize("m,n,k,s,mode,bias", [(20, 40, 80, 16, "token", True), (3, 24, 48, 0, "dynamic", False)])
def test_prefill_dequantize_then_matmul(m, n, k, s, mode, bias):
    x, plan, gsx, gsw, qw, b, ref = _reference_case(m, n, k, s, mode, bias)
    wd = dequantize_codes(nvfp4.pack(qw.codes), qw.scales, s, torch.float16)
    codes, scales = arc.augmented_weight(qw, plan, 16)
    assert torch.equal(wd.float(), F.dequantize(codes, scales, torch.tensor(1.0)))   # exact
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
