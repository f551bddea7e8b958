"""Rotary position embedding fused with the static KV-cache write (Triton), and its oracle.

One attention layer of a Llama-style model (rotate-half rotary, as transformers'
apply_rotary_pos_emb; cos / sin given per token) does in eager mode ~15 small kernels per
step: four products, two negations, two concatenations and two sums for the rotary, then
the cache's position arithmetic and two index copies. This kernel does it in one: it rotates
the query and key heads, writes the rotated keys and the values into the static cache at
positions start + t, and lays the rotated queries out as the eager ops do.

Layout
    q        (B, T, HQ*D)    bf16 / fp16 / fp32; last dim contiguous, rows may be strided
    k, v     (B, T, HKV*D)   (views of one stacked q/k/v projection are fine)
    cos, sin (B, T, D)       the model's rotary tables for these tokens, same dtype
    kc, vc   (B, HKV, L, D)  the static cache, contiguous
    start    (1,) int64      first position (a device tensor: no host sync, graph-capturable)
    -> qo    (B, HQ, T, D)   a transposed view of (B, T, HQ, D) storage, like the eager result

Bit-exact with rope_cache_reference for bf16, fp16 and fp32: each product and the sum are
rounded to the dtype, as torch's elementwise ops do, and the kernel is compiled without FMA
contraction (enable_fp_fusion=False: with it, the GPU build narrows the fp16 roundings to half
products and fuses one into the sum - 1 ulp off on the H200, results/engine-fusion-v1-h200.json).
Positions at or past L are not written (the caller checks the prompt fits).
"""
import torch
import triton
import triton.language as tl

from .fp4_jit import round_to
from .pdl import pdl_enter, triton_args

DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@triton.jit
def _rotate_store(src, dst, c_lo, c_hi, s_lo, s_hi, i, m, HALF: tl.constexpr):
    """dst[:HALF] = x1*c_lo - x2*s_lo, dst[HALF:] = x2*c_hi + x1*s_hi, each term rounded to dst's dtype."""
    dt: tl.constexpr = dst.dtype.element_ty
    x1 = tl.load(src + i, mask=m).to(tl.float32)
    x2 = tl.load(src + HALF + i, mask=m).to(tl.float32)
    lo = round_to(round_to(x1 * c_lo, dt) + round_to(-x2 * s_lo, dt), dt)
    hi = round_to(round_to(x2 * c_hi, dt) + round_to(x1 * s_hi, dt), dt)
    tl.store(dst + i, lo.to(dt), mask=m)
    tl.store(dst + HALF + i, hi.to(dt), mask=m)


@triton.jit
def _rope_cache_kernel(q, k, v, cos, sin, qo, kc, vc, start,
                       T, HQ, HKV, L, sq_b, sq_t, sk_b, sk_t, sv_b, sv_t, sc_b, sc_t,
                       HALF: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
    pdl_enter(PDL)                                                # kernels/pdl.py
    bt = tl.program_id(0)                              # token: b * T + t
    h = tl.program_id(1)                               # head: < HQ a query head, else key/value head h - HQ
    b = bt // T
    t = bt % T
    i = tl.arange(0, BLOCK)                            # (BLOCK,) over one half of the head
    m = i < HALF
    tab = b * sc_b + t * sc_t
    c_lo = tl.load(cos + tab + i, mask=m).to(tl.float32)
    c_hi = tl.load(cos + tab + HALF + i, mask=m).to(tl.float32)
    s_lo = tl.load(sin + tab + i, mask=m).to(tl.float32)
    s_hi = tl.load(sin + tab + HALF + i, mask=m).to(tl.float32)
    if h < HQ:
        _rotate_store(q + b * sq_b + t * sq_t + h * 2 * HALF, qo + (bt * HQ + h) * 2 * HALF,
                      c_lo, c_hi, s_lo, s_hi, i, m, HALF)
    else:
        j = h - HQ
        pos = tl.load(start) + t
        ok = pos < L
        row = ((b * HKV + j) * L + pos) * 2 * HALF
        _rotate_store(k + b * sk_b + t * sk_t + j * 2 * HALF, kc + row, c_lo, c_hi, s_lo, s_hi, i, m & ok, HALF)
        vs = v + b * sv_b + t * sv_t + j * 2 * HALF
        tl.store(vc + row + i, tl.load(vs + i, mask=m), mask=m & ok)
        tl.store(vc + row + HALF + i, tl.load(vs + HALF + i, mask=m), mask=m & ok)


def _check(q, k, v, cos, sin, kc, vc, start) -> tuple:
    """-> (B, T, HQ, HKV, L, D); clear errors for anything the kernel cannot take."""
    if q.dtype not in DTYPES:
        raise ValueError(f"rope_cache: q is {q.dtype}; expected one of {DTYPES}")
    for name, t in (("k", k), ("v", v), ("cos", cos), ("sin", sin), ("k_cache", kc), ("v_cache", vc)):
        if t.dtype != q.dtype or t.device != q.device:
            raise ValueError(f"rope_cache: {name} is {t.dtype} on {t.device}; expected {q.dtype} on {q.device} like q")
    if q.dim() != 3 or k.shape != v.shape or k.dim() != 3 or q.shape[:2] != k.shape[:2]:
        raise ValueError(f"rope_cache: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}; expected "
                         "(B, T, HQ*D) and two (B, T, HKV*D)")
    b, t = q.shape[:2]
    d = cos.shape[-1]
    if cos.shape != (b, t, d) or sin.shape != cos.shape or d % 2:
        raise ValueError(f"rope_cache: cos {tuple(cos.shape)}, sin {tuple(sin.shape)}; expected ({b}, {t}, D), D even")
    if q.shape[2] % d or k.shape[2] % d:
        raise ValueError(f"rope_cache: head size {d} does not divide q's {q.shape[2]} or k's {k.shape[2]} columns")
    hkv = k.shape[2] // d
    if kc.dim() != 4 or kc.shape[0] != b or kc.shape[1] != hkv or kc.shape[3] != d or vc.shape != kc.shape:
        raise ValueError(f"rope_cache: caches {tuple(kc.shape)} / {tuple(vc.shape)}; expected ({b}, {hkv}, L, {d})")
    if not (kc.is_contiguous() and vc.is_contiguous()):
        raise ValueError("rope_cache: the caches must be contiguous")
    for name, x in (("q", q), ("k", k), ("v", v), ("cos", cos), ("sin", sin)):
        if x.stride(2) != 1:
            raise ValueError(f"rope_cache: {name}'s last dimension must be contiguous (stride {x.stride(2)})")
    if start.numel() != 1 or start.dtype != torch.int64 or start.device != q.device:
        raise ValueError(f"rope_cache: start must be one int64 on {q.device}, got {start.dtype} "
                         f"{tuple(start.shape)} on {start.device}")
    return b, t, q.shape[2] // d, hkv, kc.shape[2], d


def rope_cache(q, k, v, cos, sin, k_cache, v_cache, start) -> torch.Tensor:
    """Rotate q and k, write k and v into the caches at start + t; -> rotated q (B, HQ, T, D)."""
    b, t, hq, hkv, L, d = _check(q, k, v, cos, sin, k_cache, v_cache, start)
    qo = torch.empty(b, t, hq, d, dtype=q.dtype, device=q.device)   # the eager layout: (B, T, HQ, D) storage
    _rope_cache_kernel[(b * t, hq + hkv)](
        q, k, v, cos, sin, qo, k_cache, v_cache, start, t, hq, hkv, L,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos.stride(0), cos.stride(1),
        HALF=d // 2, BLOCK=triton.next_power_of_2(d // 2), enable_fp_fusion=False, **triton_args(q.device, b * t))
    return qo.transpose(1, 2)


def rope_cache_reference(q, k, v, cos, sin, k_cache, v_cache, start) -> torch.Tensor:
    """The oracle: rotate-half rotary in torch ops and index copies into the caches."""
    b, t, hq, hkv, L, d = _check(q, k, v, cos, sin, k_cache, v_cache, start)
    heads = lambda x: x.reshape(b, t, -1, d).transpose(1, 2)          # (B, H, T, D)
    rot = lambda x: torch.cat((-x[..., d // 2:], x[..., :d // 2]), -1)
    c, s = cos[:, None], sin[:, None]                                  # (B, 1, T, D)
    qh, kh = heads(q), heads(k)
    qo, ko = qh * c + rot(qh) * s, kh * c + rot(kh) * s
    pos = start + torch.arange(t, device=q.device)
    keep = pos < L
    k_cache.index_copy_(2, pos[keep], ko[:, :, keep])
    v_cache.index_copy_(2, pos[keep], heads(v)[:, :, keep])
    return qo
