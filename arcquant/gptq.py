"""GPTQ rounding of the (augmented) weight: `gptq` (s = 0) and `arc+gptq` methods.

ARC's product is X_aug W_aug^T = Q(X_p) Wq^T + Q(R) Wq_tail^T, and Q(X_p)_tail + Q(R) ~ X_p,tail,
so Y ~ X_p Wq^T: the weight error to minimise is E[|X_p (W_p - Wq)^T|^2], GPTQ's objective
with H = X_p^T X_p (inputs in the plan's column order; the residual tail reuses the last s
quantized columns, so those are what GPTQ rounds). Columns are rounded in order, each
error spread over the columns not yet rounded through the inverse Hessian's Cholesky factor
(Frantar et al. 2022). NVFP4 blocks: the E4M3 scale of a 16-column block is chosen from the
block's current (error-updated) weights when GPTQ reaches its first column; the tensor scale
is the one of the original weights. Returns codes and scales directly, so the stored weight is
exactly what GPTQ rounded.
"""
import torch

from .formats import get_format, nvfp4
from .formats.e2m1 import e2m1_decode, e2m1_round

DAMP = 0.01
LAZY = 128                      # columns updated lazily per batch (GPTQ's "block size")


def _inverse_cholesky(h: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor of H^-1 (H damped until it factors)."""
    n, damp = h.shape[0], DAMP * h.diagonal().mean()
    eye = torch.eye(n, dtype=h.dtype, device=h.device)
    for _ in range(6):
        try:
            low = torch.linalg.cholesky(h + damp * eye)
            return torch.linalg.cholesky(torch.cholesky_inverse(low), upper=True)
        except torch.linalg.LinAlgError:
            damp *= 10
    raise FloatingPointError("the calibration Hessian is not positive definite even with damping; "
                             "use more calibration samples")


def gptq_nvfp4(w: torch.Tensor, h: torch.Tensor, gs: torch.Tensor):
    """w (N, K) float32 (K a multiple of 16), h (K, K) -> (codes (N, K) u8, scales (N, K/16) e4m3)."""
    fmt = get_format("nvfp4")
    n, k = w.shape
    w, h = w.double().clone(), h.double().clone()
    dead = h.diagonal() == 0                                     # channels never active: weight irrelevant
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    hinv = _inverse_cholesky(h)
    gs32 = torch.as_tensor(gs, dtype=torch.float32, device=w.device)
    codes = torch.zeros(n, k, dtype=torch.uint8, device=w.device)
    scales = torch.zeros(n, k // fmt.block, dtype=torch.float8_e4m3fn, device=w.device)
    for i1 in range(0, k, LAZY):
        i2 = min(i1 + LAZY, k)
        w1, hi = w[:, i1:i2].clone(), hinv[i1:i2, i1:i2]
        err1 = torch.zeros(n, i2 - i1, dtype=torch.float64, device=w.device)
        for i in range(i2 - i1):
            col = i1 + i
            if col % fmt.block == 0:                             # the block's scale, from current weights
                _, sc = nvfp4.quantize(w1[:, i:i + fmt.block].float(), gs32)    # (N, 1)
                scales[:, col // fmt.block] = sc[:, 0]
                sf = sc[:, 0].float()
                recip = torch.where(sf > 0, gs32 / sf, torch.zeros_like(sf))
            c = e2m1_round(w1[:, i].float() * recip)             # (N,) codes
            codes[:, col] = c
            q = (e2m1_decode(c) * sf / gs32).double()     # dequantized column
            e = (w1[:, i] - q) / hi[i, i]
            w1[:, i:] -= e[:, None] * hi[i, i:][None, :]
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return codes, scales
