"""The integer GEMV's two loops against each other and the float64 oracle: with u = 1 a warp's
chunks below the weight tail run a tail-free loop with pointer-advanced operands (gemv_step_main),
the rest - and every chunk for u = 2 / 4 - the general step (gemv_step). Both sum a row in the same
order, so u = 1 and u = 2 must give the same bits; both within 1e-6 of int8_gemv_reference. Awkward
shapes: K 3584 / 4096 / 14336 / 18944 (K % 1024 != 0: partial warps), s 0 / 16 / 64 / 448 (odd and
even tail starts), M 1 / 2, N 1001 and 37, float32 and bfloat16 out, one tensor scale or one a row,
with a bias, every nr at kw 1 / 2 / 4.

    PYTHONPATH=. python3 scripts/check_gemv_int8.py --out results/gemv-int8-check-h200.json
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_hopper_paths import finish_check, gpu_run, make_layer, make_x  # noqa: E402

from arcquant.kernels.act_quant import arc_quantize_activation_gemv, block_starts  # noqa: E402
from arcquant.kernels.cuda_gemv import arc_gemv_int8, int8_gemv_reference  # noqa: E402

SETTINGS = [(nr, kw) for nr in (1, 2, 4) for kw in (1, 2, 4)]


def case(k, s, m, n, per_row, dev) -> dict:
    _, plan, gsw, wc, ws = make_layer(k, n, s, dev)
    if per_row:                                                   # stacked layers: one tensor scale a row
        gsw = gsw * (1 + torch.rand(n, device=dev))
    x = make_x(m, k, dev)
    perm = plan.perm.to(torch.int32)
    xi, xs, gs = arc_quantize_activation_gemv(x, perm, s, None, block_starts(perm))
    bias = torch.randn(n, device=dev)
    ref = int8_gemv_reference(xi, xs, gs, wc, ws, gsw, s, bias)
    row = {"K": k, "s": s, "M": m, "N": n, "per_row_wgs": per_row, "equal": True, "max_rel": 0.0}
    for dt in (torch.float32, torch.bfloat16):
        for nr, kw in SETTINGS:
            y = arc_gemv_int8(xi, xs, gs, wc, ws, gsw, s, bias, dt, nr, kw, 1)
            row["equal"] &= bool(torch.equal(y, arc_gemv_int8(xi, xs, gs, wc, ws, gsw, s, bias, dt, nr, kw, 2)))
            if dt == torch.float32:
                row["max_rel"] = max(row["max_rel"], ((y.double() - ref).norm() / ref.norm()).item())
    return row


def main():
    a, dev = gpu_run()
    rows = [case(k, s, m, n, per_row, dev) for k in (3584, 4096, 14336, 18944) for s in (0, 16, 64, 448)
            for m in (1, 2) for n, per_row in ((1001, False), (37, True))]
    finish_check(a.out, rows, [r for r in rows if not r["equal"] or r["max_rel"] > 1e-6], settings_nr_kw=SETTINGS)


if __name__ == "__main__":
    main()
