"""The main path, a screen each: load -> quantize -> save; load a checkpoint -> run."""
from pathlib import Path

import torch

from .checkpoint import is_checkpoint, load_quantized
from .config import CalibConfig, QuantConfig
from .evaluate import perplexity
from .export import detect as detect_export, load_exported
from .modeling import load_model
from .quantize import quantize_model
from .stream import quantize_streaming


def quantize_to_folder(model_name: str, out, qcfg: QuantConfig, ccfg: CalibConfig, device="cpu",
                       force=False, progress=True, restart=False, max_memory=None,
                       snapshot_every=600.0) -> dict:
    """Quantize `model_name` layer by layer from its files into a checkpoint folder (bounded
    memory, resumable: arcquant/stream.py); -> the quantization report."""
    return quantize_streaming(model_name, out, qcfg, ccfg, device, force, restart, max_memory,
                              snapshot_every, progress=progress)


def load_any(path_or_name: str, device="cpu"):
    """A checkpoint folder, an exported NVFP4 folder (ours or another tool's) or a plain model
    -> (model, tokenizer, meta or None)."""
    if is_checkpoint(path_or_name):
        return load_quantized(path_or_name, device)
    if Path(path_or_name).is_dir() and detect_export(path_or_name):
        return load_exported(path_or_name, device)
    model, tok = load_model(path_or_name)
    return model.to(device), tok, None


def quantize_in_memory(model_name: str, qcfg: QuantConfig, ccfg: CalibConfig, device="cpu", progress=True):
    model, tok = load_model(model_name)
    report = quantize_model(model, tok, qcfg, ccfg, device=device, progress=progress)
    return model, tok, report


@torch.no_grad()
def generate(model, tok, prompt: str, max_new_tokens: int = 32, device="cpu") -> str:
    """Greedy completion of `prompt` (no sampling: reproducible)."""
    ids = tok(prompt, return_tensors="pt").input_ids.to(device)
    out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=tok.pad_token_id or tok.eos_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def generate_gpu(path_or_name: str, prompt: str, max_new_tokens: int = 32, device="cuda") -> str:
    """Greedy completion on a GPU: a checkpoint's packed weights go straight to the device, the
    Triton kernels run every layer they can (the split is logged), decode steps replay a CUDA graph."""
    from .engine import Engine
    from .gpu import use_kernels
    if not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA GPU here; use --device cpu (the reference backend)")
    if is_checkpoint(path_or_name):
        model, tok, _ = load_quantized(path_or_name, device, dtype=torch.bfloat16)
        use_kernels(model)
    else:
        model, tok = load_model(path_or_name, dtype=torch.bfloat16)
        model = model.to(device)
    ids = tok(prompt, return_tensors="pt").input_ids
    out = Engine(model, 1, ids.shape[1] + max_new_tokens + 1).generate(ids, max_new_tokens)
    return tok.decode(out[0], skip_special_tokens=True)


def evaluate(model, tok, text="wiki-test", seqlen=512, tokens=65536, device="cpu", progress=True) -> dict:
    return perplexity(model, tok, text, seqlen, tokens, device=device, progress=progress)
