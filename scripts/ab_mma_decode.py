"""The tensor-core GEMVs with the shift-and-mask decode (decode8, "mma" activation order) against
the same kernels with the PRMT table decode they had before (v25), in one run on one card: the
old csrc/arc_gemv.cu is built as a second extension from a copy (--old; `git show
deb1e87:arcquant/kernels/csrc/arc_gemv.cu > scratch/arc_gemv_v25.cu`), fed the activation in
natural order (from_mma_order of the new operand: the same values).

    PYTHONPATH=. python3 scripts/ab_mma_decode.py --old scratch/arc_gemv_v25.cu --out results/ab-mma-decode-h200.json

Per layer shape (Llama-3.1-8B, Qwen2.5-7B) and M: each kernel with the launch settings the model
takes (gpu.mma_config), relative error of both (fp32 out) against the float64 oracle and
between them, and the time of both (bf16 out) and of cuBLAS BF16 (median of do_bench over CUDA-graph
replays, L2 flushed).
"""
import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_hopper_paths import SHAPES, run_header, tail_width  # noqa: E402
from bench_layers import inputs, make_layer, timed  # noqa: E402

from arcquant import gpu  # noqa: E402
from arcquant.kernels.cuda_gemv import (CSRC, DECL, arc_gemm_mma, fp16_gemm_reference, from_mma_order,  # noqa: E402
                                        pipe_shape_reason, tensor_scales)


def extension(path, name: str, flags=()):
    """The MMA GEMVs of the .cu at path as their own extension (name), built with extra nvcc flags."""
    from torch.utils.cpp_extension import load_inline
    cap = torch.cuda.get_device_capability()
    os.environ["TORCH_CUDA_ARCH_LIST"] = f"{cap[0]}.{cap[1]}"
    build = Path(os.environ.get("ARCQUANT_EXT_DIR", "/tmp/ext")) / name
    build.mkdir(parents=True, exist_ok=True)
    decl = ";\n".join(d.rstrip(";") for d in DECL.split(";\n") if "arc_gemm_mma" in d) + ";"
    return load_inline(name=name, cpp_sources=decl, cuda_sources=[Path(path).read_text()],
                       functions=["arc_gemm_mma", "arc_gemm_mma_pipe"], extra_cuda_cflags=["-O3", *flags],
                       extra_include_paths=[str(CSRC)], build_directory=str(build))


def old_extension(path: str):
    return extension(path, "arcquant_gemv_old")


def shf_extension():
    """This tree's kernels with decode8's shifts left to ptxas (SHF) instead of IMAD."""
    from arcquant.kernels.cuda_gemv import SRCS
    return extension(SRCS[0], "arcquant_gemv_shf", ["-DARC_DECODE_SHF"])


def old_product(ext, xn, gs, wc, ws, wgs, s, cfg, dtype=torch.bfloat16):
    """The v25 kernel with the model's settings: xn in natural order."""
    m, n = xn.shape[0], wc.shape[0]
    y = torch.empty(m, n, dtype=dtype, device=xn.device)
    args = (xn, gs.float().reshape(-1).contiguous(), wc, ws.view(torch.uint8), tensor_scales(wgs, n), None, y, s)
    st, kw = cfg.get("st", 0), cfg["kw"]
    if st and pipe_shape_reason(xn, wc, ws, kw) is None:
        ext.arc_gemm_mma_pipe(*args, kw, st, int(cfg.get("xs", False)))
    else:
        ext.arc_gemm_mma(*args, max(1, min(kw, 8, 32 // -(-m // 8))), int(cfg.get("occ", False)))
    return y


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old", required=True, help="the v25 csrc/arc_gemv.cu")
    ap.add_argument("--out")
    ap.add_argument("--ms", type=int, nargs="+", default=[3, 4, 8, 16, 32])
    ap.add_argument("--models", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--shf", action="store_true", help="also time decode8 with plain shifts (-DARC_DECODE_SHF)")
    a = ap.parse_args()
    dev = torch.device("cuda")
    ext, shf = old_extension(a.old), shf_extension() if a.shf else None
    res, rows = run_header(command=" ".join(sys.argv)), []
    for model in a.models:
        for name, k, n in SHAPES[model]:
            s = tail_width(k)
            hot = torch.randperm(k, device=dev, generator=torch.Generator(device=dev).manual_seed(k))[:8]
            q, wb = make_layer(k, n, s, hot, dev, k)
            wc, ws, wgs = q.kernel.weight
            ws8 = ws.view(torch.float8_e4m3fn)
            for m in a.ms:
                x = inputs(m, k, hot, dev, 100 + m)
                xd, _, gs = q.kernel.quantize(q, x, "mma")
                xn = from_mma_order(xd).contiguous()
                cfg = gpu.mma_config(m, n, k)
                new = lambda: arc_gemm_mma(xd, gs, wc, ws8, wgs, s, None, torch.bfloat16, **cfg)
                old = lambda: old_product(ext, xn, gs, wc, ws8, wgs, s, cfg)
                ref = fp16_gemm_reference(xd, gs, wc, ws8, wgs, s)
                y32 = {"new": arc_gemm_mma(xd, gs, wc, ws8, wgs, s, None, torch.float32, **cfg),
                       "old": old_product(ext, xn, gs, wc, ws8, wgs, s, cfg, torch.float32)}
                err = {key: ((y.double() - ref).norm() / ref.norm()).item() for key, y in y32.items()}
                err["new_vs_old"] = ((y32["new"] - y32["old"]).norm() / y32["old"].norm()).item()
                r = dict(model=model, layer=name, K=k, N=n, s=s, M=m, cfg=cfg, rel_err_fp32=err,
                         bf16_us=timed(lambda: torch.nn.functional.linear(x, wb)), new_us=timed(new), old_us=timed(old))
                if shf is not None:                                  # same operand order as new
                    r["shf_us"] = timed(lambda: old_product(shf, xd, gs, wc, ws8, wgs, s, cfg))
                    r["rel_err_fp32"]["shf_vs_new"] = ((old_product(shf, xd, gs, wc, ws8, wgs, s, cfg, torch.float32)
                                                        - y32["new"]).norm() / y32["new"].norm()).item()
                rows.append(r)
                print(f"{model:13s} {name:8s} M={m:3d} {cfg} bf16 {r['bf16_us']:6.1f} old {r['old_us']:6.1f} "
                      f"new {r['new_us']:6.1f} us ({r['old_us'] / r['new_us']:.2f}x; x{r['bf16_us'] / r['new_us']:.2f} "
                      f"BF16)  err old {err['old']:.1e} new {err['new']:.1e}"
                      + (f"  shf {r['shf_us']:6.1f}" if shf else ""),
                      flush=True)
    res["rows"] = rows
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
