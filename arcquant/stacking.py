"""The BF16 counterpart of gpu.stack_groups: nn.Linear layers that read one input (q/k/v,
gate/up) computed as one matmul over their stacked weights.

Engines serving BF16 (vLLM, TensorRT-LLM) fuse these projections; stacking the BF16 model the
same way the quantized one is stacked keeps the comparison of `arcquant bench` fair. The
weights are concatenated once and each layer's weight (and bias) becomes a row view of the
stack (no second copy; state-dict keys and values unchanged); the group's product is computed
once per input tensor and each layer returns its columns (the product is let go once every
layer of the group has taken its columns).
"""
import torch
import torch.nn.functional as F
from torch import nn

GROUPS = {"self_attn": ("q_proj", "k_proj", "v_proj"), "mlp": ("gate_proj", "up_proj")}


class SharedProduct:
    """The product of a stacked group, which each member reads part of: computed once per input
    (the same tensor, unmodified) and let go once every member has taken it, so a prefill-sized
    product is not kept alive between forwards. Used by the BF16 stacks here and by
    gpu.StackedGroup."""

    def __init__(self, size: int):
        self.size = size
        self._clear()

    def _clear(self):
        self._key, self._version, self._value, self._taken = None, None, None, set()

    def take(self, key: torch.Tensor, member: int, compute):
        """compute() for `key`, once for the group's members (`member`: 0..size-1)."""
        if self._key is not key or self._version != key._version or member in self._taken:
            self._key, self._version, self._value, self._taken = key, key._version, compute(), set()
        value = self._value
        self._taken.add(member)
        if len(self._taken) == self.size:
            self._clear()
        return value


class _Stack:
    def __init__(self, linears: list):
        self.weight = torch.cat([l.weight.detach() for l in linears])                 # (sum N, K)
        self.bias = None if all(l.bias is None for l in linears) else torch.cat(
            [l.bias.detach() if l.bias is not None else self.weight.new_zeros(l.out_features) for l in linears])
        self.product = SharedProduct(len(linears))

    def take(self, x: torch.Tensor, member: int) -> torch.Tensor:
        """The group's product for x (computed once for its members)."""
        return self.product.take(x, member, lambda: F.linear(x, self.weight, self.bias))


class StackedLinear(nn.Module):
    """One layer of a stack: its weight / bias are row views of the stack's; forward returns its
    columns of the group's product."""

    def __init__(self, stack: _Stack, member: int, offset: int, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features, self.offset = linear.in_features, linear.out_features, offset
        self.member = member
        rows = slice(offset, offset + linear.out_features)
        self.weight = nn.Parameter(stack.weight[rows], requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(stack.bias[rows], requires_grad=False)
        self._stack = (stack,)                                                        # not a submodule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():              # traced: no Python-side cache, its own rows only
            return F.linear(x, self.weight, self.bias)
        return self._stack[0].take(x, self.member)[..., self.offset:self.offset + self.out_features]


def stack_linears(model) -> int:
    """Stack every decoder layer's q/k/v and gate/up nn.Linear groups (same input width,
    same dtype and device). -> the number of groups stacked."""
    count = 0
    for layer in model.modules():
        for parent_name, names in GROUPS.items():
            parent = getattr(layer, parent_name, None)
            linears = [getattr(parent, n, None) for n in names]
            if parent is None or not all(type(l) is nn.Linear for l in linears):
                continue
            if len({(l.in_features, l.weight.dtype, l.weight.device) for l in linears}) != 1:
                continue
            stack, off = _Stack(linears), 0
            for i, (n, l) in enumerate(zip(names, linears)):
                setattr(parent, n, StackedLinear(stack, i, off, l))
                off += l.out_features
            count += 1
    return count
