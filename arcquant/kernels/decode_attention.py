"""Attention of a few new tokens over a static KV cache (Triton), grouped-query, and its oracle.

The eager model's SDPA call on a static cache with a boolean mask first repeats every key /
value head for its query heads (transformers' repeat_kv: two copies of the whole cache per
layer and step - at batch 8 of the Llama-3.1-8B shape two ~12 us kernels a layer, more than the
attention itself), then runs a general attention kernel. Here one program takes one key/value
head, one token and all its query heads, and streams the cache once (split over the keys,
flash-decoding style, when there are few such programs and many keys: splits(); a second
kernel then combines the partial softmaxes):

    q     (B, HQ, T, D)   bf16 / fp16, last dim contiguous (the rotary kernel's transposed view)
    k, v  (B, HKV, L, D)  the static cache, contiguous; HQ = G * HKV
    mask  bool, broadcastable to (B, 1, T, L): True where a key is attended (the engine's causal
                          mask, or any other, e.g. left padding)
    nvalid (1,) int64     keys written so far: keys at or past it are never read (a long static
                          cache early in generation costs only its written part)
    -> o  (B, T, HQ, D)   softmax(q k^T * scale, masked) v, in the layout the model reshapes

Online softmax in fp32 over blocks of BN keys; the probabilities go to the tensor cores in the
cache's dtype, as flash attention does, so the result matches the fp32 oracle to about the
dtype's rounding (not bit for bit). For T <= MAX_T new tokens (decode); prefill keeps SDPA.
"""
import os

import torch
import triton
import triton.language as tl

from .pdl import pdl_enter, triton_args

MAX_T, BN = 16, 64
TARGET_PROGRAMS = 264                     # ~2 per SM of an H100 / H200 (132 SMs)
NUM_WARPS, MIN_SPLIT_BLOCKS = 4, 1        # results/decode-attention-tune-h200.json (H200): BN 64, 4 warps, 1
DTYPES = (torch.bfloat16, torch.float16)


@triton.jit
def _decode_attention_kernel(q, k, v, mask, nvalid, o, wacc, wml, scale, T, HQ, HKV, L, G,
                             sq_b, sq_h, sq_t, sm_b, sm_t,
                             D: tl.constexpr, GP: tl.constexpr, BN: tl.constexpr, PER: tl.constexpr,
                             SPLIT: tl.constexpr, F32: tl.constexpr, PDL: tl.constexpr = False):
    pdl_enter(PDL)                                                # kernels/pdl.py
    bj = tl.program_id(0)                                  # b * HKV + key/value head j
    t = tl.program_id(1)                                   # new token
    sp = tl.program_id(2)                                  # key split: blocks sp*PER .. sp*PER + PER - 1
    b = bj // HKV
    g = tl.arange(0, GP)                                   # (GP,) query heads j*G + g, rows >= G padding
    d = tl.arange(0, D)
    h = (bj % HKV) * G + g
    qb = tl.load(q + b * sq_b + h[:, None] * sq_h + t * sq_t + d[None, :], mask=(g < G)[:, None], other=0.0)
    if F32:                                                # the interpreter's bf16 tl.dot is wrong
        qb = qb.to(tl.float32)
    nv = tl.minimum(tl.load(nvalid), L)                    # keys written
    nb = tl.cdiv(nv, BN)
    m_i = tl.full((GP,), float("-inf"), tl.float32)
    l_i = tl.zeros((GP,), tl.float32)
    acc = tl.zeros((GP, D), tl.float32)
    kv = bj * L * D
    for i in range(PER):
        blk = sp * PER + i
        if blk < nb:
            n = blk * BN + tl.arange(0, BN)                # (BN,) keys
            ok = (tl.load(mask + b * sm_b + t * sm_t + n, mask=n < nv, other=0) != 0) & (n < nv)
            kb = tl.load(k + kv + n[:, None] * D + d[None, :], mask=ok[:, None], other=0.0)   # (BN, D)
            vb = tl.load(v + kv + n[:, None] * D + d[None, :], mask=ok[:, None], other=0.0)   # (BN, D)
            if F32:
                kb = kb.to(tl.float32)
            s = tl.where(ok[None, :], tl.dot(qb, tl.trans(kb)) * scale, float("-inf"))      # (GP, BN)
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)   # a block with no attended key: p = 0
            alpha = tl.exp(m_i - m_use)
            p = tl.exp(s - m_use[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            if F32:
                pv = tl.dot(p.to(vb.dtype).to(tl.float32), vb.to(tl.float32))
            else:
                pv = tl.dot(p.to(vb.dtype), vb)
            acc = acc * alpha[:, None] + pv
            m_i = m_new
    row = (b * T + t) * HQ + h                             # (GP,) output rows
    if SPLIT:                                              # partial results, combined by the kernel below
        part = sp * (tl.num_programs(0) // HKV) * T * HQ + row
        tl.store(wacc + part[:, None] * D + d[None, :], acc, mask=(g < G)[:, None])
        tl.store(wml + 2 * part, m_i, mask=g < G)
        tl.store(wml + 2 * part + 1, l_i, mask=g < G)
    else:
        tl.store(o + row[:, None] * D + d[None, :], (acc / l_i[:, None]).to(o.dtype.element_ty), mask=(g < G)[:, None])


@triton.jit
def _combine_kernel(wacc, wml, o, R, S, D: tl.constexpr, SP: tl.constexpr, PDL: tl.constexpr = False):
    pdl_enter(PDL)                                                # kernels/pdl.py
    r = tl.program_id(0)                                   # output row (b, t, query head)
    sidx = tl.arange(0, SP)
    d = tl.arange(0, D)
    m = tl.load(wml + 2 * (sidx * R + r), mask=sidx < S, other=float("-inf"))             # (SP,)
    l = tl.load(wml + 2 * (sidx * R + r) + 1, mask=sidx < S, other=0.0)
    mx = tl.max(m, axis=0)
    w = tl.where(m == float("-inf"), 0.0, tl.exp(m - mx))
    acc = tl.load(wacc + (sidx[:, None] * R + r) * D + d[None, :], mask=(sidx < S)[:, None], other=0.0)  # (SP, D)
    out = tl.sum(acc * w[:, None], axis=0) / tl.sum(l * w, axis=0)
    tl.store(o + r * D + d, out.to(o.dtype.element_ty))


def decode_attention_reason(q, k, v, mask) -> str | None:
    """Why the kernel cannot take this call (None: it can)."""
    if q.dtype not in DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"q / k / v {q.dtype} / {k.dtype} / {v.dtype} (the kernel: one of {DTYPES})"
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        return f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} (expected (B, HQ, T, D), (B, HKV, L, D))"
    b, hq, t, d = q.shape
    if t > MAX_T or hq % k.shape[1] or d & (d - 1) or not 16 <= d <= 256:
        return f"{t} tokens, {hq} query / {k.shape[1]} key heads of {d} (at most {MAX_T} tokens, a power-of-two head)"
    if q.stride(3) != 1 or not (k.is_contiguous() and v.is_contiguous()):
        return "a strided head dimension or a non-contiguous cache"
    if mask is None or mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1] != 1 or \
            mask.shape[0] not in (1, b) or mask.shape[2] not in (1, t) or mask.shape[3] != k.shape[2]:
        return f"mask {None if mask is None else (mask.dtype, tuple(mask.shape))} (the kernel: bool (B, 1, T, L))"
    return None


def splits(programs: int, L: int) -> int:
    """Key splits for a call with `programs` (batch x key/value heads x tokens) programs over a
    cache of L: enough to give the card ~2 programs per SM, at least MIN_SPLIT_BLOCKS blocks of
    keys each; 1 (one kernel, no combine) for caches of fewer than 2 blocks."""
    s = 1
    while programs * s < TARGET_PROGRAMS and L >= (2 * s) * MIN_SPLIT_BLOCKS * BN:
        s *= 2
    return s


def decode_attention(q, k, v, mask, scale: float, nvalid=None) -> torch.Tensor:
    """-> (B, T, HQ, D): the attention of q's T tokens over the cache where mask is True. nvalid:
    a one-element int64 device tensor, the number of keys written (keys at or past it are never
    read: the static cache's cumulative_length); None: all L."""
    reason = decode_attention_reason(q, k, v, mask)
    if reason is not None:
        raise ValueError(f"decode_attention: {reason}")
    b, hq, t, d = q.shape
    hkv, L = k.shape[1], k.shape[2]
    if nvalid is None:
        nvalid = torch.full((1,), L, dtype=torch.int64, device=q.device)
    m = mask.expand(b, 1, t, L).view(torch.uint8)                     # strides 0 where broadcast
    o = torch.empty(b, t, hq, d, dtype=q.dtype, device=q.device)
    g, s = hq // hkv, splits(b * hkv * t, L)
    wacc = torch.empty(s, b * t * hq, d, dtype=torch.float32, device=q.device) if s > 1 else o
    wml = torch.empty(s, b * t * hq, 2, dtype=torch.float32, device=q.device) if s > 1 else o
    _decode_attention_kernel[(b * hkv, t, s)](
        q, k, v, m, nvalid, o, wacc, wml, float(scale), t, hq, hkv, L, g,
        q.stride(0), q.stride(1), q.stride(2), m.stride(0), m.stride(2),
        D=d, GP=max(16, triton.next_power_of_2(g)), BN=BN, PER=triton.cdiv(triton.cdiv(L, BN), s), SPLIT=s > 1,
        F32=os.environ.get("TRITON_INTERPRET") == "1", num_warps=NUM_WARPS, **triton_args(q.device, b * t))
    if s > 1:
        _combine_kernel[(b * t * hq,)](wacc, wml, o, b * t * hq, s, D=d, SP=triton.next_power_of_2(s),
                                       **triton_args(q.device, b * t))
    return o


def decode_attention_reference(q, k, v, mask, scale: float) -> torch.Tensor:
    """The oracle in float32: repeat the key/value heads, softmax over the attended keys."""
    g = q.shape[1] // k.shape[1]
    kk, vv = k.float().repeat_interleave(g, 1), v.float().repeat_interleave(g, 1)   # (B, HQ, L, D)
    s = (q.float() @ kk.transpose(2, 3)) * scale                        # (B, HQ, T, L)
    s = s.masked_fill(~mask, float("-inf"))
    return (s.softmax(-1) @ vv).transpose(1, 2).to(q.dtype)           # (B, T, HQ, D)
