"""quantize_model: calibrate and replace every decoder linear layer, one layer at a time."""
import math
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from . import arc, baselines, distributed, moe
from .calibrate import capture_inputs, move_outside_layers, run_layer
from .config import GPTQ, WITH_S, CalibConfig, QuantConfig
from .data import calibration_batches
from .formats import get_format
from .modeling import find_decoder_layers, find_linears, set_submodule
from .qlinear import FINITE, QuantLinear, SharedInput, transform_input

ACT_OF_METHOD = {"w4a16": "none", "w4a8": "fp8", "rtn": "fp4", "arc": "fp4", "hadamard": "fp4",
                 "smoothquant": "fp4", "atom": "mixed", "arc+hadamard": "fp4", "gptq": "fp4", "arc+gptq": "fp4",
                 "arc+wres": "fp4", "arc+gptq+wres": "fp4"}
ROTATION_SEED = 0


def _col_norm2(linears: list) -> torch.Tensor:
    """(K,) sum over the group's weights of each input column's squared norm."""
    return sum(lin.weight.detach().float().pow(2).sum(0).cpu() for lin in linears)


def _col_werr2(linears: list, fmt) -> torch.Tensor:
    """(K,) sum over the group's weights of each input column's squared rounding error
    |W_c - Q(W_c)|^2, quantized as the layers will be (one tensor scale for the group)."""
    ws = [arc.pad_k(lin.weight.detach().float(), fmt.block) for lin in linears]     # (N, K_padded)
    gs = fmt.global_scale(torch.stack([w.abs().amax() for w in ws]).amax())
    err = sum(((w - fmt.dequantize(*fmt.quantize(w, gs), gs)) ** 2).sum(0) for w in ws)
    return err[: linears[0].in_features].cpu()


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
        -(-x.shape[-1] // mult) * mult, *rot, device=x.device))


@dataclass
class GroupInfo:
    """What planning needs of one group of linears sharing an input (kept, or saved for resume)."""
    names: list                     # linear names inside the decoder layer, leader first
    k_padded: int
    col_norm2: torch.Tensor         # (K,) sum over the group of each input column's |W|^2
    stats: object = None            # arc.ChannelStats of the leader's input, or None
    col_werr2: torch.Tensor | None = None   # (K,) |W_c - Q(W_c)|^2 summed over the group (arc+wres)


def group_info(layer, names: list, stats, fmt, rotate_block, weight_errors: bool = False) -> GroupInfo:
    linears = [layer.get_submodule(n) for n in names]
    return GroupInfo(list(names), _k_padded(linears[0], fmt, rotate_block), _col_norm2(linears), stats,
                     _col_werr2(linears, fmt) if weight_errors else None)


def choose_s(qcfg: QuantConfig, groups: list) -> list[int]:
    """s for each GroupInfo: the threshold rule, or the bit budget (target_bits)."""
    fmt = get_format(qcfg.fmt)
    if qcfg.method not in WITH_S or not qcfg.residual:
        return [0] * len(groups)
    if qcfg.target_bits is None:
        return [arc.num_augmented(g.stats.outliers, g.stats.tokens, g.k_padded, qcfg.s_multiple)
                for g in groups]
    wres = [qcfg.wres_for(g.names) for g in groups]
    gains = [arc.block_gains(g.stats, g.k_padded, qcfg.order, fmt.block, g.col_norm2, g.col_werr2 if w else None)
             for g, w in zip(groups, wres)]
    return arc.allocate_budget(gains, [g.k_padded for g in groups], [len(g.names) for g in groups],
                               qcfg.target_bits, fmt.bits_per_element, fmt.block,
                               [2 if w else 1 for w in wres])    # a wres tail channel costs 2 columns (K+2s)


def quantize_layer_group(qcfg: QuantConfig, layer, names: list, stats, layer_name: str, s: int,
                         col_werr2: torch.Tensor | None = None) -> list[dict]:
    """Replace the linears `names` of `layer` (which share one input) by QuantLinear.
    col_werr2: the group's weight error from calibration (GroupInfo), for arc+wres's tail."""
    fmt = get_format(qcfg.fmt)
    linears = [layer.get_submodule(n) for n in names]
    k_padded = _k_padded(linears[0], fmt, qcfg.rotate_block)
    rotate = _rotation(qcfg)
    wres = qcfg.wres_for(names)
    plan, smooth, amax = _plan_and_transform(qcfg, stats, k_padded, s, fmt, linears, rotate, col_werr2, wres)
    w_amax = torch.stack([_weight_amax(lin, k_padded, rotate, smooth) for lin in linears]).max()
    weight_gs = fmt.global_scale(w_amax)                           # shared: engines fuse the group
    act = ACT_OF_METHOD[qcfg.method]
    static = qcfg.act_scale == "static" and act in ("fp4", "mixed")   # w4a8 is per token
    input_gs = fmt.global_scale(amax) if static else None
    input_amax = None if amax is None else float(amax)             # engines' static input scale
    hess = _padded_hessian(stats, k_padded) if qcfg.method in GPTQ else None
    shared, rows = SharedInput(), []
    for name, lin in zip(names, linears):
        try:
            q = QuantLinear.from_linear(lin, qcfg.fmt, act, qcfg.act_scale, plan, weight_gs.cpu(),
                                        None if input_gs is None else input_gs.cpu(), rotate, smooth, hess,
                                        weight_residual=wres)
        except FloatingPointError as e:
            raise FloatingPointError(f"{e} of {layer_name}.{name}; arcquant cannot quantize it") from None
        q.shared = shared if len(names) > 1 else None
        q.input_amax = input_amax
        set_submodule(layer, name, q.to(lin.weight.device))
        rows.append({"name": f"{layer_name}.{name}", "in": lin.in_features, "out": lin.out_features,
                     "s": q.s, "avg_bits": q.avg_bits, "group": f"{layer_name}.{names[0]}"})
    return rows


def _padded_hessian(stats, k_padded: int) -> torch.Tensor:
    h = stats.xtx
    extra = k_padded - h.shape[0]
    return torch.nn.functional.pad(h, (0, extra, 0, extra)) if extra else h


def _plan_and_transform(qcfg, stats, k_padded, s, fmt, linears, rotate, col_werr2=None, wres: bool = False):
    """-> (plan, SmoothQuant scales or None, calibration max |x| of what is 4-bit quantized)."""
    smooth = None
    if qcfg.method in WITH_S and qcfg.method != "atom":           # the ARC methods
        werr = None
        if wres:                                                   # computed at calibration, else here
            werr = _col_werr2(linears, fmt) if col_werr2 is None else col_werr2
        plan = arc.make_plan(stats, k_padded, s, qcfg.order, fmt.block, _col_norm2(linears), werr)
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


class MemoryStore:
    """Layers live in the model; nothing is saved (the in-memory path). The streaming
    quantizer (arcquant/stream.py) implements the same methods on disk."""

    def __init__(self, layers):
        self.layers = layers

    def has_stats(self, i):
        return False

    def has_layer(self, i):
        return False

    def snapshot(self):
        return 0, None

    def materialize(self, i, device):
        return self.layers[i].to(device)

    def release(self, i):
        self.layers[i].to("cpu")

    def save_stats(self, i, infos, moe_rows, hidden):
        pass

    def save_layer(self, i, rows):
        pass


def calibrate_layers(model, tokenizer, qcfg, ccfg, store, device, batch_size, progress) -> tuple:
    """Pass 1: push the calibration text through the full-precision layers one at a time.
    -> (GroupInfo lists per layer, MoE expert report rows)."""
    lname, layers = find_decoder_layers(model)
    n = len(layers)
    if all(store.has_stats(i) for i in range(n)):
        loaded = [store.load_stats(i) for i in range(n)]
        return [x[0] for x in loaded], [r for x in loaded for r in x[1]]
    fmt = get_format(qcfg.fmt)
    needs_stats = ACT_OF_METHOD[qcfg.method] in ("fp4", "mixed")   # W4A4: s, plan, input range
    prepare = stats_transform(qcfg, fmt)
    batches = calibration_batches(tokenizer, ccfg.source, ccfg.nsamples, ccfg.seqlen, ccfg.seed)
    tokens = batches.numel()
    move_outside_layers(model, layers, device)
    hidden, kwargs = capture_inputs(model, layers, distributed.shard(batches), device, batch_size)
    start, saved = store.snapshot()                                # resume: activations at layer `start`
    if saved is not None:
        hidden = [h.to(device) for h in saved]
    infos, moe_rows = [], []
    for i in tqdm(range(n), desc="calibrate", disable=not progress):
        if i < start:
            layer_infos, rows = store.load_stats(i)
            infos.append(layer_infos)
            moe_rows += rows
            continue
        name, layer = f"{lname}.{i}", store.materialize(i, device)   # one layer on the device
        linears = find_linears(layer, name)
        _check_finite_weights(linears, name)
        blocks = moe.start_calibration(layer)
        done = store.has_stats(i)                                  # resumed: only the forward
        hidden, groups, stats = run_layer(layer, linears, hidden, kwargs, name, qcfg.threshold, fmt,
                                          with_stats=needs_stats and not done, prepare=prepare,
                                          hessian=qcfg.method in GPTQ)
        distributed.reduce_stats(stats, device)                    # several ranks: as if one saw all
        for b in blocks:
            b.routed = distributed.reduce_counts(b.routed, device)
        rows = moe.finish_calibration(layer, name, tokens, _top_k(model))
        if done:
            layer_infos, rows = store.load_stats(i)
        else:
            layer_infos = [group_info(layer, g, stats.get(g[0]), fmt, qcfg.rotate_block, qcfg.wres_for(g))
                           for g in groups]
        infos.append(layer_infos)
        moe_rows += rows
        store.release(i)
        store.save_stats(i, layer_infos, rows, hidden)
    move_outside_layers(model, layers, "cpu")
    return infos, moe_rows


def _top_k(model):
    return getattr(model.config, "num_experts_per_tok", None)


def quantize_model(model, tokenizer, qcfg: QuantConfig, ccfg: CalibConfig = CalibConfig(),
                   device: str = "cpu", batch_size: int = 8, progress: bool = True, store=None) -> dict:
    """Quantize `model` in place (or through `store`, layer by layer);
    -> report {"layers": [...], "avg_bits": float, "moe": [...]}."""
    if qcfg.method == "fp":
        return {"layers": [], "avg_bits": 16.0}
    lname, layers = find_decoder_layers(model)
    for i, layer in enumerate(layers):
        find_linears(layer, f"{lname}.{i}")                        # refuse early, before any work
    if store is None and distributed.world() > 1:
        raise ValueError("several processes (torchrun) quantize through the streaming path only: "
                         "use arcquant quantize")
    store = store or MemoryStore(layers)
    infos, moe_rows = calibrate_layers(model, tokenizer, qcfg, ccfg, store, device, batch_size, progress)
    s_all = iter(choose_s(qcfg, [g for layer_infos in infos for g in layer_infos]))
    s_of = [[next(s_all) for _ in layer_infos] for layer_infos in infos]
    rows_of = {}
    for i in tqdm(range(len(layers)), desc=f"quantize {qcfg.method}", disable=not progress):
        if store.has_layer(i):
            rows_of[i] = store.layer_rows(i)
            continue
        if not distributed.mine(i):                                # several ranks: layer i on rank i % world
            continue
        layer, layer_rows = store.materialize(i, device), []
        for g, s in zip(infos[i], s_of[i]):
            layer_rows += quantize_layer_group(qcfg, layer, g.names, g.stats, f"{lname}.{i}", s, g.col_werr2)
        store.save_layer(i, layer_rows)
        store.release(i)
        rows_of[i] = layer_rows
    if distributed.world() > 1:
        store.merge_layers(distributed.gather(store.layer_entries()))
        rows_of = {i: r for part in distributed.gather(rows_of) for i, r in part.items()}
    rows = [r for i in sorted(rows_of) for r in rows_of[i]]
    FINITE.install(model)                                          # NaN checks read once per forward on a GPU
    return {"layers": rows, "avg_bits": sum(r["avg_bits"] for r in rows) / len(rows), "moe": moe_rows}
