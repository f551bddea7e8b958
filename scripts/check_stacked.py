"""Stacked q/k/v and gate/up GEMVs (gpu.StackedGroup): exactness and time on the GPU.

    PYTHONPATH=. python3 scripts/check_stacked.py --out results/stacked-gemv-h200.json

For the Llama-3.1-8B and Qwen2.5-7B groups (q/k/v: 4096 -> 4096 + 1024 + 1024, 3584 -> 3584 +
512 + 512; gate/up: 4096 -> 2 x 14336, 3584 -> 2 x 18944), s = 6.25% of K, each layer with its
own tensor scale and a bias: the stacked launch (one weight, per-row tensor scales) against the
per-layer launches - bit-equal for the integer GEMV (same per-row arithmetic), and both against
the float64 oracle - then time, every call replayed from a CUDA graph, median of do_bench with
L2 flushed: one stacked launch vs the per-layer launches back to back (M = 1, 2 integer GEMV;
8, 16, 32 tensor-core GEMV, launch settings as the model picks them).
"""
import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_cuda_gemv import bench  # noqa: E402
from bench_hopper_paths import graphed, make_layer, make_x, run_header, tail_width  # noqa: E402

from arcquant.gpu import cuda_gemv_config, mma_config  # noqa: E402
from arcquant.kernels.act_quant import arc_quantize_activation_gemv  # noqa: E402
from arcquant.kernels.cuda_gemv import arc_gemm_mma, arc_gemv_int8, fp16_gemm_reference, int8_gemv_reference  # noqa: E402

GROUPS = {"llama-3.1-8b": {"qkv": (4096, [4096, 1024, 1024]), "gate_up": (4096, [14336, 14336])},
          "qwen2.5-7b": {"qkv": (3584, [3584, 512, 512]), "gate_up": (3584, [18944, 18944])}}


def run(model, name, k, ns, m, dev) -> dict:
    s = tail_width(k)
    layers = [make_layer(k, n, s, dev) for n in ns]                       # (w, plan, gsw, wc, ws)
    plan = layers[0][1]                                                    # one input plan for the group
    biases = [torch.randn(n, device=dev) for n in ns]
    wc, ws = torch.cat([l[3] for l in layers]), torch.cat([l[4] for l in layers])
    wgs = torch.cat([l[2].reshape(1).expand(n) for l, n in zip(layers, ns)]).float().contiguous()
    bias = torch.cat(biases)
    x = make_x(m, k, dev)
    int8 = m <= 2
    xq, xs, gs = arc_quantize_activation_gemv(x, plan.perm.to(torch.int32), s, None, None,
                                              "int8" if int8 else "mma")
    if int8:
        one = lambda wc_, ws_, wgs_, b_, dt=torch.float32: arc_gemv_int8(xq, xs, gs, wc_, ws_, wgs_, s, b_, dt,
                                                                         **cuda_gemv_config(m, k, wc_.shape[0]))
        ref = lambda wc_, ws_, wgs_, b_: int8_gemv_reference(xq, xs, gs, wc_, ws_, wgs_, s, b_)
    else:
        one = lambda wc_, ws_, wgs_, b_, dt=torch.float32: arc_gemm_mma(xq, gs, wc_, ws_, wgs_, s, b_, dt,
                                                                        **mma_config(m, wc_.shape[0], k))
        ref = lambda wc_, ws_, wgs_, b_: fp16_gemm_reference(xq, gs, wc_, ws_, wgs_, s, b_)
    stacked = one(wc, ws, wgs, bias)
    apart = torch.cat([one(l[3], l[4], l[2], b) for l, b in zip(layers, biases)], 1)
    want = ref(wc, ws, wgs, bias)
    rel = lambda y: ((y.double() - want).norm() / want.norm()).item()
    row = {"model": model, "group": name, "K": k, "N": ns, "s": s, "M": m, "path": "int8" if int8 else "mma",
           "stacked_equals_apart": bool(torch.equal(stacked, apart)), "stacked_rel_err": rel(stacked),
           "apart_rel_err": rel(apart)}
    bf = lambda wc_, ws_, wgs_, b_: one(wc_, ws_, wgs_, b_, torch.bfloat16)
    row["stacked_us"] = bench(graphed(lambda: bf(wc, ws, wgs, bias)))
    row["apart_us"] = bench(graphed(lambda: [bf(l[3], l[4], l[2], b) for l, b in zip(layers, biases)]))
    print(json.dumps(row), flush=True)
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--ms", nargs="+", type=int, default=[1, 2, 8, 16, 32])
    a = ap.parse_args()
    torch.manual_seed(0)
    head = run_header()
    print(head, flush=True)
    rows = [run(model, name, k, ns, m, "cuda") for model, groups in GROUPS.items()
            for name, (k, ns) in groups.items() for m in a.ms]
    json.dump({"header": head, "rows": rows}, open(a.out, "w"), indent=1)
    eq = [r["stacked_equals_apart"] for r in rows if r["path"] == "int8"]
    print(f"int8: stacked == apart on {sum(eq)}/{len(eq)}; worst rel err vs float64 "
          f"{max(r['stacked_rel_err'] for r in rows):.2e}; time stacked / apart: "
          + ", ".join(f"{r['model'][:5]} {r['group']} M={r['M']} {r['stacked_us']:.1f}/{r['apart_us']:.1f}" for r in rows))


if __name__ == "__main__":
    main()
