"""Where the host time of an eager (not graph-replayed) prefill goes: a few layers of a model shape,
BF16 and ARC, eager vs CUDA-graph prefill latency, and a CPU + CUDA profile of one eager ARC
prefill (top host-side ops by self CPU time).

    PYTHONPATH=. python3 scripts/host_prefill.py --layers 4 --calib-source scratch/c4.utf8 \
        --tokenizer scratch --out results/host-prefill-h200.json

The eager ARC prefill of the full models swings 90 - 155 ms against 80 ms from a graph (docs/e2e.md),
BF16's eager is within 2 ms of its graph: the quantized model's launches are host-bound.
"""
import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from arcquant.bench import quantized_shape
from arcquant.checkpoint import load_quantized
from arcquant.engine import Engine
from arcquant.gpu import use_kernels
from arcquant.synth import SHAPES


def timed(fn, repeats: int = 7) -> float:
    fn()
    ts = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        ts.append((time.perf_counter() - t) * 1e3)
    return statistics.median(ts)


def latencies(model, tokens: int) -> dict:
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), device="cuda")
    out = {}
    for graph in (False, True):
        e = Engine(model, 1, tokens + 1, graphs=False, prefill_graphs=graph)
        out["graph_ms" if graph else "eager_ms"] = timed(lambda: e.prefill(ids))
    return out, ids


def host_profile(model, ids, top: int = 30) -> dict:
    from torch.profiler import ProfilerActivity, profile
    e = Engine(model, 1, ids.shape[1] + 1, graphs=False)
    e.prefill(ids)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        e.prefill(ids)
        torch.cuda.synchronize()
    ev = prof.key_averages()
    rows = sorted(((x.key, x.count, x.self_cpu_time_total / 1e3, x.cpu_time_total / 1e3) for x in ev),
                  key=lambda r: -r[2])
    return {"self_cpu_ms_total": sum(r[2] for r in rows), "top": rows[:top],
            "kernels": sum(x.count for x in ev if x.device_time_total > 0 and x.self_cpu_time_total == 0)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama-3.1-8b")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--calib-source", default="c4")
    ap.add_argument("--tokenizer")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    shape = dict(SHAPES[a.shape], num_hidden_layers=a.layers)
    work = Path(tempfile.mkdtemp())
    src, ck = quantized_shape(shape, work, a.calib_source, a.tokenizer)
    from transformers import AutoModelForCausalLM
    res = {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "shape": a.shape, "layers": a.layers}
    bf16 = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.bfloat16).cuda().eval()
    res["bf16"], _ = latencies(bf16, a.tokens)
    print("bf16", res["bf16"], flush=True)
    del bf16
    torch.cuda.empty_cache()
    model, _, _ = load_quantized(ck, device="cuda", dtype=torch.bfloat16, verify=False)
    use_kernels(model)
    res["arc"], ids = latencies(model, a.tokens)
    print("arc", res["arc"], flush=True)
    res["arc_profile"] = host_profile(model, ids)
    p = res["arc_profile"]
    print(f"arc eager prefill: self CPU {p['self_cpu_ms_total']:.1f} ms", flush=True)
    for name, n, self_ms, total_ms in p["top"]:
        print(f"  {name[:70]:70s} x{n:5d} self {self_ms:8.2f} ms  total {total_ms:8.2f} ms", flush=True)
    Path(a.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
