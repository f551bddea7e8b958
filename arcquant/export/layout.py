"""Tensor layouts of the engines, as pure functions of one quantized layer.

Ours (arcquant checkpoint): codes (N, K) of W[:, perm] and the residual tail = the last s
columns (stored once). The augmented operand has columns [main K | residual s].

TensorRT-LLM NVFP4_ARC (its op fp4_quantize_with_reorder_residual): depth K+s columns laid
out [the first K-s main columns | (outlier block i, residual block i) for i < s/16], blocks
of 16; for the weight each residual block is a copy of its outlier block.

Plain NVFP4 (compressed-tensors, ModelOpt NVFP4): codes (N, K) in the original column
order, no residual. Exact for an ARC layer whose permutation moves whole 16-blocks (the
`blocks` order, and rtn); otherwise the dequantized weight is re-quantized.
"""
import torch

from ..arc import ArcPlan
from ..formats import nvfp4

BLOCK = nvfp4.BLOCK


def trt_arc_columns(k: int, s: int, block: int = BLOCK) -> torch.Tensor:
    """(K+s,) index: trt_operand = ours[:, idx] for ours = [main K | residual s]."""
    if k % block or s % block or s > k:
        raise ValueError(f"K={k} and s={s} must be multiples of {block} with s <= K")
    head = torch.arange(k - s)
    main = torch.arange(k - s, k).view(-1, block)                    # (s/B, B) outlier blocks
    res = torch.arange(k, k + s).view(-1, block)                     # (s/B, B) residual blocks
    return torch.cat([head, torch.stack([main, res], 1).flatten()])


def trt_arc_blocks(k: int, s: int, block: int = BLOCK) -> torch.Tensor:
    """((K+s)/B,) the same reordering at block-scale granularity."""
    return trt_arc_columns(k // block, s // block, 1)


def to_trt_arc(codes: torch.Tensor, scales: torch.Tensor, s: int):
    """Ours codes (N, K), scales (N, K/B), reused tail -> TRT-LLM (N, K+s), (N, (K+s)/B)."""
    k = codes.shape[1]
    aug_c = torch.cat([codes, codes[:, k - s:]], 1)                  # [main | residual] (N, K+s)
    aug_s = torch.cat([scales, scales[:, (k - s) // BLOCK:]], 1)
    return aug_c[:, trt_arc_columns(k, s)], aug_s[:, trt_arc_blocks(k, s)]


def from_trt_arc(codes: torch.Tensor, scales: torch.Tensor, k: int, name: str = "layer"):
    """TRT-LLM (N, K+s), (N, (K+s)/B) -> ours (N, K), (N, K/B); checks the duplicated blocks."""
    s = codes.shape[1] - k
    cols, blocks = trt_arc_columns(k, s), trt_arc_blocks(k, s)
    ours_c = torch.empty_like(codes)
    ours_c[:, cols] = codes
    ours_s = torch.empty_like(scales)
    ours_s[:, blocks] = scales
    c, sc = ours_c[:, :k], ours_s[:, : k // BLOCK]
    if not (torch.equal(ours_c[:, k:], c[:, k - s:]) and
            torch.equal(ours_s[:, k // BLOCK:].view(torch.uint8), sc[:, (k - s) // BLOCK:].view(torch.uint8))):
        raise ValueError(f"{name}: the residual weight blocks are not copies of their outlier blocks; "
                         "this is not an NVFP4_ARC weight")
    return c, sc


def moves_whole_blocks(perm: torch.Tensor, block: int = BLOCK) -> bool:
    """True when perm permutes aligned blocks and keeps the order inside each block."""
    p = perm.view(-1, block)
    return bool(((p[:, :1] % block) == 0).all() and (p - p[:, :1] == torch.arange(block)).all())


def plain_nvfp4(codes: torch.Tensor, scales: torch.Tensor, plan: ArcPlan, gs: torch.Tensor):
    """Ours (N, K) in plan order -> (codes, scales, exact) in the original column order.

    exact: the codes and block scales are the layer's own (whole blocks were moved);
    otherwise the dequantized weight is re-quantized with the same tensor scale.
    """
    inv = torch.argsort(plan.perm)
    if moves_whole_blocks(plan.perm):
        binv = torch.argsort(plan.perm.view(-1, BLOCK)[:, 0] // BLOCK)
        return codes[:, inv], scales[:, binv], True
    w = nvfp4.dequantize(codes, scales, gs)[:, inv]                  # (N, K) original order
    c, sc = nvfp4.quantize(w, gs)
    return c, sc, False


def reciprocal_scale(gs: torch.Tensor) -> torch.Tensor:
    """The ModelOpt scale 1/gs as float32, chosen among the neighbours of fl(1/gs) so that
    fl(1/result) == gs whenever such a float32 exists (a lossless round trip)."""
    gs = gs.reshape(()).to(torch.float32)
    r = torch.ones((), dtype=torch.float32) / gs
    for cand in (r, torch.nextafter(r, torch.tensor(0.0)), torch.nextafter(r, torch.tensor(float("inf")))):
        if torch.equal(torch.ones((), dtype=torch.float32) / cand, gs):
            return cand
    return r
