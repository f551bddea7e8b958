"""The decode activation paths timed as the model runs them (back to back in one CUDA graph, 64
calls, median of 5 replays), each against the model's current choice, with its outputs compared
bit for bit: the o_proj input (Triton kernel vs the CUDA one at 1 - 16 CTAs a row), down_proj's
(SiLU * up then the activation kernel, vs the fused CUDA kernel) and the RMSNorm-fused one (CTAs a row).

    PYTHONPATH=. python3 scripts/chain_act.py --out results/chain-act-h200.json
"""
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_hopper_paths import block_perm, gpu_run, make_x, run_header, tail_width  # noqa: E402
from sweep_chain import chain_us as sweep_chain_us  # noqa: E402

from arcquant.kernels.act_quant import arc_quantize_activation_gemv, block_starts  # noqa: E402
from arcquant.kernels.cuda_act import (arc_act_quant_cuda, arc_rmsnorm_act_cuda, arc_silu_mul_act_cuda,  # noqa: E402
                                       arc_silu_mul_cuda)

MODELS = {"llama-3.1-8b": (4096, 14336), "qwen2.5-7b": (3584, 18944)}
CTAS = (1, 2, 4, 8, 16)


def chain_us(call, n: int = 64) -> float:
    """us a call: n calls back to back in one CUDA graph (sweep_chain.chain_us), median of 5 replays."""
    return sweep_chain_us(lambda _: call(), [None] * n)


def same(a: tuple, b: tuple) -> bool:
    return all((x is None and y is None) or (x is not None and y is not None and torch.equal(x.view(torch.uint8)
               if x.dtype == torch.float8_e4m3fn else x, y.view(torch.uint8) if y.dtype == torch.float8_e4m3fn else y))
               for x, y in zip(a, b))


def plan(k: int, dev):
    s = tail_width(k)
    perm = block_perm(k, dev).to(torch.int32)
    return s, perm, block_starts(perm)


def row(model, what, k, s, m, variants: dict, current: str) -> dict:
    outs = {name: f() for name, f in variants.items()}
    times = {name: chain_us(f) for name, f in variants.items()}
    best = min(times, key=times.get)
    r = {"model": model, "input": what, "K": k, "s": s, "M": m, "current": current, "current_us": times[current],
         "best": best, "best_us": times[best], "equal": {n: same(o, outs[current]) for n, o in outs.items()},
         "times": times}
    print(json.dumps({a: b for a, b in r.items() if a not in ("times", "equal")}), "all equal:",
          all(r["equal"].values()), flush=True)
    return r


def main():
    a, dev = gpu_run()
    rows = []
    for model, (hidden, inter) in MODELS.items():
        for m in (1, 8):
            out = "int8" if m <= 2 else "mma"
            s, perm, starts = plan(hidden, dev)
            x = make_x(m, hidden, dev)
            v = {"triton": lambda: arc_quantize_activation_gemv(x, perm, s, None, starts, out)}
            v.update({f"cuda{c}": (lambda c=c: arc_act_quant_cuda(x, starts, s, None, out, c)) for c in CTAS})
            rows.append(row(model, "o_proj", hidden, s, m, v, "triton"))
            w = torch.rand(hidden, device=dev, dtype=torch.bfloat16) + 0.5
            v = {f"norm{c}": (lambda c=c: arc_rmsnorm_act_cuda(x, w, 1e-5, starts, s, None, out, c)) for c in (0,) + CTAS}
            rows.append(row(model, "rmsnorm", hidden, s, m, v, "norm0"))
            s, perm, starts = plan(inter, dev)
            gu = make_x(m, 2 * inter, dev)
            g, u = gu[:, :inter], gu[:, inter:]
            v = {"silu+triton": lambda: arc_quantize_activation_gemv(arc_silu_mul_cuda(g, u), perm, s, None, starts, out),
                 "fused": lambda: arc_silu_mul_act_cuda(g, u, starts, s, None, out)}
            v.update({f"silu+cuda{c}": (lambda c=c: arc_act_quant_cuda(arc_silu_mul_cuda(g, u), starts, s, None, out, c))
                      for c in CTAS})
            rows.append(row(model, "down_proj", inter, s, m, v, "silu+triton"))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"header": run_header(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
