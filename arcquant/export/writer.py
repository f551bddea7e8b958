"""export_checkpoint: an arcquant checkpoint -> an HF-style folder an engine loads.

Folder: config.json (+ quantization_config, dtype), [hf_quant_config.json], sharded
safetensors (model-0000i-of-0000n.safetensors + model.safetensors.index.json, or one
model.safetensors), generation_config.json, tokenizer files, arcquant_export.json
(provenance: source, format, per-layer exactness, warnings). Written to a temporary folder
and renamed, so an interrupted export leaves nothing that looks complete.
"""
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from .. import __version__
from ..checkpoint import META_FILE, unique_state, atomic_folder, load_quantized
from ..qlinear import QuantLinear
from .formats import check_exportable, layer_tensors, quant_configs

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
SKIP_FILES = {META_FILE, "model.safetensors", "config.json"}


def parse_size(text: str) -> int:
    """'5GB', '500MB', '123' -> bytes."""
    units = {"GB": 2**30, "MB": 2**20, "KB": 2**10, "B": 1}
    t = str(text).strip().upper()
    for u, f in units.items():
        if t.endswith(u) and t[: -len(u)].strip().replace(".", "", 1).isdigit():
            return int(float(t[: -len(u)]) * f)
    if t.isdigit():
        return int(t)
    raise ValueError(f"shard size {text!r} is not a size like 5GB, 500MB or a byte count")


def collect_tensors(model, fmt: str, dtype: torch.dtype):
    """-> (tensors {name: tensor}, ignore [unquantized Linear names], exactness {layer: bool})."""
    tensors, exact, ignore, inside = {}, {}, [], set()
    for name, mod in model.named_modules():
        if isinstance(mod, QuantLinear):
            out, exact[name] = layer_tensors(fmt, mod, name)
            tensors.update({f"{name}.{k}": v.contiguous() for k, v in out.items()})
            if mod.bias is not None:
                tensors[f"{name}.bias"] = mod.bias.detach().to(dtype).contiguous()
            inside.add(name)
        elif isinstance(mod, torch.nn.Linear):
            ignore.append(name)
    for key, t in unique_state(model).items():                 # tied lm_head stored once
        if key.rpartition(".")[0] not in inside:                 # quantized layers written above
            tensors[key] = t.to(dtype) if t.is_floating_point() else t
    return tensors, ignore, exact


def write_shards(tensors: dict, folder: Path, max_bytes: int) -> list[str]:
    shards, cur, size = [], {}, 0
    for k, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if cur and size + nbytes > max_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[k], size = t, size + nbytes
    shards.append(cur)
    if len(shards) == 1:
        save_file(shards[0], str(folder / "model.safetensors"), metadata={"format": "pt"})
        return ["model.safetensors"]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for fname, shard in zip(names, shards):
        save_file(shard, str(folder / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    return names


def export_checkpoint(src, fmt: str, out, force: bool = False, dtype: str = "bfloat16",
                      max_shard_size: str = "5GB", warn=print) -> dict:
    """Write `src` (an arcquant checkpoint folder) as `fmt` to `out`; -> the provenance record."""
    from transformers import GenerationConfig
    src, out = Path(src), Path(out)
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}; valid: {', '.join(DTYPES)}")
    max_bytes = parse_size(max_shard_size)
    model, tok, meta = load_quantized(src)
    warnings = check_exportable(fmt, meta)
    for w in warnings:
        warn(f"warning: {w}")
    tensors, ignore, exact = collect_tensors(model, fmt, DTYPES[dtype])
    hf_quant, qconf = quant_configs(fmt, meta, ignore)
    unquantized = sorted({k.rpartition(".")[0] for k in tensors} - set(exact))   # embeddings, norms, ...
    record = {"producer": f"arcquant {__version__}", "source": str(src), "format": fmt, "dtype": dtype,
              "method": meta["quant"]["method"], "quant": meta["quant"], "warnings": warnings,
              "excluded": ignore, "unquantized_modules": unquantized, "layers_exact": exact,
              "exact_layers": sum(exact.values()), "layers": len(exact)}

    def write(tmp: Path):
        for f in src.iterdir():                                   # tokenizer files, chat template
            if f.is_file() and f.name not in SKIP_FILES and f.suffix != ".safetensors":
                shutil.copy2(f, tmp / f.name)
        record["files"] = write_shards(tensors, tmp, max_bytes)
        cfg = model.config.to_dict()
        cfg.update(quantization_config=qconf, dtype=dtype, torch_dtype=dtype)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=1, default=str))
        if hf_quant is not None:
            (tmp / "hf_quant_config.json").write_text(json.dumps(hf_quant, indent=1))
        GenerationConfig.from_model_config(model.config).save_pretrained(tmp)
        (tmp / "arcquant_export.json").write_text(json.dumps(record, indent=1))

    atomic_folder(out, force, write)
    return record
