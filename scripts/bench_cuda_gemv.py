"""The CUDA decode kernels (kernels/cuda_gemv.py: integer GEMV for M <= 8, tensor-core MMA
for M <= 64): exactness on awkward shapes, then speed vs cuBLAS BF16 and the Triton GEMV,
in one run on one card.

    PYTHONPATH=. python3 scripts/bench_cuda_gemv.py --out results/cuda-gemv-h200.json
    PYTHONPATH=. python3 scripts/bench_cuda_gemv.py --exactness int8 --int8-only --ms 1 2 \
        --out results/cuda-gemv-u-h200.json     # the integer GEMV's (nr, kw, u) sweep alone

Exactness: the kernel vs int8_gemv_reference (float64) and vs the float64 product of the
reference ARC operands (arc.quantize_activation / augmented_weight); the int8 activation
kernel bit-exact against the reference codes and scales, its in-kernel per-token scale
against nvfp4.global_scale_from_amax. Time: median of triton.testing.do_bench (L2 flushed
before each repetition), every step replayed from a CUDA graph; "step" = activation kernel
(with the per-token scale) + GEMV, as the model runs it.
"""
import argparse
import json
import sys
from pathlib import Path

import torch
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).parent))
from bench_hopper_paths import SHAPES, copy_bandwidth, graphed, make_layer, make_x, run_header, tail_width  # noqa: E402

from arcquant import arc  # noqa: E402
from arcquant.formats import e2m1, get_format, nvfp4  # noqa: E402
from arcquant.gpu import cuda_gemv_config, gemv_config  # noqa: E402
from arcquant.kernels.act_quant import arc_quantize_activation, arc_quantize_activation_gemv, block_starts  # noqa: E402
from arcquant.kernels.cuda_gemv import (arc_gemm_mma, arc_gemv_int8, fp16_gemm_reference,  # noqa: E402
                                        int8_gemv_reference, unavailable_reason)
from arcquant.kernels.decode import arc_gemv  # noqa: E402

F = get_format("nvfp4")
CONFIGS = [(nr, kw, u) for nr in (1, 2, 4) for kw in (1, 2, 4) for u in (1, 2, 4)]   # u > 1 only for M <= 2
MMA_KW = (1, 2, 4, 8)


def bench(fn):
    return do_bench(fn, warmup=10, rep=30, return_mode="median") * 1000.0          # us


def _case(k: int, s: int, m: int, dev):
    """One exactness case: a layer of N = 1000 + M rows, an input with outlier channels, its
    reference ARC codes and scales (per-token scale) and a bias.
    -> (n, plan, gsw, wc, ws, x, perm, gsx, codes, scales, bias)"""
    n = 1000 + m
    _, plan, gsw, wc, ws = make_layer(k, n, s, dev)
    x = make_x(m, k, dev)
    gsx = F.global_scale(x.float().abs().amax(1, keepdim=True))
    codes, scales = arc.quantize_activation(x.float(), plan, F, gsx)
    return n, plan, gsw, wc, ws, x, plan.perm.to(torch.int32), gsx, codes, scales, torch.randn(n, device=dev)


def exactness(dev) -> list:
    out = []
    for k in (4096, 3584, 14336, 18944):
        for s in (0, 16, 64, 448):
            for m in (1, 2, 3, 5, 8):
                n, plan, gsw, wc, ws, x, perm, gsx, codes, scales, bias = _case(k, s, m, dev)
                xi, xs, gs = arc_quantize_activation_gemv(x, perm, s, None, block_starts(perm))
                act_exact = bool(torch.equal(xi.float(), 2 * e2m1.e2m1_decode(codes))
                                 and torch.equal(xs.view(torch.uint8), scales.view(torch.uint8))
                                 and torch.equal(gs, gsx.reshape(-1)))
                ref = int8_gemv_reference(xi, xs, gs, wc, ws, gsw, s, bias)
                xa = F.dequantize(codes, scales, gsx).double()
                wa = F.dequantize(*arc.augmented_weight(arc.QuantizedWeight(nvfp4.unpack(wc), ws, None, None),
                                                        plan, 16), gsw).double()
                ref_arc = xa @ wa.t() + bias.double()
                rel = lambda y, r: ((y.double() - r).norm() / r.norm()).item()
                row = {"K": k, "s": s, "M": m, "N": n, "act_exact": act_exact,
                       "oracle_vs_arc_rel": rel(ref, ref_arc)}
                for nr, kw, u in ((1, 4, 1), (2, 2, 1), (4, 8, 1), (1, 1, 4), (2, 2, 2), (4, 1, 4)):
                    if u == 1 or m <= 2:
                        y = arc_gemv_int8(xi, xs, gs, wc, ws, gsw, s, bias, torch.float32, nr, kw, u)
                        row[f"rel_nr{nr}_kw{kw}_u{u}"] = rel(y, ref)
                if m <= 2:                                # u only reorders the loads: the same bits
                    row["u_bitwise_equal"] = all(
                        torch.equal(arc_gemv_int8(xi, xs, gs, wc, ws, gsw, s, bias, torch.float32, nr, kw, u),
                                    arc_gemv_int8(xi, xs, gs, wc, ws, gsw, s, bias, torch.float32, nr, kw, 1))
                        for nr, kw, u in ((1, 1, 4), (2, 2, 2), (4, 1, 4), (2, 4, 4)))
                y16 = arc_gemv_int8(xi, xs, gs, wc, ws, gsw, s, bias, torch.bfloat16)
                row["bf16_out_rel"] = rel(y16, ref)
                out.append(row)
    return out


def exactness_mma(dev) -> list:
    out = []
    for k in (1040, 4096, 3584, 14336, 18944):
        for s in (0, 16, 64, 448):
            for m in (1, 3, 13, 64):
                n, plan, gsw, wc, ws, x, perm, gsx, codes, scales, bias = _case(k, s, m, dev)
                xd, _, gs = arc_quantize_activation_gemv(x, perm, s, None, block_starts(perm), out="mma")
                act_exact = bool(torch.equal(xd.float(), F.dequantize(codes, scales, torch.tensor(1.0, device=dev))))
                ref = fp16_gemm_reference(xd, gs, wc, ws, gsw, s, bias)
                rel = lambda y, r: ((y.double() - r).norm() / r.norm()).item()
                row = {"K": k, "s": s, "M": m, "N": n, "act_exact": act_exact}
                for kw, occ in ((1, False), (3, True), (8, False), (8, True)):
                    row[f"rel_kw{kw}_occ{int(occ)}"] = rel(arc_gemm_mma(xd, gs, wc, ws, gsw, s, bias, torch.float32,
                                                                        kw, occ), ref)
                out.append(row)
    return out


def speed(dev, models, ms, mma_off=False) -> list:
    """mma_off: only the integer GEMV's sweep (M <= 8), no MMA, step or Triton timings."""
    rows = []
    for model in models:
        for name, k, n in SHAPES[model]:
            s = tail_width(k)
            w, plan, gsw, wc, ws = make_layer(k, n, s, dev)
            wb = w.to(torch.bfloat16)
            perm = plan.perm.to(torch.int32)
            starts = block_starts(perm)
            for m in ms:
                x = make_x(m, k, dev)
                row = {"model": model, "layer": name, "K": k, "N": n, "s": s, "M": m}
                row["bf16_us"] = bench(graphed(lambda: torch.mm(x, wb.t())))
                xi, xs, gs = arc_quantize_activation_gemv(x, perm, s, None, starts)
                row["act_int8_us"] = bench(graphed(lambda: arc_quantize_activation_gemv(x, perm, s, None, starts)))
                if m <= 8:
                    sweep = {f"{nr},{kw},{u}": bench(graphed(lambda: arc_gemv_int8(xi, xs, gs, wc, ws, gsw, s, None,
                                                                                   torch.bfloat16, nr, kw, u)))
                             for nr, kw, u in CONFIGS if u == 1 or m <= 2}
                    best = min(sweep, key=sweep.get)
                    nr, kw, u = map(int, best.split(","))
                    used = "{nr},{kw},{u}".format(**cuda_gemv_config(m, k, n))
                    row.update(int8_sweep=sweep, int8_us=sweep[best], int8_config=[nr, kw, u],
                               int8_used_config=used, int8_used_us=sweep.get(used),
                               int8_u1_us=min(v for c, v in sweep.items() if c.endswith(",1")))
                    if mma_off:
                        print(json.dumps({k_: v for k_, v in row.items() if "sweep" not in k_}), flush=True)
                        rows.append(row)
                        continue

                    def step():
                        a, b, g = arc_quantize_activation_gemv(x, perm, s, None, starts)
                        return arc_gemv_int8(a, b, g, wc, ws, gsw, s, None, torch.bfloat16, nr, kw, u)
                    row["int8_step_us"] = bench(graphed(step))
                xd, _, gs = arc_quantize_activation_gemv(x, perm, s, None, starts, out="mma")
                row["act_fp16_us"] = bench(graphed(lambda: arc_quantize_activation_gemv(x, perm, s, None, starts,
                                                                                       out="mma")))
                msweep = {f"{kw},{int(occ)}": bench(graphed(lambda: arc_gemm_mma(xd, gs, wc, ws, gsw, s, None,
                                                                                torch.bfloat16, kw, occ)))
                          for kw in MMA_KW for occ in (False, True)}
                best = min(msweep, key=msweep.get)
                kw, occ = int(best.split(",")[0]), best.endswith(",1")
                row.update(mma_sweep=msweep, mma_us=msweep[best], mma_kw=kw, mma_occ=occ,
                           mma_unbounded_us=min(v for c, v in msweep.items() if c.endswith(",0")))

                def mma_step():
                    a, _, g = arc_quantize_activation_gemv(x, perm, s, None, starts, out="mma")
                    return arc_gemm_mma(a, g, wc, ws, gsw, s, None, torch.bfloat16, kw, occ)
                row["mma_step_us"] = bench(graphed(mma_step))
                row["step_us"] = min(row["mma_step_us"], row.get("int8_step_us", float("inf")))
                if m <= 16:
                    gsx = F.global_scale(x.float().abs().amax(1, keepdim=True)).reshape(-1)

                    def triton_step():
                        xd = arc_quantize_activation(x, perm, s, gsx, 64, torch.bfloat16, False, starts)[2]
                        return arc_gemv(xd, gsx, wc, ws, gsw, s, **gemv_config(m, k))
                    row["triton_step_us"] = bench(graphed(triton_step))
                row["x_bf16"] = row["bf16_us"] / row["step_us"]
                row["weight_GBps"] = (n * k // 2 + n * k // 16) / min(row["mma_us"], row.get("int8_us", 1e9)) / 1e3
                print(json.dumps({k_: v for k_, v in row.items() if "sweep" not in k_}), flush=True)
                rows.append(row)
    return rows


def render(path) -> str:
    """Markdown table of a result JSON (python3 scripts/bench_cuda_gemv.py --md FILE)."""
    d = json.loads(Path(path).read_text())
    h = d["header"]
    out = [f"Card: {h['card']}, torch {h['torch']}, Triton {h['triton']}, CUDA {h['cuda']}, copy bandwidth "
           f"{h['copy_GBps']:.0f} GB/s (read+write). Median of triton.testing.do_bench (L2 flushed before each "
           "repetition), CUDA graphs; step = activation kernel (per-token scale inside) + GEMV.", ""]
    for kind in ("int8", "mma"):
        ex = d.get(f"exactness_{kind}")
        if ex:
            worst = max(max(v for k_, v in r.items() if k_.startswith("rel_")) for r in ex)
            out.append(f"Exactness ({kind}): {len(ex)} shapes, activation operand bit-exact on "
                       f"{sum(r['act_exact'] for r in ex)}/{len(ex)}, worst relative error vs float64 {worst:.1e}.")
    out += ["", "| layer | K | N | s | M | cuBLAS BF16 us | integer GEMV us | MMA GEMV us | best step us | "
            "Triton step us (before) | step x BF16 | weight stream GB/s |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    f = lambda v: "" if v is None else f"{v:.1f}"
    if all("mma_us" not in r for r in d["rows"]):                 # --int8-only: the sweep
        out[-2:] = ["| layer | K | N | s | M | cuBLAS BF16 us | best u=1 us | best us (nr,kw,u) | model's config us "
                    "(nr,kw,u) | weight stream GB/s (best) | best x BF16 |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in d["rows"]:
            gbs = (r["N"] * r["K"] // 2 + r["N"] * r["K"] // 16) / r["int8_us"] / 1e3
            out.append(f"| {r['model']} {r['layer']} | {r['K']} | {r['N']} | {r['s']} | {r['M']} | {r['bf16_us']:.1f} | "
                       f"{r['int8_u1_us']:.1f} | {r['int8_us']:.1f} ({','.join(map(str, r['int8_config']))}) | "
                       f"{f(r['int8_used_us'])} ({r['int8_used_config']}) | {gbs:.0f} | {r['bf16_us'] / r['int8_us']:.2f} |")
        return "\n".join(out)
    for r in d["rows"]:
        out.append(f"| {r['model']} {r['layer']} | {r['K']} | {r['N']} | {r['s']} | {r['M']} | {r['bf16_us']:.1f} | "
                   f"{f(r.get('int8_us'))} | {r['mma_us']:.1f} | {r['step_us']:.1f} | {f(r.get('triton_step_us'))} | "
                   f"{r['x_bf16']:.2f} | {r['weight_GBps']:.0f} |")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--md", help="print the markdown table of this result JSON and exit")
    ap.add_argument("--out")
    ap.add_argument("--models", nargs="+", default=list(SHAPES))
    ap.add_argument("--ms", nargs="+", type=int, default=[1, 2, 4, 8, 16, 32, 64])
    ap.add_argument("--exactness", nargs="*", default=["int8", "mma"], choices=["int8", "mma"])
    ap.add_argument("--int8-only", action="store_true", help="time only the integer GEMV's configurations (M <= 8)")
    a = ap.parse_args()
    if a.md:
        print(render(a.md))
        return
    if not a.out:
        ap.error("--out is required")
    dev = torch.device("cuda")
    reason = unavailable_reason(dev)
    if reason:
        raise SystemExit(reason)
    torch.manual_seed(0)
    head = run_header(copy_GBps=copy_bandwidth(dev))
    print(head, flush=True)
    result = {"header": head}
    for kind in a.exactness:
        result[f"exactness_{kind}"] = ex = exactness(dev) if kind == "int8" else exactness_mma(dev)
        worst = max(max(v for k_, v in r.items() if k_.startswith("rel_") or k_ == "oracle_vs_arc_rel") for r in ex)
        if kind == "int8":
            same = [r["u_bitwise_equal"] for r in ex if "u_bitwise_equal" in r]
            print(f"exactness int8: u > 1 bitwise equal to u = 1 on {sum(same)}/{len(same)} cases", flush=True)
        print(f"exactness {kind}: {len(ex)} cases, act bit-exact {sum(r['act_exact'] for r in ex)}/{len(ex)}, "
              f"worst fp32-out rel err vs float64 {worst:.2e}", flush=True)
        Path(a.out).write_text(json.dumps(result, indent=1))
    result["rows"] = speed(dev, a.models, [m for m in a.ms if m <= 8] if a.int8_only else a.ms, a.int8_only)
    Path(a.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
