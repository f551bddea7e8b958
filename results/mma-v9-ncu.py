import sys, torch
sys.path.insert(0, "scripts")
from bench_hopper_paths import make_layer, make_x
from arcquant.kernels.act_quant import arc_quantize_activation_gemv, block_starts
from arcquant.kernels.cuda_gemv import arc_gemm_mma
dev = torch.device("cuda")
k, n, s, m = 4096, 28672, 256, 8
w, plan, gsw, wc, ws = make_layer(k, n, s, dev)
perm = plan.perm.to(torch.int32)
x = make_x(m, k, dev)
xd, _, gs = arc_quantize_activation_gemv(x, perm, s, None, block_starts(perm), out="float16")
for kw, rt, pf in ((4, 1, 1), (4, 1, 3), (4, 2, 1)):
    for _ in range(3):
        arc_gemm_mma(xd, gs, wc, ws, gsw, s, None, torch.bfloat16, kw, rt, pf)
torch.cuda.synchronize()
