"""The CUDA activation kernel (csrc/arc_act.cu, arc_act_kernel) on the device, bit for bit against
the reference (arcquant.arc.quantize_activation) on awkward shapes.

    PYTHONPATH=. python3 scripts/check_act_kernel.py --out results/act-kernel-exact-h200.json

M 1/3/100/1000 x s 0/16/64/448 x K 1040/3584/14336/18944, bf16 and fp16 rows with channel
magnitudes over 6 decades (subnormal block scales), the 'blocks' order; every output (int8 +
scales, fp16, bf16, packed + scales) with the tensor scale given (one value, one per row) and
computed in the kernel (also compared), with one CTA a row and with the wrapper's CTA count;
plus every E2M1 tie, -0 and saturation (sweep_act.exact_cuda_ties).
--triton: the Triton kernel (act_quant.py, the decode path below CUDA_MIN_M rows) instead, at M 1/3/16/32
and its three outputs (int8 + scales, fp16 in the MMA order, bf16).
"""
import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_hopper_paths import run_header  # noqa: E402
from sweep_act import exact_cuda_ties, ref  # noqa: E402

from arcquant.formats import e2m1, get_format  # noqa: E402
from arcquant.kernels.cuda_act import arc_act_quant_cuda  # noqa: E402
from arcquant.kernels import act_quant  # noqa: E402
from arcquant.kernels.act_quant import arc_quantize_activation_gemv, block_starts  # noqa: E402
from arcquant.kernels.cuda_gemv import to_mma_order  # noqa: E402

F = get_format("nvfp4")
OUTS = ("int8", "mma", "bfloat16", "packed")


def case(m, k, s, dtype, dev, seed):
    g = torch.Generator(device=dev).manual_seed(seed)
    mag = torch.logspace(-4, 2, k, device=dev)[torch.randperm(k, device=dev, generator=g)]
    x = (torch.randn(m, k, device=dev, generator=g) * mag).to(dtype)
    perm = (torch.randperm(k // 16, device=dev, generator=g)[:, None] * 16 + torch.arange(16, device=dev)).flatten()
    return x, perm.to(torch.int32)


def triton_quant(perm):
    """The Triton kernel with arc_act_quant_cuda's signature (ctas: not a Triton setting)."""
    return lambda x, starts, s, gs, out, ctas: arc_quantize_activation_gemv(x, perm, s, gs, starts, out)


def exact(x, perm, s, gs_kind, triton=False) -> bool:
    """Every output, ctas = 1 and the wrapper's choice, against the reference."""
    amax = x.float().abs().amax(1, keepdim=True)
    gs = {"one": F.global_scale(amax.max()).reshape(1), "row": F.global_scale(amax).reshape(-1),
          "computed": None}[gs_kind]
    g_ref = F.global_scale(amax) if gs is None else gs.reshape(-1, 1) if gs_kind == "row" else gs.reshape(())
    codes, scales = ref(x, perm, s, g_ref)
    sb = scales.view(torch.uint8)
    deq = F.dequantize(codes, scales, torch.tensor(1.0, device=x.device))
    starts = block_starts(perm)
    ok = True
    quant = triton_quant(perm) if triton else arc_act_quant_cuda
    for ctas in ((0,) if triton else (1, 0)):
        for out in (OUTS[:3] if triton else OUTS):
            xq, sc, g = quant(x, starts, s, gs, out, ctas)
            if out == "int8":
                ok &= torch.equal(xq.float(), 2 * e2m1.e2m1_decode(codes)) and torch.equal(sc.view(torch.uint8), sb)
            elif out == "packed":
                ok &= torch.equal(xq, F.module.pack(codes)) and torch.equal(sc.view(torch.uint8), sb)
            else:                                        # mma: in the tensor-core GEMV's column order
                ok &= torch.equal(xq.float(), to_mma_order(deq) if out == "mma" else deq)
            if gs is None:
                ok &= torch.equal(g, g_ref.reshape(-1))
    return bool(ok)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--triton", action="store_true", help="check the Triton kernel (decode sizes) instead")
    a = ap.parse_args()
    act_quant.CUDA_KERNEL = not a.triton                          # the Triton kernel for every call
    dev = "cuda"
    head = run_header(ties_bit_exact=exact_cuda_ties(dev))
    x0, p0 = case(1, 64, 16, torch.bfloat16, dev, 0)
    xq0, _, g0 = arc_act_quant_cuda(x0[:0], block_starts(p0), 16, None, "int8")   # no rows: empty outputs, no launch
    head["empty_input_ok"] = xq0.shape == (0, 80) and g0.shape == (0,)
    print(json.dumps(head), flush=True)
    checks, n_ok = [], 0
    for k in (1040, 3584, 14336, 18944):
        for s in (0, 16, 64, 448):
            for m in ((1, 3, 16, 32) if a.triton else (1, 3, 100, 1000)):
                for dtype in (torch.bfloat16, torch.float16):
                    x, perm = case(m, k, s, dtype, dev, k + s + m)
                    for gk in ("one", "row", "computed"):
                        ok = exact(x, perm, s, gk, a.triton)
                        n_ok += ok
                        checks.append({"K": k, "s": s, "M": m, "dtype": str(dtype), "gs": gk, "bit_exact": ok})
    print(f"bit-exact: {n_ok}/{len(checks)}", flush=True)
    with open(a.out, "w") as fh:
        json.dump({"header": head, "bit_exact": f"{n_ok}/{len(checks)}", "checks": checks}, fh,
                  indent=1)


if __name__ == "__main__":
    main()
