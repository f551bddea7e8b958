"""ARC activation quantization in CUDA (csrc/arc_act.cu): one thread per 16-block.

Same outputs, bit for bit, as act_quant.arc_quantize_activation_gemv / arc_quantize_activation
(and arcquant.arc.quantize_activation, the oracle) for whole-block permutations ('blocks',
the default order: `starts` from act_quant.block_starts) and bf16 / fp16 inputs:
    out="int8":             xq (M, K+s) int8 = 2 * E2M1 value, scales (M, (K+s)/16) E4M3
    out="mma":              xq (M, K+s) float16 = code * block scale (exact), each 8 columns in the
                            tensor-core GEMV's order (cuda_gemv.to_mma_order), scales None
    out="bfloat16":         xq (M, K+s) = code * block scale (exact), scales None
    out="packed":           codes (M, (K+s)/2) uint8 (element 2i in the low nibble), scales
gs=None: the per-token scale 448*6/max|x[m]| is computed in the kernel and returned (M,).
Why CUDA: the Triton kernel is instruction-bound (~220 instructions per element, see the .cu
file); here a thread owns its block and moves it with 16-byte loads and stores.
"""
import torch

from .cuda_gemv import device_extension, logged_reason

OUTS = {"int8": (0, torch.int8), "mma": (1, torch.float16), "bfloat16": (2, torch.bfloat16),
        "packed": (3, torch.uint8)}
THREADS, TARGET_CTAS = 128, 1024


def cuda_act_reason(x: torch.Tensor, starts: torch.Tensor | None) -> str | None:
    """Why the CUDA activation kernel cannot take this input (None: it can)."""
    if starts is None:
        return "the CUDA activation kernel moves whole 16-blocks: an arbitrary ('sorted') permutation needs Triton"
    if x.device.type != "cuda":
        return f"the CUDA activation kernel needs a CUDA tensor, got {x.device}"
    if x.dtype not in (torch.bfloat16, torch.float16):
        return f"the CUDA activation kernel reads bfloat16 / float16, got {x.dtype}"
    if x.data_ptr() % 16:
        return "x does not start on a 16-byte boundary"
    return logged_reason(x.device, "activation kernel")


def ctas_per_row(m: int, nblk: int) -> int:
    """Enough thread blocks to fill the card (~TARGET_CTAS), at most one thread per 16-block
    (M = 0 rows: 1, nothing is launched)."""
    return max(1, min(-(-TARGET_CTAS // max(m, 1)), -(-nblk // THREADS)))


def _rows_ok(x: torch.Tensor, strided: bool) -> bool:
    """x's rows as the kernels read them: contiguous, or (strided) unit column stride and rows a
    multiple of 16 bytes apart (the halves of a stacked product)."""
    if not strided:
        return x.is_contiguous()
    return x.stride(1) == 1 and x.stride(0) >= x.shape[1] and x.stride(0) % 8 == 0


def _same_rows(g: torch.Tensor, u: torch.Tensor) -> bool:
    """Whether u matches g (shape, dtype, device, strides) and both start on a 16-byte boundary: how
    the SiLU kernels read gate and up (two tensors, or the halves of one stacked product)."""
    return (u.shape == g.shape and u.dtype == g.dtype and u.device == g.device and u.stride() == g.stride()
            and g.data_ptr() % 16 == 0 and u.data_ptr() % 16 == 0)


def _outputs(x: torch.Tensor, starts: torch.Tensor, s: int, gs: torch.Tensor | None, out: str,
             max_k: int | None = None, strided: bool = False) -> tuple:
    """The activation kernels' shared input checks and outputs: -> (kind, nblk, xq, scales or
    None, gs as the kernel reads it (empty: computed per row), gs (M,) the kernel fills or as given)."""
    if out not in OUTS:
        raise ValueError(f"out={out!r}: use one of {', '.join(OUTS)}")
    reason = cuda_act_reason(x, starts)
    if reason:
        raise ValueError(reason)
    m, k = x.shape
    if not _rows_ok(x, strided) or k % 16 or s % 16 or not 0 <= s <= k or (max_k is not None and k > max_k):
        bound = "" if max_k is None else f" <= {max_k}"
        rows = "16-byte aligned rows" if strided else "contiguous"
        raise ValueError(f"x must be {rows} with K={k}{bound} and s={s} multiples of 16, 0 <= s <= K "
                         f"(got strides {x.stride()})")
    if starts.shape != (k // 16,) or starts.dtype != torch.int32 or starts.device != x.device:
        raise ValueError(f"starts must be int32 ({k // 16},) on {x.device} (act_quant.block_starts(perm))")
    kind, dtype = OUTS[out]
    nblk = (k + s) // 16
    xq = torch.empty(m, (k + s) // 2 if out == "packed" else k + s, dtype=dtype, device=x.device)
    scales = torch.empty(m, nblk, dtype=torch.uint8, device=x.device) if kind in (0, 3) else None
    g = torch.empty(0, dtype=torch.float32, device=x.device) if gs is None else \
        gs.to(device=x.device, dtype=torch.float32).reshape(-1).contiguous()
    if g.numel() not in (0, 1, m):
        raise ValueError(f"gs must hold 1 or M={m} values, got {g.numel()}")
    g_out = torch.empty(m, dtype=torch.float32, device=x.device) if gs is None else g
    return kind, nblk, xq, scales, g, g_out


def arc_act_quant_cuda(x: torch.Tensor, starts: torch.Tensor, s: int, gs: torch.Tensor | None = None,
                       out: str = "int8", ctas: int = 0) -> tuple:
    """x (M, K) -> (xq, scales or None, gs (M,) or as given); see the module docstring.
    ctas: CTAs a row (0: ctas_per_row's choice; the same bits for any count)."""
    if ctas < 0:
        raise ValueError(f"ctas={ctas}: give 0 (the wrapper's choice) or a number of CTAs a row >= 1")
    kind, nblk, xq, scales, g, g_out = _outputs(x, starts, s, gs, out)
    ext = device_extension(x.device)
    ext.arc_act_quant(x, starts, g, g_out, xq, scales if scales is not None else xq, s, kind,
                      ctas or ctas_per_row(x.shape[0], nblk))
    return xq, None if scales is None else scales.view(torch.float8_e4m3fn), g_out


NORM_MAX_K = 12288                                                  # the row's floats in shared memory


def arc_rmsnorm_act_cuda(x: torch.Tensor, weight: torch.Tensor, eps: float, starts: torch.Tensor, s: int,
                         gs: torch.Tensor | None = None, out: str = "int8", ctas: int = 0) -> tuple:
    """RMSNorm fused in front of the activation kernel (the inputs of q/k/v and gate/up):
    x (M, K) -> (y (M, K) = rmsnorm.rmsnorm_reference(x) up to two ulps where the sum of squares' order
    matters, then xq, scales or None, gs exactly as arc_act_quant_cuda(y, ...)).
    ctas: CTAs a row (0: the kernel's choice - up to 8 for M <= 16; the same result for any)."""
    if not 0 <= ctas <= 64:
        raise ValueError(f"ctas={ctas}: give 0 (the kernel's choice) or 1..64 CTAs a row")
    kind, _, xq, scales, g, g_out = _outputs(x, starts, s, gs, out, NORM_MAX_K)
    k = x.shape[1]
    if weight.shape != (k,) or weight.dtype != x.dtype or weight.device != x.device:
        raise ValueError(f"weight must be ({k},) {x.dtype} on {x.device}, got {tuple(weight.shape)} {weight.dtype}")
    y = torch.empty_like(x)
    ext = device_extension(x.device)
    ext.arc_rmsnorm_act(x, weight.contiguous(), float(eps), starts, g, g_out, y, xq,
                        scales if scales is not None else xq, s, kind, ctas)
    return y, xq, None if scales is None else scales.view(torch.float8_e4m3fn), g_out


SILU_MAX_K = 24576                                                  # the row of h (2 bytes each) in shared memory


def silu_mul_reference(g: torch.Tensor, u: torch.Tensor, xgs: torch.Tensor | None = None,
                       wgu: torch.Tensor | None = None) -> torch.Tensor:
    """transformers' gated MLP input of down_proj, F.silu(gate) * up in the inputs' dtype; with xgs
    (1 or M activation tensor scales) and wgu (gate's and up's weight tensor scales), gate and up are
    first scaled and rounded as prefill.scale_rows does to the unscaled GEMM outputs."""
    from .prefill import scale_rows
    if xgs is not None:
        g = scale_rows(g.clone(), xgs, wgu.reshape(-1)[0], cuda=False)
        u = scale_rows(u.clone(), xgs, wgu.reshape(-1)[1], cuda=False)
    return torch.nn.functional.silu(g) * u


def arc_silu_mul_act_cuda(g: torch.Tensor, u: torch.Tensor, starts: torch.Tensor, s: int,
                          gs: torch.Tensor | None = None, out: str = "bfloat16", xgs: torch.Tensor | None = None,
                          wgu: torch.Tensor | None = None) -> tuple:
    """SiLU(gate) * up fused in front of the activation kernel (the input of down_proj): gate, up
    (M, K), rows contiguous and one row stride for both (two tensors, or the two halves of a stacked
    gate / up product) -> (xq, scales or None, gs) as
    arc_act_quant_cuda(silu_mul_reference(g, u, xgs, wgu), ...)."""
    kind, _, xq, scales, gg, g_out = _outputs(g, starts, s, gs, out, SILU_MAX_K, strided=True)
    if not _same_rows(g, u):
        raise ValueError(f"up {tuple(u.shape)} {u.dtype} on {u.device} (strides {u.stride()}) must match gate "
                         f"{tuple(g.shape)} {g.dtype} on {g.device} (strides {g.stride()}) and be 16-byte aligned")
    if (xgs is None) != (wgu is None):
        raise ValueError("give both xgs and wgu (gate's and up's weight tensor scales), or neither")
    none = torch.empty(0, dtype=torch.float32, device=g.device)
    xs = none if xgs is None else xgs.to(device=g.device, dtype=torch.float32).reshape(-1).contiguous()
    w2 = none if wgu is None else wgu.to(device=g.device, dtype=torch.float32).reshape(-1).contiguous()
    if xs.numel() not in (0, 1, g.shape[0]) or (xgs is not None and w2.numel() != 2):
        raise ValueError(f"xgs must hold 1 or M={g.shape[0]} values and wgu 2 (gate's, up's), got {xs.numel()} and "
                         f"{w2.numel()}")
    ext = device_extension(g.device)
    ext.arc_silu_mul_act(g, u, xs, w2, starts, gg, g_out, xq, scales if scales is not None else xq, s, kind)
    return xq, None if scales is None else scales.view(torch.float8_e4m3fn), g_out


def silu_mul_rows_ok(g: torch.Tensor, u: torch.Tensor) -> bool:
    """Whether arc_silu_mul_cuda takes gate / up as they are: CUDA bf16 / fp16 (M, K), K % 8 == 0, rows
    16-byte aligned and one row stride (two tensors, or the halves of a stacked product)."""
    return (g.is_cuda and g.dtype in (torch.bfloat16, torch.float16) and g.dim() == 2 and g.shape[1] % 8 == 0
            and _rows_ok(g, True) and _same_rows(g, u))


def arc_silu_mul_cuda(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """F.silu(g) * u bit for bit, one CUDA kernel (the decode MLP: gate / up may be the two halves of
    the stacked GEMV's output, which torch's elementwise kernels read through their strided path):
    g, u (M, K) -> h (M, K) contiguous."""
    if not silu_mul_rows_ok(g, u):
        raise ValueError(f"gate {tuple(g.shape)} {g.dtype} on {g.device} (strides {g.stride()}) and up "
                         f"{tuple(u.shape)} {u.dtype} (strides {u.stride()}) must be CUDA bfloat16 / float16 (M, K), "
                         "K % 8 == 0, with one row stride and 16-byte aligned rows")
    h = torch.empty(g.shape, dtype=g.dtype, device=g.device)
    device_extension(g.device).arc_silu_mul(g, u, h)
    return h
