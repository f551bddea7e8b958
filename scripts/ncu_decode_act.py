"""Target for Nsight Compute: the activation kernels of one decode token (M = 1) as the model
launches them - the RMSNorm-fused CUDA kernel (input of q/k/v and gate/up, its default CTAs a row)
and the Triton activation kernel for o_proj (K 4096) and down_proj (K 14336), int8 operand, the
per-token scale computed; Llama-3.1-8B depths, realistic tails (bench_hopper_paths.tail_width).

    PYTHONPATH=. ncu --kernel-name regex:"rmsnorm_act|_arc_act_quant" --launch-skip 8 \\
        --cache-control none --metrics gpu__time_duration.sum,smsp__inst_executed.sum,\\
    smsp__issue_active.avg.pct_of_peak_sustained_active,sm__cycles_elapsed.avg.per_second,\\
    launch__grid_size,launch__block_size,launch__registers_per_thread,\\
    smsp__average_warp_latency_issue_stalled_{long_scoreboard,short_scoreboard,barrier,wait,mio_throttle,\\
    math_pipe_throttle,membar,drain,no_instruction}.ratio python3 scripts/ncu_decode_act.py
(the braces spelled out one metric each; --cache-control none: the row is in L2, as in the model;
the first 4 calls of each kernel at K = 4096 are skipped as warm-up).
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_hopper_paths import block_perm, tail_width  # noqa: E402

from arcquant.kernels.act_quant import arc_quantize_activation_gemv, block_starts  # noqa: E402
from arcquant.kernels.cuda_act import arc_rmsnorm_act_cuda  # noqa: E402


def main():
    dev = "cuda"
    for k in (4096, 14336):
        s = tail_width(k)
        perm = block_perm(k, dev).to(torch.int32)
        starts = block_starts(perm)
        x = torch.randn(1, k, device=dev, dtype=torch.bfloat16)
        w = torch.rand(k, device=dev, dtype=torch.bfloat16) + 0.5
        for _ in range(6):
            if k == 4096:
                arc_rmsnorm_act_cuda(x, w, 1e-5, starts, s)
            arc_quantize_activation_gemv(x, perm, s, starts=starts)
        torch.cuda.synchronize()


if __name__ == "__main__":
    main()
