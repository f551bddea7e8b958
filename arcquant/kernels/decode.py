"""Decode-shaped ARC product (M <= 16): the dequantized weight is the register operand.

    y (M, N) = (xd (M, K+s) @ dequant(W_aug)^T) / (xgs * wgs) (+ bias)

xd holds the augmented activation already multiplied out as code * block scale (no tensor
scale): exact in fp16 (E2M1 x E4M3 has at most 6 significant bits and lies in
[2^-10, 2688]). It is tiny (M x (K+s)) and stays in L1/L2; the kernel streams the packed
weight once: 16-byte rows of codes, one scale byte per 16 codes, decoded in registers,
then tensor-core dots acc (BN, 16) += W_tile (BN, BK/2) @ x_tile (BK/2, 16) over the even
and the odd columns (low and high nibbles, no interleave shuffle). The weight tail (columns
K..K+s-1) is read from columns K-s..K-1 (stored once). split_k programs share the depth
and add fp32 partial sums atomically.
"""
import torch
import triton
import triton.language as tl

from .fp4_jit import e4m3_decode, tail_to_main

MP = 16     # M padded to the smallest tensor-core tile


@triton.jit
def _e2m1_fp32(code):
    """4-bit E2M1 codes -> fp32 by bit arithmetic: the 3 magnitude bits placed as fp16
    exponent/mantissa give value * 2^-14 (subnormal 0.5 included); the sign is bit 3."""
    bits = ((code & 8).to(tl.int16) << 12) | ((code & 7).to(tl.int16) << 9)
    return bits.to(tl.float16, bitcast=True).to(tl.float32) * 16384.0


@triton.jit
def _e2m1_fp32_scaled(code):
    """As _e2m1_fp32 without the final multiply: value * 2^-14 (exact; the caller rescales)."""
    bits = ((code & 8).to(tl.int16) << 12) | ((code & 7).to(tl.int16) << 9)
    return bits.to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _load_weight_tile(wc_ptr, ws_ptr, rn, n_ok, tile, K, S, stride_wc, stride_ws, BK: tl.constexpr):
    """Depth tile `tile` of rows rn -> (code pairs (BK/2,), their validity, code bytes
    (BN, BK/2) u8, scale bits (BN, BK/16) u8); the tail reads the main columns."""
    pair = tile * (BK // 2) + tl.arange(0, BK // 2)
    ok = pair * 2 < K + S
    blk = tile * (BK // 16) + tl.arange(0, BK // 16)
    b = tl.load(wc_ptr + rn[:, None] * stride_wc + tail_to_main(pair, 2, K, S)[None, :],
                mask=n_ok[:, None] & ok[None, :], other=0)
    sb = tl.load(ws_ptr + rn[:, None] * stride_ws + tail_to_main(blk, 16, K, S)[None, :],
                 mask=n_ok[:, None] & (blk * 16 < K + S)[None, :], other=0)
    return pair, ok, b, sb


@triton.jit
def _arc_gemv_kernel(
    xd_ptr, xgs_ptr, wc_ptr, ws_ptr, wgs_ptr, bias_ptr, y_ptr,
    M, N, K, S,
    stride_x, stride_wc, stride_ws, stride_y,
    XGS_PER_ROW: tl.constexpr, HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr,
    TILES_PER_SPLIT: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    rn = tl.program_id(0) * BN + tl.arange(0, BN)
    n_ok = rn < N
    rm = tl.arange(0, 16)
    m_ok = rm < M
    acc = tl.zeros((BN, 16), dtype=tl.float32)
    t0 = tl.program_id(1) * TILES_PER_SPLIT
    for t in range(TILES_PER_SPLIT):
        pair, ok, b, sb = _load_weight_tile(wc_ptr, ws_ptr, rn, n_ok, t0 + t, K, S, stride_wc, stride_ws, BK)
        sc = tl.reshape(tl.broadcast_to(e4m3_decode(sb)[:, :, None], (BN, BK // 16, 8)), (BN, BK // 2))
        we = (_e2m1_fp32(b & 0xF) * sc).to(tl.float16)                  # (BN, BK/2) even columns
        wo = (_e2m1_fp32(b >> 4) * sc).to(tl.float16)                   # odd columns
        xmask = ok[:, None] & m_ok[None, :]
        xe = tl.load(xd_ptr + rm[None, :] * stride_x + 2 * pair[:, None], mask=xmask, other=0.0)
        xo = tl.load(xd_ptr + rm[None, :] * stride_x + 2 * pair[:, None] + 1, mask=xmask, other=0.0)
        acc += tl.dot(we, xe.to(tl.float16))
        acc += tl.dot(wo, xo.to(tl.float16))
    xgs = tl.load(xgs_ptr + rm, mask=m_ok, other=1.0) if XGS_PER_ROW else tl.load(xgs_ptr)
    wgs = tl.load(wgs_ptr)
    y = acc / (xgs[None, :] * wgs) if XGS_PER_ROW else acc / (xgs * wgs)     # (BN, 16)
    if HAS_BIAS:
        if tl.program_id(1) == 0:
            y += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[:, None]
    out = y_ptr + rm[None, :] * stride_y + rn[:, None]
    mask = n_ok[:, None] & m_ok[None, :]
    if ATOMIC:
        tl.atomic_add(out, y, mask=mask)
    else:
        tl.store(out, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _arc_gemv_fma_kernel(
    xd_ptr, xgs_ptr, wc_ptr, ws_ptr, wgs_ptr, bias_ptr, y_ptr,
    M, N, K, S,
    stride_x, stride_wc, stride_ws, stride_y,
    XGS_PER_ROW: tl.constexpr, HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr,
    TILES_PER_SPLIT: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, MB: tl.constexpr,
):
    """CUDA-core variant for very small M: per 16-block, sum_j code_j * x_j first, then one
    multiply by the block scale; no tensor-core layout shuffles."""
    rn = tl.program_id(0) * BN + tl.arange(0, BN)
    n_ok = rn < N
    cols = tl.arange(0, MB)
    acc = tl.zeros((BN, MB), dtype=tl.float32)
    t0 = tl.program_id(1) * TILES_PER_SPLIT
    for t in range(TILES_PER_SPLIT):
        pair, ok, b, sb = _load_weight_tile(wc_ptr, ws_ptr, rn, n_ok, t0 + t, K, S, stride_wc, stride_ws, BK)
        sc = e4m3_decode(sb)                                          # (BN, BK/16)
        lo = _e2m1_fp32_scaled(b & 0xF)                               # (BN, BK/2) even columns, x 2^-14
        hi = _e2m1_fp32_scaled(b >> 4)
        for m in tl.static_range(MB):
            two = tl.load(xd_ptr + m * stride_x + 2 * pair[:, None] + tl.arange(0, 2)[None, :],
                          mask=ok[:, None] & (m < M), other=0.0).to(tl.float32)             # (BK/2, 2)
            xe, xo = tl.split(two)
            p = lo * xe[None, :] + hi * xo[None, :]                   # (BN, BK/2)
            pb = tl.sum(tl.reshape(p, (BN, BK // 16, 8)), axis=2)     # per 16-block
            acc += tl.where(cols[None, :] == m, tl.sum(pb * sc, axis=1)[:, None], 0.0)
    m_ok = cols < M
    acc = acc * 16384.0                                               # undo the 2^-14 of the decode (exact)
    xgs = tl.load(xgs_ptr + cols, mask=m_ok, other=1.0) if XGS_PER_ROW else tl.load(xgs_ptr)
    wgs = tl.load(wgs_ptr)
    y = acc / (xgs[None, :] * wgs) if XGS_PER_ROW else acc / (xgs * wgs)
    if HAS_BIAS:
        if tl.program_id(1) == 0:
            y += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[:, None]
    out = y_ptr + cols[None, :] * stride_y + rn[:, None]
    mask = n_ok[:, None] & m_ok[None, :]
    if ATOMIC:
        tl.atomic_add(out, y, mask=mask)
    else:
        tl.store(out, y.to(y_ptr.dtype.element_ty), mask=mask)


def arc_gemv(xd, xgs, wc, ws, wgs, s: int, bias=None, out_dtype=torch.bfloat16,
             block_n: int = 64, block_k: int = 256, split_k: int = 4, num_warps: int = 4, num_stages: int = 3,
             fma: bool = False):
    """xd (M <= 16, K+s) fp16/bf16 (code * block scale), wc (N, K/2) u8, ws (N, K/16) e4m3.
    fma=True: the CUDA-core variant (rows of M handled one by one; for M of 1 to 4)."""
    m, n, k = xd.shape[0], wc.shape[0], wc.shape[1] * 2
    if m > MP:
        raise ValueError(f"arc_gemv handles M <= {MP} rows, got M={m}; use the prefill path")
    if xd.shape[1] != k + s or not xd.is_contiguous():
        raise ValueError(f"xd must be contiguous ({m}, {k + s}) for K={k}, s={s}; got {tuple(xd.shape)}")
    if ws.shape != (n, k // 16) or ws.dtype != torch.float8_e4m3fn or wc.dtype != torch.uint8:
        raise ValueError(f"weight codes must be uint8 ({n}, {k // 2}) and scales float8_e4m3fn ({n}, {k // 16})")
    k_tiles = triton.cdiv(k + s, block_k)
    split_k = max(1, min(split_k, k_tiles))
    per_split = triton.cdiv(k_tiles, split_k)
    atomic = triton.cdiv(k_tiles, per_split) > 1
    y = (torch.zeros if atomic else torch.empty)(m, n, dtype=torch.float32 if atomic else out_dtype, device=xd.device)
    xgs = xgs.to(torch.float32).reshape(-1).contiguous()
    wgs = wgs.to(torch.float32).reshape(-1).contiguous()
    grid = (triton.cdiv(n, block_n), triton.cdiv(k_tiles, per_split))
    if fma:
        _arc_gemv_fma_kernel[grid](xd, xgs, wc, ws.view(torch.uint8), wgs, bias if bias is not None else wgs, y,
                                   m, n, k, s, xd.stride(0), wc.stride(0), ws.stride(0), y.stride(0),
                                   XGS_PER_ROW=xgs.numel() > 1, HAS_BIAS=bias is not None, ATOMIC=atomic,
                                   TILES_PER_SPLIT=per_split, BN=block_n, BK=block_k, MB=triton.next_power_of_2(m),
                                   num_warps=num_warps, num_stages=num_stages)
        return y.to(out_dtype) if atomic else y
    _arc_gemv_kernel[grid](xd, xgs, wc, ws.view(torch.uint8), wgs, bias if bias is not None else wgs, y,
                           m, n, k, s, xd.stride(0), wc.stride(0), ws.stride(0), y.stride(0),
                           XGS_PER_ROW=xgs.numel() > 1, HAS_BIAS=bias is not None, ATOMIC=atomic,
                           TILES_PER_SPLIT=per_split, BN=block_n, BK=block_k,
                           num_warps=num_warps, num_stages=num_stages)
    return y.to(out_dtype) if atomic else y
