"""Decode GEMVs in CUDA (csrc/arc_gemv.cu): integer dot products over 16-blocks for M <= 8
(arc_gemv_int8), and a tensor-core variant for M <= 64 (arc_gemm_mma).

Why CUDA and not Triton: the Triton GEMVs (decode.py) decode every E2M1 code to a float with
several integer and float ops and reach ~9% of HBM bandwidth on H200; the bound is the
instruction count per weight element. PTX's PRMT turns 8 codes into int8 magnitudes in 4
instructions (the code's sign bit doubles as PRMT's sign-replicate flag, see the .cu file)
and DP4A multiplies 4 of them with the int8 activation in one; Triton exposes neither.

Operands (from act_quant.arc_quantize_activation_gemv): xi (M, K+s) int8 = 2 * E2M1 value,
xs (M, (K+s)/16) E4M3 (or, for the MMA kernel, xd (M, K+s) float16 = code * block scale,
out="mma": each 8 columns in to_mma_order, the order its decode pairs the weight codes);
weights as stored: wc (N, K/2) uint8, ws (N, K/16) E4M3. The oracles are int8_gemv_reference
and fp16_gemm_reference (float64); the extension is built on first use with torch's loader
(needs nvcc) into ~/.cache/arcquant/ext (ARCQUANT_EXT_DIR overrides).

The MMA kernel decodes each weight code once per token tile of 8 and accumulates in fp32
over the whole depth (no per-block epilogue): from M of about 3 it beats the integer one,
whose cost grows with M.
"""
import functools
import logging
import os
from pathlib import Path

import torch

from . import pdl

CSRC = Path(__file__).parent / "csrc"
SRCS = [CSRC / f for f in ("arc_gemv.cu", "arc_act.cu", "arc_dequant.cu")]   # one extension
HEADER = CSRC / "arc_launch.cuh"    # included by the sources; its text goes in first so that a change rebuilds
MAX_M, MMA_MAX_M, PIPE_MAX_M = 8, 64, 16
DECL = ("void arc_gemv_dp4a(torch::Tensor xi, torch::Tensor xs, torch::Tensor xgs, torch::Tensor wc, "
        "torch::Tensor ws, torch::Tensor wgs, c10::optional<torch::Tensor> bias, "
        "c10::optional<torch::Tensor> residual, torch::Tensor y, int64_t s, "
        "int64_t nr, int64_t kw, int64_t u);\n"
        "void arc_gemm_mma(torch::Tensor xd, torch::Tensor xgs, torch::Tensor wc, torch::Tensor ws, "
        "torch::Tensor wgs, c10::optional<torch::Tensor> bias, "
        "c10::optional<torch::Tensor> residual, torch::Tensor y, int64_t s, int64_t kw, int64_t occ);\n"
        "void arc_gemm_mma_pipe(torch::Tensor xd, torch::Tensor xgs, torch::Tensor wc, torch::Tensor ws, "
        "torch::Tensor wgs, c10::optional<torch::Tensor> bias, "
        "c10::optional<torch::Tensor> residual, torch::Tensor y, int64_t s, int64_t kw, int64_t st, "
        "int64_t xs);\n"
        "void arc_act_quant(torch::Tensor x, torch::Tensor starts, torch::Tensor gs, torch::Tensor gs_out, "
        "torch::Tensor xq, torch::Tensor scales, int64_t s, int64_t out, int64_t ctas);\n"
        "void arc_dequant(torch::Tensor codes, torch::Tensor scales, torch::Tensor out, int64_t s);\n"
        "void arc_scale_rows(torch::Tensor y, torch::Tensor xgs, torch::Tensor wgs, c10::optional<torch::Tensor> bias);\n"
        "void arc_rmsnorm_act(torch::Tensor x, torch::Tensor w, double eps, torch::Tensor starts, torch::Tensor gs, "
        "torch::Tensor gs_out, torch::Tensor y, torch::Tensor xq, torch::Tensor scales, int64_t s, int64_t out, "
        "int64_t ctas);\n"
        "void arc_silu_mul_act(torch::Tensor g, torch::Tensor u, torch::Tensor xgs, torch::Tensor wgu, "
        "torch::Tensor starts, torch::Tensor gs, torch::Tensor gs_out, torch::Tensor xq, torch::Tensor scales, "
        "int64_t s, int64_t out);\n"
        "void arc_silu_mul(torch::Tensor g, torch::Tensor u, torch::Tensor h);\n"
        "void arc_set_pdl(int64_t on, int64_t max_rows);")


FUNCTIONS = ["arc_gemv_dp4a", "arc_gemm_mma", "arc_gemm_mma_pipe", "arc_act_quant", "arc_dequant", "arc_scale_rows",
             "arc_rmsnorm_act", "arc_silu_mul_act", "arc_silu_mul", "arc_set_pdl"]          # bound into Python; each declared in DECL


# The pipelined MMA GEMV's settings in the default build, (token tiles: 1 for M <= 8 else 2, kw, st, xs):
# the ones gpu.mma_config takes (tests check both sides). ARCQUANT_EXT_SWEEP=1 builds every kw in (4, 8),
# st in 2..4 and xs instead (the benchmarks' sweeps; its own build folder): 24 kernels, ~20 % more
# build time on first use.
PIPE_SETTINGS = {(1, 4, 2, False), (1, 4, 3, True), (1, 8, 2, False), (1, 8, 3, True), (2, 4, 3, True), (2, 4, 4, True)}


@functools.cache
def _sweep_build() -> bool:
    """Read once: the extension is built once per process, and every GEMV call asks."""
    return os.environ.get("ARCQUANT_EXT_SWEEP") == "1"


def pipe_built_reason(m: int, kw: int, st: int, xs: bool) -> str | None:
    """Why the pipelined MMA GEMV with these settings is not in the extension (None: it is)."""
    if _sweep_build() or (1 if m <= 8 else 2, kw, st, bool(xs)) in PIPE_SETTINGS:
        return None
    return (f"the pipelined MMA GEMV with kw={kw}, st={st}, xs={bool(xs)} at M={m} is not in the default build "
            f"(cuda_gemv.PIPE_SETTINGS); set ARCQUANT_EXT_SWEEP=1 to build every setting")


@functools.cache
def _extension(capability: tuple):
    from torch.utils.cpp_extension import load_inline
    arch = f"{capability[0]}.{capability[1]}"
    sweep = _sweep_build()
    build = (Path(os.environ.get("ARCQUANT_EXT_DIR", Path.home() / ".cache" / "arcquant" / "ext"))
             / (f"sm{arch}" + ("-sweep" if sweep else "")))
    build.mkdir(parents=True, exist_ok=True)
    old = os.environ.get("TORCH_CUDA_ARCH_LIST")
    os.environ["TORCH_CUDA_ARCH_LIST"] = arch
    try:
        ext = load_inline(name="arcquant_gemv", cpp_sources=DECL, cuda_sources=[f.read_text() for f in [HEADER, *SRCS]],
                           functions=FUNCTIONS,
                           extra_cuda_cflags=["-O3"] + (["-DARC_PIPE_ALL"] if sweep else []),
                           extra_include_paths=[str(CSRC)],
                           build_directory=str(build))
        pdl.register(ext, capability)
        return ext
    finally:
        if old is None:
            os.environ.pop("TORCH_CUDA_ARCH_LIST")
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = old


@functools.cache
def device_extension(device: torch.device):
    """The extension for `device`'s compute capability, looked up once a device (every kernel call
    asks: torch.cuda.get_device_capability costs ~20 us of host time a call on the H200 machine)."""
    return _extension(torch.cuda.get_device_capability(device))


def unavailable_reason(device: torch.device) -> str | None:
    """Why the CUDA GEMV cannot run on `device` (None: it can; builds it on first call)."""
    from torch.utils.cpp_extension import CUDA_HOME
    if device.type != "cuda":
        return f"the CUDA GEMV needs a CUDA device, got {device}"
    cap = torch.cuda.get_device_capability(device)
    if cap < (8, 0):
        return f"the CUDA GEMV needs compute capability >= 8.0, got {cap}"
    if CUDA_HOME is None:
        return "the CUDA GEMV is built on first use and needs the CUDA toolkit (nvcc); none was found"
    try:
        _extension(cap)
    except Exception as e:                                    # a failed build: say why, use Triton
        return f"building the CUDA GEMV failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
    return None


@functools.cache
def logged_reason(device: torch.device, kernel: str) -> str | None:
    """unavailable_reason, asked once per device and kernel; a reason is logged once as
    "<kernel>: Triton (<reason>)" (that kernel's Triton twin runs instead)."""
    reason = unavailable_reason(device)
    if reason:
        logging.getLogger("arcquant").info("%s: Triton (%s)", kernel, reason)
    return reason


def gemv_shape_reason(k: int, s: int, m: int | None = None) -> str | None:
    if k % 32:
        return f"the CUDA GEMV reads 32 codes per step: K={k} is not a multiple of 32"
    if m is not None and not 1 <= m <= MAX_M:
        return f"the CUDA GEMV handles 1 <= M <= {MAX_M}, got M={m}"
    return None


def _check_weight_and_devices(wc, ws, tensors: dict) -> None:
    """The checks both kernels share: the stored weight's dtypes and shapes, one CUDA device."""
    n, k = wc.shape[0], wc.shape[1] * 2
    if wc.dtype != torch.uint8 or ws.shape != (n, k // 16) or ws.dtype != torch.float8_e4m3fn:
        raise ValueError(f"weight codes must be uint8 ({n}, {k // 2}) and scales float8_e4m3fn ({n}, {k // 16})")
    first = next(iter(tensors.values()))
    wrong = [f"{name} on {t.device}" for name, t in tensors.items() if t.device != first.device or t.device.type != "cuda"]
    if wrong:
        raise ValueError(f"all operands must be on one CUDA device: {', '.join(wrong)}")


def tensor_scales(wgs, n: int) -> torch.Tensor:
    """The weight tensor scale as the kernels take it: float32, one value or one per output row
    (layers stacked into one launch, e.g. q/k/v)."""
    w = wgs.to(torch.float32).reshape(-1).contiguous()
    if w.numel() not in (1, n):
        raise ValueError(f"wgs holds {w.numel()} values: give one tensor scale or one per output row (N = {n})")
    return w


def _outputs(x, n: int, bias, out_dtype, residual=None):
    """-> (y (M, N) out_dtype, bias as float32 or None, the built extension); residual (added to y
    in the epilogue) checked: (M, N), out_dtype, contiguous, on x's device."""
    if out_dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"out_dtype {out_dtype}: use bfloat16, float16 or float32")
    if residual is not None and (residual.shape != (x.shape[0], n) or residual.dtype != out_dtype
                                 or residual.device != x.device or not residual.is_contiguous()):
        raise ValueError(f"residual must be a contiguous {out_dtype} ({x.shape[0]}, {n}) tensor on {x.device}; got "
                         f"{residual.dtype} {tuple(residual.shape)} on {residual.device}"
                         f"{'' if residual.is_contiguous() else ', not contiguous'}")
    y = torch.empty(x.shape[0], n, dtype=out_dtype, device=x.device)
    b = None if bias is None else bias.to(device=x.device, dtype=torch.float32).contiguous()
    return y, b, device_extension(x.device)


def arc_gemv_int8(xi, xs, xgs, wc, ws, wgs, s: int, bias=None, out_dtype=torch.bfloat16, nr: int = 2,
                  kw: int = 4, u: int = 1, residual=None) -> torch.Tensor:
    """y (M, N) = 0.25 * sum_b isum_b * ws * xs / (xgs * wgs) (+ bias); M <= 8; wgs () or (N,).
    residual (M, N) of out_dtype: y = out_dtype(y) + residual, rounded (torch's `residual + y`).
    nr: output rows per thread block (1, 2, 4); kw: warps splitting the depth; u: 32-code steps
    whose weight loads a lane issues together (1, or 2 / 4 for M <= 2; same result for every u)."""
    m, n, k = xi.shape[0], wc.shape[0], wc.shape[1] * 2
    reason = gemv_shape_reason(k, s, m)
    if reason:
        raise ValueError(reason)
    if u not in (1, 2, 4) or (u > 1 and m > 2):
        raise ValueError(f"u={u}: give 1, or 2 / 4 for M <= 2 (got M={m})")
    if xi.dtype != torch.int8 or xi.shape[1] != k + s or not xi.is_contiguous():
        raise ValueError(f"xi must be contiguous int8 ({m}, {k + s}) for K={k}, s={s}; got {xi.dtype} "
                         f"{tuple(xi.shape)}")
    if xs.shape != (m, (k + s) // 16) or xs.dtype != torch.float8_e4m3fn:
        raise ValueError(f"xs must be float8_e4m3fn ({m}, {(k + s) // 16}); got {xs.dtype} {tuple(xs.shape)}")
    if xs.data_ptr() % 2 or ws.data_ptr() % 2:                    # the kernel reads two scales a load
        raise ValueError("xs and ws must start on a 2-byte boundary (take a fresh, contiguous tensor)")
    _check_weight_and_devices(wc, ws, {"xi": xi, "xs": xs, "wc": wc, "ws": ws})
    if any(t.data_ptr() % 16 for t in (xi, wc)):
        raise ValueError("xi and wc must start on a 16-byte boundary (take a fresh, contiguous tensor)")
    y, b, ext = _outputs(xi, n, bias, out_dtype, residual)
    ext.arc_gemv_dp4a(xi, xs.view(torch.uint8), xgs.to(torch.float32).reshape(-1).contiguous(), wc.contiguous(),
                      ws.view(torch.uint8).contiguous(), tensor_scales(wgs, n), b, residual, y, s,
                      nr, kw, u)
    return y


def _check_mma_operands(xd, wc, ws, s: int) -> None:
    """The checks both tensor-core GEMVs share: xd float16 (M, K+s) contiguous, the weight, one device."""
    m, k = xd.shape[0], wc.shape[1] * 2
    if xd.dtype != torch.float16 or xd.shape[1] != k + s or not xd.is_contiguous():
        raise ValueError(f"xd must be contiguous float16 ({m}, {k + s}) for K={k}, s={s}; got {xd.dtype} "
                         f"{tuple(xd.shape)}")
    _check_weight_and_devices(wc, ws, {"xd": xd, "wc": wc, "ws": ws})


def arc_gemm_mma(xd, xgs, wc, ws, wgs, s: int, bias=None, out_dtype=torch.bfloat16, kw: int = 4,
                 occ: bool = False, st: int = 0, xs: bool = False, residual=None) -> torch.Tensor:
    """y (M, N) = xd @ dequant(W_aug)^T / (xgs * wgs) (+ bias) on tensor cores; M <= 64; wgs () or (N,).
    xd (M, K+s) float16 = code * block scale in to_mma_order (quantize_act out="mma"); kw: warps
    splitting the depth (1..8); occ: the entry point with a register bound (more resident warps,
    see the .cu file). st > 0: the cp.async-pipelined kernel (arc_gemm_mma_pipe, st stages, xs:
    activations staged too) where it takes these operands and is built with these settings
    (pipe_shape_reason, pipe_built_reason), else this one - the same bits either way. residual: as
    arc_gemv_int8's."""
    m, n = xd.shape[0], wc.shape[0]
    if not 1 <= m <= MMA_MAX_M:
        raise ValueError(f"the MMA GEMV handles 1 <= M <= {MMA_MAX_M}, got M={m}")
    _check_mma_operands(xd, wc, ws, s)
    pipe = st and kw in (4, 8) and pipe_shape_reason(xd, wc, ws, kw) is None
    if pipe and pipe_built_reason(m, kw, st, xs) is None:
        _check_pipe_settings(kw, st)
        return _launch_pipe(xd, xgs, wc, ws, wgs, s, bias, out_dtype, kw, st, xs, residual)
    if xd.data_ptr() % 16 or wc.data_ptr() % 8:
        raise ValueError("xd must start on a 16-byte and wc on an 8-byte boundary (take a fresh, contiguous tensor)")
    kw = max(1, min(kw, 8, 32 // -(-m // 8)))
    y, b, ext = _outputs(xd, n, bias, out_dtype, residual)
    ext.arc_gemm_mma(xd, xgs.to(torch.float32).reshape(-1).contiguous(), wc.contiguous(),
                     ws.view(torch.uint8).contiguous(), tensor_scales(wgs, n), b, residual, y, s, kw,
                     int(occ))
    return y


def pipe_shape_reason(xd, wc, ws, kw: int) -> str | None:
    """Why the cp.async-pipelined MMA GEMV cannot take these operands with kw warps (None: it can)."""
    m, k = xd.shape[0], wc.shape[1] * 2
    if not 1 <= m <= PIPE_MAX_M:
        return f"the pipelined MMA GEMV handles 1 <= M <= {PIPE_MAX_M}, got M={m}"
    if k % (128 * kw):
        return (f"the pipelined MMA GEMV copies whole stages of kw * 128 = {128 * kw} columns: K={k} is not a "
                f"multiple (fewer warps, or the unpipelined kernel)")
    if any(t.data_ptr() % 16 for t in (xd, wc, ws)):
        return "xd, wc and ws must start on 16-byte boundaries for the pipelined MMA GEMV"
    return None


def arc_gemm_mma_pipe(xd, xgs, wc, ws, wgs, s: int, bias=None, out_dtype=torch.bfloat16, kw: int = 4,
                      st: int = 3, xs: bool = False, residual=None) -> torch.Tensor:
    """arc_gemm_mma with its weight (and with xs its activation) tiles streamed through shared
    memory by cp.async, st stages in flight; M <= 16, K % (128 * kw) == 0. Same bits as arc_gemm_mma
    with the same kw (same MMA tiles, same per-warp order). kw in {4, 8}, st in 2..4."""
    _check_pipe_settings(kw, st)
    _check_mma_operands(xd, wc, ws, s)
    reason = pipe_shape_reason(xd, wc, ws, kw) or pipe_built_reason(xd.shape[0], kw, st, xs)
    if reason:
        raise ValueError(reason)
    return _launch_pipe(xd, xgs, wc, ws, wgs, s, bias, out_dtype, kw, st, xs, residual)


def _check_pipe_settings(kw: int, st: int) -> None:
    if kw not in (4, 8) or st not in (2, 3, 4):
        raise ValueError(f"kw={kw}, st={st}: the pipelined MMA GEMV takes kw in (4, 8) and st in (2, 3, 4)")


def _launch_pipe(xd, xgs, wc, ws, wgs, s, bias, out_dtype, kw, st, xs, residual=None) -> torch.Tensor:
    """The pipelined kernel's launch, its operands already checked (arc_gemm_mma / arc_gemm_mma_pipe)."""
    y, b, ext = _outputs(xd, wc.shape[0], bias, out_dtype, residual)
    ext.arc_gemm_mma_pipe(xd, xgs.to(torch.float32).reshape(-1).contiguous(), wc.contiguous(),
                          ws.view(torch.uint8).contiguous(), tensor_scales(wgs, wc.shape[0]), b, residual, y, s, kw,
                          st, int(xs))
    return y


MMA_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)     # column j of each 8 in the MMA operand holds column MMA_ORDER[j]


def to_mma_order(x: torch.Tensor) -> torch.Tensor:
    """(..., C) -> the same columns, each 8 in MMA_ORDER: the tensor-core GEMV decodes codes j and
    j + 4 of a packed word into one half2 (csrc/arc_gemv.cu, decode8), so the activation operand
    ("mma") pairs its columns the same way. C % 8 == 0."""
    return x.unflatten(-1, (-1, 2, 4)).transpose(-1, -2).flatten(-3)


def from_mma_order(x: torch.Tensor) -> torch.Tensor:
    """The inverse of to_mma_order."""
    return x.unflatten(-1, (-1, 4, 2)).transpose(-1, -2).flatten(-3)


def fp16_gemm_reference(xd, xgs, wc, ws, wgs, s: int, bias=None, mma_order: bool = True) -> torch.Tensor:
    """The MMA kernel's oracle (float64): xd (code * block scale; in to_mma_order unless mma_order
    is False: the Triton GEMV's and the prefill's operand) times the augmented weight."""
    from ..formats import nvfp4
    k = wc.shape[1] * 2
    w = nvfp4.dequantize(nvfp4.unpack(wc), ws, torch.tensor(1.0)).double()        # (N, K) code * scale
    xn = from_mma_order(xd) if mma_order else xd
    y = xn.double() @ torch.cat([w, w[:, k - s:]], 1).T / (xgs.double().reshape(-1, 1) * wgs.double().reshape(-1))
    return y if bias is None else y + bias.double()


def int8_gemv_reference(xi, xs, xgs, wc, ws, wgs, s: int, bias=None) -> torch.Tensor:
    """The oracle (float64, any device): the same product from the unpacked operands."""
    from ..formats import nvfp4
    k = wc.shape[1] * 2
    w = nvfp4.dequantize(nvfp4.unpack(wc), ws, torch.tensor(1.0)).double()        # (N, K) code * scale
    w_aug = torch.cat([w, w[:, k - s:]], 1)                                       # (N, K+s)
    x = (xi.double() / 2).unflatten(-1, (-1, 16)) * xs.double().unsqueeze(-1)     # (M, (K+s)/16, 16)
    y = x.flatten(-2) @ w_aug.T / (xgs.double().reshape(-1, 1) * wgs.double().reshape(-1))
    return y if bias is None else y + bias.double()


def mma_decode_reference(words: torch.Tensor) -> torch.Tensor:
    """The tensor-core GEMVs' decode8 (csrc/arc_gemv.cu) on int64 tensors of 32-bit words of 8 E2M1
    codes (code i in nibble i) -> (..., 4) words: half2 j holds codes j (low half) and j + 4 (high)
    as fp16 bits whose value is the code's E2M1 value * 2^-14: the sign to bit 15, the 3 magnitude
    bits to 9..11 (exponent's low two bits, mantissa's top bit), in both halves at once."""
    sgn, mag = 0x80008000, 0x0E000E00
    out = [(((words << (12 - 4 * j)) & sgn) | (((words << (9 - 4 * j)) if j < 3 else (words >> 3)) & mag))
           for j in range(4)]
    return torch.stack(out, -1) & 0xFFFFFFFF


def prmt_reference(a: int, b: int, sel: torch.Tensor) -> torch.Tensor:
    """PTX prmt.b32 (default mode) on int64 tensors of 32-bit words: result byte i comes from
    selector nibble i: its low 3 bits pick a byte of b:a, its bit 3 replicates that byte's sign."""
    src = torch.tensor([(a >> 8 * i) & 0xFF for i in range(4)] + [(b >> 8 * i) & 0xFF for i in range(4)])
    out = torch.zeros_like(sel)
    for i in range(4):
        nib = (sel >> 4 * i) & 0xF
        byte = src[nib & 7]
        byte = torch.where((nib & 8) != 0, torch.where(byte >= 128, 0xFF, 0), byte)
        out |= byte << 8 * i
    return out
