"""Load an exported folder (ours, or a compressed-tensors / ModelOpt NVFP4 folder written by
another tool) back into QuantLinear layers on the reference backend.

Layers are found by their tensors, not by the config's target patterns:
    NAME.weight_packed (u8)            compressed-tensors NVFP4 (+ input_global_scale: W4A4)
    NAME.weight (u8) + weight_scale_2  ModelOpt NVFP4; with NAME.reorder_index: NVFP4_ARC
Every imported layer uses a static activation tensor scale, as the engines do.
"""
import json
from pathlib import Path

import torch

from .. import arc
from ..checkpoint import CheckpointError, load_files
from ..formats import nvfp4
from ..modeling import set_submodule
from ..qlinear import QuantLinear
from . import layout


def detect(path) -> str | None:
    """-> 'trtllm-arc' | 'modelopt-nvfp4' | 'compressed-tensors' | None."""
    path = Path(path)
    hf = path / "hf_quant_config.json"
    if hf.is_file():
        algo = json.loads(hf.read_text()).get("quantization", {}).get("quant_algo")
        return {"NVFP4_ARC": "trtllm-arc", "NVFP4": "modelopt-nvfp4"}.get(algo)
    cfg = path / "config.json"
    if cfg.is_file():
        q = json.loads(cfg.read_text()).get("quantization_config") or {}
        if q.get("quant_method") == "compressed-tensors" and q.get("format") == "nvfp4-pack-quantized":
            return "compressed-tensors"
    return None


def read_tensors(path: Path) -> dict:
    index = path / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() \
        else ["model.safetensors"]
    return load_files(path, files)


def _pop(t: dict, key: str):
    return t.pop(key) if key in t else None


def _layer(prefix: str, t: dict, dtype) -> QuantLinear:
    """Build one QuantLinear from its tensors (removed from `t`)."""
    if f"{prefix}.weight_packed" in t:                              # compressed-tensors
        codes = nvfp4.unpack(t.pop(f"{prefix}.weight_packed"))       # (N, K)
        scales, gs = t.pop(f"{prefix}.weight_scale"), t.pop(f"{prefix}.weight_global_scale").reshape(())
        in_gs = _pop(t, f"{prefix}.input_global_scale")
        plan = arc.ArcPlan.identity(codes.shape[1])
    else:                                                           # ModelOpt / NVFP4_ARC
        codes = nvfp4.unpack(t.pop(f"{prefix}.weight"))              # (N, K) or (N, K+s)
        scales = t.pop(f"{prefix}.weight_scale")
        gs = torch.ones(()) / t.pop(f"{prefix}.weight_scale_2").float().reshape(())
        in_s = _pop(t, f"{prefix}.input_scale")
        in_gs = None if in_s is None else torch.ones(()) / in_s.float().reshape(())
        perm = _pop(t, f"{prefix}.reorder_index")
        if perm is None:
            plan = arc.ArcPlan.identity(codes.shape[1])
        else:
            k, s = perm.numel(), codes.shape[1] - perm.numel()
            codes, scales = layout.from_trt_arc(codes, scales, k, prefix)   # (N, K), (N, K/16)
            perm = perm.long()
            plan = arc.ArcPlan(perm, perm[k - s:].clone())
    n, k = codes.shape
    if scales.shape != (n, k // nvfp4.BLOCK):
        raise CheckpointError(f"{prefix}: weight scales have shape {tuple(scales.shape)}, expected "
                              f"{(n, k // nvfp4.BLOCK)} for codes of shape {(n, k)}")
    qw = arc.QuantizedWeight(codes, scales.view(torch.float8_e4m3fn), None, None)
    bias = _pop(t, f"{prefix}.bias")
    return QuantLinear(k, n, "nvfp4", "fp4" if in_gs is not None else "none", "static", plan, qw,
                       gs.float(), None if in_gs is None else in_gs.float(),
                       None if bias is None else bias.to(dtype))


def load_exported(path, device: str = "cpu", dtype=torch.float32):
    """-> (model, tokenizer, meta) from an exported folder, in eval mode on `device`."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    path = Path(path)
    fmt = detect(path)
    if fmt is None:
        raise CheckpointError(f"{str(path)!r} is neither an arcquant checkpoint nor an NVFP4 export "
                              "(compressed-tensors nvfp4-pack-quantized, ModelOpt NVFP4 or NVFP4_ARC)")
    cfg_dict = json.loads((path / "config.json").read_text())
    cfg_dict.pop("quantization_config", None)
    config = AutoConfig.for_model(**cfg_dict)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    tensors = read_tensors(path)
    marker = ".weight_packed" if fmt == "compressed-tensors" else ".weight_scale_2"
    prefixes = [k[: -len(marker)] for k in list(tensors) if k.endswith(marker)]
    for prefix in prefixes:
        try:
            model.get_submodule(prefix)
        except AttributeError:
            raise CheckpointError(f"{path}: quantized layer {prefix!r} does not exist in a "
                                  f"{type(model).__name__}") from None
        set_submodule(model, prefix, _layer(prefix, tensors, dtype))
    missing, unexpected = model.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v
                                                 for k, v in tensors.items()}, strict=False)
    quant = set(prefixes)
    rest = [k for k in missing if k.rpartition(".")[0] not in quant
            and not (k.endswith("lm_head.weight") and config.tie_word_embeddings)]
    if rest or unexpected:
        raise CheckpointError(f"{path}: tensors missing {rest[:5]} / unexpected {list(unexpected)[:5]}")
    model.tie_weights()
    tok = AutoTokenizer.from_pretrained(str(path))
    meta = {"format": fmt, "quant": {"method": f"{fmt} import", "fmt": "nvfp4"}, "layers": len(prefixes),
            "avg_bits": sum(m.avg_bits for m in model.modules() if isinstance(m, QuantLinear)) / max(1, len(prefixes))}
    return model.to(device).eval(), tok, meta
