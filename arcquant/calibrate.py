"""Streaming calibration: one decoder layer on the compute device at a time.

capture_inputs runs the embedding (and whatever precedes the first decoder layer) on the
calibration batches and stops at layer 0; run_layer then pushes the activations through one
layer, recording per-group input statistics, and returns the layer's full-precision outputs
(the spec calibrates on the full-precision model).
"""
import torch
from torch import nn

from .arc import ChannelStats
from .formats import BlockFormat


class _Stop(Exception):
    pass


def move_outside_layers(model: nn.Module, layers: nn.ModuleList, device) -> None:
    """Move every parameter and buffer that is not inside the decoder layers to `device`."""
    inside = {id(m) for m in layers.modules()}
    for mod in model.modules():
        if id(mod) in inside:
            continue
        for store in (mod._parameters, mod._buffers):
            for key, t in store.items():
                if t is not None and t.device != torch.device(device):
                    t.data = t.data.to(device)


@torch.no_grad()
def capture_inputs(model, layers: nn.ModuleList, batches: torch.Tensor, device, batch_size: int):
    """-> (list of layer-0 hidden-state chunks on device, the keyword arguments layer 0 got)."""
    hidden, kwargs = [], {}

    def grab(mod, args, kw):
        hidden.append(args[0] if args else kw["hidden_states"])
        kwargs.update({k: v for k, v in kw.items() if k != "hidden_states"})
        raise _Stop

    handle = layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for chunk in batches.split(batch_size):
            try:
                model(chunk.to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return hidden, kwargs


@torch.no_grad()
def run_layer(layer: nn.Module, linears: dict, hidden: list, kwargs: dict, layer_name: str,
              threshold: float, fmt: BlockFormat, with_stats: bool = True, prepare=None, hessian: bool = False):
    """Run `hidden` through `layer`; -> (outputs, groups, stats per group leader).
    with_stats=False only finds the groups (methods that use no calibration statistics).
    prepare: x (..., K) -> (..., Kp), applied before the statistics (padding + rotation for
    the rotated methods, whose plans are made in the rotated basis).

    groups: lists of linear names that received the very same input tensor (q/k/v, gate/up).
    """
    first_inputs, stats, leaders = {}, {}, None

    def hook(name):
        def record(mod, args, out):
            x = args[0]
            if leaders is None:
                first_inputs[name] = x                    # kept alive to compare identity
            elif with_stats and name in leaders:
                _update(stats, name, x)
        return record

    def _update(store, name, x):
        if prepare is not None:
            x = prepare(x)
        if name not in store:
            store[name] = ChannelStats(x.shape[-1], threshold, fmt, hessian)
        try:
            store[name].update(x)
        except FloatingPointError as e:
            raise FloatingPointError(f"{e} at the input of {layer_name}.{name}; "
                                     "check the model weights and the calibration text") from None

    handles = [lin.register_forward_hook(hook(n)) for n, lin in linears.items()]
    outputs = []
    try:
        for i, h in enumerate(hidden):
            out = layer(h, **kwargs)
            outputs.append(out[0] if isinstance(out, tuple) else out)
            if i == 0:
                groups = _group_by_input(first_inputs, list(linears))
                leaders = {g[0] for g in groups}
                for g in groups:
                    if with_stats:
                        _update(stats, g[0], first_inputs[g[0]])
                first_inputs.clear()
    finally:
        for hd in handles:
            hd.remove()
    missing = [n for n in linears if not any(n in g for g in groups)]
    if missing:
        raise RuntimeError(f"{layer_name}: layers {missing} received no calibration input "
                           "(are they used in the forward pass?)")
    return outputs, groups, stats


def _group_by_input(inputs: dict, order: list) -> list[list[str]]:
    groups: list[list[str]] = []
    for name in order:
        if name not in inputs:
            continue
        for g in groups:
            if inputs[g[0]] is inputs[name]:
                g.append(name)
                break
        else:
            groups.append([name])
    return groups
