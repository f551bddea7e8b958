"""quantize_model: calibrate and replace every decoder linear layer, one layer at a time."""
import torch
from tqdm.auto import tqdm

from . import arc
from .calibrate import capture_inputs, move_outside_layers, run_layer
from .config import CalibConfig, QuantConfig
from .data import calibration_batches
from .formats import get_format
from .modeling import find_decoder_layers, find_linears
from .qlinear import QuantLinear, SharedInput

ACT_OF_METHOD = {"w4a16": "none", "w4a8": "fp8", "rtn": "fp4", "arc": "fp4"}


def _set_module(root, dotted: str, new) -> None:
    parent_name, _, child = dotted.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, new)


def _group_plan(qcfg: QuantConfig, stats, linears: list, k_padded: int) -> arc.ArcPlan:
    if qcfg.method != "arc":
        return arc.ArcPlan.identity(k_padded)
    fmt = get_format(qcfg.fmt)
    s = arc.num_augmented(stats.outliers, stats.tokens, k_padded, qcfg.s_multiple) if qcfg.residual else 0
    col_norm2 = sum(lin.weight.detach().float().pow(2).sum(0).cpu() for lin in linears)
    return arc.make_plan(stats, k_padded, s, qcfg.order, fmt.block, col_norm2)


def quantize_layer_group(qcfg: QuantConfig, layer, names: list, stats, layer_name: str) -> list[dict]:
    """Replace the linears `names` of `layer` (which share one input) by QuantLinear."""
    fmt = get_format(qcfg.fmt)
    linears = [layer.get_submodule(n) for n in names]
    k_padded = -(-linears[0].in_features // fmt.block) * fmt.block
    plan = _group_plan(qcfg, stats, linears, k_padded)
    w_amax = torch.stack([lin.weight.detach().abs().max().float() for lin in linears]).max()
    weight_gs = fmt.global_scale(w_amax)                           # shared: engines fuse the group
    input_gs = fmt.global_scale(stats.absmax.max()) if qcfg.act_scale == "static" else None
    shared, rows = SharedInput(), []
    for name, lin in zip(names, linears):
        try:
            q = QuantLinear.from_linear(lin, qcfg.fmt, ACT_OF_METHOD[qcfg.method], qcfg.act_scale,
                                        plan, weight_gs.cpu(), None if input_gs is None else input_gs.cpu())
        except FloatingPointError as e:
            raise FloatingPointError(f"{e} of {layer_name}.{name}; arcquant cannot quantize it") from None
        q.shared = shared if len(names) > 1 else None
        _set_module(layer, name, q.to(lin.weight.device))
        rows.append({"name": f"{layer_name}.{name}", "in": lin.in_features, "out": lin.out_features,
                     "s": q.s, "avg_bits": q.avg_bits, "group": f"{layer_name}.{names[0]}"})
    return rows


def _check_finite_weights(linears: dict, layer_name: str) -> None:
    bad = [n for n, lin in linears.items() if not torch.isfinite(lin.weight).all()]
    if bad:
        raise FloatingPointError(f"NaN or Inf in the weights of {', '.join(f'{layer_name}.{n}' for n in bad)}; "
                                 "arcquant cannot quantize them: check the source model")


def quantize_model(model, tokenizer, qcfg: QuantConfig, ccfg: CalibConfig = CalibConfig(),
                   device: str = "cpu", batch_size: int = 8, progress: bool = True) -> dict:
    """Quantize `model` in place; -> report {"layers": [...], "avg_bits": float}."""
    if qcfg.method == "fp":
        return {"layers": [], "avg_bits": 16.0}
    lname, layers = find_decoder_layers(model)
    for i, layer in enumerate(layers):
        find_linears(layer, f"{lname}.{i}")                        # refuse early, before any work
    batches = calibration_batches(tokenizer, ccfg.source, ccfg.nsamples, ccfg.seqlen, ccfg.seed)
    move_outside_layers(model, layers, device)
    hidden, kwargs = capture_inputs(model, layers, batches, device, batch_size)
    fmt, rows = get_format(qcfg.fmt), []
    for i, layer in enumerate(tqdm(layers, desc=f"quantize {qcfg.method}", disable=not progress)):
        layer.to(device)
        name = f"{lname}.{i}"
        linears = find_linears(layer, name)
        _check_finite_weights(linears, name)
        hidden, groups, stats = run_layer(layer, linears, hidden, kwargs, name, qcfg.threshold, fmt)
        for g in groups:
            rows += quantize_layer_group(qcfg, layer, g, stats[g[0]], name)
        layer.to("cpu")
    move_outside_layers(model, layers, "cpu")
    return {"layers": rows, "avg_bits": sum(r["avg_bits"] for r in rows) / len(rows)}
