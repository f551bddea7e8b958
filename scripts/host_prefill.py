"""Where the host time of an eager (not graph-replayed) prefill goes: a few layers of a model shape,
BF16 and ARC, eager vs CUDA-graph prefill latency, and a CPU + CUDA profile of one eager ARC
prefill (top host-side ops by self CPU time).

    PYTHONPATH=. python3 scripts/host_prefill.py --layers 4 --calib-source scratch/c4.utf8 \
        --tokenizer scratch --out results/host-prefill-h200.json

The eager ARC prefill of the full models swings 90 - 155 ms against 80 ms from a graph (docs/e2e.md),
BF16's eager is within 2 ms of its graph: the quantized model's launches are host-bound.
(results/host-prefill-h200.json came from this script at 0a05fba, which timed wall-clock with
time.perf_counter around synchronized calls; it now times with bench.prefill_ms's CUDA events, as
the bench's prefill columns do - the same span for a host-bound stream.)
"""
import argparse
import json
import tempfile
from pathlib import Path

import torch

from arcquant.bench import prefill_ms, quantized_shape
from arcquant.checkpoint import load_quantized
from arcquant.engine import Engine
from arcquant.gpu import use_kernels
from arcquant.synth import SHAPES


def latencies(model, tokens: int, repeats: int = 7) -> dict:
    """Median ms of an eager and of a graph-replayed prefill (bench.prefill_ms, as the bench's columns)."""
    return {f"{kind}_ms": prefill_ms(model, tokens, repeats, model.config.vocab_size, graph)[0]
            for kind, graph in (("eager", False), ("graph", True))}


def host_profile(model, tokens: int, top: int = 30) -> dict:
    from torch.profiler import ProfilerActivity, profile
    e = Engine(model, 1, tokens + 1, graphs=False)
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), device=e.device)
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


def host_breakdown(model, tokens: int, repeats: int = 5) -> dict:
    """Host (enqueue) milliseconds of one eager prefill and of each child module of the first
    decoder layer (and its attention / MLP children), inclusive, from forward hooks: the GPU is
    not waited for, so while the launches are host-bound these are the host's times. Median of
    `repeats`."""
    import statistics
    import time
    from arcquant.modeling import find_decoder_layers
    _, layers = find_decoder_layers(model)
    first = layers[0]
    named = [(n, m) for n, m in first.named_modules() if n and n.count(".") <= 1]
    spans, handles = {n: [] for n, _ in named}, []
    for n, m in named:
        handles.append(m.register_forward_pre_hook(lambda mod, a, n=n: spans[n].append(-time.perf_counter())))
        handles.append(m.register_forward_hook(lambda mod, a, o, n=n: spans[n].__setitem__(
            -1, spans[n][-1] + time.perf_counter())))
    e = Engine(model, 1, tokens + 1, graphs=False)
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), device=e.device)
    e.prefill(ids)
    totals = []
    for s in spans.values():
        s.clear()
    for _ in range(repeats):
        torch.cuda.synchronize()
        t = time.perf_counter()
        e.prefill(ids)
        totals.append(time.perf_counter() - t)
    torch.cuda.synchronize()
    for h in handles:
        h.remove()
    return {"prefill_host_ms": 1e3 * statistics.median(totals), "layers": len(layers),
            "first_layer_host_ms": {n: 1e3 * statistics.median(s) for n, s in spans.items() if s}}


def python_profile(model, tokens: int, top: int = 40) -> list:
    """cProfile of one eager prefill (host only, no torch profiler): [(function, calls, tottime ms,
    cumtime ms)] by tottime."""
    import cProfile
    import pstats
    e = Engine(model, 1, tokens + 1, graphs=False)
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), device=e.device)
    e.prefill(ids)
    torch.cuda.synchronize()
    pr = cProfile.Profile()
    pr.enable()
    e.prefill(ids)
    pr.disable()
    torch.cuda.synchronize()
    st = pstats.Stats(pr).stats
    rows = [(f"{Path(f).name}:{line}:{fn}", cc, 1e3 * tt, 1e3 * ct) for (f, line, fn), (cc, nc, tt, ct, _) in st.items()]
    return sorted(rows, key=lambda r: -r[2])[:top]


def report_host(label: str, model, tokens: int) -> dict:
    out = host_breakdown(model, tokens)
    print(f"{label}: host {out['prefill_host_ms']:.2f} ms for {out['layers']} layers; first layer:", flush=True)
    for n, ms in out["first_layer_host_ms"].items():
        print(f"  {n:40s} {ms:7.3f} ms", flush=True)
    return out


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
    res["bf16"] = latencies(bf16, a.tokens)
    print("bf16", res["bf16"], flush=True)
    res["bf16_host"] = report_host("bf16", bf16, a.tokens)
    del bf16
    torch.cuda.empty_cache()
    model, _, _ = load_quantized(ck, device="cuda", dtype=torch.bfloat16, verify=False)
    use_kernels(model)
    res["arc"] = latencies(model, a.tokens)
    print("arc", res["arc"], flush=True)
    res["arc_host"] = report_host("arc", model, a.tokens)
    res["arc_python"] = python_profile(model, a.tokens)
    for name, n, tt, ct in res["arc_python"]:
        print(f"  {name[:80]:80s} x{n:5d} tottime {tt:7.2f} ms  cumtime {ct:7.2f} ms", flush=True)
    res["arc_profile"] = host_profile(model, a.tokens)
    p = res["arc_profile"]
    print(f"arc eager prefill: self CPU {p['self_cpu_ms_total']:.1f} ms", flush=True)
    for name, n, self_ms, total_ms in p["top"]:
        print(f"  {name[:70]:70s} x{n:5d} self {self_ms:8.2f} ms  total {total_ms:8.2f} ms", flush=True)
    Path(a.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
