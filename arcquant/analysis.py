"""Per-layer error report: how far each quantized linear layer's output is from full precision.

For every decoder linear layer, on calibration activations captured from the full-precision
model, the relative output error ||Y_q - Y|| / ||Y|| (Y = X W^T + b, summed over tokens) of:
    rtn    NVFP4 W4A4 round-to-nearest
    arc    the given ARC configuration (arc, arc+gptq, arc+wres, ...; its s and average bits too)
    w4a8   NVFP4 weights, FP8 E4M3 per-token activations
    mxfp8  an 8-bit yardstick: MXFP8-style (E4M3 elements, power-of-two scale per 32) on both
           operands - the paper's "ARC error is comparable to MXFP8" claim, measured
Each quantized layer sees the same full-precision input (errors do not compound), so the
figures isolate the layer. Written as JSON and as a PNG.
"""
import json
from pathlib import Path

import torch

from .config import METHODS as ALL_METHODS
from .config import CalibConfig, QuantConfig
from .data import calibration_batches
from .formats import fp8
from .modeling import find_decoder_layers, find_linears, load_model
from .quantize import quantize_model

METHODS = ("rtn", "arc", "w4a8", "mxfp8")
ARC_FAMILY = tuple(m for m in ALL_METHODS if m.startswith("arc"))      # what the "arc" column may be


def _quantized(model_name: str, qcfg: QuantConfig, ccfg: CalibConfig, device) -> tuple[dict, dict]:
    """-> ({layer name: QuantLinear}, {layer name: report row})."""
    model, tok = load_model(model_name)
    report = quantize_model(model, tok, qcfg, ccfg, device=device, progress=False)
    rows = {r["name"]: r for r in report["layers"]}
    return {n: model.get_submodule(n) for n in rows}, rows


def _mxfp8_output(x, lin):
    w = lin.weight.float()
    pad = -x.shape[-1] % 32
    xq = fp8.fake_quantize_blocks(torch.nn.functional.pad(x.float(), (0, pad)))
    wq = fp8.fake_quantize_blocks(torch.nn.functional.pad(w, (0, pad)))
    y = xq @ wq.t()
    return y if lin.bias is None else y + lin.bias.float()


@torch.no_grad()
def layer_errors(model_name: str, arc_cfg: QuantConfig = QuantConfig(), ccfg: CalibConfig = CalibConfig(),
                 eval_samples: int = 4, device="cpu") -> dict:
    """-> {"layers": [{name, s, avg_bits, rel_err: {method: float}}], settings...}."""
    if arc_cfg.method not in ARC_FAMILY:
        raise ValueError(f"the report compares an ARC configuration; got method {arc_cfg.method!r}, use one of "
                         f"{', '.join(ARC_FAMILY)}")
    quantized = {"rtn": _quantized(model_name, QuantConfig(method="rtn", act_scale=arc_cfg.act_scale),
                                   ccfg, device)[0],
                 "w4a8": _quantized(model_name, QuantConfig(method="w4a8"), ccfg, device)[0]}
    quantized["arc"], arc_rows = _quantized(model_name, arc_cfg, ccfg, device)
    model, tok = load_model(model_name)
    model.to(device)
    lname, layers = find_decoder_layers(model)
    linears = {f"{lname}.{i}.{n}": lin for i, layer in enumerate(layers)
               for n, lin in find_linears(layer, f"{lname}.{i}").items()}
    sq = {name: {m: 0.0 for m in METHODS} for name in linears}
    ref = {name: 0.0 for name in linears}

    def hook(name):
        def record(mod, args, out):
            x = args[0].reshape(-1, mod.in_features)
            y = out.reshape(-1, mod.out_features).float()
            ref[name] += float((y ** 2).sum())
            for m in ("rtn", "arc", "w4a8"):
                sq[name][m] += float(((quantized[m][name].to(device)(x).float() - y) ** 2).sum())
            sq[name]["mxfp8"] += float(((_mxfp8_output(x, mod) - y) ** 2).sum())
        return record

    handles = [lin.register_forward_hook(hook(n)) for n, lin in linears.items()]
    try:
        batches = calibration_batches(tok, ccfg.source, eval_samples, ccfg.seqlen, ccfg.seed + 1)
        for b in batches.split(1):
            model(b.to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    rows = [{"name": n, "s": arc_rows[n]["s"], "avg_bits": arc_rows[n]["avg_bits"],
             "in": arc_rows[n]["in"], "out": arc_rows[n]["out"],
             "rel_err": {m: (sq[n][m] / ref[n]) ** 0.5 if ref[n] else 0.0 for m in METHODS}} for n in linears]
    return {"model": model_name, "arc": arc_cfg.to_dict(), "calibration": vars(ccfg),
            "eval_tokens": eval_samples * ccfg.seqlen,
            "eval_text": f"{ccfg.source}, {eval_samples} windows of {ccfg.seqlen} (seed {ccfg.seed + 1})",
            "layers": rows, "summary": summarize(rows)}


def summarize(rows: list) -> dict:
    """Median relative error per method, and in how many layers ARC is at or below MXFP8/w4a8."""
    med = lambda m: float(torch.tensor([r["rel_err"][m] for r in rows]).median())
    return {"median_rel_err": {m: med(m) for m in METHODS},
            "arc_le_mxfp8_layers": sum(r["rel_err"]["arc"] <= r["rel_err"]["mxfp8"] for r in rows),
            "arc_le_w4a8_layers": sum(r["rel_err"]["arc"] <= r["rel_err"]["w4a8"] for r in rows),
            "arc_lt_rtn_layers": sum(r["rel_err"]["arc"] < r["rel_err"]["rtn"] for r in rows),
            "layers": len(rows)}


def plot(report: dict, png: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = report["layers"]
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(14, 7), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    for m, style in zip(METHODS, ("-", "-", "--", ":")):
        ax.plot([r["rel_err"][m] for r in rows], style, label=m, linewidth=1.2)
    ax.set_yscale("log")
    ax.set_ylabel("relative output error")
    ax.legend(ncol=4)
    ax.set_title(f"{report['model']}: per-layer output error on {report['eval_text']}")
    ax2.bar(range(len(rows)), [r["s"] for r in rows], color="tab:orange")
    ax2.set_ylabel("ARC s")
    ax2.set_xlabel("linear layer (decoder order: q k v o gate up down per block)")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def write_report(report: dict, out: Path) -> tuple[Path, Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    js, png = out / "layer-errors.json", out / "layer-errors.png"
    js.write_text(json.dumps(report, indent=1))
    plot(report, png)
    return js, png
