"""Mixture-of-experts: experts as nn.Linear layers arcquant can quantize, and expert calibration.

transformers 5 stores the experts of Mixtral / Qwen-MoE style blocks as two 3D parameters
(gate_up_proj (E, 2I, H), down_proj (E, H, I)) in one module. unfuse_experts replaces such a
module by UnfusedExperts: one Expert (gate_up: Linear H->2I, down: Linear I->H) per expert,
same routed forward, so every expert is quantized with its own ARC plan. Routers
(`*Router` modules, and nn.Linear with fewer than MIN_QUANT_OUT outputs such as Qwen-MoE's
shared-expert gate) stay in high precision.

Calibration: while `calibrating`, every expert runs on every calibration token (its statistics
never come from an empty or tiny sample) while the block's output stays the routed one; the
routed token count per expert is recorded so the report names under-calibrated experts.
"""
import torch
from torch import nn

MIN_QUANT_OUT = 16                  # narrower linears (routers, gates) stay in high precision
UNDER_CALIBRATED = 0.1              # fewer routed tokens than this share of a uniform split


def is_router(mod: nn.Module) -> bool:
    return type(mod).__name__.endswith("Router") or (
        isinstance(mod, nn.Linear) and mod.out_features < MIN_QUANT_OUT)


def _is_fused_experts(mod: nn.Module) -> bool:
    p = mod._parameters
    return (isinstance(p.get("gate_up_proj"), torch.Tensor) and isinstance(p.get("down_proj"), torch.Tensor)
            and p["gate_up_proj"].dim() == 3 and hasattr(mod, "act_fn"))


class Expert(nn.Module):
    def __init__(self, hidden: int, inter: int, act_fn, device=None, dtype=None):
        super().__init__()
        self.gate_up = nn.Linear(hidden, 2 * inter, bias=False, device=device, dtype=dtype)
        self.down = nn.Linear(inter, hidden, bias=False, device=device, dtype=dtype)
        self.act_fn = act_fn

    def forward(self, x):                                          # (T, H) -> (T, H)
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(self.act_fn(gate) * up)


class UnfusedExperts(nn.ModuleList):
    """The experts of one block, expert e at `.e` (so its layers are named `...experts.e.gate_up`)."""

    def __init__(self, experts: list, num_experts: int):
        super().__init__(experts)
        self.num_experts = num_experts
        self.calibrating = False
        self.routed = torch.zeros(num_experts, dtype=torch.long)  # routed calibration tokens

    def forward(self, hidden_states, top_k_index, top_k_weights):  # (T, H), (T, k), (T, k)
        out = torch.zeros_like(hidden_states)
        for e, expert in enumerate(self):
            token_idx, top_k_pos = torch.where(top_k_index == e)
            if self.calibrating:
                self.routed[e] += token_idx.numel()
                y = expert(hidden_states.view_as(hidden_states))[token_idx]   # all tokens seen
            elif token_idx.numel() == 0:
                continue
            else:
                y = expert(hidden_states[token_idx])
            y = y * top_k_weights[token_idx, top_k_pos, None]
            out.index_add_(0, token_idx, y.to(out.dtype))
        return out


def _unfuse(mod: nn.Module) -> UnfusedExperts:
    if getattr(mod, "is_transposed", False) or getattr(mod, "has_bias", False) or \
            not getattr(mod, "is_concatenated", True):
        raise NotImplementedError(f"{type(mod).__name__}: transposed, biased or interleaved expert weights "
                                  "are not supported yet; only the [gate; up] layout of Mixtral / Qwen-MoE")
    gu, dn = mod.gate_up_proj, mod.down_proj                       # (E, 2I, H), (E, H, I)
    n_exp, two_i, hidden = gu.shape
    experts = []
    for e in range(n_exp):
        ex = Expert(hidden, two_i // 2, mod.act_fn, device=gu.device, dtype=gu.dtype)
        if gu.device.type != "meta":
            with torch.no_grad():
                ex.gate_up.weight.copy_(gu[e])
                ex.down.weight.copy_(dn[e])
        experts.append(ex)
    return UnfusedExperts(experts, n_exp)


def unfuse_experts(model: nn.Module) -> int:
    """Replace every fused experts module in `model` (in place); -> how many were replaced."""
    from .modeling import set_submodule
    targets = [name for name, mod in model.named_modules() if _is_fused_experts(mod)]
    for name in targets:
        set_submodule(model, name, _unfuse(model.get_submodule(name)))
    return len(targets)


def start_calibration(layer: nn.Module) -> list:
    blocks = [m for m in layer.modules() if isinstance(m, UnfusedExperts)]
    for b in blocks:
        b.calibrating, b.routed = True, torch.zeros_like(b.routed)
    return blocks


def finish_calibration(layer: nn.Module, layer_name: str, tokens: int, top_k: int | None) -> list[dict]:
    """Stop calibrating; -> one report row per expert block: routed counts, under-calibrated experts."""
    rows = []
    for name, b in layer.named_modules():
        if not isinstance(b, UnfusedExperts):
            continue
        b.calibrating = False
        fair = tokens * (top_k or 1) / b.num_experts
        under = [e for e, c in enumerate(b.routed.tolist()) if c < UNDER_CALIBRATED * fair]
        rows.append({"block": f"{layer_name}.{name}", "routed_tokens": b.routed.tolist(),
                     "under_calibrated": [f"{layer_name}.{name}.{e}" for e in under]})
    return rows
