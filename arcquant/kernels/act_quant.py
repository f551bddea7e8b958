"""Fused ARC activation quantization (Triton): gather -> NVFP4 -> residual -> NVFP4 -> pack.

Layout
    x       (M, K)        bf16 / fp16 / fp32, row-major, K a multiple of 16 (padded by caller)
    perm    (K,)          int32, column order of the main part
    gs      () or (M,)    float32 global scale (448*6/amax): per tensor, or per token
    codes   (M, (K+s)/2)  uint8, E2M1 codes, element 2i in the low nibble
    scales  (M, (K+s)/16) float8_e4m3fn (written as its bits)
The tail must be the last s columns of the main part (ArcPlan.tail_reuses_weight(): the
'sorted' and 'blocks' orders); augmented column c >= K re-reads main position c - s.

Bit-exact with arcquant.arc.quantize_activation: same operation order (amax/6*gs; one IEEE
division gs/s_b per block; x*recip; dequant as (code*s_b)/gs). E4M3 rounding is done in
software (power-of-two quantum and a round-to-nearest-even add), because sm_90 has no
e2m1 convert and the Triton interpreter's float8 convert is not round-to-nearest-even.
On a CUDA device, inputs of at least CUDA_MIN_M bf16 / fp16 rows in the whole-block order go
to the CUDA kernel instead (cuda_act.py, csrc/arc_act.cu: same bits, one thread per 16-block).
"""
import torch
import triton
import triton.language as tl

from .fp4_jit import e2m1_decode, tail_to_main
from .pdl import pdl_enter, triton_args

# Triton path, per-token scale: inside the kernel (every program re-reads its row) unless there
# are many long rows; then one amax pass first (H200, M = 4096: K = 14336 470 -> 222 us, but
# K = 4096 78 -> 229 us: results/act-kernel-h200.json)
ROW_AMAX_MAX_M, ROW_AMAX_MAX_K = 32, 8192
AMAX_TILE = 1024   # values a program's row amax pass loads at once: 2048 and 4096 were slower at K = 14336 (results/ab-act-decode-h200.json)
# The CUDA kernel (cuda_act.py) for at least CUDA_MIN_M rows, or rows deeper than CUDA_MIN_K: at
# M = 4096 it takes 0.6-0.8x the Triton time; at decode sizes (M <= 32, the model's call, H200,
# results/act-crossover-h200.json) 0.6-1.5 us slower for K = 4096 and 14336 (7.9-10.9 against
# 7.2-10.8 us), but 3.6-4.5 us faster for K = 18944 (Qwen2.5-7B down_proj: 10.8-11.8 against
# 14.4-16.3 us, where Triton's rows span 19 tiles). CUDA_KERNEL=False: Triton always.
CUDA_KERNEL, CUDA_MIN_M, CUDA_MIN_K = True, 33, 16384


def _cuda(x: torch.Tensor, starts) -> bool:
    """Whether the CUDA activation kernel (cuda_act.py) takes this input (a device that cannot
    build it says why once in the log)."""
    if not CUDA_KERNEL or (x.shape[0] < CUDA_MIN_M and x.shape[1] <= CUDA_MIN_K):
        return False
    from .cuda_act import cuda_act_reason
    return cuda_act_reason(x, starts) is None


@triton.jit
def _e4m3_round(v):
    """Non-negative fp32 -> (value rounded to E4M3, RNE, saturating at 448; its uint8 bits)."""
    v = tl.minimum(v, 448.0)
    e = ((v.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    e = tl.maximum(e, -6)                                         # subnormal quantum 2^-9
    inv_q = ((127 + 3 - e) << 23).to(tl.float32, bitcast=True)    # 2^(3-e), exact
    q = ((127 - 3 + e) << 23).to(tl.float32, bitcast=True)        # 2^(e-3)
    y = v * inv_q
    r = ((y + 12582912.0) - 12582912.0) * q                       # 1.5*2^23: RNE to integer
    r = tl.minimum(r, 448.0)
    rb = r.to(tl.int32, bitcast=True)
    er = ((rb >> 23) & 0xFF) - 127
    normal_bits = ((er + 7) << 3) | ((rb >> 20) & 7)
    sub_bits = (r * 512.0).to(tl.int32)                           # r < 2^-6: r / 2^-9, exact
    bits = tl.where(r < 0.015625, sub_bits, normal_bits)
    return r, bits.to(tl.uint8)


@triton.jit
def _e2m1_round(scaled):
    """fp32 -> (signed E2M1 value, 4-bit code), ties to even, saturating at 6."""
    a = tl.abs(scaled)
    mag = ((a > 0.25).to(tl.int32) + (a >= 0.75).to(tl.int32) + (a > 1.25).to(tl.int32)
           + (a >= 1.75).to(tl.int32) + (a > 2.5).to(tl.int32) + (a >= 3.5).to(tl.int32)
           + (a > 5.0).to(tl.int32))
    neg = (scaled.to(tl.int32, bitcast=True) >> 31) & 1           # sign bit, -0 included
    code = mag | (neg << 3)
    return e2m1_decode(code), code.to(tl.uint8)


@triton.jit
def _quant_blocks(x, gs):
    """x (NB, 16) fp32 -> (codes, scale bits (NB,), code * block scale, E2M1 value)."""
    amax = tl.max(tl.abs(x), axis=1)                              # (NB,)
    s, sbits = _e4m3_round(tl.math.div_rn(amax, 6.0) * gs)
    recip = tl.where(s > 0, tl.math.div_rn(gs, tl.where(s > 0, s, 1.0)), 0.0)
    val, code = _e2m1_round(x * recip[:, None])
    return code, sbits, val * s[:, None], val                     # code * block scale: exact


@triton.jit
def _arc_act_quant_kernel(
    x_ptr, perm_ptr, gs_ptr, codes_ptr, scales_ptr, xd_ptr, xi_ptr,  # pointers
    K, S,                                                     # sizes
    stride_xm, stride_cm, stride_sm, stride_dm, stride_im,    # strides
    GS_PER_ROW: tl.constexpr, NB: tl.constexpr,               # meta: 16-blocks per program
    PACKED: tl.constexpr, DEQUANTIZED: tl.constexpr,          # outputs written
    INT8: tl.constexpr,                                       # 2 * E2M1 value as int8 (+ scales)
    ROW_AMAX: tl.constexpr,                                   # per-token scale computed here -> gs_ptr
    ROW_TILES: tl.constexpr, AMAX_TILE: tl.constexpr,         # cdiv(K, AMAX_TILE) tiles (with ROW_AMAX)
    BLOCK_PERM: tl.constexpr,                                 # perm_ptr holds (K/16,) block starts
    MMA_ORDER: tl.constexpr,                                  # xd's 8-column groups as 0,4,1,5,2,6,3,7
    PDL: tl.constexpr = False,                                # launched with PDL (kernels/pdl.py)
):
    pdl_enter(PDL)                                                # kernels/pdl.py
    m = tl.program_id(0)
    # this program's blocks are gathered first: their loads (and the block starts' before them) do not
    # wait for the row's amax pass, which a decode-sized call is latency-bound on
    c = tl.program_id(1) * NB * 16 + tl.arange(0, NB)[:, None] * 16 + tl.arange(0, 16)[None, :]
    valid = c < K + S                                             # (NB, 16)
    is_tail = c >= K
    src = tail_to_main(c, 1, K, S)                                # main position read
    if BLOCK_PERM:                                                # whole blocks moved: one index per 16
        bsrc = tl.program_id(1) * NB + tl.arange(0, NB)
        bsrc = tail_to_main(bsrc, 16, K, S)
        start = tl.load(perm_ptr + bsrc, mask=bsrc * 16 < K + S, other=0)
        col = start[:, None] + tl.arange(0, 16)[None, :]
    else:
        col = tl.load(perm_ptr + src, mask=valid, other=0)
    x = tl.load(x_ptr + m * stride_xm + col, mask=valid, other=0.0).to(tl.float32)
    if ROW_AMAX:                                                  # 448*6 / max|x[m, :]|, as nvfp4.global_scale_from_amax
        amax = tl.zeros((AMAX_TILE,), dtype=tl.float32)
        for r in range(ROW_TILES):                                # AMAX_TILE wide: few round trips
            offs = r * AMAX_TILE + tl.arange(0, AMAX_TILE)
            amax = tl.maximum(amax, tl.abs(tl.load(x_ptr + m * stride_xm + offs, mask=offs < K, other=0.0)
                                           .to(tl.float32)))
        gs = tl.math.div_rn(2688.0, tl.maximum(tl.max(amax), 1e-30))
        if tl.program_id(1) == 0:
            tl.store(gs_ptr + m, gs)
    else:
        gs = tl.load(gs_ptr + m) if GS_PER_ROW else tl.load(gs_ptr)
    code1, sbits1, vs1, val1 = _quant_blocks(x, gs)
    if (tl.program_id(1) + 1) * NB * 16 > K:                      # this program reaches the tail
        deq1 = tl.math.div_rn(vs1, gs)                            # as the reference: (code * s_b) / gs
        code2, sbits2, vs2, val2 = _quant_blocks(x - deq1, gs)    # residual vs rounded scale
    else:
        code2, sbits2, vs2, val2 = code1, sbits1, vs1, val1
    if DEQUANTIZED:                                               # code * block scale (Hopper GEMMs)
        vd = tl.where(is_tail, vs2, vs1)
        if MMA_ORDER:                                             # cuda_gemv.to_mma_order, in registers
            vd = tl.reshape(tl.permute(tl.reshape(vd, (NB, 2, 2, 4)), (0, 1, 3, 2)), (NB, 16))
        tl.store(xd_ptr + m * stride_dm + c, vd.to(xd_ptr.dtype.element_ty), mask=valid)
    if INT8:                                                      # 2 * value: -12..12 (the CUDA GEMV)
        tl.store(xi_ptr + m * stride_im + c, (tl.where(is_tail, val2, val1) * 2.0).to(tl.int8), mask=valid)
    if PACKED or INT8:
        blk_tail = tl.max(is_tail.to(tl.int32), axis=1) == 1      # (NB,): blocks never straddle K
        pb = tl.program_id(1) * NB + tl.arange(0, NB)
        tl.store(scales_ptr + m * stride_sm + pb, tl.where(blk_tail, sbits2, sbits1), mask=pb < (K + S) // 16)
    if PACKED:
        lo, hi = tl.split(tl.reshape(tl.where(is_tail, code2, code1), (NB * 8, 2)))
        pc = tl.program_id(1) * NB * 8 + tl.arange(0, NB * 8)
        tl.store(codes_ptr + m * stride_cm + pc, lo | (hi << 4), mask=pc < (K + S) // 2)


def block_starts(perm: torch.Tensor):
    """(K/16,) int32 first channel of each 16-block of perm when perm moves whole aligned blocks
    (the 'blocks' order), else None. Computed once per layer (it reads perm on the host)."""
    p = perm.reshape(-1, 16).long()
    whole = bool(((p[:, :1] % 16) == 0).all() and (p - p[:, :1] == torch.arange(16, device=p.device)).all())
    return p[:, 0].to(torch.int32).contiguous() if whole else None


def _check_act(x: torch.Tensor, perm: torch.Tensor, s: int, starts: torch.Tensor | None):
    if x.dim() != 2 or not x.is_contiguous():
        raise ValueError(f"x must be a contiguous 2-D tensor, got shape {tuple(x.shape)} "
                         f"contiguous={x.is_contiguous()}")
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise TypeError(f"x has dtype {x.dtype}; expected bfloat16, float16 or float32")
    m, k = x.shape
    if k % 16 or s % 16 or not 0 <= s <= k:
        raise ValueError(f"K={k} and s={s} must be multiples of 16 with 0 <= s <= K; pad K first")
    if perm.shape != (k,) or perm.dtype != torch.int32:
        raise ValueError(f"perm must be int32 of shape ({k},), got {perm.dtype} {tuple(perm.shape)}")
    if perm.device != x.device:
        raise ValueError(f"perm is on {perm.device} but x is on {x.device}")
    if starts is not None and (starts.shape != (k // 16,) or starts.dtype != torch.int32):
        raise ValueError(f"starts must be int32 of shape ({k // 16},) from block_starts(perm)")


def arc_quantize_activation(x: torch.Tensor, perm: torch.Tensor, s: int, gs: torch.Tensor,
                            blocks_per_program: int = 64, dequantized=None, packed: bool = True,
                            starts: torch.Tensor | None = None):
    """x (M, K) -> (codes (M, (K+s)/2) uint8, scales (M, (K+s)/16) float8_e4m3fn), or with
    dequantized=dtype (float16 / bfloat16) -> also (M, K+s) code * block scale (exact), the
    operand of the Hopper GEMMs: (codes, scales, xd); packed=False skips codes and scales.
    starts: block_starts(perm) for a whole-block permutation: one index load per 16 channels."""
    _check_act(x, perm, s, starts)
    m, k = x.shape
    gs = gs.to(torch.float32).reshape(-1).contiguous()
    if gs.numel() not in (1, m):
        raise ValueError(f"gs must hold 1 or M={m} values, got {gs.numel()}")
    if gs.device != x.device:
        raise ValueError(f"gs is on {gs.device} but x is on {x.device}")
    if dequantized not in (None, torch.float16, torch.bfloat16) or (dequantized is None and not packed):
        raise ValueError(f"dequantized={dequantized}: use None, torch.float16 or torch.bfloat16, and ask "
                         "for at least one output")
    if _cuda(x, starts) and packed != (dequantized is not None) and dequantized != torch.float16:
        # one output: the CUDA kernel (its float16 output is in the MMA order, so not for float16 here)
        from .cuda_act import arc_act_quant_cuda
        xq, sc, _ = arc_act_quant_cuda(x, starts, s, gs, "packed" if packed else "bfloat16")
        return (xq, sc) if packed else (None, None, xq)
    rows = m if packed else 1
    codes = torch.empty(rows, (k + s) // 2, dtype=torch.uint8, device=x.device)
    scales = torch.empty(rows, (k + s) // 16, dtype=torch.uint8, device=x.device)
    xd = torch.empty(m if dequantized else 1, k + s, dtype=dequantized or torch.float16, device=x.device)
    nb = blocks_per_program
    grid = (m, triton.cdiv((k + s) // 16, nb))
    _arc_act_quant_kernel[grid](x, perm if starts is None else starts, gs, codes, scales, xd, xd, k, s, x.stride(0),
                                codes.stride(0), scales.stride(0), xd.stride(0), 0, GS_PER_ROW=gs.numel() > 1,
                                NB=nb, PACKED=packed, DEQUANTIZED=dequantized is not None, INT8=False,
                                ROW_AMAX=False, ROW_TILES=1, AMAX_TILE=16, BLOCK_PERM=starts is not None, MMA_ORDER=False)
    out = (codes, scales.view(torch.float8_e4m3fn)) if packed else (None, None)
    return out if dequantized is None else (*out, xd)


def arc_quantize_activation_gemv(x: torch.Tensor, perm: torch.Tensor, s: int, gs: torch.Tensor | None = None,
                                 starts: torch.Tensor | None = None, out: str = "int8", blocks_per_program: int = 64):
    """x (M, K) -> the operands of the CUDA GEMVs (kernels/cuda_gemv.py): (xq, scales, gs) with
    out="int8": xq (M, K+s) int8 = 2 * E2M1 value, scales (M, (K+s)/16) float8_e4m3fn;
    out="bfloat16": xq (M, K+s) = code * block scale (exact), scales None;
    out="mma": the same in float16, each 8 columns in the tensor-core GEMV's order (cuda_gemv.to_mma_order).
    gs=None: the per-token tensor scale 448*6/max|x[m]| is computed and returned as (M,), in the
    kernel (Triton, for many rows of K > ROW_AMAX_MAX_K: one amax pass first).
    On a CUDA device with the 'blocks' order (starts given), bf16 / fp16 input and at least
    CUDA_MIN_M rows, the CUDA kernel (cuda_act.py) runs instead: same bits, faster at that size."""
    from .ops import XQ_DTYPES
    _check_act(x, perm, s, starts)
    if out not in XQ_DTYPES:
        raise ValueError(f"out={out!r}: use one of {', '.join(XQ_DTYPES)}")
    if _cuda(x, starts):                                          # whole-block order, bf16 / fp16
        from .cuda_act import arc_act_quant_cuda
        return arc_act_quant_cuda(x, starts, s, gs, out)
    m, k = x.shape
    if gs is None and m > ROW_AMAX_MAX_M and k > ROW_AMAX_MAX_K:   # many long rows: one amax pass
        from ..formats.nvfp4 import global_scale_from_amax
        gs = global_scale_from_amax(torch.linalg.vector_norm(x, float("inf"), dim=1))   # max|x|: one read
    if gs is None:
        gs_buf, row_amax = torch.empty(m, dtype=torch.float32, device=x.device), True
    else:
        gs_buf, row_amax = gs.to(torch.float32).reshape(-1).contiguous(), False
        if gs_buf.numel() not in (1, m) or gs_buf.device != x.device:
            raise ValueError(f"gs must hold 1 or M={m} values on {x.device}, got {gs_buf.numel()} on {gs_buf.device}")
    int8 = out == "int8"
    xq = torch.empty(m, k + s, dtype=XQ_DTYPES[out], device=x.device)
    scales = torch.empty(m if int8 else 1, (k + s) // 16, dtype=torch.uint8, device=x.device)
    grid = (m, triton.cdiv((k + s) // 16, blocks_per_program))
    tile = min(AMAX_TILE, triton.next_power_of_2(k))              # the row amax pass's width
    _arc_act_quant_kernel[grid](x, perm if starts is None else starts, gs_buf, scales, scales, xq, xq, k, s,
                                x.stride(0), 0, scales.stride(0), xq.stride(0), xq.stride(0),
                                GS_PER_ROW=row_amax or gs_buf.numel() > 1, NB=blocks_per_program, PACKED=False,
                                DEQUANTIZED=not int8, INT8=int8, ROW_AMAX=row_amax,
                                ROW_TILES=triton.cdiv(k, tile) if row_amax else 1, AMAX_TILE=tile,
                                BLOCK_PERM=starts is not None,
                                MMA_ORDER=out == "mma", **triton_args(x.device, m))
    return xq, scales.view(torch.float8_e4m3fn) if int8 else None, gs_buf
