"""Where the CUDA activation kernel overtakes the Triton one at decode sizes (act_quant.CUDA_MIN_M, CUDA_MIN_K):
the call the model makes (act_quant.arc_quantize_activation_gemv, per-token scale computed, the
int8 operand of the integer GEMV and the fp16 one of the tensor-core GEMV) timed both ways.

    PYTHONPATH=. python3 scripts/act_crossover.py --out results/act-crossover-h200.json

Input depths 4096 (Llama q/k/v, o, gate/up), 14336 / 18944 (Llama / Qwen down), s = 6.25 % of K,
M = 1 ... 64 bf16 rows with outlier channels, a random whole-block order; each call captured in a
CUDA graph, median of do_bench with the L2 flushed (bench_layers.timed). Both kernels are bit-exact
against the reference (scripts/check_act_kernel.py, tests/test_kernels.py).
"""
import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_hopper_paths import run_header, tail_width  # noqa: E402
from bench_layers import timed  # noqa: E402

from arcquant.kernels import act_quant  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    dev = "cuda"
    head = run_header(CUDA_MIN_M=act_quant.CUDA_MIN_M, CUDA_MIN_K=act_quant.CUDA_MIN_K)
    print(json.dumps(head), flush=True)
    rows = []
    for k in (4096, 14336, 18944):
        s = tail_width(k)
        perm = ((torch.randperm(k // 16, device=dev)[:, None] * 16 + torch.arange(16, device=dev)).flatten()
                .to(torch.int32))
        starts = act_quant.block_starts(perm)
        for m in (1, 2, 4, 8, 16, 32, 64):
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            x[:, :8] *= 30
            for out in ("int8", "mma"):
                r = {"K": k, "s": s, "M": m, "out": out}
                for label, flag in (("triton", False), ("cuda", True)):
                    act_quant.CUDA_KERNEL, act_quant.CUDA_MIN_M = flag, 0
                    r[f"{label}_us"] = timed(lambda: act_quant.arc_quantize_activation_gemv(x, perm, s, None, starts,
                                                                                            out))
                rows.append(r)
                print(f"K={k:6d} M={m:3d} {out:8s} triton {r['triton_us']:6.1f} cuda {r['cuda_us']:6.1f} us",
                      flush=True)
    with open(a.out, "w") as fh:
        json.dump({"header": head, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
