"""The decode GEMVs' launch settings swept as the model runs them: back to back on copies of each
layer's weight (none read from L2), one CUDA graph (chain_us), instead of one
call after an L2 flush (the sweeps gpu.cuda_gemv_config / gpu.mma_config were first chosen from).

    ARCQUANT_EXT_SWEEP=1 PYTHONPATH=. python3 scripts/sweep_chain.py --out results/sweep-chain-h200.json

Integer GEMV (M = 1, 2): every nr in (1, 2, 4), kw in (1, 2, 4), u in (1, 2). Tensor-core GEMV (M = 8,
16): the unpipelined kernel at kw in (1, 2, 4, 8) x occ, the pipelined one at kw in (4, 8) x st in
(2, 3, 4) x xs where K allows (ARCQUANT_EXT_SWEEP=1 builds every setting). Each row names the
model's current setting and its time next to the best.
"""
import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_hopper_paths import SHAPES, make_layer, make_x, run_header, tail_width  # noqa: E402

from arcquant.gpu import cuda_gemv_config, mma_config  # noqa: E402
from arcquant.kernels.act_quant import arc_quantize_activation_gemv, block_starts  # noqa: E402
from arcquant.kernels.cuda_gemv import arc_gemm_mma, arc_gemv_int8, pipe_shape_reason  # noqa: E402

INT8 = [(nr, kw, u) for nr in (1, 2, 4) for kw in (1, 2, 4) for u in (1, 2)]
MMA = [(kw, occ, 0, False) for kw in (1, 2, 4, 8) for occ in (False, True)] + \
    [(kw, False, st, xs) for kw in (4, 8) for st in (2, 3, 4) for xs in (False, True)]


def chain_us(call, copies: list) -> float:
    """us a call: call(weight copy) for every copy, back to back in one CUDA graph; median of 5 replays."""
    for c in copies:
        call(c)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for c in copies:
            call(c)
    times = []
    for _ in range(6):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1000.0 / len(copies))
    return sorted(times[1:])[2]


def key(cfg: dict) -> str:
    return ",".join(f"{k}={int(v)}" for k, v in sorted(cfg.items()))


def sweep_shape(model, name, k, n, ms, dev) -> list:
    s = tail_width(k)
    _, plan, gsw, wc, ws = make_layer(k, n, s, dev)
    perm = plan.perm.to(torch.int32)
    starts = block_starts(perm)
    nbytes = n * k // 2 + n * k // 16
    copies = [(wc.clone(), ws.clone()) for _ in range(max(2, -(-512 * 2**20 // nbytes)))]
    rows = []
    for m in ms:
        x = make_x(m, k, dev)
        times = {}
        if m <= 2:
            xi, xs, gs = arc_quantize_activation_gemv(x, perm, s, None, starts)
            current = cuda_gemv_config(m, k, n)
            for nr, kw, u in INT8:
                cfg = dict(nr=nr, kw=kw, u=u)
                times[key(cfg)] = chain_us(lambda c: arc_gemv_int8(xi, xs, gs, *c, gsw, s, None, torch.bfloat16,
                                                                   **cfg), copies)
        else:
            xd, _, gs = arc_quantize_activation_gemv(x, perm, s, None, starts, out="mma")
            current = mma_config(m, n, k)
            for kw, occ, st, xs_ in MMA:
                if st and (m > 16 or pipe_shape_reason(xd, wc, ws, kw)):
                    continue
                cfg = dict(kw=kw, occ=occ, st=st, xs=xs_)
                times[key(cfg)] = chain_us(lambda c: arc_gemm_mma(xd, gs, *c, gsw, s, None, torch.bfloat16, **cfg),
                                           copies)
            current = dict(dict(st=0, xs=False), **current)
        best = min(times, key=times.get)
        row = {"model": model, "layer": name, "K": k, "N": n, "s": s, "M": m, "current": key(current),
               "current_us": times.get(key(current)), "best": best, "best_us": times[best],
               "GBps_best": nbytes / times[best] / 1e3, "times": times}
        print(json.dumps({k_: v for k_, v in row.items() if k_ != "times"}), flush=True)
        rows.append(row)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--models", nargs="+", default=list(SHAPES))
    ap.add_argument("--ms", nargs="+", type=int, default=[1, 2, 8, 16])
    a = ap.parse_args()
    dev = torch.device("cuda")
    torch.manual_seed(0)
    out = {"header": run_header(), "rows": []}
    print(json.dumps(out["header"]), flush=True)
    for model in a.models:
        for name, k, n in SHAPES[model]:
            out["rows"] += sweep_shape(model, name, k, n, a.ms, dev)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
