"""Perplexity, GPTQ protocol: join the text with blank lines, tokenize once, cut into
non-overlapping windows of `seqlen`, mean token NLL over all windows, exp.
(Not lm-eval's word perplexity.)"""
import math

import torch
from tqdm.auto import tqdm

from .data import load_text


@torch.no_grad()
def perplexity(model, tokenizer, text: str = "wiki-test", seqlen: int = 512, max_tokens: int | None = 65536,
               batch_size: int = 8, device: str = "cpu", progress: bool = True) -> dict:
    """-> {"ppl", "tokens" (tokens in the windows), "windows", "seqlen", "text"}."""
    ids = tokenizer(load_text(text), return_tensors="pt").input_ids[0]
    n = ids.numel() // seqlen
    if max_tokens is not None:
        n = min(n, max_tokens // seqlen)
    if n < 1:
        raise ValueError(f"{text!r} gives fewer than one window of {seqlen} tokens")
    windows = ids[: n * seqlen].view(n, seqlen)
    nll, count = 0.0, 0
    for chunk in tqdm(windows.split(batch_size), desc=f"ppl {text}", disable=not progress):
        chunk = chunk.to(device)
        logits = model(chunk, use_cache=False).logits.float()          # (B, T, V)
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1), reduction="sum")
        nll += loss.item()
        count += chunk[:, 1:].numel()
    return {"ppl": math.exp(nll / count), "tokens": n * seqlen, "windows": n, "seqlen": seqlen, "text": text}
