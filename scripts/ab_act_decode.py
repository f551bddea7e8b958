"""A/B of the Triton activation kernel at decode sizes (the model's call: per-token scale computed in
the kernel, whole-block order): an older copy of act_quant.py (--old FILE) against the current one at
several AMAX_TILE widths, all in one run; CUDA graphs of 20 calls on hot L2 (as in the decode step,
where the input was just written), median of do_bench. Writes JSON.

    git show 76f8970:arcquant/kernels/act_quant.py > scratch/act_quant_v34.py      # v34's kernel
    PYTHONPATH=. python3 scripts/ab_act_decode.py --old scratch/act_quant_v34.py --out results/ab-act-decode-h200.json
The old file's package-relative imports are made absolute when it is loaded.
"""
import argparse
import importlib.util
import json
import re
import tempfile

import torch
import triton
from triton.testing import do_bench

from arcquant.kernels import act_quant


def graph_us(fn, calls: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            fn()
    return do_bench(g.replay, warmup=50, rep=300) * 1e3 / calls


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--old", required=True)
    ap.add_argument("--tiles", nargs="+", type=int, default=[1024, 2048, 4096])
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    text = open(a.old).read()
    text = re.sub(r"from \.\.(\w+)", r"from arcquant.\1", re.sub(r"from \.(\w+)", r"from arcquant.kernels.\1", text))
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as fh:   # Triton reads the source file
        fh.write(text)
    spec = importlib.util.spec_from_file_location("act_quant_old", fh.name)
    old = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(old)
    old.CUDA_KERNEL = act_quant.CUDA_KERNEL = False
    rows = []
    for k, s in ((4096, 256), (14336, 896)):
        for m in (1, 8):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            perm = (torch.randperm(k // 16, device="cuda")[:, None] * 16 + torch.arange(16, device="cuda")).flatten()
            perm = perm.to(torch.int32)
            starts = act_quant.block_starts(perm)
            for out in ("int8", "mma"):
                ref = old.arc_quantize_activation_gemv(x, perm, s, None, starts, out)
                row = {"K": k, "s": s, "M": m, "out": out,
                       "old_us": graph_us(lambda: old.arc_quantize_activation_gemv(x, perm, s, None, starts, out))}
                for t in a.tiles:
                    act_quant.AMAX_TILE = t
                    got = act_quant.arc_quantize_activation_gemv(x, perm, s, None, starts, out)
                    row[f"tile{t}_same_bits"] = all(torch.equal(p, q) for p, q in zip(got, ref) if p is not None)
                    row[f"tile{t}_us"] = graph_us(lambda: act_quant.arc_quantize_activation_gemv(x, perm, s, None,
                                                                                                starts, out))
                print(json.dumps(row), flush=True)
                rows.append(row)
    head = {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}
    with open(a.out, "w") as fh:
        json.dump({"header": head, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
