"""GPTQ rounding of NVFP4 weights (gptq, arc+gptq): against round-to-nearest as the reference."""
import pytest
import torch

from arcquant.config import CalibConfig, QuantConfig
from arcquant.formats import nvfp4
from arcquant.gptq import gptq_nvfp4
from arcquant.quantize import quantize_model
from conftest import tiny_llama


def _rtn(w, gs):
    return nvfp4.quantize(w, gs)


def test_identity_hessian_gives_round_to_nearest():
    """With H = I no error is propagated: GPTQ must equal RTN code for code."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(24, 64, generator=g) * torch.logspace(-2, 1, 64)
    gs = nvfp4.global_scale_from_amax(w.abs().max())
    codes, scales = gptq_nvfp4(w, torch.eye(64), gs)
    rc, rs = _rtn(w, gs)
    assert torch.equal(codes, rc) and torch.equal(scales.view(torch.uint8), rs.view(torch.uint8))


def test_gptq_lowers_the_output_error_on_correlated_inputs():
    g = torch.Generator().manual_seed(1)
    k, n = 128, 64
    mix = torch.randn(k, k, generator=g) / k ** 0.5 + torch.eye(k)
    x = torch.randn(2048, k, generator=g) @ mix                  # correlated channels
    w = torch.randn(n, k, generator=g)
    gs = nvfp4.global_scale_from_amax(w.abs().max())
    codes, scales = gptq_nvfp4(w, x.double().t() @ x.double(), gs)
    wq_gptq = nvfp4.dequantize(codes, scales, gs)
    wq_rtn = nvfp4.dequantize(*_rtn(w, gs), gs)
    err = lambda wq: ((x @ (w - wq).t()).norm() / (x @ w.t()).norm()).item()
    assert err(wq_gptq) < 0.85 * err(wq_rtn), (err(wq_gptq), err(wq_rtn))
    assert set(codes.unique().tolist()) <= set(range(16))


def test_dead_channels_and_zero_weights():
    w = torch.zeros(8, 32)
    h = torch.zeros(32, 32)                                       # no calibration signal at all
    codes, scales = gptq_nvfp4(w, h, torch.tensor(1.0))
    assert torch.equal(nvfp4.dequantize(codes, scales, torch.tensor(1.0)), torch.zeros(8, 32))


def test_arc_gptq_on_a_model(tokenizer):
    """arc+gptq runs through the normal path; its output error is no worse than arc's."""
    cal = CalibConfig(nsamples=4, seqlen=64)
    ids = tokenizer("The quick brown fox jumps over the lazy dog near the river bank.", return_tensors="pt").input_ids
    ref_model = tiny_llama(hidden=64, inter=128)
    with torch.no_grad():
        ref = ref_model(ids).logits
    errs = {}
    for method in ("arc", "arc+gptq"):
        model = tiny_llama(hidden=64, inter=128)
        report = quantize_model(model, tokenizer, QuantConfig(method=method), cal, progress=False)
        with torch.no_grad():
            out = model(ids).logits
        assert torch.isfinite(out).all() and report["avg_bits"] > 4.5
        errs[method] = ((out - ref).norm() / ref.norm()).item()
    assert errs["arc+gptq"] <= errs["arc"] * 1.05, errs


@pytest.mark.parametrize("kw,match", [(dict(fmt="mxfp4"), "needs fmt nvfp4"), (dict(order="none"), "order blocks or sorted")])
def test_gptq_refuses_what_it_cannot_round(kw, match):
    with pytest.raises(ValueError, match=match):
        QuantConfig(method="arc+gptq", **kw)


def test_streamed_arc_gptq_equals_in_memory(tokenizer, tmp_path):
    """The Hessians survive the streaming quantizer's saved statistics (pass 1 -> pass 2)."""
    from arcquant.checkpoint import read_meta, read_tensors, save_quantized
    from arcquant.modeling import load_model
    from arcquant.stream import quantize_streaming
    from conftest import tiny_folder
    folder = tiny_folder(tokenizer, tmp_path / "tiny")
    qcfg, cal = QuantConfig(method="arc+gptq"), CalibConfig(nsamples=4, seqlen=64)
    quantize_streaming(str(folder), tmp_path / "s", qcfg, cal, progress=False, log=lambda m: None)
    model, tok = load_model(str(folder))
    report = quantize_model(model, tok, qcfg, cal, progress=False)
    save_quantized(model, tok, tmp_path / "m", qcfg, cal, report, "tiny")
    a, b = (read_tensors(tmp_path / d, read_meta(tmp_path / d)) for d in ("s", "m"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
