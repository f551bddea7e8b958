"""One comparison of methods on one model: perplexity, zero-shot tasks, average bits.

run_comparison quantizes the model once per method (same calibration data, same layers),
evaluates it, and appends one JSON line per finished cell to OUT/results.jsonl; a rerun skips
the cells already there (same model, method and settings), so an interrupted run resumes.
write_outputs renders OUT/table.md, OUT/results.json and OUT/plot.png from those lines.
"""
import hashlib
import json
import time
from pathlib import Path

import torch

from . import pipeline
from .config import CalibConfig, QuantConfig

# issue 3's table: every baseline of the paper, ARC in each format, and what goes beyond it
# (label -> QuantConfig fields over the command line's; s-bearing methods at the 5.5-bit budget)
PRESETS = {"paper": {
    "fp": dict(method="fp"), "w4a16": dict(method="w4a16"), "w4a8": dict(method="w4a8"),
    "rtn nvfp4": dict(method="rtn"), "rtn mxfp4": dict(method="rtn", fmt="mxfp4"),
    "rtn int4": dict(method="rtn", fmt="int4", s_multiple=128),
    "hadamard full": dict(method="hadamard", rotate=0), "hadamard b16": dict(method="hadamard", rotate=16),
    "smoothquant": dict(method="smoothquant"), "atom": dict(method="atom"),
    "arc nvfp4": dict(method="arc"), "arc mxfp4": dict(method="arc", fmt="mxfp4"),
    "arc int4": dict(method="arc", fmt="int4", s_multiple=128),
    "arc+hadamard b16": dict(method="arc+hadamard", rotate=16), "arc+gptq": dict(method="arc+gptq"),
    "arc+wres": dict(method="arc+wres"),
}}


def preset_configs(name: str, base: dict, only=None) -> dict:
    """{label: QuantConfig} of preset `name`, each preset's fields over `base` (QuantConfig
    fields); `only`: a subset of its labels, run in the order given (the preset's order without it)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; valid: {', '.join(PRESETS)}")
    cells = PRESETS[name]
    unknown = [x for x in (only or ()) if x not in cells]
    if unknown:
        raise ValueError(f"{unknown} not in preset {name!r}; its labels: {', '.join(cells)}")
    labels = dict.fromkeys(only) if only else cells                     # user order, repeats dropped
    return {label: QuantConfig(**{**base, **cells[label]}) for label in labels}


def device_name(device) -> str:
    d = torch.device(device)
    return torch.cuda.get_device_name(d) if d.type == "cuda" else d.type


def cell_key(model: str, qcfg: QuantConfig, ccfg: CalibConfig, eval_settings: dict) -> str:
    blob = json.dumps([model, qcfg.to_dict(), vars(ccfg), eval_settings], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _done(path: Path) -> dict:
    if not path.exists():
        return {}
    rows = {}
    for line in path.read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:                     # a line cut by an interruption: redo that cell
            continue
        rows[r["key"]] = r
    return rows


def _append_line(path: Path, line: str) -> None:
    """Append one line; after a last line cut by an interruption, start a new line first (else
    the new cell would be glued to the fragment and lost on the next read)."""
    cut = False
    if path.exists() and path.stat().st_size:
        with path.open("rb") as f:
            f.seek(-1, 2)
            cut = f.read(1) != b"\n"
    with path.open("a") as f:
        f.write(("\n" if cut else "") + line + "\n")


def run_comparison(model: str, configs: dict, ccfg: CalibConfig, out: Path | None, text="wiki-test",
                   seqlen=512, tokens=65536, tasks=(), limit=None, device="cpu", log=print,
                   batch_size: int = 16) -> list[dict]:
    """configs: {label: QuantConfig}. -> rows (finished cells, in the order of `configs`).
    Calibration, perplexity and the zero-shot tasks run on `device` (batch_size: zero-shot)."""
    settings = {"text": text, "seqlen": seqlen, "tokens": tokens, "tasks": list(tasks), "limit": limit}
    path = None if out is None else Path(out) / "results.jsonl"
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    done, rows = _done(path) if path else {}, []
    for label, qcfg in configs.items():
        key = cell_key(model, qcfg, ccfg, settings)
        if key in done:
            log(f"  {label:24s} done before (skipped)")
            rows.append({**done[key], "limit": limit})          # the key holds the limit: lines before it was stored
            continue
        t0 = time.time()
        if torch.device(device).type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        mdl, tok, rep = pipeline.quantize_in_memory(model, qcfg, ccfg, device, progress=False)
        mdl = mdl.to(device)                           # calibration hands layers back on the CPU
        row = {"key": key, "label": label, "model": model, "method": qcfg.method, "config": qcfg.to_dict(),
               "calibration": vars(ccfg), "avg_bits": rep["avg_bits"], "limit": limit,
               "device": device_name(device), "torch": torch.__version__,
               **pipeline.evaluate(mdl, tok, text, seqlen, tokens, device, progress=False)}
        if tasks:
            from .zeroshot import evaluate_zeroshot
            zs = evaluate_zeroshot(mdl, tok, tasks, limit, batch_size, device=device)
            row.update(zeroshot=zs["tasks"], average_acc=zs["average_acc"], lm_eval=zs["lm_eval"])
        row["seconds"] = round(time.time() - t0, 1)
        if torch.device(device).type == "cuda":                      # what the cell's batch size costs
            row["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
            row["peak_gpu_reserved_gib"] = round(torch.cuda.max_memory_reserved(device) / 2**30, 2)
        rows.append(row)
        if path is not None:
            _append_line(path, json.dumps(row))
        log(f"  {label:24s} ppl {row['ppl']:8.3f}  avg bits {row['avg_bits']:.3f}"
            + (f"  zero-shot avg acc {row['average_acc']:.4f}" if tasks else ""))
    return rows


def cells_from_tasks(task_rows: list[dict], ppl_rows: list[dict]) -> list[dict]:
    """Whole-table rows (as run_comparison's) out of scripts/zeroshot_tasks.py's one-task rows
    (timing rows, those with a limit, left out) and a perplexity run of the same configs
    (another results file: rows with "config" and "ppl"; matched on model and config). A cell
    missing a task keeps the tasks it has and gets no average. Order: first appearance."""
    ppl = {(r["model"], json.dumps(r["config"], sort_keys=True)): r for r in ppl_rows}
    cells = {}
    for r in task_rows:
        if r.get("limit"):
            continue
        k = (r["model"], json.dumps(r["config"], sort_keys=True))
        if k not in ppl:
            raise ValueError(f"no perplexity row for {r['label']!r} of {r['model']} (config {r['config']}) "
                             "in the perplexity file: run that config first (`arcquant compare` or scripts/ppl_variants.py --set baselines)")
        p = ppl[k]
        c = cells.setdefault(k, {"label": r["label"], "model": r["model"], "method": r["config"]["method"],
                                 "config": r["config"], "calibration": r["calibration"], "avg_bits": r["avg_bits"],
                                 "limit": None, "device": r["device"], "torch": r["torch"], "lm_eval": r["lm_eval"],
                                 "ppl": p["ppl"], "ppl_run": {f: p.get(f) for f in ("device", "torch", "avg_bits", "seconds")},
                                 **{f: p[f] for f in ("text", "seqlen", "tokens")},
                                 "zeroshot": {}, "seconds": 0.0, "peak_gpu_gib": 0.0})
        c["zeroshot"][r["task"]] = {m: r[m] for m in ("acc", "acc_norm", "perplexity") if m in r}
        c["seconds"] = round(c["seconds"] + r["seconds"], 1)
        c["peak_gpu_gib"] = max(c["peak_gpu_gib"], r.get("peak_gpu_gib", 0.0))
    tasks = {t for c in cells.values() for t in c["zeroshot"]}
    for c in cells.values():
        if set(c["zeroshot"]) == tasks:
            c["average_acc"] = sum(v["acc"] for v in c["zeroshot"].values()) / len(tasks)
    return list(cells.values())


def table(rows: list[dict]) -> str:
    tasks = sorted({t for r in rows for t in r.get("zeroshot", {})})
    head = ["method", "avg bits", "ppl"] + tasks + (["avg acc"] if tasks else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        zs = r.get("zeroshot", {})
        cells = [r["label"], f"{r['avg_bits']:.2f}", f"{r['ppl']:.2f}"]
        cells += [f"{100 * zs[t]['acc']:.1f}" if t in zs else "" for t in tasks]
        cells += [f"{100 * r['average_acc']:.1f}" if "average_acc" in r else "-"] if tasks else []
        lines.append("| " + " | ".join(cells) + " |")
    r0 = rows[0]
    lines.append(f"\n{r0['model']}: perplexity on {r0['text']} ({r0['tokens']} tokens, seqlen {r0['seqlen']}); "
                 f"calibration {r0['calibration']['source']} {r0['calibration']['nsamples']}x"
                 f"{r0['calibration']['seqlen']} seed {r0['calibration']['seed']}"
                 + (f"; zero-shot acc (%) through lm-evaluation-harness {r0.get('lm_eval')}, "
                    + ("full splits" if not r0.get("limit") else
                       f"first {r0['limit']} documents per task (--limit: a quick run)") if tasks else "")
                 + "".join(sorted({f"; run on {r['device']}, torch {r['torch']}" for r in rows if "device" in r}))
                 + "".join(sorted({f"; perplexity from another run (on {r['ppl_run'].get('device') or 'the CPU'}, "
                                   f"torch {r['ppl_run'].get('torch')})" for r in rows if "ppl_run" in r})))
    return "\n".join(lines) + "\n"


def _same_comparison(a: dict, b: dict) -> bool:
    """Two cells of one table: same model, evaluation text and size, calibration, tasks and
    limit (a line written before the limit was stored matches any limit)."""
    fields = ("model", "text", "seqlen", "tokens", "calibration")
    return (all(a.get(f) == b.get(f) for f in fields) and a.get("limit", b.get("limit")) == b.get("limit")
            and set(a.get("zeroshot", {})) == set(b.get("zeroshot", {})))


def all_rows(rows: list[dict], out: Path) -> list[dict]:
    """rows plus the finished cells of earlier runs into the same OUT that belong to the same
    comparison (a later run with other methods adds to the table instead of replacing it); one
    row per label - this run's, else the latest - in the order labels were first run."""
    if not rows:
        return rows
    limit = rows[0].get("limit")
    earlier = [{**r, "limit": limit} for r in _done(Path(out) / "results.jsonl").values()
               if _same_comparison(r, rows[0])]
    by_label = {r["label"]: r for r in earlier}
    by_label.update({r["label"]: r for r in rows})
    return list(by_label.values())


def write_outputs(rows: list[dict], out: Path) -> None:
    """OUT/table.md, results.json and plot.png: this run's rows and the earlier cells of the same
    comparison in OUT (all_rows)."""
    out = Path(out)
    rows = all_rows(rows, out)
    (out / "table.md").write_text(table(rows))
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    try:
        import matplotlib
    except ImportError:
        return                                             # the plot needs the [analysis] extra
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    panels = [("ppl", "perplexity (lower is better; log scale)", "tab:blue", lambda r: r["ppl"])]
    if any("average_acc" in r for r in rows):                # a cell missing a task: no bar
        panels.append(("acc", "zero-shot average acc % (higher is better)", "tab:green",
                       lambda r: 100 * r["average_acc"] if "average_acc" in r else float("nan")))
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 0.8 + 0.32 * len(rows)), squeeze=False)
    labels = [f"{r['label']} ({r['avg_bits']:.2f} b)" for r in rows]
    for ax, (kind, title, color, value) in zip(axes[0], panels):
        vals = [value(r) for r in rows]
        ax.barh(labels, vals, color=color)
        have = [v for v in vals if v == v]                 # NaN (a cell missing a task): no bar, no label
        ax.invert_yaxis()                                  # the table's order, top to bottom
        if kind == "ppl":
            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.set_xticks([t for t in (10, 15, 20, 30, 50, 100, 200, 500, 1000, 10000)
                           if min(have) * 0.8 <= t <= max(have) * 1.2])
        else:                                              # differences of a few points: zoom in
            ax.set_xlim(max(0.0, min(have) - 3), max(have) + 2)
        for y, v in enumerate(vals):
            if v == v:
                ax.text(v, y, f" {v:.1f}", va="center", fontsize=8)
        ax.axvline(vals[0], color="grey", lw=0.8, ls="--")  # the first row (fp) as the reference
        ax.set_title(title, fontsize=10)
    fig.suptitle(rows[0]["model"])
    fig.tight_layout()
    fig.savefig(out / "plot.png", dpi=100)
    plt.close(fig)
