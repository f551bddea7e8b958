"""quantize_model: calibrate and replace every decoder linear layer, one layer at a time."""
import math

import torch
from tqdm.auto import tqdm

from . import arc, baselines
from .calibrate import capture_inputs, move_outside_layers, run_layer
from .config import WITH_S, CalibConfig, QuantConfig
from .data import calibration_batches
from .formats import get_format
from .modeling import find_decoder_layers, find_linears, set_submodule
from .qlinear import QuantLinear, SharedInput, transform_input

ACT_OF_METHOD = {"w4a16": "none", "w4a8": "fp8", "rtn": "fp4", "arc": "fp4", "hadamard": "fp4",
                 "smoothquant": "fp4", "atom": "mixed", "arc+hadamard": "fp4"}
ROTATION_SEED = 0


def _col_norm2(linears: list) -> torch.Tensor:
    """(K,) sum over the group's weights of each input column's squared norm."""
    return sum(lin.weight.detach().float().pow(2).sum(0).cpu() for lin in linears)


def _pad_multiple(fmt, rotate_block: int | None) -> int:
    """K is padded to the format block, and to the rotation block for block-wise rotations."""
    return math.lcm(fmt.block, rotate_block) if rotate_block else fmt.block


def _k_padded(linear, fmt, rotate_block: int | None = None) -> int:
    mult = _pad_multiple(fmt, rotate_block)
    return -(-linear.in_features // mult) * mult


def _rotation(qcfg: QuantConfig):
    return None if qcfg.rotate_block is None else (qcfg.rotate_block, ROTATION_SEED)


def stats_transform(qcfg: QuantConfig, fmt):
    """x -> what the quantizer sees (padded and rotated) for the rotated methods, else None."""
    rot = _rotation(qcfg)
    if rot is None:
        return None
    mult = _pad_multiple(fmt, rot[0])
    return lambda x: baselines.rotate(arc.pad_k(x.float(), mult), baselines.rotation_matrix(
        -(-x.shape[-1] // mult) * mult, *rot))


def choose_s(qcfg: QuantConfig, groups: list) -> list[int]:
    """s for each (linears, stats) group: the threshold rule, or the bit budget (target_bits)."""
    fmt = get_format(qcfg.fmt)
    if qcfg.method not in WITH_S or not qcfg.residual:
        return [0] * len(groups)
    widths = [_k_padded(lins[0], fmt, qcfg.rotate_block) for lins, _ in groups]
    if qcfg.target_bits is None:
        return [arc.num_augmented(st.outliers, st.tokens, k, qcfg.s_multiple)
                for (_, st), k in zip(groups, widths)]
    gains = [arc.block_gains(st, k, qcfg.order, fmt.block, _col_norm2(lins))
             for (lins, st), k in zip(groups, widths)]
    return arc.allocate_budget(gains, widths, [len(l) for l, _ in groups], qcfg.target_bits,
                               fmt.bits_per_element, fmt.block)


def quantize_layer_group(qcfg: QuantConfig, layer, names: list, stats, layer_name: str, s: int) -> list[dict]:
    """Replace the linears `names` of `layer` (which share one input) by QuantLinear."""
    fmt = get_format(qcfg.fmt)
    linears = [layer.get_submodule(n) for n in names]
    k_padded = _k_padded(linears[0], fmt, qcfg.rotate_block)
    rotate = _rotation(qcfg)
    plan, smooth, amax = _plan_and_transform(qcfg, stats, k_padded, s, fmt, linears, rotate)
    w_amax = torch.stack([_weight_amax(lin, k_padded, rotate, smooth) for lin in linears]).max()
    weight_gs = fmt.global_scale(w_amax)                           # shared: engines fuse the group
    act = ACT_OF_METHOD[qcfg.method]
    static = qcfg.act_scale == "static" and act in ("fp4", "mixed")   # w4a8 is per token
    input_gs = fmt.global_scale(amax) if static else None
    input_amax = None if amax is None else float(amax)             # engines' static input scale
    shared, rows = SharedInput(), []
    for name, lin in zip(names, linears):
        try:
            q = QuantLinear.from_linear(lin, qcfg.fmt, act, qcfg.act_scale, plan, weight_gs.cpu(),
                                        None if input_gs is None else input_gs.cpu(), rotate, smooth)
        except FloatingPointError as e:
            raise FloatingPointError(f"{e} of {layer_name}.{name}; arcquant cannot quantize it") from None
        q.shared = shared if len(names) > 1 else None
        q.input_amax = input_amax
        set_submodule(layer, name, q.to(lin.weight.device))
        rows.append({"name": f"{layer_name}.{name}", "in": lin.in_features, "out": lin.out_features,
                     "s": q.s, "avg_bits": q.avg_bits, "group": f"{layer_name}.{names[0]}"})
    return rows


def _plan_and_transform(qcfg, stats, k_padded, s, fmt, linears, rotate):
    """-> (plan, SmoothQuant scales or None, calibration max |x| of what is 4-bit quantized)."""
    smooth = None
    if qcfg.method in ("arc", "arc+hadamard"):
        plan = arc.make_plan(stats, k_padded, s, qcfg.order, fmt.block, _col_norm2(linears))
    elif qcfg.method == "atom":                                    # outliers by max, last s
        plan = arc.make_plan(stats, k_padded, s, "sorted", fmt.block)
    else:
        plan = arc.ArcPlan.identity(k_padded)
    if stats is None:
        return plan, None, None
    absmax = arc.pad_k(stats.absmax, k_padded)
    if qcfg.method == "smoothquant":
        w_col = torch.stack([arc.pad_k(lin.weight.detach().abs().float().amax(0).cpu(), k_padded)
                             for lin in linears]).amax(0)
        smooth = baselines.smooth_scales(absmax, w_col, qcfg.alpha)
        absmax = absmax / smooth
    if qcfg.method == "atom":
        absmax = absmax[plan.perm[: k_padded - s]]                 # the 4-bit part only
    return plan, smooth, absmax.max()


def _weight_amax(lin, k_padded, rotate, smooth) -> torch.Tensor:
    """max |W| as quantized (after the rotation / smoothing folded into it)."""
    w = lin.weight.detach().float()
    if rotate is None and smooth is None:
        return w.abs().max()
    w = transform_input(arc.pad_k(w, k_padded), rotate, None)
    return (w if smooth is None else w * smooth.to(w.device)).abs().max()


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
    fmt, found = get_format(qcfg.fmt), []
    needs_stats = ACT_OF_METHOD[qcfg.method] in ("fp4", "mixed")   # W4A4: s, plan, input range
    prepare = stats_transform(qcfg, fmt)
    for i, layer in enumerate(tqdm(layers, desc="calibrate", disable=not progress)):
        layer.to(device)                                           # one layer on the device at a time
        name = f"{lname}.{i}"
        linears = find_linears(layer, name)
        _check_finite_weights(linears, name)
        hidden, groups, stats = run_layer(layer, linears, hidden, kwargs, name, qcfg.threshold, fmt,
                                          with_stats=needs_stats, prepare=prepare)
        found += [(i, g, stats.get(g[0])) for g in groups]
        layer.to("cpu")
    del hidden
    s_all = choose_s(qcfg, [([layers[i].get_submodule(n) for n in g], st) for i, g, st in found])
    rows = []
    for (i, g, st), s in zip(tqdm(found, desc=f"quantize {qcfg.method}", disable=not progress), s_all):
        layers[i].to(device)
        rows += quantize_layer_group(qcfg, layers[i], g, st, f"{lname}.{i}", s)
        layers[i].to("cpu")
    move_outside_layers(model, layers, "cpu")
    return {"layers": rows, "avg_bits": sum(r["avg_bits"] for r in rows) / len(rows)}
