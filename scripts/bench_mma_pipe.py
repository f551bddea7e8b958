"""The tensor-core GEMV with cp.async-pipelined operands (cuda_gemv.arc_gemm_mma_pipe) against
the kernels the model runs at decode (integer GEMV for M <= 2, arc_gemm_mma above) and cuBLAS
BF16, in one run on one card: exactness first, then the (kw, st, xs) sweep.

    PYTHONPATH=. python3 scripts/bench_mma_pipe.py --out results/mma-pipe-h200.json

Exactness: the pipelined kernel's fp32 output equals arc_gemm_mma's with the same kw bit for bit
(same tiles, same per-warp order), on awkward shapes (N = 1000 + M rows: a partial last tile;
s with an odd number of tail blocks: 8-byte copies), and is within 1e-6 of the float64 oracle
fp16_gemm_reference. Time: median of do_bench over a CUDA graph replay, L2 flushed each time.
"""
import argparse
import json
import os
import sys
from pathlib import Path

import torch

os.environ.setdefault("ARCQUANT_EXT_SWEEP", "1")   # every pipelined setting (cuda_gemv.PIPE_SETTINGS: the model's)

sys.path.insert(0, str(Path(__file__).parent))
from bench_hopper_paths import SHAPES, run_header, tail_width  # noqa: E402
from bench_layers import inputs, make_layer, timed  # noqa: E402

from arcquant.kernels.cuda_gemv import arc_gemm_mma, arc_gemm_mma_pipe, fp16_gemm_reference  # noqa: E402

PIPES = [(kw, st, xs) for kw in (4, 8) for st in (2, 3, 4) for xs in (False, True)]


def operand(q, x):
    """The "mma" operand (float16 code * block scale) of the MMA kernels and its per-token scale."""
    xd, _, gs = q.kernel.quantize(q, x, "mma")
    return xd, gs


def exactness(dev) -> list:
    out = []
    for k in (4096, 3584, 14336, 18944):
        for s in (0, 16, 48, 448):
            hot = torch.arange(8, device=dev) * 37
            for m in (1, 3, 8, 9, 16):
                n = 1000 + m
                q, _ = make_layer(k, n, s, hot, dev, k + s)
                x = inputs(m, k, hot, dev, m)
                xd, gs = operand(q, x)
                wc, ws, wgs = q.kernel.weight
                ws8 = ws.view(torch.float8_e4m3fn)
                bias = torch.randn(n, device=dev)
                ref = fp16_gemm_reference(xd, gs, wc, ws8, wgs, s, bias)
                for kw, st, xs in PIPES:
                    if k % (128 * kw):
                        continue
                    y = arc_gemm_mma_pipe(xd, gs, wc, ws8, wgs, s, bias, torch.float32, kw, st, xs)
                    y0 = arc_gemm_mma(xd, gs, wc, ws8, wgs, s, bias, torch.float32, kw)
                    err = ((y.double() - ref).norm() / ref.norm()).item()
                    ok = torch.equal(y, y0) and err < 1e-6
                    out.append(dict(K=k, s=s, M=m, N=n, kw=kw, st=st, xs=xs, equal_to_mma=torch.equal(y, y0),
                                    rel_err=err, ok=ok))
                    if not ok:
                        print("MISMATCH", out[-1], flush=True)
    print(f"exactness: {sum(r['ok'] for r in out)}/{len(out)}", flush=True)
    return out


def speed(dev, ms, models) -> list:
    rows = []
    for model, layers in ((mo, SHAPES[mo]) for mo in models):
        for name, k, n in layers:
            s = tail_width(k)
            hot = torch.randperm(k, device=dev, generator=torch.Generator(device=dev).manual_seed(k))[:8]
            q, wb = make_layer(k, n, s, hot, dev, k)
            kp = q.kernel
            wc, ws, wgs = kp.weight
            ws8 = ws.view(torch.float8_e4m3fn)
            for m in ms:
                x = inputs(m, k, hot, dev, 100 + m)
                xd, gs = operand(q, x)
                kind = kp.path(m)
                _, _, (_, xq, xs_, g2) = kp.operand(q, x)
                r = dict(model=model, layer=name, K=k, N=n, s=s, M=m, path=kind)
                r["bf16_us"] = timed(lambda: torch.nn.functional.linear(x, wb))
                r["model_us"] = timed(lambda: kp.product(kind, m, xq, xs_, g2, kp.weight, None, n, k, torch.bfloat16))
                r["mma_us"] = {kw: timed(lambda: arc_gemm_mma(xd, gs, wc, ws8, wgs, s, None, torch.bfloat16, kw))
                               for kw in (4, 8)}
                r["pipe_us"] = {f"{kw},{st},{int(xs)}": timed(
                    lambda: arc_gemm_mma_pipe(xd, gs, wc, ws8, wgs, s, None, torch.bfloat16, kw, st, xs))
                    for kw, st, xs in PIPES if k % (128 * kw) == 0}
                best = min(r["pipe_us"], key=r["pipe_us"].get)
                r["pipe_best"], r["pipe_best_us"] = best, r["pipe_us"][best]
                wbytes = n * k // 2 + n * k // 16
                r["pipe_GBps"] = wbytes / r["pipe_best_us"] / 1e3
                r["model_GBps"] = wbytes / r["model_us"] / 1e3
                rows.append(r)
                print(f"{model:13s} {name:8s} M={m:3d} bf16 {r['bf16_us']:7.1f} model({kind}) {r['model_us']:7.1f} "
                      f"mma {min(r['mma_us'].values()):7.1f} pipe {r['pipe_best_us']:7.1f} [{best}] "
                      f"{r['pipe_GBps']:5.0f} GB/s (model {r['model_GBps']:5.0f})  "
                      f"x{r['bf16_us'] / r['pipe_best_us']:.2f} vs x{r['bf16_us'] / r['model_us']:.2f} BF16",
                      flush=True)
    return rows


def ncu_target(dev) -> None:
    """Launches for Nsight Compute: Llama gate/up and down at M = 8, the old MMA kernel then the
    pipelined one (kw 4 / 8, st 3, both activation modes), three launches each."""
    for name, k, n, kw in (("gate_up", 4096, 28672, 4), ("down", 14336, 4096, 8)):
        hot = torch.arange(8, device=dev) * 97
        q, _ = make_layer(k, n, 256 if k == 4096 else 896, hot, dev, 1)
        xd, gs = operand(q, inputs(8, k, hot, dev, 5))
        wc, ws, wgs = q.kernel.weight
        s = q.kernel.s
        for fn in (lambda: arc_gemm_mma(xd, gs, wc, ws.view(torch.float8_e4m3fn), wgs, s, None, torch.bfloat16, kw),
                   *(lambda xs=xs: arc_gemm_mma_pipe(xd, gs, wc, ws.view(torch.float8_e4m3fn), wgs, s, None,
                                                     torch.bfloat16, kw, 3, xs) for xs in (False, True))):
            for _ in range(3):
                fn()
        torch.cuda.synchronize()
        print(name, flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out")
    ap.add_argument("--ms", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    ap.add_argument("--models", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--no-exactness", action="store_true")
    ap.add_argument("--no-speed", action="store_true")
    ap.add_argument("--ncu-target", action="store_true", help="only the launches ncu_target makes")
    a = ap.parse_args()
    dev = torch.device("cuda")
    if a.ncu_target:
        return ncu_target(dev)
    res = run_header(command=" ".join(sys.argv))
    if not a.no_exactness:
        res["exactness"] = exactness(dev)
    if not a.no_speed:
        res["speed"] = speed(dev, a.ms, a.models)
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
