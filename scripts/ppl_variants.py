"""Held-out perplexity of quantization variants on one model; appends JSON lines (resumable).

    python scripts/ppl_variants.py --out results/variants-smollm2.jsonl
Each variant is a QuantConfig; finished variants (same name, same eval settings) are skipped.
"""
import argparse
import json
import time
from pathlib import Path

import torch

from arcquant.config import CalibConfig, QuantConfig
from arcquant.evaluate import perplexity
from arcquant.modeling import load_model
from arcquant.quantize import quantize_model

VARIANTS = {
    "fp": dict(method="fp"),
    "w4a16": dict(method="w4a16"),
    "w4a8": dict(method="w4a8"),
    "rtn-dynamic": dict(method="rtn", act_scale="dynamic"),
    "rtn-token": dict(method="rtn", act_scale="token"),
    "arc-paper (sorted, dynamic)": dict(method="arc", order="sorted", act_scale="dynamic"),
    "reorder-only (sorted, s=0, dynamic)": dict(method="arc", order="sorted", act_scale="dynamic", residual=False),
    "arc sorted, token": dict(method="arc", order="sorted", act_scale="token"),
    "arc none, dynamic": dict(method="arc", order="none", act_scale="dynamic"),
    "arc none, token": dict(method="arc", order="none", act_scale="token"),
    "arc blocks, dynamic": dict(method="arc", order="blocks", act_scale="dynamic"),
    "arc blocks, token": dict(method="arc", order="blocks", act_scale="token"),
    "arc blocks, static": dict(method="arc", order="blocks", act_scale="static"),
    "reorder-only (blocks, s=0, token)": dict(method="arc", order="blocks", act_scale="token", residual=False),
    "arc blocks, token, thr 1/16": dict(method="arc", order="blocks", act_scale="token", threshold=1 / 16),
    "arc blocks, token, s mult 16": dict(method="arc", order="blocks", act_scale="token", s_multiple=16),
    "arc blocks, token, budget 5.33": dict(method="arc", order="blocks", act_scale="token", target_bits=5.327),
    "arc blocks, token, budget 5.5": dict(method="arc", order="blocks", act_scale="token", target_bits=5.5),
    "arc sorted, token, budget 5.5": dict(method="arc", order="sorted", act_scale="token", target_bits=5.5),
    "arc blocks, dynamic, budget 5.5": dict(method="arc", order="blocks", act_scale="dynamic", target_bits=5.5),
    "arc blocks, token, budget 6.0": dict(method="arc", order="blocks", act_scale="token", target_bits=6.0),
}


# issue 3: the paper's baselines in the same path (s-bearing methods use the default 5.5-bit budget)
BASELINES = {
    "fp": dict(method="fp"), "w4a16": dict(method="w4a16"), "w4a8": dict(method="w4a8"),
    "rtn nvfp4": dict(method="rtn"), "rtn mxfp4": dict(method="rtn", fmt="mxfp4"),
    "rtn int4": dict(method="rtn", fmt="int4", s_multiple=128),
    "hadamard full": dict(method="hadamard", rotate=0), "hadamard b16": dict(method="hadamard", rotate=16),
    "hadamard b32": dict(method="hadamard", rotate=32), "hadamard b128": dict(method="hadamard", rotate=128),
    "smoothquant a0.5": dict(method="smoothquant", alpha=0.5),
    "atom, budget 5.5": dict(method="atom"),
    "arc nvfp4, budget 5.5": dict(method="arc"), "arc mxfp4, budget 5.5": dict(method="arc", fmt="mxfp4"),
    "arc int4, budget 5.5": dict(method="arc", fmt="int4", s_multiple=128),
    "arc+hadamard b16, budget 5.5": dict(method="arc+hadamard", rotate=16),
    "gptq nvfp4": dict(method="gptq"), "arc+gptq nvfp4, budget 5.5": dict(method="arc+gptq"),
    "arc+wres nvfp4, budget 5.5": dict(method="arc+wres"),
    "arc+wres except down_proj, budget 5.5": dict(method="arc+wres", wres_skip=("down_proj",)),
    "arc+gptq+wres nvfp4, budget 5.5": dict(method="arc+gptq+wres"),
}
SETS = {"variants": VARIANTS, "baselines": BASELINES}


def _explicit(kw: dict) -> dict:
    """Variants without 'budget' in their name use the paper's threshold rule for s."""
    return {"target_bits": None, **kw}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--out", required=True)
    ap.add_argument("--tokens", type=int, default=65536)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--calib", type=int, nargs=2, default=(32, 512), metavar=("N", "SEQLEN"))
    ap.add_argument("--only", nargs="*", help="variant names to run (default: all)")
    ap.add_argument("--set", default="variants", choices=list(SETS), help="variants (issue 2) or baselines (issue 3)")
    ap.add_argument("--md", help="render the JSON lines of --out as a markdown table to this file (and a bar "
                                 "chart next to it, same name with .png)")
    a = ap.parse_args()
    out = Path(a.out)
    if a.md:
        Path(a.md).write_text(render(out))
        plot(out, Path(a.md).with_suffix(".png"))
        return
    done = set()
    if out.exists():
        done = {json.loads(l)["variant"] for l in out.read_text().splitlines() if l.strip()}
    ccfg = CalibConfig(source="c4", nsamples=a.calib[0], seqlen=a.calib[1], seed=0)
    table = SETS[a.set]
    names = a.only or list(table)
    unknown = [n for n in names if n not in table]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; known: {list(table)}")
    for name in names:
        kw = table[name] if a.set == "variants" else {"target_bits": 5.5, **table[name]}
        if name in done:
            continue
        torch.manual_seed(0)
        model, tok = load_model(a.model)
        t0 = time.time()
        qcfg = QuantConfig(**_explicit(kw))
        rep = quantize_model(model, tok, qcfg, ccfg, progress=False)
        r = perplexity(model, tok, "wiki-test", a.seqlen, a.tokens, progress=False)
        row = {"variant": name, "model": a.model, "config": qcfg.to_dict(), "avg_bits": rep["avg_bits"],
               **r, "calib": f"c4 {ccfg.nsamples}x{ccfg.seqlen} seed {ccfg.seed}",
               "torch": torch.__version__, "seconds": round(time.time() - t0, 1)}
        print(json.dumps(row), flush=True)
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")


def reused_note(rows: list) -> str:
    """Rows copied from another file of the same code path and settings (`reused_from`: 'FILE: variant')."""
    reused = [f"{r['variant']} ({r['reused_from']})" for r in rows if "reused_from" in r]
    return (f" Rows run once for another table of the same code path and settings: {', '.join(reused)}."
            if reused else "")


def render_baselines(rows: list) -> str:
    """Issue 3 table: every method in one path; gap closed against rtn of the same format."""
    by = {r["variant"]: r for r in rows}
    w4a8 = by["w4a8"]["ppl"] if "w4a8" in by else None              # gap column empty until it has run
    lines = ["| variant | method | format | rotation | avg bits | ppl | rtn->w4a8 gap closed |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        c = r["config"]
        rtn = by.get(f"rtn {c.get('fmt', 'nvfp4')}")
        gap = "" if c["method"] in ("fp", "w4a16", "w4a8") or rtn is None or w4a8 is None else \
            f"{100 * (rtn['ppl'] - r['ppl']) / (rtn['ppl'] - w4a8):.0f}%"
        rot = c.get("rotate")
        rot = "" if rot is None else ("full" if rot == 0 else f"block {rot}")
        lines.append(f"| {r['variant']} | {c['method']} | {c.get('fmt', 'nvfp4')} | {rot} | {r['avg_bits']:.2f} | "
                     f"{r['ppl']:.2f} | {gap} |")
    r0 = rows[0]
    lines.append(f"\n{r0['model']}; perplexity on {r0['text']} ({r0['tokens']} tokens, seqlen {r0['seqlen']}, "
                 f"GPTQ protocol); calibration {r0['calib']}; per-token activation scale; torch {r0['torch']}, CPU. "
                 "Gap closed: (rtn - x) / (rtn - w4a8) with rtn of the same 4-bit format."
                 + reused_note(rows))
    return "\n".join(lines) + "\n"


def render(jsonl: Path) -> str:
    rows = [json.loads(l) for l in jsonl.read_text().splitlines() if l.strip()]
    if any(r["variant"] == "rtn nvfp4" for r in rows):
        return render_baselines(rows)
    by = {r["variant"]: r for r in rows}
    w4a8 = by["w4a8"]["ppl"] if "w4a8" in by else None              # gap column empty until it has run
    lines = ["| variant | method | order | act scale | avg bits | ppl | rtn->w4a8 gap closed |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        c = r["config"]
        gap = ""
        if c["method"] in ("rtn", "arc"):
            rtn = by.get(f"rtn-{c['act_scale']}", by["rtn-token"])["ppl"]
            gap = f"{100 * (rtn - r['ppl']) / (rtn - w4a8):.0f}%"
        order = c["order"] if c["method"] == "arc" else ""
        act = c["act_scale"] if c["method"] in ("rtn", "arc") else ""
        lines.append(f"| {r['variant']} | {c['method']} | {order} | {act} | {r['avg_bits']:.2f} | "
                     f"{r['ppl']:.2f} | {gap} |")
    r0 = rows[0]
    lines.append(f"\n{r0['model']}; perplexity on {r0['text']} ({r0['tokens']} tokens, seqlen {r0['seqlen']}, "
                 f"GPTQ protocol); calibration {r0['calib']}; torch {r0['torch']}, CPU. The gap closed is "
                 "(rtn - x) / (rtn - w4a8), against rtn with the same activation scale (rtn-token for static"
                 + (", and for dynamic: rtn-dynamic was not run" if "rtn-dynamic" not in by else "") + ")."
                 + reused_note(rows))
    return "\n".join(lines) + "\n"


def plot(jsonl: Path, png: Path) -> None:
    """Horizontal bars: perplexity per variant (log scale), average bits in the labels."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [json.loads(l) for l in jsonl.read_text().splitlines() if l.strip()]
    rows.sort(key=lambda r: r["ppl"])
    fig, ax = plt.subplots(figsize=(9, 0.32 * len(rows) + 1.2))
    colors = ["tab:green" if r["config"]["method"].startswith("arc") else "tab:gray" if r["config"]["method"] in
              ("fp", "w4a16", "w4a8") else "tab:blue" for r in rows]
    ax.barh([f"{r['variant']} ({r['avg_bits']:.2f} b)" for r in rows], [r["ppl"] for r in rows], color=colors)
    ax.set_xscale("log")
    ax.invert_yaxis()
    ax.set_xlabel(f"perplexity on {rows[0]['text']}, {rows[0]['tokens']} tokens (lower is better; log scale)")
    ax.set_title(f"{rows[0]['model']}: ARC variants green, references gray, baselines blue", fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
