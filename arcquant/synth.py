"""Randomly initialised models of real shapes, written layer by layer (bounded memory).

For tests of scale (a model larger than a memory cap), benchmarks of a model shape
(Llama-3.1-8B, Qwen2.5-7B) and MoE tests. Weights ~ N(0, 0.02); `outliers` input channels
of every RMSNorm weight are multiplied by `outlier_gain`, so the activations entering
q/k/v and gate/up have the few large channels real LLMs have and ARC picks a realistic s.
The tokenizer is SmolLM2's (ids < 49152, so any vocabulary at least that large works).
"""
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from .modeling import resolve_model

SHAPES = {
    "tiny-llama": dict(model_type="llama", hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, vocab_size=49152, tie_word_embeddings=True),
    "llama-3.1-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                         rope_theta=500000.0, max_position_embeddings=8192, tie_word_embeddings=False),
    "qwen2.5-7b": dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                       rope_theta=1000000.0, max_position_embeddings=8192, tie_word_embeddings=False),
}


def _config(shape: dict):
    from transformers import AutoConfig
    kw = dict(shape)
    return AutoConfig.for_model(kw.pop("model_type"), **kw)


def write_random_model(folder, shape: dict | str, dtype=torch.bfloat16, seed: int = 0, outliers: int = 8,
                       outlier_gain: float = 30.0, device: str = "cpu", tokenizer_dir=None) -> Path:
    """Write config.json, tokenizer files and one safetensors file per decoder layer to `folder`."""
    from transformers import AutoModelForCausalLM
    shape = SHAPES[shape] if isinstance(shape, str) else shape
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = _config(shape)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    gen = torch.Generator(device).manual_seed(seed)
    hot = torch.randperm(config.hidden_size, generator=gen, device=device)[:outliers].cpu()
    current, tensors, rest, weight_map = None, {}, {}, {}
    for name, t in model.state_dict().items():                   # embed, layer 0, 1, ..., norm, head
        if config.tie_word_embeddings and name == "lm_head.weight":
            continue
        value = _random(name, t.shape, dtype, gen, hot, outlier_gain, device)
        if ".layers." not in name:
            rest[name] = value
            continue
        key = ".".join(name.split(".")[:3])                        # model.layers.i
        if key != current and tensors:
            _write(folder, current, tensors, weight_map)           # one layer in memory at a time
            tensors = {}
        current, tensors[name] = key, value
    if tensors:
        _write(folder, current, tensors, weight_map)
    _write(folder, "rest", rest, weight_map)
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": model_bytes(folder)}, "weight_map": weight_map}, indent=1))
    config.save_pretrained(folder)
    src = Path(tokenizer_dir) if tokenizer_dir else resolve_model("smollm2-135m")
    for f in src.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")) or f.name == "vocab.json" or f.name == "merges.txt":
            shutil.copy2(f, folder / f.name)
    return folder


def _random(name: str, shape, dtype, gen, hot, gain, device) -> torch.Tensor:
    if name.endswith("norm.weight"):
        w = torch.ones(shape)
        if name.endswith("layernorm.weight"):                      # inputs of q/k/v and gate/up
            w[hot] = gain
        return w.to(dtype)
    return (torch.randn(shape, generator=gen, device=device) * 0.02).to(dtype).cpu()


def _write(folder: Path, key: str, tensors: dict, weight_map: dict) -> None:
    """One shard; its tensor names go into `weight_map` (the HF sharded-checkpoint index)."""
    name = f"{key.replace('.', '-')}.safetensors"
    save_file(tensors, str(folder / name), metadata={"format": "pt"})
    weight_map.update(dict.fromkeys(tensors, name))


def model_bytes(folder) -> int:
    return sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))

