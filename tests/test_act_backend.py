"""The reference layer's activations quantized by the fused Triton kernel (the default on a CUDA
device) give the same bits as plain torch: checked here through the Triton interpreter."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")   # before triton is imported: CPU interpreter

import pytest
import torch

from arcquant import arc, baselines
from arcquant.formats import get_format, nvfp4
from arcquant.qlinear import QuantLinear, act_backend


def _input(m, k, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    x[:, torch.randperm(k, generator=g)[:4]] *= torch.tensor([30.0, 12.0, 50.0, 8.0])   # outliers
    return x


def _layer(k, order, s, act_scale="token", rotate=None, smooth=None, seed=0):
    torch.manual_seed(seed)
    x = _input(48, k, seed)
    kp = -(-k // 16) * 16
    st = arc.ChannelStats(kp, 0.125, get_format("nvfp4"))
    st.update(torch.nn.functional.pad(x, (0, kp - k)))
    plan = arc.make_plan(st, kp, s, order, 16)
    lin = torch.nn.Linear(k, 8)
    gsw = nvfp4.global_scale_from_amax(lin.weight.abs().max())
    gsi = nvfp4.global_scale_from_amax(x.abs().max())
    q = QuantLinear.from_linear(lin, "nvfp4", "fp4", act_scale, plan, gsw, gsi, rotate=rotate, smooth=smooth)
    return q, x


def _both(q, x, monkeypatch):
    monkeypatch.setenv("ARCQUANT_ACT_BACKEND", "reference")
    ref = q.quantize_input(x)
    monkeypatch.setenv("ARCQUANT_ACT_BACKEND", "triton")
    return ref, q.quantize_input(x)


@pytest.mark.parametrize("order,s,act_scale", [("blocks", 32, "token"), ("sorted", 16, "dynamic"),
                                               ("sorted", 48, "static"), ("blocks", 0, "token")])
def test_kernel_gives_the_reference_bits(order, s, act_scale, monkeypatch):
    q, x = _layer(120, order, s, act_scale)                 # K=120: padded to 128
    assert q.s == s
    ref, got = _both(q, x, monkeypatch)
    assert q._kernel_quantizes(x)
    assert got.shape == (48, 128 + s) and torch.equal(got, ref)


def test_kernel_after_rotation_and_smoothing(monkeypatch):
    q, x = _layer(64, "blocks", 16, rotate=(16, 0))
    ref, got = _both(q, x, monkeypatch)
    assert torch.equal(got, ref)
    smooth = baselines.smooth_scales(x.abs().amax(0), torch.ones(64), 0.5)
    q, x = _layer(64, "blocks", 0, smooth=smooth)
    ref, got = _both(q, x, monkeypatch)
    assert torch.equal(got, ref)


def test_tail_elsewhere_stays_on_the_reference(monkeypatch):
    q, x = _layer(64, "none", 16)                           # tail not at the plan's end
    ref, got = _both(q, x, monkeypatch)
    assert not q._kernel_quantizes(x) and torch.equal(got, ref)


def test_backend_choice(monkeypatch):
    x = torch.zeros(2, 16)
    monkeypatch.delenv("ARCQUANT_ACT_BACKEND", raising=False)
    assert act_backend(x) == "reference"                    # auto: the kernel on CUDA devices only
    monkeypatch.setenv("ARCQUANT_ACT_BACKEND", "cuda")
    with pytest.raises(ValueError, match="valid: auto, reference, triton"):
        act_backend(x)
    q, x = _layer(64, "blocks", 16)
    monkeypatch.setenv("ARCQUANT_ACT_BACKEND", "triton")
    x[3, 5] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf in the activations"):   # checked as on the reference
        q.quantize_input(x)


def test_nan_check_read_once_per_forward_on_a_gpu(monkeypatch):
    """On a GPU the NaN / Inf check of the activations is a device flag read at the end of the
    model's forward (or every `every` layer calls), not a host sync per layer: same error."""
    from arcquant.qlinear import FINITE, FiniteCheck
    monkeypatch.setattr(FiniteCheck, "deferred", staticmethod(lambda x: True))   # the GPU's path, here
    q, x = _layer(64, "blocks", 16)
    model = torch.nn.Sequential(q)
    FINITE.install(model)
    FINITE.install(model)                                   # once: one hook
    assert len(model._forward_hooks) == 1
    immediate = torch.nn.Sequential(_layer(64, "blocks", 16)[0])
    y = model(x)
    monkeypatch.undo()
    assert torch.equal(y, immediate(x))                     # the check does not touch the result
    monkeypatch.setattr(FiniteCheck, "deferred", staticmethod(lambda x: True))
    for bad in (float("nan"), float("inf"), -float("inf")):
        xb = x.clone()
        xb[7, 3] = bad
        with pytest.raises(ValueError, match="NaN or Inf in the activations of a quantized layer"):
            model(xb)                                       # raised by the forward hook
        model(x)                                            # flags reset: a clean input passes
    check = FiniteCheck(every=3)                            # no hook: read every 3 calls
    check.check(x[:0], x[:0].abs().amax(-1, keepdim=True), "the activations")   # no rows: nothing to read
    assert check.count == 0
    xb = x.clone()
    xb[0, 0] = float("nan")
    check.check(xb, xb.abs().amax(-1, keepdim=True), "the activations")
    check.check(x, x.abs().amax(), "the activations")
    with pytest.raises(ValueError, match="within the last 3 layer calls"):
        check.check(x, x.abs().amax(), "the activations")
