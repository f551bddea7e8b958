"""Zero-shot full splits task by task for one preset cell, quantized once; each finished task is
appended to a JSON-lines file at once (a long CPU run that is cut keeps what it finished).

    python scripts/zeroshot_tasks.py --label "arc nvfp4" --tasks piqa arc_easy arc_challenge winogrande \
        --out results/zeroshot-smollm2-full/cpu-tasks.jsonl
    python scripts/zeroshot_tasks.py --render results/zeroshot-smollm2-full/cpu-tasks.jsonl
--device cuda runs it on a GPU (scripts/device_zeroshot.sh tasks: many cells at once, nothing lost
but the tasks in progress when the machine goes). --render writes a .md beside it: these cells next
to the whole-table cells of results.jsonl in the same folder (the GPU run), task by task.
"""
import argparse
import json
import time
from pathlib import Path

import torch

from arcquant import pipeline
from arcquant.compare import PRESETS, cells_from_tasks, device_name, preset_configs, write_outputs
from arcquant.config import CalibConfig
from arcquant.zeroshot import TASKS, evaluate_zeroshot


def render(path: Path) -> str:
    by_label, whole = {}, path.parent / "results.jsonl"
    for r in map(json.loads, whole.read_text().splitlines() if whole.exists() else []):
        by_label[(r["label"], r["avg_bits"], r["device"])] = {t: v["acc"] for t, v in r["zeroshot"].items()}
    for r in map(json.loads, path.read_text().splitlines()):
        if r.get("limit"):                                      # a timing run (--limit), not a result
            continue
        by_label.setdefault((r["label"], r["avg_bits"], r["device"]), {})[r["task"]] = r["acc"]
    tasks = [t for t in TASKS if any(t in v for v in by_label.values())]
    lines = ["| method | avg bits | run on | " + " | ".join(tasks) + " |", "|" + "---|" * (len(tasks) + 3)]
    for (label, bits, device), accs in by_label.items():
        cells = [f"{100 * accs[t]:.1f}" if t in accs else "" for t in tasks]
        lines.append(f"| {label} | {bits:.2f} | {device} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + ("\n\nzero-shot acc (%), full splits, lm-evaluation-harness; calibration c4 32x512 seed 0. "
                              "The rows of scripts/zeroshot_tasks.py (task by task) hold the tasks that finished in "
                              "the time a session had; whole cells are compare's (table.md).\n")


def evaluate_fitting(model, tok, task: str, a) -> tuple[dict, int]:
    """One task at --batch-size; on a CUDA out-of-memory error (processes sharing a card, the longest
    documents come first) again at half the batch, down to 1. -> (lm-eval's result, batch used)."""
    batch = a.batch_size
    while True:
        try:
            return evaluate_zeroshot(model, tok, [task], a.limit, batch, device=a.device), batch
        except torch.OutOfMemoryError:
            if batch == 1:
                raise
            batch //= 2
            torch.cuda.empty_cache()
            print(f"{task}: out of GPU memory, again at batch {batch}", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--label", choices=list(PRESETS["paper"]))
    ap.add_argument("--render", help="write this JSON-lines file's table (.md beside it) and stop")
    ap.add_argument("--cells", help="with --render: write whole-table rows (table.md, results.json, "
                    "plot.png) into this folder, perplexity from --ppl")
    ap.add_argument("--ppl", help="with --cells: a results JSON-lines file of the same configs' perplexity")
    ap.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--out")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (calibration and evaluation)")
    ap.add_argument("--limit", type=int, help="first N documents per task: to time a set-up (such rows "
                    "carry the limit and stay out of --render's table)")
    a = ap.parse_args()
    if a.cells or a.ppl:
        if not (a.render and a.cells and a.ppl):
            ap.error("--cells and --ppl go together, with --render (the one-task rows to merge)")
        missing = [f for f in (a.render, a.ppl) if not Path(f).is_file()]
        if missing:
            ap.error(f"no such file: {', '.join(missing)}")
        read = lambda f: [json.loads(line) for line in Path(f).read_text().splitlines() if line.strip()]
        try:
            rows = cells_from_tasks(read(a.render), read(a.ppl))
        except ValueError as e:
            ap.error(str(e))
        Path(a.cells).mkdir(parents=True, exist_ok=True)
        write_outputs(rows, Path(a.cells))
        print((Path(a.cells) / "table.md").read_text())
        return
    if a.render:
        md = Path(a.render).with_suffix(".md")
        md.write_text(render(Path(a.render)))
        print(md.read_text())
        return
    if not a.label or not a.out:
        ap.error("--label and --out are needed (or --render)")
    out = Path(a.out)
    done = set()
    if out.exists():
        rows = map(json.loads, out.read_text().splitlines())
        done = {(r["model"], r["label"], r["task"], r.get("limit")) for r in rows}
    todo = [t for t in a.tasks if (a.model, a.label, t, a.limit) not in done]
    if not todo:
        return
    qcfg = preset_configs("paper", {}, [a.label])[a.label]
    ccfg = CalibConfig()
    model, tok, rep = pipeline.quantize_in_memory(a.model, qcfg, ccfg, a.device, progress=False)
    model = model.to(a.device)                                # calibration hands layers back on the CPU
    for task in todo:
        t0 = time.time()
        zs, batch = evaluate_fitting(model, tok, task, a)
        row = {"model": a.model, "label": a.label, "config": qcfg.to_dict(), "calibration": vars(ccfg),
               "avg_bits": rep["avg_bits"], "task": task, "limit": a.limit, "batch_size": batch,
               **zs["tasks"][task], "lm_eval": zs["lm_eval"], "documents": zs["n_samples"].get(task),
               "device": device_name(a.device), "torch": torch.__version__, "seconds": round(time.time() - t0, 1)}
        if a.device.startswith("cuda"):
            row["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated(a.device) / 2**30, 2)
            torch.cuda.reset_peak_memory_stats(a.device)
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(task, row)


if __name__ == "__main__":
    main()
