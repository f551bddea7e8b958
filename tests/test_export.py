"""Export to TensorRT-LLM NVFP4_ARC, compressed-tensors and ModelOpt NVFP4, and import back.

Independent references: the compressed-tensors package (through transformers) reads our
folder; the NVFP4_ARC product is rebuilt from the exported tensors the way TensorRT-LLM's
fp4_quantize_with_reorder_residual describes it; the plain-NVFP4 fallback of a `blocks`
ARC layer is RTN of the original weight.
"""
import json

import pytest
import torch

from arcquant.checkpoint import save_quantized
from arcquant.config import CalibConfig, QuantConfig
from arcquant.export import ExportError, export_checkpoint, load_exported
from arcquant.export import layout, writer
from arcquant.formats import nvfp4
from arcquant.qlinear import QuantLinear
from arcquant.quantize import quantize_model
from conftest import tiny_llama

CAL = CalibConfig(nsamples=2, seqlen=64)
IDS = torch.arange(3, 40).reshape(1, -1)


def _checkpoint(tokenizer, tmp_path, name="ck", **quant):
    """A tiny Llama with one strong activation-outlier channel, quantized and saved."""
    model = tiny_llama(hidden=64, inter=128)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 5] *= 30.0
    reference = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    qcfg = QuantConfig(**quant)
    report = quantize_model(model, tokenizer, qcfg, CAL, progress=False)
    path = save_quantized(model, tokenizer, tmp_path / name, qcfg, CAL, report, "tiny")
    return model, path, reference


def _quant_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


# ---- pure layout functions -------------------------------------------------------------------
def test_trt_arc_layout_interleaves_outlier_and_residual_blocks():
    idx = layout.trt_arc_columns(64, 32)
    want = list(range(32)) + list(range(32, 48)) + list(range(64, 80)) + list(range(48, 64)) + list(range(80, 96))
    assert idx.tolist() == want
    assert layout.trt_arc_blocks(64, 32).tolist() == [0, 1, 2, 4, 3, 5]
    codes = torch.randint(0, 16, (5, 64), dtype=torch.uint8)
    scales = torch.rand(5, 4).to(torch.float8_e4m3fn)
    tc, ts = layout.to_trt_arc(codes, scales, 32)
    assert tc.shape == (5, 96) and torch.equal(tc[:, 32:48], codes[:, 32:48]) and torch.equal(tc[:, 48:64], codes[:, 32:48])
    c2, s2 = layout.from_trt_arc(tc, ts, 64)
    assert torch.equal(c2, codes) and torch.equal(s2.view(torch.uint8), scales.view(torch.uint8))
    tc[0, 70] ^= 1                                                   # a residual block that is no copy
    with pytest.raises(ValueError, match="not copies"):
        layout.from_trt_arc(tc, ts, 64)


def test_plain_fallback_of_block_moves_is_rtn_of_the_original_order():
    torch.manual_seed(0)
    w = torch.randn(8, 64)
    gs = nvfp4.global_scale_from_amax(w.abs().max())
    perm = torch.tensor([2, 0, 3, 1]).repeat_interleave(16) * 16 + torch.arange(16).repeat(4)
    codes, scales = nvfp4.quantize(w[:, perm], gs)
    c, s, exact = layout.plain_nvfp4(codes, scales, layout.ArcPlan(perm, perm[32:]), gs)
    rc, rs = nvfp4.quantize(w, gs)
    assert exact and torch.equal(c, rc) and torch.equal(s.view(torch.uint8), rs.view(torch.uint8))
    shuffled = torch.randperm(64)                                    # channels mixed across blocks
    codes, scales = nvfp4.quantize(w[:, shuffled], gs)
    assert not layout.plain_nvfp4(codes, scales, layout.ArcPlan(shuffled, shuffled[:0]), gs)[2]


def test_reciprocal_scale_round_trips_when_a_float32_allows_it():
    gs = torch.tensor(2688.0 / 0.37)
    r = layout.reciprocal_scale(gs)
    assert abs(float(r) * float(gs) - 1) < 2e-7
    hits = sum(torch.equal(1 / layout.reciprocal_scale(torch.tensor(v)), torch.tensor(v))
               for v in torch.linspace(100, 30000, 200).tolist())
    assert hits >= 150                                               # exact for most values


# ---- NVFP4_ARC ----------------------------------------------------------------------------------
def _trt_activation(x, reorder_index, s, input_scale):
    """X (M, K) -> dequant of TensorRT-LLM's augmented activation: gather by reorder_index,
    NVFP4 with global scale 1/input_scale, residual of the last s channels against the
    rounded block scales, interleaved [K-s | (outlier block, residual block) ...]."""
    gs = 1.0 / input_scale.float()
    xr = x[:, reorder_index.long()]
    k = xr.shape[1]
    c1, s1 = nvfp4.quantize(xr, gs)
    d1 = nvfp4.dequantize(c1, s1, gs)
    c2, s2 = nvfp4.quantize(xr[:, k - s:] - d1[:, k - s:], gs)
    d2 = nvfp4.dequantize(c2, s2, gs)
    parts = [d1[:, : k - s]]
    for i in range(s // 16):
        parts += [d1[:, k - s + 16 * i: k - s + 16 * (i + 1)], d2[:, 16 * i: 16 * (i + 1)]]
    return torch.cat(parts, 1)


def test_trtllm_arc_product_rebuilt_from_exported_tensors(tokenizer, tmp_path):
    model, ck, _ = _checkpoint(tokenizer, tmp_path, act_scale="static")
    out = tmp_path / "trt"
    export_checkpoint(ck, "trtllm-arc", out, dtype="float32")
    hf = json.loads((out / "hf_quant_config.json").read_text())["quantization"]
    assert hf["quant_algo"] == "NVFP4_ARC" and hf["group_size"] == 16 and "lm_head" in hf["exclude_modules"]
    tensors = writer_read(out)
    torch.manual_seed(1)
    checked = 0
    for name, q in _quant_layers(model).items():
        s = hf["arc"]["num_residual_channels"][name]
        assert s == q.s
        w = tensors[f"{name}.weight"]
        assert w.dtype == torch.uint8 and w.shape == (q.out_features, (q.in_features + s) // 2)
        assert tensors[f"{name}.reorder_index"].dtype == torch.int16
        wd = nvfp4.dequantize(nvfp4.unpack(w), tensors[f"{name}.weight_scale"], 1 / tensors[f"{name}.weight_scale_2"])
        x = torch.randn(5, q.in_features) * 0.3
        x[:, 5] *= 30
        xd = _trt_activation(x, tensors[f"{name}.reorder_index"], s, tensors[f"{name}.input_scale"])
        y_engine = xd @ wd.t()
        y_ours = q(x)
        torch.testing.assert_close(y_engine, y_ours, rtol=1e-5, atol=1e-5)
        checked += s > 0
    assert checked >= 4                                              # layers with residual channels


def writer_read(path):
    from arcquant.export.importer import read_tensors
    return read_tensors(path)


def test_trtllm_arc_round_trip_same_codes_and_logits(tokenizer, tmp_path):
    model, ck, _ = _checkpoint(tokenizer, tmp_path, act_scale="static")
    export_checkpoint(ck, "trtllm-arc", tmp_path / "trt", dtype="float32", max_shard_size="100KB")
    index = json.loads((tmp_path / "trt" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1                # really sharded
    back, _, meta = load_exported(tmp_path / "trt")
    assert meta["format"] == "trtllm-arc"
    for name, q in _quant_layers(model).items():
        r = back.get_submodule(name)
        assert torch.equal(r.perm, q.perm) and torch.equal(r.tail, q.tail)
        assert torch.equal(r.weight_packed, q.weight_packed)
        assert torch.equal(r.weight_scale.view(torch.uint8), q.weight_scale.view(torch.uint8))
        # ModelOpt stores 1/global_scale: the tensor scale comes back within one float32 ulp
        torch.testing.assert_close(r.weight_global_scale, q.weight_global_scale, rtol=1.2e-7, atol=0)
    torch.testing.assert_close(back(IDS).logits, model(IDS).logits, rtol=1e-4, atol=1e-4)


# ---- compressed-tensors ---------------------------------------------------------------------
def test_compressed_tensors_package_reads_our_folder(tokenizer, tmp_path):
    pytest.importorskip("compressed_tensors", reason="the [test] extra installs compressed-tensors")
    from compressed_tensors.compressors.nvfp4.helpers import unpack_fp4_from_uint8
    from compressed_tensors.quantization.lifecycle.forward import dequantize
    from transformers import AutoModelForCausalLM
    model, ck, _ = _checkpoint(tokenizer, tmp_path, method="rtn", act_scale="static")
    export_checkpoint(ck, "compressed-tensors", tmp_path / "ct", dtype="bfloat16")
    ct, info = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.bfloat16, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ours = _quant_layers(model)
    seen = 0
    for name, mod in ct.named_modules():
        if not hasattr(mod, "weight_packed"):
            continue
        n, half = mod.weight_packed.shape
        codes = unpack_fp4_from_uint8(mod.weight_packed, n, 2 * half, dtype=torch.float32)
        w = dequantize(codes, mod.weight_scale.float(), args=mod.quantization_scheme.weights,
                       global_scale=mod.weight_global_scale, dtype=torch.float32)
        mine = ours[name].dequantized_weight()
        # the package rounds twice (code * (scale / global)), we once: at most 1 ulp apart
        torch.testing.assert_close(w, mine, rtol=2.4e-7, atol=0)
        assert torch.equal(mod.input_global_scale.reshape(()), ours[name].input_global_scale)
        seen += 1
    assert seen == len(ours) == 14


def test_compressed_tensors_round_trip_identical(tokenizer, tmp_path):
    model, ck, _ = _checkpoint(tokenizer, tmp_path, method="rtn", act_scale="static")
    export_checkpoint(ck, "compressed-tensors", tmp_path / "ct", dtype="float32")
    cfg = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert cfg["format"] == "nvfp4-pack-quantized" and cfg["config_groups"]["group_0"]["input_activations"]["dynamic"] == "local"
    t = writer_read(tmp_path / "ct")
    for layer in range(2):                                # fused groups share their tensor scales
        for group in (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj")):
            for scale in ("weight_global_scale", "input_global_scale"):
                vals = [t[f"model.layers.{layer}.{g}.{scale}"] for g in group]
                assert all(torch.equal(v, vals[0]) for v in vals)
    back, _, _ = load_exported(tmp_path / "ct")
    for name, q in _quant_layers(model).items():
        assert torch.equal(back.get_submodule(name).dequantized_weight(), q.dequantized_weight())
    assert torch.equal(back(IDS).logits, model(IDS).logits)


def test_arc_fallback_is_plain_rtn_of_the_original_weights(tokenizer, tmp_path, capsys):
    model, ck, reference = _checkpoint(tokenizer, tmp_path)          # default: blocks order, s > 0
    rec = export_checkpoint(ck, "compressed-tensors", tmp_path / "ct", dtype="float32")
    assert any("accuracy drops to RTN level" in w for w in rec["warnings"])
    assert "model.embed_tokens" in rec["unquantized_modules"] and rec["excluded"] == ["lm_head"]
    assert "accuracy drops to RTN level" in capsys.readouterr().out
    back, _, _ = load_exported(tmp_path / "ct")
    for name, q in _quant_layers(model).items():
        r = back.get_submodule(name)
        assert r.s == 0 and torch.equal(r.perm, torch.arange(q.in_features, dtype=torch.int32))
        rtn = nvfp4.fake_quantize(reference[name], q.weight_global_scale)
        assert torch.equal(r.dequantized_weight(), rtn)


def test_modelopt_nvfp4_round_trip(tokenizer, tmp_path):
    model, ck, _ = _checkpoint(tokenizer, tmp_path, method="rtn", act_scale="static")
    export_checkpoint(ck, "modelopt-nvfp4", tmp_path / "mo", dtype="float32")
    hf = json.loads((tmp_path / "mo" / "hf_quant_config.json").read_text())["quantization"]
    assert hf["quant_algo"] == "NVFP4"
    t = writer_read(tmp_path / "mo")
    q = model.model.layers[0].self_attn.q_proj
    assert torch.equal(t["model.layers.0.self_attn.q_proj.weight"], q.weight_packed)
    assert t["model.layers.0.self_attn.q_proj.weight_scale_2"].shape == ()
    back, _, _ = load_exported(tmp_path / "mo")
    torch.testing.assert_close(back(IDS).logits, model(IDS).logits, rtol=1e-4, atol=1e-4)


# ---- bad input ----------------------------------------------------------------------------------
def test_export_refusals(tokenizer, tmp_path):
    _, rtn, _ = _checkpoint(tokenizer, tmp_path, "rtn", method="rtn")
    with pytest.raises(ExportError, match="no residual channels"):
        export_checkpoint(rtn, "trtllm-arc", tmp_path / "x")
    with pytest.raises(ExportError, match="valid formats: trtllm-arc"):
        export_checkpoint(rtn, "gguf", tmp_path / "x")
    _, i4, _ = _checkpoint(tokenizer, tmp_path, "i4", fmt="int4", s_multiple=128, target_bits=None)
    with pytest.raises(ExportError, match="NVFP4 only"):
        export_checkpoint(i4, "trtllm-arc", tmp_path / "x")
    _, a16, _ = _checkpoint(tokenizer, tmp_path, "a16", method="w4a16")
    with pytest.raises(ExportError, match="compressed-tensors"):
        export_checkpoint(a16, "modelopt-nvfp4", tmp_path / "x")
    _, wres, _ = _checkpoint(tokenizer, tmp_path, "wres", method="arc+wres")
    for fmt in ("trtllm-arc", "compressed-tensors"):
        with pytest.raises(ExportError, match="arc\\+wres has a second weight tail"):
            export_checkpoint(wres, fmt, tmp_path / "x")
    assert not (tmp_path / "x").exists()
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="--force"):
        export_checkpoint(rtn, "compressed-tensors", tmp_path / "taken")
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"


def test_interrupted_export_leaves_no_folder(tokenizer, tmp_path, monkeypatch):
    _, ck, _ = _checkpoint(tokenizer, tmp_path)

    def boom(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(writer, "write_shards", boom)
    with pytest.raises(KeyboardInterrupt):
        export_checkpoint(ck, "trtllm-arc", tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_w4a16_exports_weights_only_compressed_tensors(tokenizer, tmp_path):
    model, ck, _ = _checkpoint(tokenizer, tmp_path, method="w4a16")
    export_checkpoint(ck, "compressed-tensors", tmp_path / "ct", dtype="float32")
    group = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"]
    assert group["input_activations"] is None
    assert not any(k.endswith("input_global_scale") for k in writer_read(tmp_path / "ct"))
    back, _, _ = load_exported(tmp_path / "ct")
    assert torch.equal(back(IDS).logits, model(IDS).logits)
