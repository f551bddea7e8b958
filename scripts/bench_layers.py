"""Issue 4's per-layer benchmark, of the paths the model runs now (run on the device machine).

    PYTHONPATH=. python3 scripts/bench_layers.py --out results/bench-layers-h200.json
    python3 scripts/bench_layers.py --md results/bench-layers-h200.json   # its tables, in Markdown

For every Llama-3.1-8B / Qwen2.5-7B layer shape (q/k/v and gate/up as the model stacks them;
s = 6.25 % of K rounded to 64; a 'blocks' plan calibrated on rows with outlier channels) and
M in 1..8192, one QuantLinear on the kernel path (gpu.use_kernels) is timed:
  bf16     cuBLAS x (M, K) @ W^T, bf16 out
  act      the activation kernel as the layer calls it (ops.quantize_act, per-token scale)
  gemm     the product alone from a quantized operand (KernelPath.product: integer GEMV for
           M <= 2, tensor-core GEMV for M <= 32, dequantize W + cuBLAS + scales above)
  both     the layer's forward (act + gemm), what the model pays per linear
  norm+act the fused RMSNorm + activation kernel that feeds q/k/v and gate/up in the model
  deq+bf16 "dequantize W to bf16, then cuBLAS" (weight-only, no activation quantization)
Each call is captured in a CUDA graph (as the engine runs it: no host launch time) and timed
as the median of triton.testing.do_bench over graph replays, which zeroes a 256 MB buffer
before every repetition, so weights and inputs come from HBM, not the 50 MB L2.
Exactness per row: the product (fp32 out) against the float64 product of the reference
operands (plain torch quantization, ARCQUANT_ACT_BACKEND=reference); beside it, cuBLAS BF16's
own error against float64 (its bf16 output rounding). Copy bandwidth of the card measured in
the same run (clone of 1 GiB).
"""
import argparse
import json
import os
import sys
from pathlib import Path

import torch
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).parent))
from bench_hopper_paths import SHAPES, graphed, run_header, tail_width  # noqa: E402

from arcquant import arc  # noqa: E402
from arcquant.formats import get_format  # noqa: E402
from arcquant.gpu import use_kernels  # noqa: E402
from arcquant.kernels.prefill import dequantize_codes  # noqa: E402
from arcquant.qlinear import QuantLinear  # noqa: E402

F = get_format("nvfp4")
NORMED = ("qkv", "gate_up")                                       # inputs that come from an RMSNorm
MS = [1, 4, 16, 64, 256, 1024, 4096, 8192]


def inputs(m, k, hot, dev, seed):
    """(m, k) bf16 rows with outlier channels `hot` (x30), as calibration saw them."""
    g = torch.Generator(device=dev).manual_seed(seed)
    x = torch.randn(m, k, device=dev, generator=g)
    x[:, hot] *= 30
    return x.to(torch.bfloat16)


def make_layer(k, n, s, hot, dev, seed):
    """One QuantLinear (N, K) on the kernel path, its BF16 weight; the plan from calibrated rows."""
    g = torch.Generator(device=dev).manual_seed(seed)
    lin = torch.nn.Linear(k, n, bias=False, device=dev)
    lin.weight.data = torch.randn(n, k, device=dev, generator=g) * 0.02
    st = arc.ChannelStats(k, 0.125, F)
    st.update(inputs(512, k, hot, dev, seed + 1).float().cpu())
    plan = arc.make_plan(st, k, s, "blocks", 16)
    plan = arc.ArcPlan(plan.perm.to(dev), plan.tail.to(dev))
    q = QuantLinear.from_linear(lin, "nvfp4", "fp4", "token", plan, F.global_scale(lin.weight.abs().amax()))
    use_kernels(torch.nn.Sequential(q))
    return q, lin.weight.detach().to(torch.bfloat16)


def timed(fn) -> float:
    """Median microseconds of fn replayed from a CUDA graph, L2 flushed before each replay."""
    return do_bench(graphed(fn), warmup=25, rep=100, return_mode="median") * 1e3


def rel_err_fp32(q, x):
    """The kernel product (fp32 out) vs the float64 product of the reference operands."""
    kp = q.kernel
    m, _, (kind, xq, xs, gs) = kp.operand(q, x)
    y = kp.product(kind, m, xq, xs, gs, kp.weight, None, q.out_features, q.k_padded, torch.float32)
    old = os.environ.get("ARCQUANT_ACT_BACKEND")
    os.environ["ARCQUANT_ACT_BACKEND"] = "reference"
    try:
        xr = q.quantize_input(x.float())
    finally:
        os.environ.pop("ARCQUANT_ACT_BACKEND") if old is None else os.environ.__setitem__("ARCQUANT_ACT_BACKEND", old)
    ref = xr.double() @ q.dequantized_weight().double().t()
    q._w_aug = None                                               # free the fp32 weight
    return kind, ((y.double() - ref).norm() / ref.norm()).item()


def bf16_rel_err(x, w):
    """cuBLAS BF16's own error (bf16 output) against the float64 product of the same inputs."""
    ref = x.double() @ w.double().t()
    return ((torch.nn.functional.linear(x, w).double() - ref).norm() / ref.norm()).item()


def bench_shape(model, name, k, n, ms, dev):
    s = tail_width(k)
    hot = torch.randperm(k, device=dev, generator=torch.Generator(device=dev).manual_seed(k))[:8]
    q, wb = make_layer(k, n, s, hot, dev, k)
    kp, ops = q.kernel, q.kernel.ops
    normw = torch.rand(k, device=dev, dtype=torch.bfloat16) + 0.5
    wc, ws = kp.weight[0], kp.weight[1].view(torch.float8_e4m3fn)
    rows = []
    for m in ms:
        x = inputs(m, k, hot, dev, 100 + m)
        kind = kp.path(m)
        _, _, (_, xq, xs, gs) = kp.operand(q, x)
        r = {"model": model, "layer": name, "K": k, "N": n, "s": s, "M": m, "path": kind}
        r["bf16_us"] = timed(lambda: torch.nn.functional.linear(x, wb))
        r["act_us"] = timed(lambda: ops.quantize_act(x, kp.perm, kp.starts, s, None, kind))
        r["gemm_us"] = timed(lambda: kp.product(kind, m, xq, xs, gs, kp.weight, None, n, k, torch.bfloat16))
        r["both_us"] = timed(lambda: q(x))
        if name in NORMED:
            r["norm_act_us"] = timed(lambda: ops.rmsnorm_quantize_act(x, normw, 1e-5, kp.perm, kp.starts, s, None,
                                                                      kind))
        r["deq_bf16_us"] = timed(lambda: torch.mm(x, dequantize_codes(wc, ws).t()))
        wbytes = n * k // 2 + n * k // 16                               # codes + E4M3 block scales, tail read once
        xbytes = m * k * 2                                               # bf16 input rows
        r["speedup_both_vs_bf16"] = r["bf16_us"] / r["both_us"]
        r["speedup_gemm_vs_bf16"] = r["bf16_us"] / r["gemm_us"]
        r["gemm_GBps"] = wbytes / r["gemm_us"] / 1e3
        r["bf16_GBps"] = 2 * n * k / r["bf16_us"] / 1e3
        r["gemm_TFLOPs"] = 2 * m * n * (k + s) / r["gemm_us"] / 1e6
        r["bf16_TFLOPs"] = 2 * m * n * k / r["bf16_us"] / 1e6
        r["act_GBps"] = (xbytes + xq.numel() * xq.element_size() + m * (k + s) // 16) / r["act_us"] / 1e3
        r["path_checked"], r["rel_err_fp32"] = rel_err_fp32(q, x)
        r["bf16_rel_err"] = bf16_rel_err(x, wb)
        rows.append(r)
        print(f"{model:13s} {name:8s} M={m:5d} {kind:8s} bf16 {r['bf16_us']:8.1f} act {r['act_us']:7.1f} "
              f"gemm {r['gemm_us']:8.1f} both {r['both_us']:8.1f} "
              f"{'norm+act %6.1f ' % r['norm_act_us'] if 'norm_act_us' in r else ''}deq+bf16 {r['deq_bf16_us']:8.1f} us"
              f"  x{r['speedup_both_vs_bf16']:.2f} (gemm x{r['speedup_gemm_vs_bf16']:.2f})  {r['gemm_GBps']:5.0f} GB/s "
              f"{r['gemm_TFLOPs']:6.1f} TF/s  act {r['act_GBps']:5.0f} GB/s  err {r['rel_err_fp32']:.1e} "
              f"(bf16 {r['bf16_rel_err']:.1e})", flush=True)
    return rows


def copy_bandwidth(dev) -> float:
    """GB/s of cloning 1 GiB (read + write), the card's copy bandwidth."""
    buf = torch.empty(2 ** 28, dtype=torch.float32, device=dev)
    return 2 * buf.numel() * 4 / do_bench(buf.clone, return_mode="median") / 1e6


def render(path) -> str:
    """Markdown of a result JSON: the header, the issue's three targets, the whole table."""
    d = json.loads(open(path).read())
    h, rows = d["header"], d["rows"]
    out = [f"Card: {h['card']}, torch {h['torch']}, Triton {h['triton']}, CUDA {h['cuda']}; copy bandwidth "
           f"{h['copy_GBps']:.0f} GB/s (read + write). Times in us: median of do_bench over CUDA-graph replays, "
           "L2 flushed before each. both = activation kernel + product (the layer's forward); x = BF16 / both.", ""]
    dec = [r for r in rows if r["M"] <= 16 and r["model"].startswith("llama")]
    if dec:
        worst = min(dec, key=lambda r: r["speedup_both_vs_bf16"])
        out.append(f"- Decode (M <= 16), Llama layers, act + product vs cuBLAS BF16 (target >= 3.0x): "
                   f"{min(r['speedup_both_vs_bf16'] for r in dec):.2f}x - {max(r['speedup_both_vs_bf16'] for r in dec):.2f}x "
                   f"(worst: {worst['layer']} M = {worst['M']}).")
    big = [r for r in rows if r["M"] == 4096]
    if big:
        pct = [100 * r["act_GBps"] / h["copy_GBps"] for r in big]
        out.append(f"- Activation kernel alone at M = 4096 (target >= 70 % of copy bandwidth): {min(pct):.0f} - "
                   f"{max(pct):.0f} %.")
        out.append(f"- Prefill M = 4096, act + product vs cuBLAS BF16 (target >= 0.85x): "
                   f"{min(r['speedup_both_vs_bf16'] for r in big):.2f}x - {max(r['speedup_both_vs_bf16'] for r in big):.2f}x; "
                   f"product alone {min(r['speedup_gemm_vs_bf16'] for r in big):.2f}x - "
                   f"{max(r['speedup_gemm_vs_bf16'] for r in big):.2f}x.")
    out += ["", "| layer | K | N | s | M | path | cuBLAS BF16 | act | product | both | norm+act | deq W + BF16 | "
            "x both | x product | product GB/s | product TFLOP/s | act GB/s | rel err (BF16's) |",
            "|" + "---|" * 18]
    for r in rows:
        na = f"{r['norm_act_us']:.1f}" if "norm_act_us" in r else ""
        out.append(f"| {r['model']} {r['layer']} | {r['K']} | {r['N']} | {r['s']} | {r['M']} | {r['path']} | "
                   f"{r['bf16_us']:.1f} | {r['act_us']:.1f} | {r['gemm_us']:.1f} | {r['both_us']:.1f} | {na} | "
                   f"{r['deq_bf16_us']:.1f} | {r['speedup_both_vs_bf16']:.2f} | {r['speedup_gemm_vs_bf16']:.2f} | "
                   f"{r['gemm_GBps']:.0f} | {r['gemm_TFLOPs']:.1f} | {r['act_GBps']:.0f} | "
                   f"{r['rel_err_fp32']:.1e} ({r['bf16_rel_err']:.1e}) |")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    ap.add_argument("--md", help="print the Markdown tables of this result JSON and exit")
    ap.add_argument("--ms", type=int, nargs="*", default=MS)
    ap.add_argument("--shapes", nargs="*", default=list(SHAPES))
    a = ap.parse_args()
    if a.md:
        print(render(a.md))
        return
    if not a.out:
        ap.error("give --out FILE (or --md FILE to print a result)")
    dev = "cuda"
    head = run_header(copy_GBps=copy_bandwidth(dev))
    print(json.dumps(head), flush=True)
    rows = []
    for model in a.shapes:
        for name, k, n in SHAPES[model]:
            rows += bench_shape(model, name, k, n, a.ms, dev)
            torch.cuda.empty_cache()
    with open(a.out, "w") as f:
        json.dump({"header": head, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
