"""MoE (Mixtral and Qwen-MoE layouts): experts quantized with ARC, routers kept, an expert that
gets no calibration tokens still gets a finite plan and is named in the report."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, MixtralConfig, Qwen2MoeConfig

from arcquant.checkpoint import load_quantized, read_meta, read_tensors, save_quantized
from arcquant.config import CalibConfig, QuantConfig
from arcquant.modeling import load_model, resolve_model
from arcquant.moe import UnfusedExperts
from arcquant.pipeline import quantize_in_memory
from arcquant.qlinear import QuantLinear
from arcquant.stream import quantize_streaming

ROOT = Path(__file__).resolve().parents[1]
CAL = CalibConfig(nsamples=4, seqlen=64)
SMALL = dict(vocab_size=49152, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, tie_word_embeddings=True)


def _save(model, folder: Path) -> Path:
    model.save_pretrained(folder)                                  # transformers' own on-disk names
    tok_src = resolve_model("smollm2-135m")
    for f in tok_src.glob("*"):
        if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
            (folder / f.name).write_bytes(f.read_bytes())
    return folder


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    """4 experts, top-1 routing; expert 3's router row is the mean of the others' rows, so its
    logit (their mean) never exceeds their max: it gets no token, ever."""
    torch.manual_seed(0)
    cfg = MixtralConfig(**SMALL, intermediate_size=128, num_local_experts=4, num_experts_per_tok=1)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for layer in model.model.layers:
            w = layer.mlp.gate.weight                              # (E, H)
            w.normal_(0, 0.5)
            w[3] = w[:3].mean(0)
    return _save(model, tmp_path_factory.mktemp("mix") / "tiny-mixtral")


def test_unfused_experts_compute_what_transformers_computes(mixtral):
    fused = AutoModelForCausalLM.from_pretrained(str(mixtral), dtype=torch.float32).eval()
    ours, tok = load_model(str(mixtral))
    assert isinstance(ours.model.layers[0].mlp.experts, UnfusedExperts)
    ids = tok("Mixture of experts route every token to a few experts.", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, fused(ids).logits, rtol=1e-5, atol=1e-5)


def test_mixtral_quantized_with_an_uncalibrated_expert(mixtral, tmp_path):
    out = tmp_path / "ck"
    cmd = [sys.executable, "-m", "arcquant.cli", "quantize", "--model", str(mixtral), "--out", str(out),
           "--calib-samples", "4", "--calib-seqlen", "64"]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    assert "under-calibrated experts" in res.stdout and "model.layers.0.mlp.experts.3" in res.stdout
    meta = read_meta(out)
    for i, row in enumerate(meta["moe"]):
        assert row["routed_tokens"][3] == 0 and sum(row["routed_tokens"]) == 4 * 64
        assert f"model.layers.{i}.mlp.experts.3" in row["under_calibrated"]
    assert "model.layers.1.mlp.experts.3.gate_up" in meta["layers"] and "model.layers.1.mlp.gate" not in meta["layers"]
    model, tok, _ = load_quantized(out)
    fp, _ = load_model(str(mixtral))
    src = read_tensors(out, meta)
    assert torch.equal(model.model.layers[0].mlp.gate.weight, fp.model.layers[0].mlp.gate.weight)  # router kept
    assert torch.isfinite(src["model.layers.0.mlp.experts.3.gate_up.weight_global_scale"])
    ex3 = model.model.layers[0].mlp.experts[3].gate_up
    assert isinstance(ex3, QuantLinear) and ex3.input_amax > 0
    x = torch.randn(5, 64)                                         # the unused expert still computes sanely
    y, ref = ex3(x), x @ fp.model.layers[0].mlp.experts[3].gate_up.weight.T
    assert torch.isfinite(y).all() and (y - ref).norm() / ref.norm() < 0.3
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        q, f = model(ids).logits, fp(ids).logits
    assert torch.isfinite(q).all() and (q - f).norm() / f.norm() < 0.2


def test_streamed_moe_equals_in_memory(mixtral, tmp_path):
    """The streaming reader finds experts under Mixtral's checkpoint names (w1/w3/w2)."""
    quantize_streaming(str(mixtral), tmp_path / "s", QuantConfig(), CAL, progress=False, log=lambda m: None)
    model, tok, report = quantize_in_memory(str(mixtral), QuantConfig(), CAL, progress=False)
    save_quantized(model, tok, tmp_path / "m", QuantConfig(), CAL, report, "tiny")
    a, b = read_tensors(tmp_path / "s", read_meta(tmp_path / "s")), read_tensors(tmp_path / "m", read_meta(tmp_path / "m"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_qwen_moe_shared_expert_gate_kept(tmp_path):
    torch.manual_seed(1)
    cfg = Qwen2MoeConfig(**SMALL, intermediate_size=128, moe_intermediate_size=64, shared_expert_intermediate_size=128,
                         num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1)
    folder = _save(AutoModelForCausalLM.from_config(cfg), tmp_path / "tiny-qwen-moe")
    quantize_streaming(str(folder), tmp_path / "ck", QuantConfig(), CAL, progress=False, log=lambda m: None)
    meta = read_meta(tmp_path / "ck")
    names = set(meta["layers"])
    assert "model.layers.0.mlp.shared_expert.down_proj" in names and "model.layers.0.mlp.experts.2.down" in names
    assert not any("shared_expert_gate" in n or n.endswith("mlp.gate") for n in names)
    model, tok, _ = load_quantized(tmp_path / "ck")
    ids = tok("Experts share a gate.", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
