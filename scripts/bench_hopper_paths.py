"""Decode (Triton GEMV kernel) and prefill (dequantize once + cuBLAS) ARC paths vs cuBLAS BF16
(results v1-v5; the decode GEMVs the model runs are CUDA now: scripts/bench_layers.py).

    PYTHONPATH=. python3 scripts/bench_hopper_paths.py --out results/bench-paths.json

For every Llama-3.1-8B / Qwen2.5-7B layer shape (s = 6.25% of K rounded to 64) and M:
  bf16      cuBLAS x (M, K) @ W^T, bf16 out
  act       fused activation kernel (gather, NVFP4, residual, NVFP4 -> code * scale, 16-bit)
  decode    (M <= 16) act + arc_gemv, the whole step captured in one CUDA graph
  prefill   (M >= 64) act + dequantize W once + torch.mm (fp32 out) + tensor scales
Exactness first (vs the float64 product of the reference operands), then time: median of
triton.testing.do_bench (it flushes L2 before every repetition), the GEMV config swept.
"""
import argparse
import json
import sys

from pathlib import Path

import torch
import triton
from triton.testing import do_bench

from arcquant import arc
from arcquant.formats import get_format, nvfp4
from arcquant.kernels.act_quant import arc_quantize_activation, block_starts
from arcquant.kernels.decode import arc_gemv
from arcquant.kernels.prefill import arc_matmul_prefill, dequantize_codes

F = get_format("nvfp4")
SHAPES = {"llama-3.1-8b": [("qkv", 4096, 6144), ("o", 4096, 4096), ("gate_up", 4096, 28672), ("down", 14336, 4096)],
          "qwen2.5-7b": [("qkv", 3584, 4608), ("o", 3584, 3584), ("gate_up", 3584, 37888), ("down", 18944, 3584)]}
DECODE_MS, PREFILL_MS = [1, 4, 16], [64, 256, 1024, 4096, 8192]
ap_ms = None
# (fma, BN, BK, split_k): tensor-core GEMV and the CUDA-core variant
GEMV_CONFIGS = [(False, 64, 256, sk, 4) for sk in (2, 4, 8)] + [(False, 32, 256, 8, 4), (False, 64, 512, 4, 4)] + \
    [(True, bn, bk, sk, w) for bn in (2, 4, 8) for bk in (512, 1024, 2048) for sk in (1,) for w in (1, 2, 4)]
ACT_NB = (32, 64, 128, 256)      # 16-blocks per program of the activation kernel (swept at M >= 1024)
DEQ_NB = (64, 128, 256)


def bench(fn):
    return do_bench(fn, warmup=10, rep=40, return_mode="median") * 1000.0          # us


def run_header(**extra) -> dict:
    """What every result file names: the card and the versions (plus extra fields)."""
    return {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "cuda": torch.version.cuda, **extra}


def gpu_run() -> tuple:
    """What the GPU scripts' main() starts with: --out (required), seed 0, the CUDA device.
    -> (parsed arguments, device)."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    torch.manual_seed(0)
    return a, torch.device("cuda")


def finish_check(out: str, rows: list, bad: list, **summary) -> None:
    """How the GPU exactness checks end: the summary (card, versions, case and failure counts, and
    `summary`) printed, each failed row printed, everything written to `out`, exit status 1 if any
    case failed."""
    record = {"header": run_header(), **summary, "cases": len(rows), "failed": len(bad), "rows": rows}
    print(json.dumps({k: v for k, v in record.items() if k != "rows"}), flush=True)
    for r in bad:
        print("FAILED", json.dumps(r), flush=True)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(record, indent=1))
    sys.exit(1 if bad else 0)


def graphed(fn):
    fn()                                                                            # compile
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay


def tail_width(k: int) -> int:
    """The benchmarks' realistic s for depth K: ~6.25 % of K in multiples of 64, at least 64."""
    return max(64, round(k * 0.0625 / 64) * 64)


def block_perm(k: int, dev) -> torch.Tensor:
    """A random channel order that moves whole 16-blocks (the 'blocks' order): (K,) int64."""
    return torch.randperm(k // 16, device=dev).repeat_interleave(16) * 16 + torch.arange(16, device=dev).repeat(k // 16)


def make_layer(k, n, s, dev):
    """Weight (N, K) with a plan whose tail is the last s columns ('blocks' order)."""
    w = torch.randn(n, k, device=dev) * 0.02
    perm = block_perm(k, dev)
    plan = arc.ArcPlan(perm, perm[k - s:].clone())
    gsw = F.global_scale(w.abs().amax())
    codes, scales = F.quantize(w[:, perm], gsw)
    return w, plan, gsw, nvfp4.pack(codes).contiguous(), scales.contiguous()


def make_x(m, k, dev):
    x = torch.randn(m, k, device=dev)
    x[:, torch.randint(0, k, (8,), device=dev)] *= 40.0                             # outlier channels
    return x.to(torch.bfloat16)


def check(x, plan, s, gsw, wc, ws):
    """Relative error of both paths vs float64 on the reference operands."""
    gsx = F.global_scale(x.float().abs().amax(1, keepdim=True))
    xa = F.dequantize(*arc.quantize_activation(x.float(), plan, F, gsx), gsx).double()
    codes = nvfp4.unpack(wc)
    wa = F.dequantize(*arc.augmented_weight(arc.QuantizedWeight(codes, ws, None, None), plan, 16), gsw).double()
    ref = xa @ wa.t()
    _, _, xd = arc_quantize_activation(x, plan.perm.to(torch.int32), s, gsx, dequantized=torch.bfloat16, packed=False)
    out = {}
    rel = lambda y: ((y.double() - ref).norm() / ref.norm()).item()
    out["decode_rel_err"] = rel(arc_gemv(xd, gsx, wc, ws, gsw, s, out_dtype=torch.float32))
    out["decode_fma_rel_err"] = rel(arc_gemv(xd, gsx, wc, ws, gsw, s, out_dtype=torch.float32, block_n=8, fma=True))
    out["prefill_exact_rel_err"] = rel(arc_matmul_prefill(xd, gsx, wc, ws, gsw, s, out_dtype=torch.float32, exact=True))
    out["prefill_fast_rel_err"] = rel(arc_matmul_prefill(xd, gsx, wc, ws, gsw, s, out_dtype=torch.float32))
    out["bf16_rounding_rel_err"] = rel(ref.to(torch.bfloat16))
    return out


def run_shape(model, name, k, n, dev, rows):
    s = tail_width(k)
    w, plan, gsw, wc, ws = make_layer(k, n, s, dev)
    wb = w.to(torch.bfloat16)
    perm = plan.perm.to(torch.int32)
    starts = block_starts(perm)
    print(f"{model} {name} K={k} N={n} s={s}: {check(make_x(3, k, dev), plan, s, gsw, wc, ws)}", flush=True)
    for m in ap_ms or DECODE_MS + PREFILL_MS:
        x = make_x(m, k, dev)
        gsx = F.global_scale(x.float().abs().amax(1, keepdim=True)).reshape(-1)
        row = {"model": model, "layer": name, "K": k, "N": n, "s": s, "M": m}
        row["bf16_us"] = bench(graphed(lambda: torch.mm(x, wb.t())))
        act_nb = 64
        if m >= 1024:
            sweep = {nb: bench(lambda: arc_quantize_activation(x, perm, s, gsx, nb, torch.bfloat16, False, starts))
                     for nb in ACT_NB}
            act_nb = min(sweep, key=sweep.get)
            row["act_sweep"] = sweep
        act = lambda: arc_quantize_activation(x, perm, s, gsx, act_nb, torch.bfloat16, False, starts)
        row["act_us"] = bench(graphed(act))
        row["act_packed_us"] = bench(lambda: arc_quantize_activation(x, perm, s, gsx, act_nb, None, True, starts))
        row["act_GBps"] = (m * k * 2 + m * (k + s) * 2) / row["act_us"] / 1e3
        row["act_packed_GBps"] = (m * k * 2 + m * (k + s) * 9 // 16) / row["act_packed_us"] / 1e3
        _, _, xd = act()
        if m <= 16:
            best = None
            for fma, bn, bk, sk, nw in GEMV_CONFIGS:
                if fma and m > 4:
                    continue
                step = lambda: arc_gemv(act()[2], gsx, wc, ws, gsw, s, block_n=bn, block_k=bk, split_k=sk, fma=fma,
                                        num_warps=nw)
                t = bench(graphed(step))
                row.setdefault("sweep", []).append([fma, bn, bk, sk, nw, round(t, 2)])
                if best is None or t < best[0]:
                    best = (t, (fma, bn, bk, sk, nw))
            row["arc_us"], row["config"] = best[0], best[1]
            f, bn, bk, sk, nw = best[1]
            row["gemm_us"] = bench(graphed(lambda: arc_gemv(xd, gsx, wc, ws, gsw, s, block_n=bn, block_k=bk,
                                                            split_k=sk, fma=f, num_warps=nw)))
        else:
            row["gemm_us"] = bench(lambda: arc_matmul_prefill(xd, gsx, wc, ws, gsw, s))
            row["gemm_exact_us"] = bench(lambda: arc_matmul_prefill(xd, gsx, wc, ws, gsw, s, exact=True))
            dq = {nb: bench(lambda: dequantize_codes(wc, ws, s, torch.bfloat16, nb)) for nb in DEQ_NB}
            row["dequant_w_us"], row["dequant_nb"] = min(dq.values()), min(dq, key=dq.get)
            row["arc_us"] = bench(lambda: arc_matmul_prefill(act()[2], gsx, wc, ws, gsw, s))
        row["x_bf16"] = row["bf16_us"] / row["arc_us"]
        wbytes = n * k // 2 + n * k // 16
        row["arc_GBps"] = wbytes / row["arc_us"] / 1e3
        row["arc_TFLOPs"] = 2 * m * n * (k + s) / row["arc_us"] / 1e6
        rows.append(row)
        print(json.dumps(row), flush=True)


def copy_bandwidth(dev):
    a = torch.empty(2**28, dtype=torch.uint8, device=dev)
    b = torch.empty_like(a)
    return 2 * a.numel() / bench(lambda: b.copy_(a)) / 1e3                             # GB/s


def render(path) -> str:
    """Markdown table of a result JSON (python3 scripts/bench_hopper_paths.py --md FILE)."""
    d = json.load(open(path))
    h = d["header"]
    out = [f"Card: {h['card']}, torch {h['torch']}, Triton {h['triton']}, copy bandwidth {h['copy_GBps']:.0f} GB/s "
           "(read+write). Median of triton.testing.do_bench (L2 flushed before each repetition); decode "
           "steps and BF16 replayed from CUDA graphs.", "",
           "| layer | K | N | s | M | cuBLAS BF16 us | act us | act (packed) GB/s | ARC GEMM us | act+GEMM us | x BF16 | path / config |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in d["rows"]:
        cfg = r.get("config")
        path = ("decode " + ("CUDA-core" if cfg[0] else "tensor-core") + f" BN={cfg[1]} BK={cfg[2]} split={cfg[3]}"
                + (f" warps={cfg[4]}" if len(cfg) > 4 else "")) \
            if cfg else f"prefill (dequant W {r.get('dequant_w_us', 0):.0f} us + cuBLAS)"
        out.append(f"| {r['model']} {r['layer']} | {r['K']} | {r['N']} | {r['s']} | {r['M']} | {r['bf16_us']:.1f} | "
                   f"{r['act_us']:.1f} | {r.get('act_packed_GBps', 0):.0f} | {r['gemm_us']:.1f} | {r['arc_us']:.1f} | "
                   f"{r['x_bf16']:.2f} | {path} |")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--md", help="print the markdown table of this result JSON and exit")
    ap.add_argument("--out")
    ap.add_argument("--models", nargs="+", default=list(SHAPES))
    ap.add_argument("--ms", nargs="+", type=int, help="only these M")
    a = ap.parse_args()
    if a.md:
        print(render(a.md))
        return
    if not a.out:
        ap.error("--out is required")
    global ap_ms
    ap_ms = a.ms
    dev = "cuda"
    torch.manual_seed(0)
    head = run_header(copy_GBps=copy_bandwidth(dev))
    print(head, flush=True)
    rows = []
    for model in a.models:
        for name, k, n in SHAPES[model]:
            run_shape(model, name, k, n, dev, rows)
            with open(a.out, "w") as f:
                json.dump({"header": head, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
