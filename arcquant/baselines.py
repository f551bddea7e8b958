"""The transforms of the paper's baselines, as pure functions (spec section 3).

Rotation (QuaRot-style): y = x W^T = (x R)(W R)^T for orthonormal R, so activations are
rotated online and weights offline, then both quantized. R = diag(random signs) @ H:
    block b (16/32/128)  block-diagonal Sylvester Hadamard of size b (NVFP4's 16-blocks are
                         kept isolated when b = 16: the `arc+hadamard` combination)
    full (block 0)       H_(2^a) kron Q_m over the whole width K = 2^a * m (Q_m a seeded
                         random orthogonal matrix when K is not a power of two)
SmoothQuant: s_c = max|x_c|^alpha / max|W_c|^(1-alpha); x / s and W * s (product unchanged).
Atom: the top-s channels by calibration max go to an 8-bit branch (FP8 E4M3, per-token
scale for activations, per-row for weights), the rest NVFP4 - the mixed precision ARC
replaces with residual channels of the same width.
"""
import math
from functools import lru_cache

import torch


def hadamard(n: int) -> torch.Tensor:
    """(n, n) float64 orthonormal Sylvester Hadamard matrix; n a power of two."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"a Hadamard block needs a power-of-two size, got {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(n)


def _random_orthogonal(m: int, gen: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(m, m, generator=gen, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).contiguous()


def rotation_matrix(k: int, block: int, seed: int = 0, device=None) -> torch.Tensor:
    """(n, n) float32 rotation applied to consecutive n-channel groups of a K-wide input:
    n = block, or n = K for the full-width rotation (block 0). Deterministic in seed. Built once
    on the CPU; `device`: a copy kept there (not a host-to-device copy per layer call - the
    full-width matrix of K = 4,864 is 95 MB)."""
    if device is None or torch.device(device).type == "cpu":
        return _rotation_cpu(k, block, seed)
    return _rotation_copy(k, block, seed, torch.device(device))


@lru_cache(maxsize=32)
def _rotation_copy(k: int, block: int, seed: int, device: torch.device) -> torch.Tensor:
    return _rotation_cpu(k, block, seed).to(device)


@lru_cache(maxsize=32)
def _rotation_cpu(k: int, block: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if block:
        if k % block:
            raise ValueError(f"K={k} is not a multiple of the rotation block {block}")
        h = hadamard(block)
    else:
        a = k & -k                                                    # largest power of 2 dividing K
        h = hadamard(a) if k == a else torch.kron(hadamard(a), _random_orthogonal(k // a, gen))
    signs = torch.randint(0, 2, (h.shape[0],), generator=gen).double() * 2 - 1
    return (signs[:, None] * h).float()


def rotate(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """x (..., K) -> x R applied to each group of n = R.shape[0] channels (float32)."""
    n = r.shape[0]
    return (x.to(torch.float32).unflatten(-1, (-1, n)) @ r.to(x.device)).flatten(-2)


def smooth_scales(act_absmax: torch.Tensor, w_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """(K,) SmoothQuant scales; channels never seen (max 0) keep scale 1."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha={alpha} must be in [0, 1] (SmoothQuant uses 0.5)")
    a, w = act_absmax.double(), w_absmax.double()
    s = a.pow(alpha) / w.pow(1 - alpha)
    ok = (a > 0) & (w > 0) & torch.isfinite(s)
    return torch.where(ok, s, torch.ones_like(s)).clamp(1e-5, 1e5).float()
