"""Bad input: one clear message naming the problem, and nothing half-written left behind."""
import json
import subprocess
import sys

import pytest
import torch

from arcquant import checkpoint as ckpt
from arcquant.checkpoint import CheckpointError, load_quantized, save_quantized
from arcquant.config import CalibConfig, QuantConfig
from arcquant.modeling import UnsupportedModelError, resolve_model
from arcquant.quantize import quantize_model
from conftest import tiny_llama

CAL = CalibConfig(nsamples=2, seqlen=64)


def quantized_tiny(tokenizer, **kw):
    model = tiny_llama(**kw)
    report = quantize_model(model, tokenizer, QuantConfig(), CAL, progress=False)
    return model, report


def test_width_not_multiple_of_16_is_zero_padded_exactly(tokenizer, tmp_path):
    model = tiny_llama(hidden=40, inter=72)                    # K = 40 and 72: padded to 48, 80
    ids = tokenizer("Some real words to run through the model.", return_tensors="pt").input_ids
    with torch.no_grad():
        ref = model(ids).logits
    report = quantize_model(model, tokenizer, QuantConfig(), CAL, progress=False)
    q = model.model.layers[0].mlp.down_proj
    assert q.k_padded == 80 and q.in_features == 72
    with torch.no_grad():
        out = model(ids).logits
    assert ((out - ref).norm() / ref.norm()) < 0.2
    save_quantized(model, tokenizer, tmp_path / "ck", QuantConfig(), CAL, report, "tiny")
    again, _, _ = load_quantized(tmp_path / "ck")
    with torch.no_grad():
        assert torch.equal(again(ids).logits, out)


def test_not_a_model(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a model"):
        resolve_model(str(tmp_path / "nothing-here"))


def test_unsupported_architecture_names_the_modules(tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=49152)).eval()
    with pytest.raises(UnsupportedModelError, match=r"transformer\.h\.0\.attn\.c_attn \(Conv1D\)"):
        quantize_model(model, tokenizer, QuantConfig(), CAL, progress=False)
    with pytest.raises(UnsupportedModelError, match="no list of repeated decoder layers"):
        quantize_model(torch.nn.Sequential(torch.nn.Linear(4, 4)), tokenizer, QuantConfig(), CAL)


def test_nan_in_weights_names_the_layer(tokenizer):
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"weights of model\.layers\.1\.mlp\.up_proj"):
        quantize_model(model, tokenizer, QuantConfig(), CAL, progress=False)


def test_nan_in_calibration_activations_names_the_input(tokenizer):
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[0].post_attention_layernorm.weight[3] = float("inf")
    with pytest.raises(FloatingPointError, match=r"calibration activations at the input of model\.layers\.0\.mlp\.gate_proj"):
        quantize_model(model, tokenizer, QuantConfig(), CAL, progress=False)


@pytest.mark.parametrize("content,match", [(b"", "is empty"), (b"   \n", "is empty"),
                                           (b"\xff\xfe\x00bad", "not UTF-8"),
                                           (b"too short", "fewer than one window")])
def test_bad_calibration_text(tokenizer, tmp_path, content, match):
    f = tmp_path / "cal.txt"
    f.write_bytes(content)
    with pytest.raises(ValueError, match=match):
        quantize_model(tiny_llama(), tokenizer, QuantConfig(), CalibConfig(str(f), 2, 64), progress=False)
    with pytest.raises(ValueError, match="neither one of c4, wiki-train nor an existing text file"):
        CalibConfig(str(tmp_path / "missing.txt"))


def test_output_folder_that_holds_something_is_refused(tokenizer, tmp_path):
    model, report = quantized_tiny(tokenizer)
    out = tmp_path / "ck"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="already exists and is not empty"):
        save_quantized(model, tokenizer, out, QuantConfig(), CAL, report, "tiny")
    assert (out / "keep.txt").read_text() == "user data"


def test_interrupted_save_leaves_nothing(tokenizer, tmp_path, monkeypatch):
    model, report = quantized_tiny(tokenizer)

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(ckpt, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        save_quantized(model, tokenizer, tmp_path / "ck", QuantConfig(), CAL, report, "tiny")
    assert list(tmp_path.iterdir()) == []                     # no folder, no temporary left


@pytest.fixture
def saved_tiny(tokenizer, tmp_path):
    model, report = quantized_tiny(tokenizer)
    return save_quantized(model, tokenizer, tmp_path / "ck", QuantConfig(), CAL, report, "tiny")


def test_checkpoint_from_newer_version(saved_tiny):
    meta = json.loads((saved_tiny / "arcquant.json").read_text())
    meta["version"] = 99
    (saved_tiny / "arcquant.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="format version 99.*upgrade arcquant"):
        load_quantized(saved_tiny)


def test_checkpoint_missing_tensor_is_named(saved_tiny):
    from safetensors.torch import load_file, save_file
    tensors = load_file(str(saved_tiny / "model.safetensors"))
    del tensors["model.layers.1.self_attn.v_proj.weight_scale"]
    save_file(tensors, str(saved_tiny / "model.safetensors"))
    with pytest.raises(CheckpointError, match="truncated or damaged"):      # the checksum sees it first
        load_quantized(saved_tiny)
    with pytest.raises(CheckpointError, match=r"'model\.layers\.1\.self_attn\.v_proj\.weight_scale' is missing"):
        load_quantized(saved_tiny, verify=False)


def test_checkpoint_altered_byte_is_caught_by_checksum(saved_tiny):
    f = saved_tiny / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-5] ^= 0x10                                          # same size, one bit of a weight flipped
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors does not match its recorded SHA-256"):
        load_quantized(saved_tiny)


def test_version_1_checkpoint_without_checksums_still_loads(saved_tiny):
    meta = json.loads((saved_tiny / "arcquant.json").read_text())
    meta["version"] = 1
    del meta["files"]
    (saved_tiny / "arcquant.json").write_text(json.dumps(meta))
    model, _, got = load_quantized(saved_tiny)
    assert got["version"] == 1 and any(True for _ in model.parameters())


def test_checkpoint_truncated_file(saved_tiny):
    f = saved_tiny / "model.safetensors"
    f.write_bytes(f.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r"has 1000 bytes, the checkpoint recorded \d+: the file is truncated"):
        load_quantized(saved_tiny)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="not an arcquant checkpoint"):
        load_quantized(tmp_path)


def test_cli_reports_errors_without_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "arcquant.cli", "eval", str(tmp_path / "nope")],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert "arcquant eval: error:" in r.stderr and "is not a model" in r.stderr
    assert "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "arcquant.cli", "quantize", "--out", "x", "--method", "awq"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "invalid choice: 'awq'" in r.stderr


def test_qwen2_with_qkv_bias_quantizes_saves_and_reloads(tokenizer, tmp_path):
    """Qwen2 layout (q/k/v bias) through the same generic path, no architecture list."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(0)
    cfg = Qwen2Config(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=49152, max_position_embeddings=256)
    model = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.bias.normal_()              # non-zero biases must survive
    ids = tokenizer("Quantize a Qwen2 layout too.", return_tensors="pt").input_ids
    report = quantize_model(model, tokenizer, QuantConfig(), CAL, progress=False)
    q = model.model.layers[0].self_attn.q_proj
    assert q.bias is not None and q.shared is model.model.layers[0].self_attn.k_proj.shared
    with torch.no_grad():
        out = model(ids).logits
    save_quantized(model, tokenizer, tmp_path / "ck", QuantConfig(), CAL, report, "tiny-qwen2")
    again, _, meta = load_quantized(tmp_path / "ck")
    assert meta["layers"]["model.layers.0.self_attn.q_proj"]["bias"] is True
    with torch.no_grad():
        assert torch.equal(again(ids).logits, out)


@pytest.mark.parametrize("method", ["w4a8", "w4a16", "rtn"])
def test_static_scale_roundtrip_for_every_method(tokenizer, tmp_path, method):
    model = tiny_llama()
    qcfg = QuantConfig(method=method, act_scale="static")
    report = quantize_model(model, tokenizer, qcfg, CAL, progress=False)
    ids = tokenizer("static scales", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model(ids).logits
    save_quantized(model, tokenizer, tmp_path / "ck", qcfg, CAL, report, "tiny")
    again, _, _ = load_quantized(tmp_path / "ck")
    with torch.no_grad():
        assert torch.equal(again(ids).logits, out)


def test_cli_refuses_to_requantize_a_checkpoint(saved_tiny):
    r = subprocess.run([sys.executable, "-m", "arcquant.cli", "eval", str(saved_tiny), "--method", "arc"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "already a quantized checkpoint" in r.stderr


def test_bench_refuses_a_model_of_another_shape_and_a_cpu_only_machine(saved_tiny, tmp_path, monkeypatch):
    """arcquant bench compares a checkpoint with the BF16 model it came from: a source of another shape
    is named field by field; the right one gets as far as the GPU check, which on a CPU-only machine
    refuses with the reason."""
    from arcquant.bench import run_bench
    cfg = json.loads((saved_tiny / "config.json").read_text())
    other = dict(cfg, hidden_size=cfg["hidden_size"] * 2, num_hidden_layers=cfg["num_hidden_layers"] + 1)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps(other))
    with pytest.raises(ValueError, match=f"another model shape.*hidden_size {2 * cfg['hidden_size']} vs "
                                         f"{cfg['hidden_size']}; num_hidden_layers {cfg['num_hidden_layers'] + 1} vs"):
        run_bench(tmp_path / "other", saved_tiny)
    with pytest.raises(ValueError, match="no readable config.json"):
        run_bench(tmp_path / "missing", saved_tiny)
    (tmp_path / "same").mkdir()
    (tmp_path / "same" / "config.json").write_text(json.dumps(cfg))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="needs a CUDA GPU \\(none found\\); on a CPU use arcquant eval"):
        run_bench(tmp_path / "same", saved_tiny)


def test_engine_says_which_batch_fits_the_free_memory(monkeypatch):
    """A KV cache larger than 90 % of the free GPU memory is refused, naming the need, the free
    memory and the largest batch that fits at that length (mem_get_info stands in for a card)."""
    from transformers import LlamaConfig
    from arcquant.engine import check_fits
    cfg = LlamaConfig(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, num_hidden_layers=32)
    per_seq = 2 * 32 * 4096 * 8 * 128 * 2                               # K and V, 32 layers, 4096 tokens: 512 MiB
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10 * 2**30, 80 * 2**30))
    check_fits(cfg, 17, 4096, torch.bfloat16, torch.device("cuda"))    # 8.5 GiB of 9 GiB usable: fits
    with pytest.raises(ValueError, match=r"batch 64 x 4096 tokens needs 32.00 GiB but 10.00 GiB are free; "
                                         r"at 4096 tokens at most batch 18 fits"):
        check_fits(cfg, 64, 4096, torch.bfloat16, torch.device("cuda"))
    assert int(0.9 * 10 * 2**30 // per_seq) == 18
