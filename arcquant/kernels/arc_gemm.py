"""ARC W4A4 GEMM (Triton): Y = dequant(X_aug) @ dequant(W_aug)^T, depth K+s, FP32 accumulate.

Layout
    xc  (M, (K+s)/2) uint8, xs (M, (K+s)/16) e4m3   activation from arc_quantize_activation
    wc  (N, K/2) uint8,     ws (N, K/16) e4m3        weight main part only: augmented columns
                                                     K..K+s-1 are read from K-s..K-1 (stored once)
    xgs () or (M,) float32, wgs () float32           global scales (448*6/amax)
    y   (M, N);  y = acc / (xgs * wgs) (+ bias)
Numerics (exact on Hopper, spec section 5): E2M1 x E4M3 has at most 6 significant bits and
lies in [2^-10, 2688], so every operand element is exact in fp16, tensor-core products are
exact, and they accumulate in fp32: the products Blackwell's FP4 MMA forms. (fp16 rather
than bf16 also keeps the Triton interpreter's tl.dot right for CPU tests.) The oracle is
arcquant.arc (same products; fp32 summation order differs).
Tile count is a compile-time constant (one compile per K+s: pipelinable loop); split_k > 1
splits the depth over programs that add fp32 partial sums atomically (decode, small N).
"""
import torch
import triton
import triton.language as tl

from .fp4_jit import e2m1_decode, e4m3_decode, tail_to_main


@triton.jit
def _load_halves(codes_ptr, scales_ptr, rows, row_ok, byte_idx, blk_idx, col_ok, blk_ok, stride_c, stride_s,
                 R: tl.constexpr, BK: tl.constexpr):
    """-> (even, odd) columns, each (R, BK/2) fp16 (exact), of code pairs byte_idx (BK/2,);
    blk_idx (BK/16,) are the 16-blocks they belong to (one scale load per block)."""
    mask = row_ok[:, None] & col_ok[None, :]
    b = tl.load(codes_ptr + rows[:, None] * stride_c + byte_idx[None, :], mask=mask, other=0)
    sb = tl.load(scales_ptr + rows[:, None] * stride_s + blk_idx[None, :],
                 mask=row_ok[:, None] & blk_ok[None, :], other=0)
    s = tl.reshape(tl.broadcast_to(e4m3_decode(sb)[:, :, None], (R, BK // 16, 8)), (R, BK // 2))
    return (e2m1_decode(b & 0xF) * s).to(tl.float16), (e2m1_decode(b >> 4) * s).to(tl.float16)


@triton.jit
def _load_operand(codes_ptr, scales_ptr, rows, row_ok, byte_idx, blk_idx, col_ok, blk_ok, stride_c, stride_s,
                  R: tl.constexpr, BK: tl.constexpr):
    """-> (R, BK) fp16: the halves interleaved back into column order."""
    lo, hi = _load_halves(codes_ptr, scales_ptr, rows, row_ok, byte_idx, blk_idx, col_ok, blk_ok,
                          stride_c, stride_s, R, BK)
    return tl.reshape(tl.join(lo, hi), (R, BK))


@triton.jit
def _arc_gemm_kernel(
    xc_ptr, xs_ptr, xgs_ptr, wc_ptr, ws_ptr, wgs_ptr, bias_ptr, y_ptr,   # pointers
    M, N, K, S,                                                          # sizes
    stride_xc, stride_xs, stride_wc, stride_ws, stride_y,                # strides
    XGS_PER_ROW: tl.constexpr, HAS_BIAS: tl.constexpr,                   # meta
    K_TILES: tl.constexpr, TILES_PER_SPLIT: tl.constexpr, ATOMIC: tl.constexpr, EVEN_ODD: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    m_ok, n_ok = rm < M, rn < N
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    t0 = tl.program_id(2) * TILES_PER_SPLIT
    for t in range(TILES_PER_SPLIT):                                     # compile-time count
        pair = (t0 + t) * (BK // 2) + tl.arange(0, BK // 2)              # code pairs (2p, 2p+1)
        blk = (t0 + t) * (BK // 16) + tl.arange(0, BK // 16)             # 16-blocks
        ok = (pair * 2 < K + S) & (t0 + t < K_TILES)
        blk_ok = (blk * 16 < K + S) & (t0 + t < K_TILES)
        wblk = tail_to_main(blk, 16, K, S)                               # weight tail = main cols
        wpair = tail_to_main(pair, 2, K, S)
        if EVEN_ODD:
            xe, xo = _load_halves(xc_ptr, xs_ptr, rm, m_ok, pair, blk, ok, blk_ok, stride_xc, stride_xs, BM, BK)
            we, wo = _load_halves(wc_ptr, ws_ptr, rn, n_ok, wpair, wblk, ok, blk_ok, stride_wc, stride_ws, BN, BK)
            acc += tl.dot(xe, tl.trans(we))
            acc += tl.dot(xo, tl.trans(wo))
        else:
            xv = _load_operand(xc_ptr, xs_ptr, rm, m_ok, pair, blk, ok, blk_ok, stride_xc, stride_xs, BM, BK)
            wv = _load_operand(wc_ptr, ws_ptr, rn, n_ok, wpair, wblk, ok, blk_ok, stride_wc, stride_ws, BN, BK)
            acc += tl.dot(xv, tl.trans(wv))
    xgs = tl.load(xgs_ptr + rm, mask=m_ok, other=1.0) if XGS_PER_ROW else tl.load(xgs_ptr)
    y = acc / (xgs[:, None] * tl.load(wgs_ptr)) if XGS_PER_ROW else acc / (xgs * tl.load(wgs_ptr))
    if HAS_BIAS:
        if tl.program_id(2) == 0:
            y += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    out = y_ptr + rm[:, None] * stride_y + rn[None, :]
    if ATOMIC:
        tl.atomic_add(out, y, mask=m_ok[:, None] & n_ok[None, :])
    else:
        tl.store(out, y.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def arc_gemm(xc, xs, xgs, wc, ws, wgs, s: int, bias=None, out_dtype=torch.bfloat16,
             block_m: int = 64, block_n: int = 64, block_k: int = 64, num_warps: int = 4, num_stages: int = 2,
             split_k: int = 1, even_odd: bool = True):
    """Augmented W4A4 product; see the module docstring for layouts. -> (M, N) out_dtype."""
    m, n, k = xc.shape[0], wc.shape[0], wc.shape[1] * 2
    checks = [(xc.dtype == torch.uint8 and wc.dtype == torch.uint8, "codes must be uint8"),
              (xs.dtype == torch.float8_e4m3fn and ws.dtype == torch.float8_e4m3fn, "scales must be float8_e4m3fn"),
              (xc.shape == (m, (k + s) // 2), f"xc shape {tuple(xc.shape)} != ({m}, {(k + s) // 2}) for K={k}, s={s}"),
              (xs.shape == (m, (k + s) // 16), f"xs shape {tuple(xs.shape)} != ({m}, {(k + s) // 16})"),
              (ws.shape == (n, k // 16), f"ws shape {tuple(ws.shape)} != ({n}, {k // 16})"),
              (s % 16 == 0 and 0 <= s <= k, f"s={s} must be a multiple of 16 in [0, K={k}]"),
              (all(t.is_contiguous() for t in (xc, xs, wc, ws)), "operands must be contiguous")]
    for ok, msg in checks:
        if not ok:
            raise ValueError(f"arc_gemm: {msg}")
    devices = {t.device for t in (xc, xs, xgs, wc, ws, wgs)}
    if len(devices) != 1:
        raise ValueError(f"arc_gemm: operands are on several devices {sorted(map(str, devices))}")
    xgs = xgs.to(torch.float32).reshape(-1).contiguous()
    wgs = wgs.to(torch.float32).reshape(-1).contiguous()
    k_tiles = triton.cdiv(k + s, block_k)
    split_k = max(1, min(split_k, k_tiles))
    per_split = triton.cdiv(k_tiles, split_k)
    atomic = split_k > 1
    y = (torch.zeros if atomic else torch.empty)(m, n, dtype=torch.float32 if atomic else out_dtype,
                                                 device=xc.device)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n), triton.cdiv(k_tiles, per_split))
    _arc_gemm_kernel[grid](xc, xs.view(torch.uint8), xgs, wc, ws.view(torch.uint8), wgs,
                           bias if bias is not None else wgs, y, m, n, k, s,
                           xc.stride(0), xs.stride(0), wc.stride(0), ws.stride(0), y.stride(0),
                           XGS_PER_ROW=xgs.numel() > 1, HAS_BIAS=bias is not None,
                           K_TILES=k_tiles, TILES_PER_SPLIT=per_split, ATOMIC=atomic, EVEN_ODD=even_odd,
                           BM=block_m, BN=block_n, BK=block_k, num_warps=num_warps, num_stages=num_stages)
    return y.to(out_dtype) if atomic else y
