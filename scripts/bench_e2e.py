"""End-to-end decode / prefill speed and memory, BF16 vs ARC NVFP4 in the same engine (issue 5).

    PYTHONPATH=. python scripts/bench_e2e.py --shapes llama-3.1-8b qwen2.5-7b --out results/e2e-h200
Random weights of each shape (outlier channels injected) are written, quantized with ARC
defaults (8 x 512 calibration tokens), then both models are timed one after the other on the
same GPU: decode tokens/s at batch 1/8/32 (CUDA graphs, 64 steps after a 128-token prompt,
median of 5), prefill of 2048 tokens, weight bytes, peak memory, and a per-op profile of one
decode step (batch 1 and each batch of 2 - 16 tokens); for ARC also the same run's A/Bs: the prefill with its fusions off, the decode at 3 - 16
tokens with the pipelined GEMV off, and two engines' greedy logits. Writes OUT.json and OUT.md.
"""
import argparse
import json
import shutil
from pathlib import Path

import torch
import transformers
import triton

from arcquant.bench import AB, quantized_shape, run_bench, table, temp_work


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", nargs="+", default=["llama-3.1-8b"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8, 32])
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--prefill", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--calib-source", default="c4")
    ap.add_argument("--tokenizer", default=None)
    ap.add_argument("--out", required=True)
    ap.add_argument("--compile", nargs="*", type=int, default=[], metavar="B",
                    help="also time these batches with the decode step through torch.compile")
    ap.add_argument("--no-bf16-stacked", action="store_true",
                    help="skip the BF16 row with q/k/v and gate/up stacked (the fair baseline for ARC's stacked GEMVs)")
    ap.add_argument("--ab", nargs="*", default=list(AB), choices=AB,
                    help="the same run's A/Bs to run as well (default: all)")
    a = ap.parse_args()
    head = (f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
            f"transformers {transformers.__version__}")
    record, md = {"device": head, "shapes": {}}, [f"# End-to-end: BF16 vs ARC NVFP4 ({head})", ""]
    for shape in a.shapes:
        work = temp_work()
        src, ck = quantized_shape(shape, work, a.calib_source, a.tokenizer)
        rows = run_bench(src, ck, a.batches, a.decode, a.prefill, a.repeats, a.compile, not a.no_bf16_stacked, a.ab)
        record["shapes"][shape] = rows
        md += [f"## {shape}", "", table(rows, a.batches, a.prefill), "", "Top CUDA ops of one eager decode step, batch 1:", ""]
        ops = lambda prof: "; ".join(f"{n[:60]} x{c} {ms:.3f} ms" for n, c, ms in prof)
        md += [f"- {r['model']}: {ops(r['profile_b1'])}" for r in rows]
        for b in (b for b in a.batches if f"profile_b{b}" in rows[-1] and b != 1):
            md += ["", f"Top CUDA ops of one eager decode step, batch {b}:", ""]
            md += [f"- {r['model']}: {ops(r[f'profile_b{b}'])}" for r in rows if f"profile_b{b}" in r]
        md += ["", f"Top CUDA ops of one {a.prefill}-token prefill (eager):", ""]
        md += [f"- {r['model']}: {ops(r[f'profile_prefill_{a.prefill}'])}" for r in rows]
        md.append("")
        print("\n".join(md), flush=True)
        shutil.rmtree(work, ignore_errors=True)
        Path(a.out + ".json").write_text(json.dumps(record, indent=1, default=str))
        Path(a.out + ".md").write_text("\n".join(md) + "\n")


if __name__ == "__main__":
    main()
