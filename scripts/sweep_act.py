"""Activation kernel at prefill size (issue 4 target: >= 70% of copy bandwidth at M = 4096).

    PYTHONPATH=. python3 scripts/sweep_act.py --out results/act-kernel-h200.json [--prev MODULE]
For the Llama-3.1-8B and Qwen2.5-7B input depths, M = 4096 bf16 rows, s = 6.25% of K: the
kernel's time for the packed output (codes + E4M3 scales, the W4A4 operand) and for the bf16
code * block scale output (the Hopper prefill operand), with whole-block ('blocks', the
default order, one index per 16 channels) and arbitrary ('sorted') permutations, over blocks
per program; the CUDA kernel (cuda_act.py; whole-block order) for packed, bf16 and int8
outputs; and the model's prefill call (per-token scale computed, bf16 operand) on both.
Bytes counted: x read once, outputs written once. Every kernel is first checked bit-exact
against arcquant.arc.quantize_activation on the same data. --prev: a module with a previous
Triton kernel (same API), timed in the same run.
"""
import argparse
import importlib
import json
import sys
from pathlib import Path

import torch
import triton
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).parent))
from bench_hopper_paths import tail_width  # noqa: E402

from arcquant import arc  # noqa: E402
from arcquant.formats import get_format  # noqa: E402
from arcquant.formats import e2m1  # noqa: E402
from arcquant.kernels import act_quant  # noqa: E402
from arcquant.kernels.cuda_act import arc_act_quant_cuda  # noqa: E402
from arcquant.kernels.cuda_gemv import from_mma_order  # noqa: E402

F = get_format("nvfp4")
DEPTHS = {"llama q/k/v, o, gate/up": 4096, "llama down": 14336, "qwen q/k/v, o, gate/up": 3584, "qwen down": 18944}


def case(k, m, dev):
    s = tail_width(k)
    xs = [torch.randn(m, k, device=dev, dtype=torch.bfloat16) for _ in range(4)]
    for x in xs:                                                       # a few outlier channels, as real inputs
        x[:, :8] *= 30
    gs = [F.global_scale(x.float().abs().amax(1, keepdim=True)) for x in xs]
    blocks = (torch.randperm(k // 16, device=dev)[:, None] * 16 + torch.arange(16, device=dev)).flatten()
    return s, xs, gs, {"blocks": blocks.to(torch.int32), "sorted": torch.randperm(k, device=dev).to(torch.int32)}


def ref(x, perm, s, gs):
    plan = arc.ArcPlan(perm.long(), perm.long()[perm.numel() - s:])
    return arc.quantize_activation(x.float(), plan, F, gs)


def exact_triton(mod, x, perm, s, gs, starts) -> bool:
    codes, scales = ref(x, perm, s, gs)
    c, sc, xd = mod.arc_quantize_activation(x, perm, s, gs, dequantized=torch.bfloat16, starts=starts)
    return (torch.equal(c, F.module.pack(codes)) and torch.equal(sc.view(torch.uint8), scales.view(torch.uint8))
            and torch.equal(xd.float(), F.dequantize(codes, scales, torch.tensor(1.0, device=x.device))))


def exact_cuda(x, perm, s, gs, starts, token: bool = True) -> bool:
    """Every output of the CUDA kernel, the given per-token scale and (token) the one it computes."""
    codes, scales = ref(x, perm, s, gs)
    sb = scales.view(torch.uint8)
    c, sc, _ = arc_act_quant_cuda(x, starts, s, gs, "packed")
    xd, _, _ = arc_act_quant_cuda(x, starts, s, gs, "bfloat16")
    xh, _, _ = arc_act_quant_cuda(x, starts, s, gs, "mma")
    xi, xs, g = arc_act_quant_cuda(x, starts, s, None if token else gs, "int8")
    deq = F.dequantize(codes, scales, torch.tensor(1.0, device=x.device))
    return (torch.equal(c, F.module.pack(codes)) and torch.equal(sc.view(torch.uint8), sb)
            and torch.equal(xd.float(), deq) and torch.equal(from_mma_order(xh).float(), deq)
            and torch.equal(xi.float(), 2 * e2m1.e2m1_decode(codes)) and torch.equal(xs.view(torch.uint8), sb)
            and torch.equal(g, gs.reshape(-1)))


def exact_cuda_ties(dev) -> bool:
    """Every E2M1 rounding tie, -0, saturation and an all-negative tiny block (block scale 1, so
    x / scale = x exactly): the CUDA kernel's outputs against the reference."""
    x = torch.zeros(3, 32, device=dev, dtype=torch.bfloat16)
    x[0, :16] = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, -0.0, -0.25, -5.0, -1.75, 0.5, 3.0, -2.5, 6.0])
    x[1, 16:] = -1e-3
    x[2] = torch.linspace(-7, 7, 32)
    perm = torch.arange(32, device=dev, dtype=torch.int32)
    return all(exact_cuda(x, perm, s, torch.ones(3, 1, device=dev), act_quant.block_starts(perm), token=False)
               for s in (0, 16))


def timed(fn, xs, gs):
    i = [0]

    def f():
        i[0] = (i[0] + 1) % 4
        return fn(xs[i[0]], gs[i[0]])
    return do_bench(f, return_mode="median") * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--m", type=int, default=4096)
    ap.add_argument("--prev", help="module of the previous Triton kernel, e.g. arcquant.kernels.act_quant_prev")
    a = ap.parse_args()
    dev, m = "cuda", a.m
    buf = torch.empty(2 ** 28, device=dev)
    copy = 2 * buf.numel() * 4 / do_bench(lambda: buf.clone(), return_mode="median") / 1e6
    del buf
    head = {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "copy_GBps": copy, "M": m}
    head["ties_bit_exact"] = exact_cuda_ties(dev)
    print(json.dumps(head), flush=True)
    tritons = {"triton": act_quant} | ({"prev": importlib.import_module(a.prev)} if a.prev else {})
    act_quant.CUDA_KERNEL = False                                      # the Triton rows run Triton
    rows = []

    def add(r, byts):
        r.update(GBps=byts / r["us"] / 1e3, pct_copy=100 * byts / r["us"] / 1e3 / copy)
        rows.append(r)
        print(" ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()), flush=True)

    for name, k in DEPTHS.items():
        s, xs, gs, perms = case(k, m, dev)
        base = {"depth": name, "K": k, "s": s}
        wbytes = {"packed": m * (k + s) * (0.5 + 1 / 16), "bf16": m * (k + s) * 2, "int8": m * (k + s) * (1 + 1 / 16)}
        for order, perm in perms.items():
            for label, mod in tritons.items():
                starts = mod.block_starts(perm) if order == "blocks" else None
                ok = exact_triton(mod, xs[0], perm, s, gs[0], starts)
                for out in ("packed", "bf16"):
                    for nb in (32, 64, 128):
                        fn = (lambda x, g: mod.arc_quantize_activation(x, perm, s, g, nb, starts=starts)) \
                            if out == "packed" else \
                            (lambda x, g: mod.arc_quantize_activation(x, perm, s, g, nb, torch.bfloat16, False, starts))
                        add({**base, "order": order, "kernel": label, "output": out, "blocks_per_program": nb,
                             "us": timed(fn, xs, gs), "bit_exact": ok}, m * k * 2 + wbytes[out])
            if order != "blocks":
                continue
            starts = act_quant.block_starts(perm)
            ok = exact_cuda(xs[0], perm, s, gs[0], starts)
            for out, cout in (("packed", "packed"), ("bf16", "bfloat16"), ("int8", "int8")):
                add({**base, "order": order, "kernel": "cuda", "output": out,
                     "us": timed(lambda x, g: arc_act_quant_cuda(x, starts, s, g, cout), xs, gs), "bit_exact": ok},
                    m * k * 2 + wbytes[out])
            # the model's prefill call: per-token scale computed (gs=None), bf16 operand
            for label, flag in (("cuda", True), ("triton", False)):
                act_quant.CUDA_KERNEL = flag
                add({**base, "order": order, "kernel": f"{label} prefill call (per-token scale inside)",
                     "output": "bf16", "us": timed(lambda x, g: act_quant.arc_quantize_activation_gemv(
                         x, perm, s, None, starts, out="bfloat16"), xs, gs)}, m * k * 2 + wbytes["bf16"])
            act_quant.CUDA_KERNEL = False
    with open(a.out, "w") as fh:
        json.dump({"header": head, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
