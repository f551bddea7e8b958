"""Programmatic dependent launch (PDL) for the decode kernels, on Hopper (sm_90) and later.

A decode step runs ~15 kernels a layer, most of them microseconds long; with PDL each may start
while the kernel before it still runs, at a wait instruction (its first) that returns once every
earlier kernel has finished and its writes are visible (csrc/arc_launch.cuh; Triton's gdc_wait):
the launch and the CTAs' placement overlap the kernel before, nothing else does. The arithmetic
is the same either way, so the outputs are the same bits (checked on the GPU: scripts/bench_e2e.py's
PDL A/B, `pdl_logits_max_abs_diff`).

Only for calls of at most MAX_ROWS token rows (batch 1 - 2 decode, the integer GEMVs' steps): on
an H200 it made batch-1 decode 5.6 - 6.1 % faster (Llama-3.1-8B / Qwen2.5-7B shapes) but batch 8
(tensor-core GEMVs) 1.5 % and 8 % slower (results/e2e-v39-h200.md, e2e-qwen-v39-h200.md).
On by default where the GPU has it (compute capability >= 9.0, not the Triton interpreter);
ARCQUANT_PDL=0 turns it off, set_pdl() switches it at run time (a CUDA graph keeps the setting it
was captured with).
"""
import functools
import os

import torch
import triton
import triton.language as tl

MAX_ROWS = 2
MIN_CAPABILITY = (9, 0)                    # griddepcontrol: Hopper and later
_STATE = {"on": os.environ.get("ARCQUANT_PDL", "1") != "0", "max_rows": MAX_ROWS}
_EXTENSIONS = []                           # the CUDA extensions built so far (cuda_gemv registers them)


def enabled() -> bool:
    """The current setting (it takes effect where the device supports PDL)."""
    return _STATE["on"]


def set_pdl(on: bool, max_rows: int | None = None) -> None:
    """Switch PDL for the kernels launched from now on (max_rows: for calls of at most that many
    token rows; None keeps the current limit)."""
    if max_rows is not None and max_rows < 0:
        raise ValueError(f"max_rows={max_rows}: give a number of token rows >= 0")
    _STATE["on"] = bool(on)
    _STATE["max_rows"] = _STATE["max_rows"] if max_rows is None else int(max_rows)
    for ext in _EXTENSIONS:
        ext.arc_set_pdl(int(_STATE["on"]), _STATE["max_rows"])


def max_rows() -> int:
    return _STATE["max_rows"]


def register(ext, capability: tuple) -> None:
    """A freshly built CUDA extension for a device of `capability` takes the setting (sm_90 on)."""
    if capability >= MIN_CAPABILITY:
        _EXTENSIONS.append(ext)
        ext.arc_set_pdl(int(_STATE["on"]), _STATE["max_rows"])


def _capable(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= MIN_CAPABILITY


@functools.cache
def _device_has_pdl(device: torch.device) -> bool:
    return os.environ.get("TRITON_INTERPRET") != "1" and _capable(device)


def describe(device: torch.device) -> str:
    """Whether the decode kernels of a model on `device` launch with PDL, and why not (the backend
    log line)."""
    if not _STATE["on"]:
        return "programmatic dependent launch off (ARCQUANT_PDL=0 or pdl.set_pdl(False))"
    if not _capable(device):
        return (f"programmatic dependent launch off (needs a CUDA GPU of compute capability >= "
                f"{MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]}, model on {device})")
    return f"programmatic dependent launch for calls of up to {_STATE['max_rows']} token rows"


def triton_args(device: torch.device, rows: int) -> dict:
    """The launch arguments that give a Triton kernel with a PDL constexpr its PDL launch on
    `device` for a call of `rows` token rows ({} where the device has none, PDL is off or the call
    has more rows than max_rows(): the kernel's PDL stays False)."""
    on = _STATE["on"] and rows <= _STATE["max_rows"] and _device_has_pdl(device)
    return {"PDL": True, "launch_pdl": True} if on else {}


@triton.jit
def pdl_enter(PDL: tl.constexpr):
    """The first statement of every Triton kernel with a PDL constexpr (launched with triton_args):
    let the next kernel be placed, then wait until every earlier one has finished and its writes
    are visible - before any load or store (csrc/arc_launch.cuh's arc::pdl_enter for the CUDA ones).
    Nothing when PDL is False (the default, the interpreter)."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
