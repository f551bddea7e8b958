"""The mixed-input prefill GEMM (weight decoded in registers) against the float64 ARC product,
on the CPU through the Triton interpreter."""
import os

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")   # before triton is imported: CPU interpreter
triton = pytest.importorskip("triton", reason="triton is a test dependency (pip install -e .[test])")

from arcquant.formats import nvfp4                         # noqa: E402
from arcquant.kernels.act_quant import arc_quantize_activation  # noqa: E402
from arcquant.kernels.mixed_gemm import arc_matmul_mixed   # noqa: E402
from test_kernels import _reference_case                   # noqa: E402


@pytest.mark.parametrize("m,n,k,s,mode,bias", [(20, 40, 80, 16, "token", True),     # tile straddles K
                                               (3, 24, 48, 0, "dynamic", False),
                                               (33, 17, 96, 96, "token", False),    # whole depth repeated
                                               (5, 32, 208, 48, "dynamic", True)])
@pytest.mark.parametrize("swap", [True, False])
def test_mixed_gemm_matches_reference_product(m, n, k, s, mode, bias, swap):
    x, plan, gsx, gsw, qw, b, ref = _reference_case(m, n, k, s, mode, bias)
    _, _, xd = arc_quantize_activation(x, plan.perm.to(torch.int32), s, gsx, dequantized=torch.float16,
                                       packed=False)
    y = arc_matmul_mixed(xd, gsx, nvfp4.pack(qw.codes), qw.scales, gsw, s, bias=b, out_dtype=torch.float32,
                         block_m=16, block_n=16, block_k=32, group=2, swap=swap)
    assert ((y.double() - ref).norm() / ref.norm()).item() < 1e-6
    # one rounding of the fp32 result (fp16 here: the interpreter truncates to bf16; the GPU
    # check in scripts/bench_mixed.py compares bf16 outputs)
    yh = arc_matmul_mixed(xd, gsx, nvfp4.pack(qw.codes), qw.scales, gsw, s, bias=b, out_dtype=torch.float16,
                          block_m=16, block_n=16, block_k=32, group=2, swap=swap)
    assert torch.equal(yh, y.to(torch.float16))


def test_mixed_gemm_bad_input_is_named():
    x, plan, gsx, gsw, qw, b, _ = _reference_case(3, 24, 48, 16, "token", False)
    _, _, xd = arc_quantize_activation(x, plan.perm.to(torch.int32), 16, gsx, dequantized=torch.float16,
                                       packed=False)
    wc = nvfp4.pack(qw.codes)
    with pytest.raises(ValueError, match="xd must be float16"):
        arc_matmul_mixed(xd.bfloat16(), gsx, wc, qw.scales, gsw, 16)
    with pytest.raises(ValueError, match="expected K\\+s = 64"):
        arc_matmul_mixed(xd[:, :48], gsx, wc, qw.scales, gsw, 16)
    with pytest.raises(ValueError, match="xgs has 2 values"):
        arc_matmul_mixed(xd, gsx[:2], wc, qw.scales, gsw, 16)
