"""The engine-level fusions (engine_fusion.py) and their kernels, on the CPU through the Triton
interpreter: the rotary + KV-cache kernel bit-exact against its torch oracle and, in a real
model (SmolLM2-135M), the engine's logits bit-exact with the eager attention; the RMSNorm
kernel within an ulp of transformers' formula."""
import os

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")   # before triton is imported: CPU interpreter
pytest.importorskip("triton", reason="triton is a test dependency (pip install -e .[test])")

from arcquant.engine import Engine                                      # noqa: E402
from arcquant.engine_fusion import fuse_engine                          # noqa: E402
from arcquant.kernels.ops import backend                                # noqa: E402
from arcquant.kernels.rmsnorm import rmsnorm, rmsnorm_reason, rmsnorm_reference  # noqa: E402
from arcquant.kernels.rope_cache import rope_cache, rope_cache_reference  # noqa: E402

ULP = {torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10, torch.float32: 2 ** -21}


def _rope_case(dt, b, t, hq, hkv, d, L, seed=0):
    """Strided q/k/v views of one stacked projection (as the quantized model's), random rotary
    angles (both halves of cos / sin equal, as a model's tables), random caches."""
    g = torch.Generator().manual_seed(seed)
    n = (hq + 2 * hkv) * d
    qkv = torch.randn(b, t, n + 3, generator=g).mul(3).to(dt)          # 3 spare columns: strided rows
    q, k, v = qkv[..., :hq * d], qkv[..., hq * d:(hq + hkv) * d], qkv[..., (hq + hkv) * d:n]
    ang = torch.randn(b, t, d // 2, generator=g) * 5
    ang = torch.cat([ang, ang], -1)
    caches = [torch.randn(b, hkv, L, d, generator=g).to(dt) for _ in range(2)]
    return q, k, v, ang.cos().to(dt), ang.sin().to(dt), caches


@pytest.mark.parametrize("dt", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("b,t,hq,hkv,d,L,start", [(1, 1, 4, 2, 8, 10, 3), (2, 5, 6, 2, 64, 16, 4),
                                                  (3, 2, 3, 3, 12, 8, 7), (1, 4, 2, 1, 6, 9, 7)])
def test_rope_cache_kernel_is_bit_exact(dt, b, t, hq, hkv, d, L, start):
    """Rotated queries, the cache rows written (and positions >= L left alone: the last case
    runs off the end) all equal to the oracle bit for bit."""
    q, k, v, cos, sin, (kc, vc) = _rope_case(dt, b, t, hq, hkv, d, L)
    kc2, vc2, s = kc.clone(), vc.clone(), torch.tensor([start])
    got = rope_cache(q, k, v, cos, sin, kc, vc, s)
    want = rope_cache_reference(q, k, v, cos, sin, kc2, vc2, s)
    assert got.shape == (b, hq, t, d) and torch.equal(got, want)
    assert torch.equal(kc, kc2) and torch.equal(vc, vc2)
    assert not torch.equal(kc[:, :, start:], _rope_case(dt, b, t, hq, hkv, d, L)[5][0][:, :, start:])  # written


def test_rope_cache_refuses_bad_input():
    q, k, v, cos, sin, (kc, vc) = _rope_case(torch.bfloat16, 1, 2, 4, 2, 8, 10)
    s = torch.tensor([0])
    with pytest.raises(ValueError, match="cos is torch.float32 .* expected torch.bfloat16"):
        rope_cache(q, k, v, cos.float(), sin, kc, vc, s)
    with pytest.raises(ValueError, match="caches must be contiguous"):
        rope_cache(q, k, v, cos, sin, kc.transpose(2, 3).contiguous().transpose(2, 3), vc, s)
    with pytest.raises(ValueError, match="start must be one int64"):
        rope_cache(q, k, v, cos, sin, kc, vc, torch.tensor([0], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"expected \(1, 2, L, 8\)"):
        rope_cache(q, k, v, cos, sin, kc[:, :1], vc[:, :1], s)
    with pytest.raises(ValueError, match="head size 6 does not divide"):
        rope_cache(q, k, v, cos[..., :6], sin[..., :6], kc, vc, s)


@pytest.mark.parametrize("dt", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(3, 64), (2, 5, 576), (1, 100)])
def test_rmsnorm_kernel_within_an_ulp(dt, shape):
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(*shape, generator=g) * 4).to(dt)
    w = (torch.rand(shape[-1], generator=g) + 0.5).to(dt)
    got, want = rmsnorm(x, w, 1e-5), rmsnorm_reference(x, w, 1e-5)
    assert got.shape == x.shape and got.dtype == dt
    err = (got.float() - want.float()).abs()
    assert (err <= 2 * ULP[dt] * want.float().abs()).all()
    assert (got == want).float().mean() > 0.5                          # mostly bit-equal
    other = torch.float64 if dt == torch.float32 else torch.float32
    assert f"weight {other}" in rmsnorm_reason(x, w.to(other))
    with pytest.raises(ValueError, match=f"rows of {shape[-1]} with weight \\(50,\\)"):
        rmsnorm(x, w[:50], 1e-5)


def _decode_logits(model, ids, feed, fusions) -> torch.Tensor:
    """Prefill ids (B, T), then decode steps feeding the tokens feed (B, S) (teacher-forced, so
    every setting sees the same tokens): logits (S + 1, B, V) float32."""
    e = Engine(model, ids.shape[0], ids.shape[1] + feed.shape[1] + 1, graphs=False, fusions=fusions)
    out = [e.prefill(ids).float()]
    for i in range(feed.shape[1]):
        out.append(e.step(feed[:, i:i + 1], ids.shape[1] + i).float())
    return torch.stack(out)


def test_fused_attention_gives_the_eager_logits_bit_for_bit(fresh_smollm):
    """SmolLM2-135M in bf16 (9 query, 3 key/value heads of 64), two prompts, prefill and 2 decode
    steps: with the rotary + cache kernel the logits equal the eager modules' bit for bit; with
    the RMSNorm kernel too, they are as far from the float32 model's as the eager bf16 ones."""
    model, tok = fresh_smollm
    ids = tok(["The capital of France is", "def add(a, b): return"], return_tensors="pt", padding=True).input_ids
    feed = torch.tensor([[264, 1345], [1232, 28]])
    ref = _decode_logits(model, ids, feed, fusions=False)              # float32, eager
    model = model.to(torch.bfloat16)
    with backend("triton"):
        eager = _decode_logits(model, ids, feed, fusions=False)
        fuse_engine(model, True, norms=False)                          # the attention fusion alone
        rope = _decode_logits(model, ids, feed, fusions=None)
        both = _decode_logits(model, ids, feed, fusions=True)
    assert torch.equal(rope, eager)
    err = lambda x: (x - ref).abs().mean().item()
    assert err(both) < 1.25 * err(eager), (err(both), err(eager))
    counts = fuse_engine(model, False)
    assert counts == {"attention": 30, "norms": 61, "other_attention": []}
    assert "forward" not in model.model.layers[0].self_attn.__dict__
