"""Quantize a randomly initialised model of a real shape (default Llama-3.1-8B) on one GPU with
the streaming quantizer, and record wall time and peak memory (issue 7's scale check).

    PYTHONPATH=. python scripts/quantize_8b.py --work /tmp/q8b --calib-source c4 --json out.json
The random model (bf16, outlier channels injected, see arcquant/synth.py) is written first and
its time reported separately. Several GPUs: write it with --write-only, then
    torchrun --nproc-per-node 2 scripts/quantize_8b.py --work /tmp/q8b --reuse ... On a machine without the data packages pass --calib-source FILE
and --tokenizer DIR (SmolLM2's tokenizer files).
"""
import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from arcquant import distributed
from arcquant.config import CalibConfig, QuantConfig
from arcquant.stream import quantize_streaming
from arcquant.synth import SHAPES, model_bytes, write_random_model


def peak_rss_gib() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama-3.1-8b", choices=list(SHAPES))
    ap.add_argument("--work", required=True)
    ap.add_argument("--calib-source", default="c4")
    ap.add_argument("--tokenizer", default=None)
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--layers", type=int, default=None, help="override the shape's number of layers")
    ap.add_argument("--write-only", action="store_true", help="write the random model and stop")
    ap.add_argument("--reuse", action="store_true", help="use the random model already in --work")
    ap.add_argument("--out", default="out", help="checkpoint folder name inside --work")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    work = Path(a.work)
    shape = dict(SHAPES[a.shape], **({"num_hidden_layers": a.layers} if a.layers else {}))
    t, src = time.time(), work / "model"
    if not a.reuse:
        shutil.rmtree(work, ignore_errors=True)
        write_random_model(src, shape, device=a.device, tokenizer_dir=a.tokenizer)
        print(f"random {a.shape}: {model_bytes(src) / 2**30:.2f} GiB written in {time.time() - t:.0f} s", flush=True)
    t_write = time.time() - t
    if a.write_only:
        return
    cuda = a.device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t = time.time()
    rep = quantize_streaming(str(src), work / a.out, QuantConfig(), CalibConfig(a.calib_source, a.samples, a.seqlen),
                             device=a.device, snapshot_every=1e9, progress=False)
    wall = time.time() - t
    s_frac = sorted(r["s"] / r["in"] for r in rep["layers"])
    rec = {"shape": a.shape, "device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
           "calibration": f"{a.samples} x {a.seqlen} tokens of {Path(a.calib_source).name}",
           "method": "arc nvfp4 (defaults: blocks order, target 5.5 bits, static act scale)",
           "source_gib": model_bytes(src) / 2**30, "write_random_s": round(t_write, 1),
           "quantize_wall_s": round(wall, 1), "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
           "peak_host_rss_gib": peak_rss_gib(), "estimate_gib": rep["memory_estimate"]["total"] / 2**30,
           "ranks": distributed.world(), "layers_in_model": shape["num_hidden_layers"],
           "checkpoint_gib": sum(f.stat().st_size for f in (work / a.out).rglob("*.safetensors")) / 2**30,
           "avg_bits": rep["avg_bits"], "layers": len(rep["layers"]),
           "s_over_k_median": s_frac[len(s_frac) // 2], "s_over_k_max": s_frac[-1]}
    if distributed.rank() == 0:
        print(json.dumps(rec, indent=1))
        if a.json:
            Path(a.json).write_text(json.dumps(rec, indent=1))


if __name__ == "__main__":
    main()
