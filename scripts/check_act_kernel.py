"""The CUDA activation kernel (csrc/arc_act.cu, arc_act_kernel) on the device, bit for bit against
the reference (arcquant.arc.quantize_activation) on awkward shapes.

    PYTHONPATH=. python3 scripts/check_act_kernel.py --out results/act-kernel-exact-h200.json

M 1/3/100/1000 x s 0/16/64/448 x K 1040/3584/14336/18944, bf16 and fp16 rows with channel
magnitudes over 6 decades (subnormal block scales), the 'blocks' order; every output (int8 +
scales, fp16, bf16, packed + scales) with the tensor scale given (one value, one per row) and
computed in the kernel (also compared), with one CTA a row and with the wrapper's CTA count;
plus every E2M1 tie, -0 and saturation (sweep_act.exact_cuda_ties).
"""
import argparse
import json
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).parent))
from sweep_act import exact_cuda_ties, ref  # noqa: E402

from arcquant.formats import e2m1, get_format  # noqa: E402
from arcquant.kernels import cuda_act  # noqa: E402
from arcquant.kernels.act_quant import block_starts  # noqa: E402
from arcquant.kernels.cuda_gemv import _extension  # noqa: E402

F = get_format("nvfp4")
OUTS = ("int8", "float16", "bfloat16", "packed")


def run(x, starts, s, gs, out, ctas):
    """The extension called with a given CTA count a row (0: the wrapper's choice)."""
    kind, nblk, xq, scales, g, g_out = cuda_act._outputs(x, starts, s, gs, out)
    c = ctas or cuda_act.ctas_per_row(x.shape[0], nblk)
    _extension(torch.cuda.get_device_capability(x.device)).arc_act_quant(
        x, starts, g, g_out, xq, scales if scales is not None else xq, s, kind, c)
    return xq, scales, g_out


def case(m, k, s, dtype, dev, seed):
    g = torch.Generator(device=dev).manual_seed(seed)
    mag = torch.logspace(-4, 2, k, device=dev)[torch.randperm(k, device=dev, generator=g)]
    x = (torch.randn(m, k, device=dev, generator=g) * mag).to(dtype)
    perm = (torch.randperm(k // 16, device=dev, generator=g)[:, None] * 16 + torch.arange(16, device=dev)).flatten()
    return x, perm.to(torch.int32)


def exact(x, perm, s, gs_kind) -> bool:
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
    for ctas in (1, 0):
        for out in OUTS:
            xq, sc, g = run(x, starts, s, gs, out, ctas)
            if out == "int8":
                ok &= torch.equal(xq.float(), 2 * e2m1.e2m1_decode(codes)) and torch.equal(sc, sb)
            elif out == "packed":
                ok &= torch.equal(xq, F.module.pack(codes)) and torch.equal(sc, sb)
            else:
                ok &= torch.equal(xq.float(), deq)
            if gs is None:
                ok &= torch.equal(g, g_ref.reshape(-1))
    return bool(ok)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    dev = "cuda"
    head = {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "cuda": torch.version.cuda, "ties_bit_exact": exact_cuda_ties(dev)}
    x0, p0 = case(1, 64, 16, torch.bfloat16, dev, 0)
    xq0, _, g0 = run(x0[:0], block_starts(p0), 16, None, "int8", 0)       # no rows: empty outputs, no launch
    head["empty_input_ok"] = xq0.shape == (0, 80) and g0.shape == (0,)
    print(json.dumps(head), flush=True)
    checks, n_ok = [], 0
    for k in (1040, 3584, 14336, 18944):
        for s in (0, 16, 64, 448):
            for m in (1, 3, 100, 1000):
                for dtype in (torch.bfloat16, torch.float16):
                    x, perm = case(m, k, s, dtype, dev, k + s + m)
                    for gk in ("one", "row", "computed"):
                        ok = exact(x, perm, s, gk)
                        n_ok += ok
                        checks.append({"K": k, "s": s, "M": m, "dtype": str(dtype), "gs": gk, "bit_exact": ok})
    print(f"bit-exact: {n_ok}/{len(checks)}", flush=True)
    with open(a.out, "w") as fh:
        json.dump({"header": head, "bit_exact": f"{n_ok}/{len(checks)}", "checks": checks}, fh,
                  indent=1)


if __name__ == "__main__":
    main()
