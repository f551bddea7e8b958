"""Activation kernel: blocks per program vs bandwidth (M=4096, bf16), sorted vs blocks perms.
    PYTHONPATH=. python3 scripts/sweep_act.py"""
import torch
import triton
from triton.testing import do_bench

from arcquant.formats import get_format
from arcquant.kernels.act_quant import arc_quantize_activation

F = get_format("nvfp4")
buf = torch.empty(2 ** 28, device="cuda")
copy = 2 * buf.numel() * 4 / do_bench(lambda: buf.clone(), return_mode="median") / 1e6
print(torch.cuda.get_device_name(), "copy GB/s", round(copy), "triton", triton.__version__)
for k, s in ((4096, 256), (14336, 896)):
    m = 4096
    xs = [torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for _ in range(4)]
    gs = [F.global_scale(x.float().abs().amax(1, keepdim=True)) for x in xs]
    perms = {"sorted": torch.randperm(k, device="cuda").to(torch.int32),
             "blocks": (torch.randperm(k // 16, device="cuda")[:, None] * 16
                        + torch.arange(16, device="cuda")).flatten().to(torch.int32)}
    byts = m * k * 2 + m * (k + s) * (0.5 + 1 / 16)
    for name, perm in perms.items():
        for nb in (8, 32, 64, 128):
            i = [0]

            def f():
                i[0] = (i[0] + 1) % 4
                return arc_quantize_activation(xs[i[0]], perm, s, gs[i[0]], blocks_per_program=nb)
            ms = do_bench(f, return_mode="median")
            print(f"K={k} s={s} perm={name:6s} blocks/program={nb:3d}: {ms * 1e3:7.1f} us "
                  f"{byts / ms / 1e6:6.0f} GB/s ({100 * byts / ms / 1e6 / copy:.0f}% of copy)")
