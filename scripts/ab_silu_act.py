"""The prefill's SiLU(gate) * up + activation kernel (csrc/arc_act.cu: arc_silu_mul_act_kernel)
built with compile-time knobs, one run on one card: ARC_SILU_U (16-byte loads in flight per
operand, default 2; 4 before this A/B) and ARC_SILU_MINB (__launch_bounds__(256, N): CTAs an SM the registers must
allow; default none). Each variant is arc_act.cu built as its own extension (in parallel).

    PYTHONPATH=. python3 scripts/ab_silu_act.py --out results/ab-silu-act-h200.json

The Llama-3.1-8B (K = 14336, s = 896) and Qwen2.5-7B (K = 18944, s = 1152) down_proj inputs at
M = 2048 (the 2048-token prefill), bf16, per-row xgs and gate's / up's wgu (the unscaled GEMM outputs), the
per-token tensor scale computed, bf16 operand out; a permuted block order. Every variant's
operand and scales must equal the first variant's bit for bit (the default build is the package's
source, checked against the CPU reference by scripts/check_mlp_fusion.py). Time: median of
do_bench_cudagraph; bytes = gate + up read, the operand written.
"""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from triton.testing import do_bench_cudagraph

sys.path.insert(0, str(Path(__file__).parent))
from bench_hopper_paths import copy_bandwidth, run_header  # noqa: E402

from arcquant.kernels.cuda_gemv import DECL  # noqa: E402

SRC = Path(__file__).parent.parent / "arcquant" / "kernels" / "csrc" / "arc_act.cu"
FUNCS = ["arc_silu_mul_act"]
VARIANTS = ["-DARC_SILU_U=4", "", "-DARC_SILU_U=1", "-DARC_SILU_MINB=5", "-DARC_SILU_U=2 -DARC_SILU_MINB=6",
            "-DARC_SILU_U=8"]
SHAPES = {"llama-3.1-8b": (14336, 896), "qwen2.5-7b": (18944, 1152)}


def load(i: int, flags: str):
    from torch.utils.cpp_extension import load_inline
    cap = torch.cuda.get_device_capability() if torch.cuda.is_available() else (9, 0)
    os.environ["TORCH_CUDA_ARCH_LIST"] = f"{cap[0]}.{cap[1]}"
    build = Path(os.environ.get("ARCQUANT_EXT_DIR", "/tmp/ext")) / f"silu_ab{i}"
    build.mkdir(parents=True, exist_ok=True)
    decl = ";\n".join(d.rstrip(";") for d in DECL.split(";\n") if "arc_silu_mul_act(" in d) + ";"
    return load_inline(name=f"silu_ab{i}", cpp_sources=decl, cuda_sources=[SRC.read_text()], functions=FUNCS,
                       extra_cuda_cflags=["-O3", *flags.split()], build_directory=str(build))


def build_all():
    """Compile every variant at once (one process each), then load them here."""
    procs = [subprocess.Popen([sys.executable, __file__, "--build", str(i)]) for i in range(len(VARIANTS))]
    if any(p.wait() for p in procs):
        raise SystemExit("a variant failed to build")
    return [load(i, f) for i, f in enumerate(VARIANTS)]


def operands(k: int, s: int, m: int = 2048):
    g = torch.Generator(device="cuda").manual_seed(k)
    gate, up = (torch.randn(m, k, device="cuda", generator=g) * 40 for _ in range(2))
    for t in (gate, up):
        t[:, torch.randperm(k, device="cuda", generator=g)[:8]] *= 20
    xgs = 20 * torch.rand(m, device="cuda", generator=g) + 5                 # per-row activation scales
    wgu = 2 * torch.rand(2, device="cuda", generator=g) + 0.5                # gate's and up's weight scales
    starts = (torch.randperm(k // 16, device="cuda", generator=g) * 16).to(torch.int32)
    return gate.bfloat16(), up.bfloat16(), xgs, wgu, starts


def call(ext, gate, up, ig, iu, starts, s):                                    # ig, iu: xgs, wgu
    m, k = gate.shape
    xq = torch.empty(m, k + s, dtype=torch.bfloat16, device="cuda")
    gs_out = torch.empty(m, dtype=torch.float32, device="cuda")
    none = torch.empty(0, dtype=torch.float32, device="cuda")
    fn = lambda: ext.arc_silu_mul_act(gate, up, ig, iu, starts, none, gs_out, xq, xq, s, 2)   # noqa: E731
    fn()
    return fn, xq, gs_out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    ap.add_argument("--build", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.build is not None:
        load(a.build, VARIANTS[a.build])
        return
    exts = build_all()
    head = run_header(copy_GBps=copy_bandwidth(torch.device("cuda")))
    print(head, flush=True)
    rows = []
    for model, (k, s) in SHAPES.items():
        ops_ = operands(k, s)
        base = None
        for flags, ext in zip(VARIANTS, exts):
            fn, xq, gs_out = call(ext, *ops_, s)
            if base is None:
                base = (xq.clone(), gs_out.clone())
            equal = torch.equal(xq.view(torch.int16), base[0].view(torch.int16)) and torch.equal(gs_out, base[1])
            us = do_bench_cudagraph(fn, rep=200) * 1e3
            moved = 2 * ops_[0].numel() * 2 + xq.numel() * 2
            row = {"model": model, "K": k, "s": s, "M": 2048, "flags": flags or "(default)", "bit_equal": equal,
                   "us": us, "GBps": moved / us / 1e3}
            print(json.dumps(row), flush=True)
            rows.append(row)
    if a.out:
        Path(a.out).write_text(json.dumps({"header": head, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
