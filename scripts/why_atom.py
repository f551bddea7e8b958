"""Why does Atom (outlier channels in FP8) beat ARC on SmolLM2? Split its advantage.

    python scripts/why_atom.py [--model qwen2.5-coder-0.5b] --out results/why-atom-smollm2.jsonl --only VARIANT

Atom keeps the top-s channels' activations AND weights in 8 bits; ARC makes only the
activations of its s channels ~8-bit (Q1 + Q2) and keeps their weights in NVFP4. Two swaps,
same model, calibration, s and evaluation as results/baselines-smollm2.md:
  - "atom, 4-bit outlier weights": Atom with the outlier weight columns in NVFP4 instead of FP8;
  - "arc, 8-bit outlier weights": ARC with the weight columns of its s channels in FP8 (per-row
    scale) in both the main part and the duplicated tail.
These are measurement patches applied to the library's layers in this script only.
"""
import argparse
import json
import time
from pathlib import Path

import torch

from arcquant import qlinear
from arcquant.config import CalibConfig, QuantConfig
from arcquant.evaluate import perplexity
from arcquant.formats import fp8, get_format
from arcquant.modeling import load_model
from arcquant.quantize import quantize_model


def nvfp4_tail(w_tail: torch.Tensor):
    """Atom's weight branch rounded to NVFP4 (16-blocks along K) instead of FP8: (values, ones)."""
    if w_tail.shape[1] == 0:
        return w_tail, torch.ones(w_tail.shape[0], 1)
    fmt = get_format("nvfp4")
    gs = fmt.global_scale(w_tail.abs().amax())
    return fmt.dequantize(*fmt.quantize(w_tail, gs), gs), torch.ones(w_tail.shape[0], 1)


def _patch_tail(extra, apply):
    """Patch QuantLinear for one measurement: extra(mod, linear, plan, weight_gs) -> a (N, s) tensor
    kept on each layer with a tail when it is built; apply(w_aug, k, s, t) edits dequant(W_aug)
    (N, K+s) in place when the reference product first builds it."""
    build, deq = qlinear.QuantLinear.from_linear.__func__, qlinear.QuantLinear.dequantized_weight

    def from_linear(cls, linear, fmt, act, act_scale, plan, weight_gs, *args, **kw):
        mod = build(cls, linear, fmt, act, act_scale, plan, weight_gs, *args, **kw)
        if plan.tail.numel():
            mod._tail_extra = extra(mod, linear, plan, weight_gs)
        return mod

    def dequantized_weight(self):
        first = self._w_aug is None
        w_aug = deq(self)
        if first and self.s and hasattr(self, "_tail_extra"):
            apply(w_aug, self.k_padded, self.s, self._tail_extra)
        return w_aug

    qlinear.QuantLinear.from_linear = classmethod(from_linear)
    qlinear.QuantLinear.dequantized_weight = dequantized_weight


def _tail_weight(linear, plan):
    """(N, s) float32: the original weight columns of the plan's tail, in plan order."""
    return qlinear.arc.pad_k(linear.weight.detach().float(), plan.k)[:, plan.perm[plan.k - plan.tail.numel():]]


def arc_fp8_tail():
    """ARC's s channels with FP8 weights (per-row scale) in the main part and the duplicated tail."""
    def apply(w_aug, k, s, t):
        w_aug[:, k - s: k] = t
        w_aug[:, k:] = t
    _patch_tail(lambda mod, linear, plan, gs: fp8.fake_quantize_per_row(_tail_weight(linear, plan)), apply)


def arc_weight_residual():
    """The tail's weight residual R_W = NVFP4(W_tail - dequant(Q(W)_tail)) (16-blocks, the layer's
    weight tensor scale) added to the main tail columns, i.e. the product on the tail becomes
    Q1 (Q(W) + R_W) + Q2 Q(W): what W_aug = [Q(W), Q(W)_tail, R_W] with X_aug = [Q1, Q2, Q1_tail]
    computes in one GEMM of depth K + 2s (s more weight and activation columns)."""
    fmt = get_format("nvfp4")

    def residual(mod, linear, plan, weight_gs):
        s, qw = plan.tail.numel(), mod.quantized_weight()
        w_q = fmt.dequantize(qw.codes[:, plan.k - s:], qw.scales[:, (plan.k - s) // 16:], weight_gs)
        return fmt.dequantize(*fmt.quantize(_tail_weight(linear, plan) - w_q, weight_gs), weight_gs)

    def apply(w_aug, k, s, t):
        w_aug[:, k - s: k] += t
    _patch_tail(residual, apply)


VARIANTS = {"atom, 4-bit outlier weights": ("atom", lambda: setattr(qlinear, "_quantize_tail8", nvfp4_tail), 5.5),
            "arc, 8-bit outlier weights": ("arc", arc_fp8_tail, 5.5),
            # s from a 5.0-bit budget: with s more columns on each side the layers carry 4.5 (K + 2s) / K = 5.5 bits
            "arc + weight residual on the tail (5.5 bits)": ("arc", arc_weight_residual, 5.0)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--out", required=True)
    ap.add_argument("--only", nargs="*", default=list(VARIANTS))
    a = ap.parse_args()
    name = a.only[0]
    method, patch, budget = VARIANTS[name]
    patch()                                                   # one variant per process: patches stay local
    torch.manual_seed(0)
    model, tok = load_model(a.model)
    t0 = time.time()
    qcfg = QuantConfig(method=method, target_bits=budget)
    ccfg = CalibConfig(source="c4", nsamples=32, seqlen=512, seed=0)
    rep = quantize_model(model, tok, qcfg, ccfg, progress=False)
    r = perplexity(model, tok, "wiki-test", 512, 65536, progress=False)
    extra = {"avg_bits_with_weight_residual": 2 * rep["avg_bits"] - 4.5} if "weight residual" in name else {}
    row = {"variant": name, "model": a.model, "config": qcfg.to_dict(), "avg_bits_as_counted": rep["avg_bits"], **extra,
           **r, "calib": "c4 32x512 seed 0", "torch": torch.__version__, "seconds": round(time.time() - t0, 1)}
    print(json.dumps(row), flush=True)
    with Path(a.out).open("a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
