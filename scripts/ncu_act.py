"""Target for Nsight Compute: the CUDA activation kernel at prefill size (M = 4096 bf16 rows, the
per-token scale computed, the bf16 operand written - the prefill call) for the Llama-3.1-8B input
depths 4096 (q/k/v, o, gate/up) and 14336 (down), s = 6.25 % of K, a random whole-block order.

    PYTHONPATH=. ncu --kernel-name regex:"arc_act_kernel" --launch-skip 1 --launch-count 2 \\
        --cache-control all --metrics gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum,\\
    smsp__inst_executed.sum,launch__registers_per_thread,launch__grid_size,launch__block_size,\\
    sm__warps_active.avg.pct_of_peak_sustained_active,smsp__issue_active.avg.pct_of_peak_sustained_active,\\
    sm__throughput.avg.pct_of_peak_sustained_elapsed,dram__throughput.avg.pct_of_peak_sustained_elapsed \\
        python3 scripts/ncu_act.py > results/ncu-act-h200.txt
Per element: smsp__inst_executed.sum (warp instructions) x 32 / (M x K).
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_hopper_paths import tail_width  # noqa: E402

from arcquant.kernels.act_quant import block_starts  # noqa: E402
from arcquant.kernels.cuda_act import arc_act_quant_cuda  # noqa: E402


def main():
    dev, m = "cuda", 4096
    for k in (4096, 14336):
        s = tail_width(k)
        x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
        perm = (torch.randperm(k // 16, device=dev)[:, None] * 16 + torch.arange(16, device=dev)).flatten()
        starts = block_starts(perm.to(torch.int32))
        for _ in range(2):                                           # ncu skips the first launch of each
            arc_act_quant_cuda(x, starts, s, None, "bfloat16")
        torch.cuda.synchronize()


if __name__ == "__main__":
    main()
