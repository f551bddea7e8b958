"""Prefill ARC product with the weight dequantized in registers (Triton, mixed-input GEMM).

    xd  (M, K+s) fp16   activation operand code * block scale (arc_quantize_activation(...,
                        dequantized=torch.float16); exact: at most 6 significant bits, [2^-10, 2688])
    wc  (N, K/2) uint8, ws (N, K/16) e4m3   packed weight, main part only (the tail columns
                        K..K+s-1 read from K-s..K-1)
    y   (M, N) = (xd @ wdq^T, fp32 accumulation) / (xgs[m] * wgs) (+ bias), one rounding

Unlike arc_matmul_prefill (dequantize the whole weight to a BF16 copy, cuBLAS, then a scale
pass), each program decodes its (BN, BK) weight tile in registers and feeds the tensor cores
directly: no weight copy written and read back, the tensor scales and bias in the epilogue.
The E2M1 decode is bit placement: the three magnitude bits put at fp16 bits 9..11 read as
value * 2^-14 (subnormals included), times 2^14 (exact), times the block scale (exact in
fp16: <= 448; products <= 2688 with <= 6 significant bits); the low (even column) and high
(odd column) nibbles are interleaved back in registers. swap=True makes the decoded weight
the first operand (acc = W @ X^T: on Hopper the register operand of wgmma), X^T the second.
"""
import torch
import triton
import triton.language as tl

from .fp4_jit import e4m3_decode, tail_to_main


@triton.jit
def _e2m1_fp16(nib):
    """4-bit E2M1 codes (int16, sign at bit 3) -> fp16 values (exact)."""
    bits = ((nib & 7) << 9) | ((nib & 8) << 12)
    return bits.to(tl.float16, bitcast=True) * 16384.0


@triton.jit
def _mixed_kernel(x_ptr, wc_ptr, ws_ptr, xgs_ptr, wgs_ptr, bias_ptr, y_ptr, M, N, K, S,
                  stride_x, stride_wc, stride_ws, stride_y,
                  XGS_PER_ROW: tl.constexpr, HAS_BIAS: tl.constexpr,
                  BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP: tl.constexpr,
                  SWAP: tl.constexpr, K_TILES: tl.constexpr):
    pid = tl.program_id(0)
    grid_m, grid_n = tl.cdiv(M, BM), tl.cdiv(N, BN)
    width = GROUP * grid_n                                                   # grouped order: L2 reuse of W
    first_m = (pid // width) * GROUP
    rows = tl.minimum(grid_m - first_m, GROUP)
    pm = first_m + (pid % width) % rows
    pn = (pid % width) // rows
    rm = pm * BM + tl.arange(0, BM)                                          # (BM,) tokens
    rn = pn * BN + tl.arange(0, BN)                                          # (BN,) weight rows
    m_ok, n_ok = rm < M, rn < N
    acc = tl.zeros((BN, BM) if SWAP else (BM, BN), dtype=tl.float32)
    for t in range(K_TILES):                                               # compile-time count
        k0 = t * BK
        pair = k0 // 2 + tl.arange(0, BK // 2)                               # (BK/2,) column pairs
        p_ok = pair * 2 < K + S
        blk = k0 // 16 + tl.arange(0, BK // 16)                              # (BK/16,) 16-blocks
        b = tl.load(wc_ptr + rn[:, None] * stride_wc + tail_to_main(pair, 2, K, S)[None, :],
                    mask=n_ok[:, None] & p_ok[None, :], other=0).to(tl.int16)   # (BN, BK/2)
        sc = tl.load(ws_ptr + rn[:, None] * stride_ws + tail_to_main(blk, 16, K, S)[None, :],
                     mask=n_ok[:, None] & (blk * 16 < K + S)[None, :], other=0)
        sc = tl.reshape(tl.broadcast_to(e4m3_decode(sc).to(tl.float16)[:, :, None], (BN, BK // 16, 8)),
                        (BN, BK // 2))                                       # (BN, BK/2) block scale
        w = tl.reshape(tl.join(_e2m1_fp16(b & 15) * sc, _e2m1_fp16(b >> 4) * sc), (BN, BK))   # (BN, BK)
        col = k0 + tl.arange(0, BK)
        c_ok = col < K + S
        if SWAP:                                                             # acc (BN, BM) = W @ X^T
            xt = tl.load(x_ptr + rm[None, :] * stride_x + col[:, None], mask=m_ok[None, :] & c_ok[:, None], other=0.0)
            acc = tl.dot(w, xt, acc)
        else:                                                                # acc (BM, BN) = X @ W^T
            x = tl.load(x_ptr + rm[:, None] * stride_x + col[None, :], mask=m_ok[:, None] & c_ok[None, :], other=0.0)
            acc = tl.dot(x, tl.trans(w), acc)
    if SWAP:
        acc = tl.trans(acc)                                                  # (BM, BN)
    gs = tl.load(wgs_ptr)
    if XGS_PER_ROW:
        y = acc / (tl.load(xgs_ptr + rm, mask=m_ok, other=1.0) * gs)[:, None]
    else:
        y = acc / (tl.load(xgs_ptr) * gs)
    if HAS_BIAS:
        y += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm[:, None] * stride_y + rn[None, :], y.to(y_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


def arc_matmul_mixed(xd, xgs, wc, ws, wgs, s: int, bias=None, out_dtype=torch.bfloat16,
                     block_m: int = 128, block_n: int = 128, block_k: int = 64, group: int = 8,
                     num_warps: int = 8, num_stages: int = 3, swap: bool = True):
    """Same product and rounding as arc_matmul_prefill(..., exact=True); see the module docstring."""
    m, n, k = xd.shape[0], wc.shape[0], wc.shape[1] * 2
    checks = [(xd.dtype == torch.float16, f"xd must be float16 (code * scale), got {xd.dtype}"),
              (xd.shape[1] == k + s, f"xd has {xd.shape[1]} columns, expected K+s = {k + s} (K={k}, s={s})"),
              (wc.dtype == torch.uint8 and ws.dtype == torch.float8_e4m3fn,
               f"weight codes must be uint8 and scales float8_e4m3fn, got {wc.dtype} and {ws.dtype}"),
              (ws.shape == (n, k // 16), f"ws shape {tuple(ws.shape)} != ({n}, {k // 16})"),
              (s % 16 == 0 and 0 <= s <= k, f"s={s} must be a multiple of 16 in [0, K={k}]"),
              (block_k % 32 == 0, f"block_k={block_k} must be a multiple of 32"),
              (xd.stride(1) == 1 and wc.stride(1) == 1 and ws.stride(1) == 1, "operands need unit column stride")]
    for ok, msg in checks:
        if not ok:
            raise ValueError(f"arc_matmul_mixed: {msg}")
    devices = {t.device for t in (xd, xgs, wc, ws, wgs)}
    if len(devices) != 1:
        raise ValueError(f"arc_matmul_mixed: operands are on several devices {sorted(map(str, devices))}")
    xgs = xgs.to(torch.float32).reshape(-1).contiguous()
    if xgs.numel() not in (1, m):
        raise ValueError(f"arc_matmul_mixed: xgs has {xgs.numel()} values, expected 1 or M = {m}")
    wgs = wgs.to(torch.float32).reshape(-1).contiguous()
    y = torch.empty(m, n, dtype=out_dtype, device=xd.device)
    grid = (triton.cdiv(m, block_m) * triton.cdiv(n, block_n),)
    _mixed_kernel[grid](xd, wc, ws.view(torch.uint8), xgs, wgs, bias if bias is not None else wgs, y, m, n, k, s,
                        xd.stride(0), wc.stride(0), ws.stride(0), y.stride(0),
                        XGS_PER_ROW=xgs.numel() > 1, HAS_BIAS=bias is not None,
                        BM=block_m, BN=block_n, BK=block_k, GROUP=group, SWAP=swap, K_TILES=triton.cdiv(k + s, block_k), num_warps=num_warps, num_stages=num_stages)
    return y
