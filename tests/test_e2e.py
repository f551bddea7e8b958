"""The real model end to end: quantize -> save -> reload in a fresh process -> same logits;
perplexity ordering on real held-out text."""
import json
import subprocess
import sys

import pytest
import torch

from arcquant.checkpoint import save_quantized
from arcquant.config import CalibConfig, QuantConfig
from arcquant.evaluate import perplexity
from arcquant.qlinear import QuantLinear
from arcquant.quantize import quantize_model

SMALL_CALIB = CalibConfig(nsamples=4, seqlen=128)
PROMPT = "The history of the Roman Empire begins with"

RELOAD = """
import sys, torch
from arcquant.checkpoint import load_quantized
model, tok, meta = load_quantized(sys.argv[1])
ids = tok(sys.argv[2], return_tensors="pt").input_ids
with torch.no_grad():
    torch.save(model(ids).logits, sys.argv[3])
"""


def test_quantize_save_reload_fresh_process_same_logits(fresh_smollm, tmp_path):
    model, tok = fresh_smollm
    qcfg = QuantConfig()
    report = quantize_model(model, tok, qcfg, SMALL_CALIB, progress=False)
    assert len(report["layers"]) == 30 * 7
    assert all(isinstance(model.get_submodule(r["name"]), QuantLinear) for r in report["layers"])
    # q/k/v and gate/up were found to share their input without a list of names
    q = model.model.layers[0].self_attn.q_proj
    assert q.shared is model.model.layers[0].self_attn.v_proj.shared is not None
    assert model.model.layers[0].mlp.gate_proj.shared is model.model.layers[0].mlp.up_proj.shared
    assert model.model.layers[0].mlp.down_proj.shared is None
    ids = tok(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        ref = model(ids).logits
    out = save_quantized(model, tok, tmp_path / "ck", qcfg, SMALL_CALIB, report, "smollm2-135m")
    meta = json.loads((out / "arcquant.json").read_text())
    assert meta["version"] == 2 and meta["quant"]["method"] == "arc"
    assert meta["files"]["model.safetensors"]["bytes"] == (out / "model.safetensors").stat().st_size
    assert meta["layers"]["model.layers.0.self_attn.k_proj"]["group"] == "model.layers.0.self_attn.q_proj"
    subprocess.run([sys.executable, "-c", RELOAD, str(out), PROMPT, str(tmp_path / "logits.pt")], check=True)
    again = torch.load(tmp_path / "logits.pt", weights_only=True)
    assert torch.equal(again, ref)


def test_perplexity_ordering_on_real_text(tokenizer):
    """fp < arc < rtn on held-out Wikipedia (4k tokens, seqlen 256): ARC recovers accuracy."""
    from arcquant.modeling import load_model
    ppl = {}
    for method in ("fp", "rtn", "arc"):
        model, tok = load_model("smollm2-135m")
        quantize_model(model, tok, QuantConfig(method=method), SMALL_CALIB, progress=False)
        ppl[method] = perplexity(model, tok, "wiki-test", 256, 4096, progress=False)["ppl"]
    assert 10 < ppl["fp"] < ppl["arc"] < ppl["rtn"] < 3 * ppl["fp"], ppl


def test_avg_bits_follow_the_spec_formula_and_rules_for_s(tokenizer):
    from arcquant.modeling import load_model
    for qcfg in (QuantConfig(), QuantConfig(target_bits=None)):          # budget (default), threshold
        model, tok = load_model("smollm2-135m")
        report = quantize_model(model, tok, qcfg, SMALL_CALIB, progress=False)
        bits = [4.5 * (r["in"] + r["s"]) / r["in"] for r in report["layers"]]
        assert report["avg_bits"] == pytest.approx(sum(bits) / len(bits))
        if qcfg.target_bits is None:      # paper: ceil(mean outliers per token / 64) * 64 >= 64
            assert all(r["s"] % 64 == 0 and 64 <= r["s"] <= r["in"] for r in report["layers"])
        else:
            assert all(r["s"] % 16 == 0 for r in report["layers"])
            assert 5.4 < report["avg_bits"] <= 5.5


def test_qwen_coder_from_six_packages_loads_and_predicts_text():
    """The second real model (Qwen2, q/k/v bias): its GGUF file joined from six packages."""
    from arcquant.evaluate import perplexity
    from arcquant.modeling import find_decoder_layers, find_linears, load_model
    model, tok = load_model("qwen2.5-coder-0.5b")
    assert type(model).__name__ == "Qwen2ForCausalLM"
    name, layers = find_decoder_layers(model)
    lin = find_linears(layers[0], f"{name}.0")
    assert len(layers) == 24 and lin["self_attn.q_proj"].bias is not None and lin["self_attn.o_proj"].bias is None
    r = perplexity(model, tok, "wiki-test", 512, 1024, progress=False)
    assert 5 < r["ppl"] < 60                                        # a trained model (uniform: 151936)
