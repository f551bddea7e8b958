"""The kernels as torch custom ops (arcquant/kernels/ops.py): registration checked by
torch.library.opcheck (schema, fake tensors, dispatch), the CPU reference backend against the
Triton kernels run through the interpreter, and torch.compile tracing them without breaks."""
import os

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton", reason="triton is a test dependency (pip install -e .[test])")

from arcquant import arc                                            # noqa: E402
from arcquant.formats import get_format, nvfp4                     # noqa: E402
from arcquant.kernels.act_quant import block_starts                # noqa: E402
from arcquant.kernels.ops import OPS, backend, set_backend         # noqa: E402

F = get_format("nvfp4")


def case(m=3, k=96, s=32, n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(m, k, generator=g) * torch.logspace(-2, 1, k)).bfloat16()
    perm = torch.randperm(k // 16, generator=g).repeat_interleave(16) * 16 + torch.arange(16).repeat(k // 16)
    w = torch.randn(n, k, generator=g)
    gsw = F.global_scale(w.abs().amax())
    codes, scales = F.quantize(w[:, perm], gsw)
    return x, perm.to(torch.int32), nvfp4.pack(codes), scales.view(torch.uint8), gsw, torch.randn(n, generator=g)


@pytest.mark.parametrize("out", ["int8", "mma", "bfloat16"])
@pytest.mark.parametrize("per_token", [True, False])
def test_quantize_act_reference_equals_triton_kernel(out, per_token):
    x, perm, *_ = case()
    gs = None if per_token else F.global_scale(x.float().abs().amax()).reshape(1)
    ref = OPS.quantize_act(x, perm, None, 32, gs, out)                 # CPU: the reference backend
    with backend("triton"):
        ker = OPS.quantize_act(x, perm, block_starts(perm), 32, gs, out)
    for a, b in zip(ref, ker):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


def test_products_reference_equals_triton_kernels():
    x, perm, wc, ws, gsw, bias = case()
    for m, op in ((3, "gemv_triton"), (20, "prefill")):
        xm = torch.cat([x] * 7)[:m]
        xd, _, gs = OPS.quantize_act(xm, perm, None, 32, None, "bfloat16")
        extra = dict(fma=True, block_n=8, block_k=32, split_k=1) if op == "gemv_triton" else {}
        ref = getattr(OPS, op)(xd, gs, wc, ws, gsw, bias, 32, out_dtype=torch.float32, **extra)
        with backend("triton"):
            ker = getattr(OPS, op)(xd, gs, wc, ws, gsw, bias, 32, out_dtype=torch.float32, **extra)
        assert ((ker - ref).norm() / ref.norm()) < 1e-5, op
        # and the product is the ARC product of the reference operands
        plan = arc.ArcPlan(perm.long(), perm.long()[-32:])
        gx = F.global_scale(xm.float().abs().amax(-1, keepdim=True))
        xa = F.dequantize(*arc.quantize_activation(xm.float(), plan, F, gx), gx).double()
        qw = arc.QuantizedWeight(nvfp4.unpack(wc), ws.view(torch.float8_e4m3fn), None, None)
        wa = F.dequantize(*arc.augmented_weight(qw, plan, 16),
                          gsw).double()
        want = xa @ wa.T + bias.double()
        assert ((ref.double() - want).norm() / want.norm()) < 1e-6, op


def test_opcheck_every_op():
    x, perm, wc, ws, gsw, bias = case()
    xi, xs, gs = OPS.quantize_act(x, perm, None, 32, None, "int8")
    xd, _, _ = OPS.quantize_act(x, perm, None, 32, None, "mma")
    xb, _, _ = OPS.quantize_act(x, perm, None, 32, None, "bfloat16")
    calls = [(OPS.quantize_act.default, (x, perm, None, 32, None, "int8")),
             (OPS.quantize_act.default, (x, perm, None, 32, gs[:1].clone(), "mma")),
             (OPS.gemv_int8.default, (xi, xs, gs, wc, ws, gsw, bias, 32, 2, 1, torch.bfloat16)),
             (OPS.gemv_int8.default, (xi, xs, gs, wc, ws, gsw, bias, 32, 4, 2, torch.bfloat16, 4)),
             (OPS.gemm_mma.default, (xd, gs, wc, ws, gsw, None, 32, 4, False, torch.float32)),
             (OPS.gemv_triton.default, (xb, gs, wc, ws, gsw, bias, 32, True, 8, 32, 1, torch.bfloat16)),
             (OPS.prefill.default, (xb, gs, wc, ws, gsw, None, 32, torch.bfloat16)),
             (OPS.prefill_unscaled.default, (xb, wc, ws, 32)),
             (OPS.silu_mul_quantize_act.default, (x, x * 0.5, gs + 1, torch.tensor([1.5, 0.75]), perm, None, 32, None,
                                                  "bfloat16")),
             (OPS.silu_mul_quantize_act.default, (x, x * 0.5, None, None, perm, None, 32, gs[:1].clone(), "int8"))]
    for op, args in calls:
        torch.library.opcheck(op, args)


def test_eager_namespace_is_the_registered_ops_bodies():
    """ops.EAGER (what gpu.KernelPath calls outside torch.compile) holds one plain function per
    registered op, with the same results; ops.current gives OPS while torch.compile traces."""
    import torch.library

    from arcquant.kernels import ops
    names = sorted(vars(ops.EAGER))
    assert names == sorted(n for n in dir(OPS) if isinstance(getattr(OPS, n), torch._ops.OpOverloadPacket))
    x, perm, wc, ws, gsw, bias = case()
    for out in ("int8", "bfloat16"):
        for a, b in zip(ops.EAGER.quantize_act(x, perm, None, 32, None, out), OPS.quantize_act(x, perm, None, 32, None, out)):
            assert torch.equal(a, b)
    xd, _, gs = OPS.quantize_act(torch.cat([x] * 7), perm, None, 32, None, "bfloat16")
    assert torch.equal(ops.EAGER.prefill(xd, gs, wc, ws, gsw, bias, 32, torch.bfloat16),
                       OPS.prefill(xd, gs, wc, ws, gsw, bias, 32, torch.bfloat16))
    assert ops.current() is ops.EAGER
    seen = []
    torch._dynamo.reset()
    torch.compile(lambda t: seen.append(ops.current()) or t + 1, backend="eager", fullgraph=True)(x)
    assert seen == [OPS]


def test_torch_compile_traces_the_ops_without_breaks():
    x, perm, wc, ws, gsw, bias = case()

    def linear(x):
        xd, _, gs = OPS.quantize_act(x, perm, None, 32, None, "mma")
        return OPS.gemm_mma(xd, gs, wc, ws, gsw, bias, 32, 4, True, torch.bfloat16)
    torch._dynamo.reset()
    compiled = torch.compile(linear, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(x), linear(x))


def test_backend_choice_is_validated_and_logged(caplog):
    with pytest.raises(ValueError, match="backend 'cuda'; valid: auto, reference, triton"):
        set_backend("cuda")
    with caplog.at_level("INFO", logger="arcquant"):
        with backend("triton"):
            pass
    assert "ops backend on CPU tensors: triton (interpreter)" in caplog.text
