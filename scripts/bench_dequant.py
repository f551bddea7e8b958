"""The prefill helpers (kernels/prefill.py): weight dequantization (dequantize_codes), CUDA
kernel (csrc/arc_dequant.cu) against the Triton one and the float64 reference, and the
epilogue (scale_rows), CUDA against torch's elementwise ops; then speed.

    PYTHONPATH=. python3 scripts/bench_dequant.py --out results/dequant-h200.json

Exactness: bit-equal to the Triton kernel and equal to nvfp4.dequantize of the unpacked codes
(tail columns repeating K-s..K-1) on awkward shapes (K 1040 / 3584 / 14336, s 0 / 16 / 448,
rows 1 / 3 / 1000), random codes (all 16) and scales (every positive finite E4M3 value). Time: median of do_bench with L2
flushed, the Llama-3.1-8B and Qwen2.5-7B layer shapes, s = 6.25% of K; GB/s counts codes and
scales read once and the bf16 output written once, against the card's copy bandwidth.
"""
import json
import sys
from pathlib import Path

import torch
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).parent))
from bench_hopper_paths import SHAPES, copy_bandwidth, gpu_run, run_header, tail_width  # noqa: E402

from arcquant.formats import nvfp4  # noqa: E402
from arcquant.kernels.prefill import dequantize_codes, scale_rows  # noqa: E402


def operands(r: int, k: int, dev):
    codes = torch.randint(0, 256, (r, k // 2), dtype=torch.uint8, device=dev)
    every = torch.arange(1, 127, dtype=torch.uint8, device=dev).view(torch.float8_e4m3fn)   # all positive finite
    scales = every[torch.randint(0, 126, (r, k // 16), device=dev)]
    return codes, scales


def exactness(dev) -> list:
    rows = []
    for k in (1040, 3584, 14336):
        for s in (0, 16, 448):
            for r in (1, 3, 1000):
                codes, scales = operands(r, k, dev)
                ref = nvfp4.dequantize(nvfp4.unpack(codes.cpu()), scales.cpu().float(), torch.tensor(1.0)).double()
                ref = torch.cat([ref, ref[:, k - s:]], 1)
                row = {"K": k, "s": s, "R": r}
                for dt in (torch.bfloat16, torch.float16):
                    cu = dequantize_codes(codes, scales, s, dt, cuda=True)
                    tr = dequantize_codes(codes, scales, s, dt, cuda=False)
                    name = str(dt).removeprefix("torch.")
                    row[f"{name}_equal_triton"] = bool(torch.equal(cu, tr))
                    row[f"{name}_equal_reference"] = bool(torch.equal(cu.cpu().double(), ref))
                rows.append(row)
    return rows


def exactness_epilogue(dev) -> list:
    """scale_rows on CUDA (the factors 1 / (xgs[m] * wgs[n]) formed in the kernel) vs torch's
    y.mul_(1.0 / (xgs * wgs)).add_(bias): bit-equal on random y, scales and bias - xgs one value or
    one per row, wgs one value, one per column, or a stacked q/k/v group's (three runs of equal values,
    one run edge inside an 8-column group)."""
    rows = []
    for m, n in ((1, 8), (3, 24), (2048, 4096), (7, 6144)):
        for dt in (torch.bfloat16, torch.float16):
            for per_row in (True, False):
                for cols in ("one", "each", "stacked"):
                    for with_bias in (True, False):
                        y = torch.randn(m, n, device=dev).to(dt)
                        xgs = torch.rand(m if per_row else 1, device=dev) * 3 + 0.01
                        wgs = torch.rand(1 if cols == "one" else n, device=dev) * 2 + 0.01
                        if cols == "stacked":                          # runs of equal values, an edge at n/2+4
                            cut = [0, n // 2 + 4 if n > 8 else 4, n - n // 4, n]
                            for a, b, v in zip(cut, cut[1:], torch.rand(3).tolist()):
                                wgs[a:b] = v + 0.5
                        bias = torch.randn(n, device=dev).to(dt) if with_bias else None
                        got = scale_rows(y.clone(), xgs, wgs, bias, cuda=True)
                        ref = scale_rows(y.clone(), xgs, wgs, bias, cuda=False)
                        rows.append({"M": m, "N": n, "dtype": str(dt), "per_row": per_row, "wgs": cols,
                                     "bias": with_bias, "equal": bool(torch.equal(got, ref))})
    return rows


def speed(dev, copy_gbps: float) -> list:
    rows = []
    for model, shapes in SHAPES.items():
        for name, k, n in shapes:
            s = tail_width(k)
            codes, scales = operands(n, k, dev)
            moved = n * (k // 2 + k // 16) + n * (k + s) * 2
            row = {"model": model, "layer": name, "K": k, "N": n, "s": s}
            for kind, flag in (("cuda", True), ("triton", False)):
                us = do_bench(lambda: dequantize_codes(codes, scales, s, torch.bfloat16, cuda=flag),
                              return_mode="median") * 1e3
                row[f"{kind}_us"], row[f"{kind}_pct_copy"] = us, 100 * moved / us / 1e3 / copy_gbps
            y, xgs = torch.randn(2048, n, device=dev).to(torch.bfloat16), torch.rand(2048, device=dev) + 0.5
            wgs = torch.ones(1, device=dev)
            for kind, flag in (("cuda", True), ("torch", False)):               # the epilogue at M = 2048
                us = do_bench(lambda: scale_rows(y, xgs, wgs, None, cuda=flag), return_mode="median") * 1e3
                row[f"epilogue_{kind}_us"] = us
                row[f"epilogue_{kind}_pct_copy"] = 100 * 2 * y.numel() * 2 / us / 1e3 / copy_gbps
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def main():
    a, dev = gpu_run()
    head = run_header(copy_GBps=copy_bandwidth(dev))
    print(head, flush=True)
    ex = exactness(dev)
    ok = sum(all(v for k_, v in r.items() if k_.endswith(("triton", "reference"))) for r in ex)
    print(f"exactness: {ok}/{len(ex)} shapes bit-equal to Triton and to the reference (bf16 and fp16)", flush=True)
    ep = exactness_epilogue(dev)
    print(f"epilogue: {sum(r['equal'] for r in ep)}/{len(ep)} cases bit-equal to torch", flush=True)
    result = {"header": head, "exactness": ex, "exactness_epilogue": ep, "rows": speed(dev, head["copy_GBps"])}
    Path(a.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
