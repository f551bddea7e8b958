"""Weight dequantization (the prefill's weight pass) in several layouts, one run on one card:
scripts/dequant_variants.cu built as its own extension - mode 0 is the v10 kernel
(csrc/arc_dequant.cu before this A/B), mode 1 the package's kernel now (the .cu includes
csrc/arc_dequant.cu), modes 2-3 other thread layouts with its decode (see the .cu).

    PYTHONPATH=. python3 scripts/ab_dequant.py --out results/ab-dequant-h200.json

Exactness: every variant bit-equal (int16 view) to mode 0, and equal in value (the Triton kernel
writes +0 for code 8, -0) to the Triton kernel (prefill._dequant_kernel) and, on the smaller shapes,
to nvfp4.dequantize of the unpacked codes, on awkward shapes (K 1040 / 3584 /
14336, s 0 / 16 / 448, rows 1 / 3 / 1000) with random codes (all 16 codes) and every positive finite
E4M3 scale, bf16 and fp16. Speed: the per-linear shapes of the Llama-3.1-8B / Qwen2.5-7B prefill
(q, k, v, o, gate, up, down; s = 6.25 % of K), median of do_bench with L2 flushed; next to a write-only
fill and a copy of the same output bytes; per model the sum over its layers' dequantizations.
"""
import json
import os
import sys
from pathlib import Path

import torch
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).parent))
from bench_dequant import operands  # noqa: E402
from bench_hopper_paths import copy_bandwidth, gpu_run, run_header, tail_width  # noqa: E402

from arcquant.formats import nvfp4  # noqa: E402
from arcquant.kernels.prefill import dequantize_codes  # noqa: E402

VARIANTS = [(0, 1, 0), (1, 1, 0)] + [(m, u, c) for m in (2, 3) for u in (1, 2, 4) for c in (4, 8)]
LAYERS = {"llama-3.1-8b": (32, [("q", 4096, 4096, 1), ("kv", 4096, 1024, 2), ("o", 4096, 4096, 1),
                                ("gate_up", 4096, 14336, 2), ("down", 14336, 4096, 1)]),
          "qwen2.5-7b": (28, [("q", 3584, 3584, 1), ("kv", 3584, 512, 2), ("o", 3584, 3584, 1),
                              ("gate_up", 3584, 18944, 2), ("down", 18944, 3584, 1)])}


def extension():
    from torch.utils.cpp_extension import load_inline
    cap = torch.cuda.get_device_capability()
    os.environ["TORCH_CUDA_ARCH_LIST"] = f"{cap[0]}.{cap[1]}"
    build = Path(os.environ.get("ARCQUANT_EXT_DIR", "/tmp/ext")) / "dequant_ab"
    build.mkdir(parents=True, exist_ok=True)
    decl = ("void dequant_variant(torch::Tensor codes, torch::Tensor scales, torch::Tensor out, int64_t s, "
            "int64_t mode, int64_t unroll, int64_t ctas_per_sm);")
    src = (Path(__file__).parent / "dequant_variants.cu").read_text()
    csrc = Path(__file__).parent.parent / "arcquant" / "kernels" / "csrc"          # it includes arc_dequant.cu
    return load_inline(name="dequant_ab", cpp_sources=decl, cuda_sources=[src], functions=["dequant_variant"],
                       extra_cuda_cflags=["-O3"], extra_include_paths=[str(csrc)], build_directory=str(build))


def run(ext, codes, scales, s, dt, v):
    out = torch.empty(codes.shape[0], codes.shape[1] * 2 + s, dtype=dt, device=codes.device)
    ext.dequant_variant(codes, scales.view(torch.uint8), out, s, *v)
    return out


def exactness(ext, dev) -> list:
    rows = []
    for k in (1040, 3584, 14336):
        for s in (0, 16, 448):
            for r in (1, 3, 1000):
                codes, scales = operands(r, k, dev)
                row = {"K": k, "s": s, "R": r, "equal": {}}
                ref = None
                if r * k <= 1000 * 3584:
                    ref = nvfp4.dequantize(nvfp4.unpack(codes.cpu()), scales.cpu().float(), torch.tensor(1.0))
                    ref = torch.cat([ref, ref[:, k - s:]], 1)
                for dt in (torch.bfloat16, torch.float16):
                    tri = dequantize_codes(codes, scales, s, dt, cuda=False)
                    v0 = run(ext, codes, scales, s, dt, VARIANTS[0]).view(torch.int16)
                    for v in VARIANTS:
                        got = run(ext, codes, scales, s, dt, v)
                        ok = torch.equal(got, tri) and torch.equal(got.view(torch.int16), v0)
                        if ref is not None:
                            ok = ok and torch.equal(got.cpu(), ref.to(dt))
                        row["equal"][f"{v}-{str(dt)[6:]}"] = bool(ok)
                rows.append(row)
    return rows


def speed(ext, dev, copy_gbps) -> dict:
    rows, sums = [], {}
    for model, (layers, shapes) in LAYERS.items():
        for name, k, n, count in shapes:
            s = tail_width(k)
            codes, scales = operands(n, k, dev)
            out = torch.empty(n, k + s, dtype=torch.bfloat16, device=dev)
            other = torch.empty_like(out)
            moved = n * (k // 2 + k // 16) + out.numel() * 2
            row = {"model": model, "layer": name, "K": k, "N": n, "s": s, "count": count,
                   "fill_us": do_bench(lambda: out.fill_(1.0), return_mode="median") * 1e3,
                   "copy_us": do_bench(lambda: other.copy_(out), return_mode="median") * 1e3, "variants": {}}
            row["fill_GBps"] = out.numel() * 2 / row["fill_us"] / 1e3
            row["copy_GBps"] = 2 * out.numel() * 2 / row["copy_us"] / 1e3
            for v in VARIANTS:
                us = do_bench(lambda: ext.dequant_variant(codes, scales.view(torch.uint8), out, s, *v),
                              return_mode="median") * 1e3
                row["variants"][str(v)] = {"us": us, "GBps": moved / us / 1e3, "pct_copy": 100 * moved / us / 1e3 / copy_gbps}
                sums.setdefault(model, {}).setdefault(str(v), 0.0)
                sums[model][str(v)] += us * count * layers / 1e3
            best = min(row["variants"], key=lambda key: row["variants"][key]["us"])
            print(f"{model} {name}: fill {row['fill_GBps']:.0f} GB/s, copy {row['copy_GBps']:.0f} GB/s; " +
                  ", ".join(f"{key} {d['us']:.1f}" for key, d in row["variants"].items()) + f"; best {best}", flush=True)
            rows.append(row)
    for model, d in sums.items():
        print(f"{model}: dequantization of one prefill, ms: " + ", ".join(f"{k} {v:.2f}" for k, v in d.items()), flush=True)
    return {"rows": rows, "prefill_ms": sums}


def main():
    a, dev = gpu_run()
    ext = extension()
    head = run_header(copy_GBps=copy_bandwidth(dev))
    print(head, flush=True)
    ex = exactness(ext, dev)
    for v in VARIANTS:
        ok = sum(all(val for key, val in r["equal"].items() if key.startswith(str(v))) for r in ex)
        print(f"variant {v}: {ok}/{len(ex)} shapes bit-equal (bf16 and fp16)", flush=True)
    result = {"header": head, "exactness": ex, **speed(ext, dev, head["copy_GBps"])}
    Path(a.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
