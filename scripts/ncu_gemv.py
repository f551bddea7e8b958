"""Target for Nsight Compute: the decode GEMVs of Llama-3.1-8B gate/up and down_proj as the model
launches them (integer GEMV at M = 1, tensor-core GEMV at M = 8; bench_layers.make_layer).

    PYTHONPATH=. ncu --kernel-name regex:"arc_gemv_kernel|arc_gemm_mma" --launch-skip 2 \\
        --launch-count 100 --cache-control all --metrics gpu__time_duration.sum,dram__bytes_read.sum,\\
    smsp__inst_executed.sum,launch__registers_per_thread,launch__grid_size,launch__block_size,\\
    sm__warps_active.avg.pct_of_peak_sustained_active,launch__occupancy_limit_registers,\\
    sm__inst_executed_pipe_lsu.sum,smsp__average_warp_latency_issue_stalled_long_scoreboard.ratio,\\
    dram__throughput.avg.pct_of_peak_sustained_elapsed python3 scripts/ncu_gemv.py > results/ncu-gemv-h200.txt

The v37 profile (issue activity and stall reasons; results/ncu-gemv-v37-h200.txt):

    PYTHONPATH=. ncu --kernel-name regex:"arc_gemv_kernel|arc_gemm_mma" --cache-control all --metrics \
    gpu__time_duration.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,\
    smsp__issue_active.avg.pct_of_peak_sustained_active,sm__warps_active.avg.pct_of_peak_sustained_active,\
    smsp__inst_executed.sum,launch__registers_per_thread,launch__grid_size,sm__cycles_elapsed.avg.per_second,\
    smsp__average_warps_issue_stalled_{long_scoreboard,short_scoreboard,wait,math_pipe_throttle,not_selected,\
    lg_throttle,barrier,no_instruction}_per_issue_active.ratio python3 scripts/ncu_gemv.py
(the braces spelled out one metric each).
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_layers import inputs, make_layer  # noqa: E402


def main():
    dev = "cuda"
    for name, k, n, s in (("gate_up", 4096, 28672, 256), ("down", 14336, 4096, 896)):
        hot = torch.arange(8, device=dev) * 97
        q, _ = make_layer(k, n, s, hot, dev, 1)
        kp = q.kernel
        for m in (1, 8):
            x = inputs(m, k, hot, dev, 5)
            _, _, (kind, xq, xs, gs) = kp.operand(q, x)
            for _ in range(3):                                     # ncu skips the first two launches
                kp.product(kind, m, xq, xs, gs, kp.weight, None, n, k, torch.bfloat16)
            torch.cuda.synchronize()
            print(name, m, kind, flush=True)


if __name__ == "__main__":
    main()
