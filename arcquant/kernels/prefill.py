"""Prefill-shaped ARC product (large M): dequantize once, then the BF16 tensor-core GEMM.

For large M the product is compute-bound, and Hopper has no FP4 tensor cores: the exact
route is BF16 MMA on E2M1 x E4M3 values (spec section 5). Dequantizing each weight element
once per call (N x (K+s) bf16 written; in CUDA, csrc/arc_dequant.cu, where it builds, else
Triton) and handing the GEMM to cuBLAS beats re-dequantizing the weight in every output tile
of a fused kernel.

    wd (N, K+s) bf16 = code * block scale, the tail columns K..K+s-1 copied from K-s..K-1
    y  (M, N)        = (xd @ wd^T in fp32) / (xgs[m] * wgs[n]) (+ bias)
xgs: 1 or M activation tensor scales; wgs: 1 weight tensor scale, or N (one per output row: a
stacked q/k/v group, gpu.StackedGroup).
xd comes from the activation kernel (arc_quantize_activation(..., dequantized=True)).
Every operand value is exact in bf16 (at most 6 significant bits, range [2^-10, 2688]);
the GEMM accumulates in fp32 and returns fp32 (torch.mm out_dtype), the tensor scales are
applied once in fp32, then one rounding to the output dtype.
"""
import torch
import triton
import triton.language as tl

from .fp4_jit import e2m1_decode, e4m3_decode, tail_to_main


@triton.jit
def _dequant_kernel(c_ptr, s_ptr, out_ptr, K, S, stride_c, stride_s, stride_o, NB: tl.constexpr):
    r = tl.program_id(0)
    col = tl.program_id(1) * NB * 16 + tl.arange(0, NB)[:, None] * 16 + tl.arange(0, 16)[None, :]   # (NB, 16)
    ok = col < K + S
    src = tail_to_main(col, 1, K, S)                                  # tail = main columns
    byte = tl.load(c_ptr + r * stride_c + src // 2, mask=ok, other=0)
    code = tl.where(src % 2 == 0, byte & 0xF, byte >> 4)
    blk = tl.program_id(1) * NB + tl.arange(0, NB)
    sblk = tail_to_main(blk, 16, K, S)
    sc = e4m3_decode(tl.load(s_ptr + r * stride_s + sblk, mask=blk * 16 < K + S, other=0))
    val = e2m1_decode(code) * sc[:, None]
    tl.store(out_ptr + r * stride_o + col, val.to(out_ptr.dtype.element_ty), mask=ok)


def _cuda_reason(device: torch.device) -> str | None:
    """Why csrc/arc_dequant.cu cannot run on `device` (asked once; logged; Triton runs then)."""
    from .cuda_gemv import logged_reason
    return logged_reason(device, "weight dequantization")


def _ext(device: torch.device):
    """The built extension for `device` (cuda_gemv.device_extension: looked up once a device)."""
    from .cuda_gemv import device_extension
    return device_extension(device)


def dequantize_codes(codes, scales, s: int = 0, out_dtype=torch.bfloat16, blocks_per_program: int = 64,
                     cuda: bool | None = None):
    """codes (R, K/2) u8, scales (R, K/16) e4m3 -> (R, K+s) code * block scale (exact), the last
    s columns repeating columns K-s..K-1 (the augmented weight). cuda: None picks the CUDA
    kernel for contiguous CUDA inputs where it builds (same bits), False the Triton one."""
    r, k = codes.shape[0], codes.shape[1] * 2
    if scales.shape != (r, k // 16) or codes.dtype != torch.uint8 or scales.dtype != torch.float8_e4m3fn:
        raise ValueError(f"codes must be uint8 ({r}, K/2) and scales float8_e4m3fn ({r}, {k // 16}); "
                         f"got {codes.dtype} {tuple(codes.shape)}, {scales.dtype} {tuple(scales.shape)}")
    if s % 16 or not 0 <= s <= k:
        raise ValueError(f"s={s} must be a multiple of 16 in [0, K={k}]")
    out = torch.empty(r, k + s, dtype=out_dtype, device=codes.device)
    if cuda is None:
        cuda = (codes.is_cuda and out_dtype in (torch.bfloat16, torch.float16) and codes.is_contiguous()
                and scales.is_contiguous() and codes.data_ptr() % 8 == 0 and _cuda_reason(codes.device) is None)
    if cuda:
        if not codes.is_cuda or out_dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(f"the CUDA dequantization kernel needs CUDA tensors and a bfloat16 / float16 output, "
                             f"got {codes.device} and {out_dtype}; pass cuda=None to choose automatically")
        _ext(codes.device).arc_dequant(codes, scales.view(torch.uint8), out, s)
        return out
    nb = blocks_per_program
    grid = (r, triton.cdiv((k + s) // 16, nb))
    _dequant_kernel[grid](codes, scales.view(torch.uint8), out, k, s, codes.stride(0), scales.stride(0),
                          out.stride(0), NB=nb)
    return out


def arc_matmul_prefill(xd, xgs, wc, ws, wgs, s: int, bias=None, out_dtype=torch.bfloat16, exact: bool = False):
    """xd (M, K+s) bf16 (code * block scale) x the packed weight -> y (M, N) out_dtype.

    exact=True: the fp32 GEMM result is divided by the tensor scales, then rounded once.
    exact=False (fast): cuBLAS rounds the fp32 accumulator to xd's dtype and the scales are
    applied to that (a second rounding: at most one more bf16 ulp; scale_rows), saving the
    fp32 round trip through memory (~25% of the time at M = 4096)."""
    if xd.is_cuda and not exact:
        y = matmul_unscaled(xd, wc, ws, s)                               # (M, N) xd.dtype
        scale_rows(y, xgs, wgs, None if bias is None else bias.to(y.dtype))
        return y.to(out_dtype)
    wd = _augmented_weight(xd, wc, ws, s)                                # (N, K+s)
    acc = torch.mm(xd, wd.t(), out_dtype=torch.float32) if xd.is_cuda else xd.float() @ wd.float().t()
    y = acc / tensor_scales(xgs, wgs)
    return (y if bias is None else y + bias.to(torch.float32)).to(out_dtype)


def _augmented_weight(xd, wc, ws, s: int) -> torch.Tensor:
    """The weight's code * block scale with its tail, (N, K+s) in xd's dtype, after checking that
    xd is K+s deep."""
    k = wc.shape[1] * 2
    if xd.shape[1] != k + s:
        raise ValueError(f"xd has {xd.shape[1]} columns, expected K+s = {k + s}")
    return dequantize_codes(wc, ws, s, xd.dtype)


def tensor_scales(xgs, wgs) -> torch.Tensor:
    """The product's divisor: activation tensor scale(s) x the weight's, (M or 1, N or 1) fp32."""
    return xgs.to(torch.float32).reshape(-1, 1) * wgs.to(torch.float32).reshape(1, -1)


def inverse_scales(xgs, wgs) -> torch.Tensor:
    """What the fast path multiplies the bf16 GEMM output by: 1 / (xgs * wgs), (M or 1, N or 1)."""
    return 1.0 / tensor_scales(xgs, wgs)


def matmul_unscaled(xd, wc, ws, s: int) -> torch.Tensor:
    """xd (M, K+s) x the augmented weight's code * block scale -> (M, N) in xd's dtype (cuBLAS,
    fp32 accumulation, one rounding): arc_matmul_prefill's fast path before scale_rows."""
    return torch.mm(xd, _augmented_weight(xd, wc, ws, s).t())


def scale_rows(y, xgs, wgs, bias=None, cuda: bool | None = None):
    """In place: y (M, N) 16-bit = T(T(y * inv) + bias[n]), inv = 1 / (xgs[m] * wgs[n]) in fp32 (xgs: 1
    or M values, wgs: 1 or N) - torch's y.mul_(inverse_scales(xgs, wgs)).add_(bias) bit for bit.
    cuda: None picks the CUDA kernel (csrc/arc_dequant.cu: the factors formed in the kernel, 16-byte
    accesses) for N % 8 == 0 on a device where it builds, False torch's elementwise kernels."""
    xgs = xgs.to(torch.float32).reshape(-1)                                     # (M,) or (1,)
    wgs = wgs.to(torch.float32).reshape(-1)                                     # (N,) or (1,)
    if xgs.numel() not in (1, y.shape[0]) or wgs.numel() not in (1, y.shape[1]):
        raise ValueError(f"scale_rows: y {tuple(y.shape)} takes 1 or M = {y.shape[0]} activation scales (got "
                         f"{xgs.numel()}) and 1 or N = {y.shape[1]} weight scales (got {wgs.numel()})")
    if cuda is None:
        cuda = (y.is_cuda and y.dtype in (torch.bfloat16, torch.float16) and y.is_contiguous()
                and y.shape[1] % 8 == 0 and y.data_ptr() % 16 == 0 and (bias is None or bias.data_ptr() % 16 == 0)
                and _cuda_reason(y.device) is None)
    if not cuda:
        y.mul_(inverse_scales(xgs, wgs))
        return y if bias is None else y.add_(bias)
    if not y.is_cuda or y.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"the CUDA epilogue needs a CUDA bfloat16 / float16 y, got {y.device} {y.dtype}; "
                         "pass cuda=None to choose automatically")
    _ext(y.device).arc_scale_rows(y, xgs.contiguous(), wgs.contiguous(), None if bias is None else bias.contiguous())
    return y
