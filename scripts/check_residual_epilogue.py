"""The decode GEMVs' residual epilogue on the GPU: y = T(product) + residual, rounded, must equal
torch's `residual + y` on the same kernel's output without a residual, bit for bit - for the
integer GEMV (M 1 / 2, every nr and kw, u 1 / 2), the tensor-core GEMV (M 3 / 8 / 20 / 40, with
and without the register bound) and the pipelined one (each built setting: M 4 / 8 / 16), in
bfloat16, float16 and float32 out, with a bias, on awkward shapes (K 3584 / 14336, s 16 / 448,
N 1001). Residuals are random and of the product's size, so the add's rounding matters.

    PYTHONPATH=. python3 scripts/check_residual_epilogue.py --out results/residual-epilogue-h200.json
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_hopper_paths import finish_check, gpu_run, make_layer, make_x  # noqa: E402

from arcquant.kernels.act_quant import arc_quantize_activation_gemv, block_starts  # noqa: E402
from arcquant.kernels.cuda_gemv import PIPE_SETTINGS, arc_gemm_mma, arc_gemv_int8  # noqa: E402
from arcquant.kernels.ops import _quantize_act  # noqa: E402

DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def calls(k, s, n, dev):
    """(name, M, fn(residual, out_dtype) -> y) for every kernel setting checked."""
    _, plan, gsw, wc, ws = make_layer(k, n, s, dev)
    perm = plan.perm.to(torch.int32)
    bias = torch.randn(n, device=dev)
    for m in (1, 2):
        xi, xs, gs = arc_quantize_activation_gemv(make_x(m, k, dev), perm, s, None, block_starts(perm))
        for nr in (1, 2, 4):
            for kw in (1, 4):
                for u in ((1, 2) if m <= 2 else (1,)):
                    yield (f"int8 nr{nr} kw{kw} u{u}", m,
                           lambda r, dt, a=(xi, xs, gs, nr, kw, u): arc_gemv_int8(
                               a[0], a[1], a[2], wc, ws, gsw, s, bias, dt, a[3], a[4], a[5], residual=r))
    for m in (3, 8, 20, 40):
        xd, _, gs = _quantize_act(make_x(m, k, dev), perm, block_starts(perm), s, None, "mma")
        for occ in (False, True):
            yield (f"mma occ{int(occ)}", m, lambda r, dt, a=(xd, gs, occ): arc_gemm_mma(
                a[0], a[1], wc, ws, gsw, s, bias, dt, 4, a[2], residual=r))
    for tiles, kw, st, xs_ in sorted(PIPE_SETTINGS):
        if k % (128 * kw):
            continue
        for m in ((4, 8) if tiles == 1 else (16,)):
            xd, _, gs = _quantize_act(make_x(m, k, dev), perm, block_starts(perm), s, None, "mma")
            yield (f"pipe kw{kw} st{st} xs{int(xs_)}", m, lambda r, dt, a=(xd, gs, kw, st, xs_): arc_gemm_mma(
                a[0], a[1], wc, ws, gsw, s, bias, dt, a[2], st=a[3], xs=a[4], residual=r))


def main():
    a, dev = gpu_run()
    rows = []
    for k, s in ((3584, 16), (14336, 448), (4096, 256)):
        for name, m, fn in calls(k, s, 1001 if k != 4096 else 4096, dev):
            for dt in DTYPES:
                y = fn(None, dt)
                res = (torch.randn(m, y.shape[1], device=dev) * y.float().abs().mean()).to(dt)
                got = fn(res, dt)
                want = res + y
                rows.append({"K": k, "s": s, "M": m, "kernel": name, "dtype": str(dt).split(".")[-1],
                             "equal": bool(torch.equal(got, want)), "changed": bool(not torch.equal(got, y))})
    finish_check(a.out, rows, [r for r in rows if not r["equal"] or not r["changed"]])


if __name__ == "__main__":
    main()
