"""The ARC method as pure functions (arXiv 2601.07475, section 2 of spec/arcquant.md).

Y = X W^T with X (M, K) and W (N, K). A plan holds
    perm (K,)  the column order of the main part (the paper: channels sorted by their
               calibration max |x|, ascending, so outliers come last)
    tail (s,)  the original channel of each augmented (residual) column
Augmented operands, depth K + s:
    X_aug = [Q1, Q2]   Q1 = Q(X[:, perm]);  Q2 = Q(X[:, tail] - dequant(Q1) at tail)
    W_aug = [Q(W[:, perm]), W_tail]
When tail == perm[K-s:] (the paper's layout) W_tail is the last s columns of Q(W[:, perm]):
identical codes and scales, so it is not stored twice. Otherwise (the "none" order: the
residual channels are picked without reordering the rest) W_tail = Q(W[:, tail]) is stored.
Q2 uses the same tensor scale as Q1: X_aug is one tensor of one GEMM.
"""
from dataclasses import dataclass, field

import torch

from .formats import BlockFormat
from .formats.e2m1 import check_finite

ORDERS = ("sorted", "blocks", "none")


# ---- calibration statistics -------------------------------------------------------------------
class ChannelStats:
    """Running statistics of one linear input over calibration tokens.

    absmax (K,): max_t |X[t, c]|;  outliers: sum_t #{c : |X[t,c]| > threshold * max_c |X[t,c]|};
    sqerr (K,): sum_t (X[t,c] - Qtok(X)[t,c])^2, the per-channel error of plain per-token
    NVFP4 quantization in the original order (used by the "blocks" order and the budget);
    sumsq (K,): sum_t X[t,c]^2;  xtx (K, K): sum_t x_t x_t^T when asked (GPTQ's Hessian).
    """

    def __init__(self, k: int, threshold: float, fmt: BlockFormat, hessian: bool = False):
        self.xtx = torch.zeros(k, k, dtype=torch.float64) if hessian else None   # (K, K) for GPTQ
        self.absmax = torch.zeros(k, dtype=torch.float32)
        self.sqerr = torch.zeros(k, dtype=torch.float64)
        self.sumsq = torch.zeros(k, dtype=torch.float64)
        self.outliers = 0
        self.tokens = 0
        self.threshold = threshold
        self.fmt = fmt

    def update(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(torch.float32)                # (T, K)
        if not torch.isfinite(x).all():
            raise FloatingPointError("NaN or Inf in calibration activations")
        a = x.abs()
        self.absmax = torch.maximum(self.absmax, a.amax(0).cpu())
        tok_max = a.amax(1, keepdim=True)                                # (T, 1)
        self.outliers += int((a > self.threshold * tok_max).sum())
        self.tokens += x.shape[0]
        xq = pad_k(x, self.fmt.block)
        gs = self.fmt.global_scale(xq.abs().amax(1, keepdim=True))
        dq = self.fmt.dequantize(*self.fmt.quantize(xq, gs), gs)[:, : x.shape[1]]
        self.sqerr += ((x - dq) ** 2).sum(0).double().cpu()
        self.sumsq += (x.double() ** 2).sum(0).cpu()
        if self.xtx is not None:
            xd = x.double()
            self.xtx += (xd.t() @ xd).cpu()


def pad_k(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pad the last axis to a multiple (exact for a matmul with zero-padded weights)."""
    extra = -x.shape[-1] % multiple
    return torch.nn.functional.pad(x, (0, extra)) if extra else x


def num_augmented(outliers: int, tokens: int, k: int, multiple: int) -> int:
    """s = ceil(K * ratio / multiple) * multiple, capped at K; ratio = outliers / (tokens K)."""
    if tokens <= 0:
        raise ValueError("no calibration tokens were seen; cannot choose s")
    # ceil((outliers / tokens) / multiple) in exact integer arithmetic
    return min(k, -(-outliers // (tokens * multiple)) * multiple)


def channel_errors(stats: ChannelStats, k_padded: int, weight_col_norm2: torch.Tensor,
                   weight_err2: torch.Tensor | None = None) -> torch.Tensor:
    """(K_padded,) output error a residual channel removes (diagonal approximation):
    sqerr_c |W_c|^2, the activation rounding error; with a weight residual (arc+wres) also
    sumsq_c |W_c - Q(W_c)|^2, the weight rounding error the residual weight removes."""
    err = pad_k(stats.sqerr, k_padded) * pad_k(weight_col_norm2.double(), k_padded)
    if weight_err2 is not None:
        err = err + pad_k(stats.sumsq, k_padded) * pad_k(weight_err2.double(), k_padded)
    return err


def block_gains(stats: ChannelStats, k_padded: int, order: str, block: int,
                weight_col_norm2: torch.Tensor, weight_err2: torch.Tensor | None = None) -> torch.Tensor:
    """(K/block,) estimated output-error reduction of each further residual block, descending,
    relative to the layer's output energy (sum_c x_c^2 |W_c|^2); channel_errors summed over
    whole original blocks for "blocks", over the best channels otherwise."""
    err = channel_errors(stats, k_padded, weight_col_norm2, weight_err2)
    energy = float((pad_k(stats.sumsq, k_padded) * pad_k(weight_col_norm2.double(), k_padded)).sum()) or 1.0
    if order == "blocks":
        gains = err.view(-1, block).sum(1)
    else:
        gains = torch.sort(err, descending=True).values.view(-1, block).sum(1)
    return torch.sort(gains, descending=True).values / energy


def allocate_budget(gains: list, widths: list, members: list, target_bits: float, base_bits: float,
                    block: int, columns: list | None = None) -> list[int]:
    """Greedy residual blocks across groups by gain per bit until the average bits
    (mean over layers of base_bits * (K + columns * s)/K) reach target_bits. -> s per group.
    columns: stored columns per tail channel of each group (1, or 2 for a weight-residual tail)."""
    n_layers = sum(members)
    allowance = n_layers * target_bits - sum(m * base_bits for m in members)    # extra bit-units
    cand = []
    for g, (gain, k, m) in enumerate(zip(gains, widths, members)):
        cost = m * base_bits * block / k * (columns[g] if columns else 1)
        cand += [(float(v) * m / cost, cost, g) for v in gain.tolist()]
    cand.sort(key=lambda c: -c[0])                 # per-group gains are descending: order kept
    s = [0] * len(gains)
    for value, cost, g in cand:
        if value <= 0 or cost > allowance + 1e-9:
            continue
        allowance -= cost
        s[g] += block
    return s


# ---- plans ----------------------------------------------------------------------------------------
@dataclass
class ArcPlan:
    perm: torch.Tensor   # (K,) int64
    tail: torch.Tensor   # (s,) int64
    _reuses: bool | None = field(default=None, repr=False, compare=False)   # tail_reuses_weight, once

    @property
    def k(self) -> int:
        return self.perm.numel()

    @property
    def s(self) -> int:
        return self.tail.numel()

    def tail_reuses_weight(self) -> bool:
        """True when the weight tail is the last s columns of Q(W[:, perm]) (stored once)."""
        if self._reuses is None:                                         # a host sync: checked once
            self._reuses = self.s == 0 or torch.equal(self.tail, self.perm[self.k - self.s:])
        return self._reuses

    def tail_positions(self) -> torch.Tensor:
        """(s,) position of each tail channel inside the permuted main part."""
        inv = torch.empty_like(self.perm)
        inv[self.perm] = torch.arange(self.k, device=self.perm.device)
        return inv[self.tail]

    @staticmethod
    def identity(k: int) -> "ArcPlan":
        return ArcPlan(torch.arange(k), torch.zeros(0, dtype=torch.long))


def make_plan(stats: ChannelStats, k_padded: int, s: int, order: str, block: int,
              weight_col_norm2: torch.Tensor | None = None, weight_err2: torch.Tensor | None = None) -> ArcPlan:
    """Build the plan for one group of layers sharing an input (K padded to the block);
    weight_err2 (arc+wres): the blocks order also ranks by the weight error the residual removes."""
    absmax = pad_k(stats.absmax, k_padded)                               # padding: stat 0
    if s % block or s > k_padded:
        raise ValueError(f"s={s} must be a multiple of the block {block} and at most K={k_padded}")
    if order == "sorted":                                                # the paper
        perm = torch.sort(absmax, stable=True).indices
        return ArcPlan(perm, perm[k_padded - s:].clone())
    if order == "none":                                                  # TRT-LLM "with residual"
        top = torch.sort(absmax, stable=True).indices[k_padded - s:]
        return ArcPlan(torch.arange(k_padded), top.clone())
    if order == "blocks":                                                # ours: keep 16-blocks intact
        if weight_col_norm2 is not None:
            err = channel_errors(stats, k_padded, weight_col_norm2, weight_err2)
        else:
            err = pad_k(stats.sqerr, k_padded)
        score = err.view(-1, block).sum(1)                               # (K/block,)
        border = torch.sort(score, stable=True).indices                  # worst blocks last
        perm = (border[:, None] * block + torch.arange(block)).flatten()
        return ArcPlan(perm, perm[k_padded - s:].clone())
    raise ValueError(f"unknown order {order!r}; valid orders: {', '.join(ORDERS)}")


# ---- augmented operands ---------------------------------------------------------------------------
@dataclass
class QuantizedWeight:
    codes: torch.Tensor                 # (N, K) uint8 codes of W[:, perm]
    scales: torch.Tensor                # (N, K/B)
    tail_codes: torch.Tensor | None     # (N, s) only when the tail is not reused
    tail_scales: torch.Tensor | None    # (N, s/B)


def quantize_weight(w: torch.Tensor, plan: ArcPlan, fmt: BlockFormat, gs) -> QuantizedWeight:
    """w (N, K) padded -> quantized main part in plan order, plus a stored tail if needed."""
    check_finite(w, "the weights")
    codes, scales = fmt.quantize(w[:, plan.perm], gs)
    if plan.tail_reuses_weight():
        return QuantizedWeight(codes, scales, None, None)
    tc, ts = fmt.quantize(w[:, plan.tail], gs)
    return QuantizedWeight(codes, scales, tc, ts)


def augmented_weight(qw: QuantizedWeight, plan: ArcPlan, block: int):
    """-> codes (N, K+s), scales (N, (K+s)/B): the weight operand of the one GEMM."""
    if qw.tail_codes is not None:
        return (torch.cat([qw.codes, qw.tail_codes], 1), torch.cat([qw.scales, qw.tail_scales], 1))
    k, s = plan.k, plan.s
    return (torch.cat([qw.codes, qw.codes[:, k - s:]], 1),
            torch.cat([qw.scales, qw.scales[:, (k - s) // block:]], 1))


def weight_residual(w: torch.Tensor, qw: QuantizedWeight, plan: ArcPlan, fmt: BlockFormat, gs):
    """arc+wres: the rounding error of the tail's weights, quantized in the same format and
    tensor scale: R_W = Q(W[:, tail] - dequant(Q(W)_tail)) -> (codes (N, s), scales (N, s/B)).
    With it the product is one GEMM of depth K + 2s:
        X_aug = [Q1 (K) | Q2 (s) | Q1_tail (s)]   W_aug = [Q(W) (K) | Q(W)_tail (s) | R_W (s)]
    i.e. Q1_tail meets an ~8-bit weight (Q(W)_tail + R_W), Q2 the 4-bit one."""
    if not plan.tail_reuses_weight():
        raise ValueError("a weight residual needs a tail that reuses the main part (order blocks or sorted)")
    k, s, b = plan.k, plan.s, fmt.block
    w_tail_q = fmt.dequantize(qw.codes[:, k - s:], qw.scales[:, (k - s) // b:], gs)    # (N, s)
    return fmt.quantize(w[:, plan.tail].float() - w_tail_q, gs)


def quantize_activation(x: torch.Tensor, plan: ArcPlan, fmt: BlockFormat, gs, check: bool = True):
    """x (M, K) padded -> (codes (M, K+s), scales (M, (K+s)/B)) of X_aug = [Q1, Q2].
    check=False: the caller checks x for NaN / Inf (qlinear.FINITE, without a host sync)."""
    if check:
        check_finite(x, "the activations")
    xp = x[:, plan.perm]                                                 # (M, K)
    c1, s1 = fmt.quantize(xp, gs)
    if plan.s == 0:
        return c1, s1
    k, s, b = plan.k, plan.s, fmt.block
    if plan.tail_reuses_weight():                                        # tail = last s columns
        d1 = fmt.dequantize(c1[:, k - s:], s1[:, (k - s) // b:], gs)     # (M, s)
    else:
        d1 = fmt.dequantize(c1, s1, gs)[:, plan.tail_positions()]        # (M, s)
    r = x[:, plan.tail].to(torch.float32) - d1                           # residual vs rounded scale
    c2, s2 = fmt.quantize(r, gs)
    return torch.cat([c1, c2], 1), torch.cat([s1, s2], 1)


def augmented_matmul(x_aug: torch.Tensor, w_aug: torch.Tensor) -> torch.Tensor:
    """The single GEMM of depth K+s on dequantized operands: (M, K+s) x (N, K+s)^T."""
    return x_aug @ w_aug.t()
