"""The prefill MLP fusion's kernel on the GPU (issue 4: the variant fused with SiLU(gate) * up).

    PYTHONPATH=. python3 scripts/check_mlp_fusion.py --out results/mlp-fusion-h200.json
ops.silu_mul_quantize_act (csrc/arc_act.cu: arc_silu_mul_act_kernel) on random gate / up rows
with outlier channels, M = 1, 3, 33, 100 (every case) and 1000, 2048 (bf16, per-row scales);
K = 1040, 3584, 14336, 18944 with s = 16, 448, 896, 0; bf16 / fp16 inputs; bf16 / int8
operands; with the tensor scales of the unscaled prefill GEMM (the activation's per row, xgs, and
gate's and up's weight scales, wgu: the kernel forms 1 / (xgs * w) itself) and without; gate and up
as two tensors and as the two halves of one stacked (M, 2K) product; per-token and static
activation scale. Each operand, block scale and per-token scale must equal, bit for bit, the CPU
reference (ops.quantize_act on CPU) applied to what the unfused GPU path
computes: prefill.scale_rows on gate and up, torch's F.silu(g) * u, and also the GPU activation
kernel on that h. Bad inputs must raise. Then times one Llama / Qwen down_proj input at M = 2048
against the unfused chain (two scale_rows, F.silu, the product, the activation kernel), CUDA
graphs, median of do_bench. Last, the decode MLP's SiLU * up kernel (ops.silu_mul) against torch's
F.silu(g) * u, bit for bit and timed (check_decode).
"""
import argparse
import json

import torch
from triton.testing import do_bench_cudagraph

from arcquant.kernels import ops
from arcquant.kernels.act_quant import block_starts
from arcquant.kernels.cuda_act import arc_silu_mul_act_cuda
from arcquant.kernels.prefill import scale_rows


def case(m, k, dtype, seed, scaled, stacked=False):
    """-> (gate, up, xgs, wgu, perm): gate / up (M, K), as the halves of one (M, 2K) tensor if stacked."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    mag = 40.0 if scaled else 2.0                                  # raw GEMM outputs are large, 1 / (xgs w) small
    x = torch.randn(m, 2 * k, device="cuda", generator=g) * mag
    for half in (x[:, :k], x[:, k:]):
        half[:, torch.randperm(k, device="cuda", generator=g)[:8]] *= 20
    xgs = 20 * torch.rand(m, device="cuda", generator=g) + 5 if scaled else None
    wgu = 2 * torch.rand(2, device="cuda", generator=g) + 0.5 if scaled else None
    perm = (torch.randperm(k // 16, device="cuda", generator=g)[:, None] * 16 +
            torch.arange(16, device="cuda")).flatten().to(torch.int32)
    x = x.to(dtype)
    gate, up = (x[:, :k], x[:, k:]) if stacked else (x[:, :k].contiguous(), x[:, k:].contiguous())
    return gate, up, xgs, wgu, perm


def unfused_h(g, u, xgs, wgu):
    if xgs is not None:
        g, u = scale_rows(g.contiguous().clone(), xgs, wgu[0]), scale_rows(u.contiguous().clone(), xgs, wgu[1])
    return torch.nn.functional.silu(g) * u


def check(m, k, s, dtype, out, scaled, static, stacked=False):
    g, u, xgs, wgu, perm = case(m, k, dtype, m * 7 + k + s + scaled, scaled, stacked)
    starts = block_starts(perm)
    gs = torch.tensor([37.5], device="cuda") if static else None
    xq, xs, gg = ops.OPS.silu_mul_quantize_act(g, u, xgs, wgu, perm, starts, s, gs, out)
    h = unfused_h(g, u, xgs, wgu)
    rq, rs, rg = ops.OPS.quantize_act(h.cpu(), perm.cpu(), None, s, None if gs is None else gs.cpu(), out)
    aq, as_, ag = ops.OPS.quantize_act(h, perm, starts, s, gs, out)      # the unfused GPU kernel
    return {"M": m, "K": k, "s": s, "dtype": str(dtype), "out": out, "scaled": scaled, "static_gs": static,
            "stacked": stacked,
            "operand_exact": bool(torch.equal(xq.cpu(), rq) and torch.equal(xs.cpu(), rs) and torch.equal(gg.cpu(), rg)),
            "equals_unfused_gpu": bool(torch.equal(xq, aq) and torch.equal(xs, as_) and torch.equal(gg, ag))}


def bad_inputs() -> dict:
    g, u, xgs, wgu, perm = case(4, 1040, torch.bfloat16, 0, True)
    starts = block_starts(perm)
    tries = {"wgu of 1 value": lambda: arc_silu_mul_act_cuda(g, u, starts, 16, None, "bfloat16", xgs, wgu[:1]),
             "xgs without wgu": lambda: arc_silu_mul_act_cuda(g, u, starts, 16, None, "bfloat16", xgs, None),
             "up with another row stride": lambda: arc_silu_mul_act_cuda(g, case(4, 1040, torch.bfloat16, 0, True,
                                                                               True)[1], starts, 16),
             "up of another shape": lambda: arc_silu_mul_act_cuda(g, u[:, :1024], starts, 16, None, "bfloat16"),
             "K too large": lambda: arc_silu_mul_act_cuda(torch.zeros(1, 24592, dtype=torch.bfloat16, device="cuda"),
                                                          torch.zeros(1, 24592, dtype=torch.bfloat16, device="cuda"),
                                                          torch.zeros(1537, dtype=torch.int32, device="cuda"), 0),
             "CPU tensors": lambda: arc_silu_mul_act_cuda(g.cpu(), u.cpu(), starts.cpu(), 16)}
    got = {}
    for name, fn in tries.items():
        try:
            fn()
            got[name] = "no error"
        except ValueError as e:
            got[name] = f"ValueError: {e}"
    return got


def check_decode() -> dict:
    """ops.silu_mul (csrc/arc_act.cu: arc_silu_mul_kernel, the decode MLP's SiLU * up) against torch's
    F.silu(g) * u, bit for bit: M = 1 - 32, gate / up as two tensors and as the halves of one stacked
    product, bf16 / fp16; and its time against torch's two ops on the stacked halves (Llama, M = 8)."""
    from arcquant.kernels.cuda_act import silu_mul_rows_ok
    rows = []
    for m in (1, 3, 8, 16, 32):
        for k in (1040, 14336, 18944):
            for dtype in (torch.bfloat16, torch.float16):
                for stacked in (False, True):
                    g, u, _, _, _ = case(m, k, dtype, m + k, False, stacked)
                    ok = silu_mul_rows_ok(g, u)
                    rows.append({"M": m, "K": k, "dtype": str(dtype), "stacked": stacked, "cuda": ok,
                                 "equal": bool(torch.equal(ops.OPS.silu_mul(g, u), torch.nn.functional.silu(g) * u))})
    g, u, _, _, _ = case(8, 14336, torch.bfloat16, 5, False, True)
    t_k = do_bench_cudagraph(lambda: ops.OPS.silu_mul(g, u)) * 1e3
    t_t = do_bench_cudagraph(lambda: torch.nn.functional.silu(g) * u) * 1e3
    return {"cases": len(rows), "equal": sum(r["equal"] for r in rows), "cuda": sum(r["cuda"] for r in rows),
            "failures": [r for r in rows if not r["equal"]], "kernel_us_m8_llama": t_k, "torch_us_m8_llama": t_t}


def timing(m, k, s):
    g, u, _, _, perm = case(m, k, torch.bfloat16, 1, False)
    one, ones = torch.ones(m, device="cuda"), torch.ones(2, device="cuda")
    starts = block_starts(perm)
    fused = lambda: ops.OPS.silu_mul_quantize_act(g, u, one, ones, perm, starts, s, None, "bfloat16")

    def apart():                                                    # scales 1: in place, values stay put
        scale_rows(g, one, ones[0])
        scale_rows(u, one, ones[1])
        return ops.OPS.quantize_act(torch.nn.functional.silu(g) * u, perm, starts, s, None, "bfloat16")
    t_f, t_a = do_bench_cudagraph(fused) * 1e3, do_bench_cudagraph(apart) * 1e3
    moved = (2 * m * k + m * (k + s)) * 2                            # g, u read; operand written (bytes)
    return {"M": m, "K": k, "s": s, "fused_us": t_f, "unfused_chain_us": t_a, "fused_GB_s": moved / t_f / 1e3}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    shapes = ((1040, 16), (3584, 448), (14336, 896), (18944, 0))
    rows = [check(m, k, s, dtype, out, scaled, static=(m == 3)) for m in (1, 3, 33, 100) for k, s in shapes
            for dtype in (torch.bfloat16, torch.float16) for out in ("bfloat16", "int8") for scaled in (True, False)]
    rows += [check(m, k, s, torch.bfloat16, "bfloat16", True, False) for m in (1000, 2048) for k, s in shapes]
    rows += [check(m, k, s, dtype, "bfloat16", True, False, stacked=True) for m in (3, 100, 2048) for k, s in shapes
             for dtype in (torch.bfloat16, torch.float16)]
    summary = {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "cases": len(rows),
               "operand_exact": sum(r["operand_exact"] for r in rows),
               "equals_unfused_gpu": sum(r["equals_unfused_gpu"] for r in rows),
               "failures": [r for r in rows if not (r["operand_exact"] and r["equals_unfused_gpu"])],
               "bad_inputs": bad_inputs(), "timing": [timing(2048, 14336, 896), timing(2048, 18944, 1216)],
               "decode_silu_mul": check_decode()}
    print(json.dumps(summary, indent=1))
    with open(a.out, "w") as fh:
        json.dump({"summary": summary, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
