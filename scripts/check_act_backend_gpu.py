"""On a CUDA device: the reference layer's NVFP4 activations quantized by the fused Triton kernel
(qlinear.act_backend) against plain torch on the same card and on the CPU - bit for bit - and the
time of each (median, do_bench). Writes JSON.

    PYTHONPATH=. python scripts/check_act_backend_gpu.py --out results/act-backend-gpu-h200.json
"""
import argparse
import json
import os

import torch

from arcquant import arc
from arcquant.formats import get_format, nvfp4
from arcquant.qlinear import QuantLinear


def layer_and_input(m, k, s, order, act_scale, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    x[:, torch.randperm(k, generator=g)[:8]] *= 40.0                    # outlier channels
    kp = -(-k // 16) * 16
    st = arc.ChannelStats(kp, 0.125, get_format("nvfp4"))
    st.update(torch.nn.functional.pad(x, (0, kp - k)))
    plan = arc.make_plan(st, kp, s, order, 16)
    torch.manual_seed(seed)
    lin = torch.nn.Linear(k, 64)
    q = QuantLinear.from_linear(lin, "nvfp4", "fp4", act_scale, plan,
                                nvfp4.global_scale_from_amax(lin.weight.abs().max()),
                                nvfp4.global_scale_from_amax(x.abs().max()))
    return q, x


def quantize(q, x, backend):
    os.environ["ARCQUANT_ACT_BACKEND"] = backend
    return q.quantize_input(x)


def nan_check_on_card() -> dict:
    """The deferred NaN / Inf check (qlinear.FiniteCheck) fed NaN and Inf on the card, with both
    activation backends: the model's forward raises the same error, and a clean input then passes."""
    from arcquant.qlinear import FINITE
    out = {}
    for backend in ("reference", "triton"):
        q, x = layer_and_input(100, 1536, 96, "blocks", "dynamic", 7)
        model = torch.nn.Sequential(q).to("cuda")
        FINITE.install(model)
        os.environ["ARCQUANT_ACT_BACKEND"] = backend
        xc = x.to("cuda")
        clean = model(xc)
        for bad in (float("nan"), float("inf")):
            xb = xc.clone()
            xb[17, 300] = bad
            try:
                model(xb)
                out[f"{backend}_{bad}"] = "not raised"
            except ValueError as e:
                out[f"{backend}_{bad}"] = "raised" if "NaN or Inf in the activations" in str(e) else repr(e)
            out[f"{backend}_{bad}_clean_after"] = torch.equal(model(xc), clean)
    print(out, flush=True)
    assert all(v in ("raised", True) for v in out.values()), out
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--nan-only", action="store_true", help="only the NaN / Inf check on the card (no timing)")
    a = ap.parse_args()
    if a.nan_only:
        head = dict(card=torch.cuda.get_device_name(), torch=torch.__version__, nan_check=nan_check_on_card())
        with open(a.out, "w") as f:
            json.dump(dict(header=head), f, indent=1)
        return
    from triton.testing import do_bench
    rows = []
    cases = [(m, k, s, o, sc) for (k, s) in [(576, 32), (1536, 96), (4096, 256), (1040, 0)]
             for m in (1, 3, 100, 2048) for o, sc in [("blocks", "token"), ("sorted", "dynamic"), ("blocks", "static")]]
    for i, (m, k, s, order, sc) in enumerate(cases):
        q, x = layer_and_input(m, k, s, order, sc, i)
        cpu = quantize(q, x, "reference")
        q = q.to("cuda"); xc = x.to("cuda")
        ref = quantize(q, xc, "reference")
        got = quantize(q, xc, "triton")
        assert q._kernel_quantizes(xc)
        t_ref = do_bench(lambda: quantize(q, xc, "reference"), rep=50)
        t_tri = do_bench(lambda: quantize(q, xc, "triton"), rep=50)
        row = dict(m=m, k=k, s=s, order=order, act_scale=sc, exact_vs_gpu_torch=torch.equal(got, ref),
                   exact_vs_cpu=torch.equal(got.cpu(), cpu), mismatches=int((got != ref).sum()),
                   ms_torch=round(t_ref, 4), ms_triton=round(t_tri, 4))
        print(row, flush=True)
        rows.append(row)
    head = dict(card=torch.cuda.get_device_name(), torch=torch.__version__,
                triton=__import__("triton").__version__, all_exact=all(r["exact_vs_gpu_torch"] for r in rows),
                nan_check=nan_check_on_card())
    print(head)
    with open(a.out, "w") as f:
        json.dump(dict(header=head, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
