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
from arcquant.kernels.decode_attention import (decode_attention, decode_attention_reason,  # noqa: E402
                                               decode_attention_reference)
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


@pytest.mark.parametrize("dt", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("b,t,hq,hkv,d,L", [(1, 1, 4, 2, 16, 10), (2, 3, 9, 3, 64, 150), (3, 2, 7, 1, 32, 700),
                                            (1, 1, 4, 1, 16, 1030)])
def test_decode_attention_matches_the_float32_oracle(dt, b, t, hq, hkv, d, L):
    """Grouped-query attention of t new tokens over a cache of L: within two ulps of the dtype
    of the float32 oracle - causal, with some early keys off too (padding), with a broadcast
    batch mask, and bounded by the keys written (nvalid; the rows past it hold NaN, never read).
    The last three shapes split the keys over 2, 8 and 16 programs (splits()) and combine them."""
    from arcquant.kernels.decode_attention import splits
    g = torch.Generator().manual_seed(b * 10 + t)
    q = torch.randn(b, t, hq, d, generator=g).to(dt).transpose(1, 2)   # (B, HQ, T, D) view, as the rotary kernel's
    k, v = (torch.randn(b, hkv, L, d, generator=g).to(dt) for _ in range(2))
    pos = torch.randint(0, L - t + 1, (1,), generator=g) + torch.arange(t)
    k[:, :, pos[-1] + 1:] = float("nan")
    v[:, :, pos[-1] + 1:] = float("nan")
    causal = (torch.arange(L)[None, :] <= pos[:, None]).expand(b, 1, -1, -1)
    padded = causal.clone()
    padded[0, :, :, :2] = False
    written = torch.tensor([int(pos[-1]) + 1])
    shorter = torch.tensor([int(pos[0])])                              # the last t - 1 keys not yet written
    for mask, nvalid, attended in ((causal, written, causal), (padded, None, padded), (causal[:1], written, causal),
                                   (causal, shorter, causal & (torch.arange(L) < shorter))):
        got = decode_attention(q, k, v, mask, d ** -0.5, nvalid)
        want = decode_attention_reference(q, k.nan_to_num(), v.nan_to_num(), attended, d ** -0.5)
        assert got.shape == (b, t, hq, d)
        if t > 1 and attended is not causal and nvalid is shorter and pos[0] == 0:
            continue                                                   # the first token has no key left
        assert ((got.float() - want.float()).abs() <= 2 * ULP[dt] * want.float().abs().clamp(min=0.5)).all()
    assert splits(b * hkv * t, L) == {10: 1, 150: 2, 700: 8, 1030: 16}[L]      # some splits hold no written key
    assert "at most 16 tokens" in decode_attention_reason(q.repeat(1, 1, 17, 1), k, v, causal)
    assert "mask" in decode_attention_reason(q, k, v, causal.float())
    with pytest.raises(ValueError, match="one of"):
        decode_attention(q.float(), k, v, causal, 1.0)


def _decode_logits(model, ids, feed, fusions) -> torch.Tensor:
    """Prefill ids (B, T), then decode steps feeding the tokens feed (B, S) (teacher-forced, so
    every setting sees the same tokens): logits (S + 1, B, V) float32."""
    e = Engine(model, ids.shape[0], ids.shape[1] + feed.shape[1] + 1, graphs=False, fusions=fusions)
    out = [e.prefill(ids).float()]
    for i in range(feed.shape[1]):
        out.append(e.step(feed[:, i:i + 1], ids.shape[1] + i).float())
    return torch.stack(out)


def test_fused_attention_gives_the_eager_logits_bit_for_bit(fresh_smollm, monkeypatch):
    """SmolLM2-135M in bf16 (9 query, 3 key/value heads of 64), two prompts, prefill and 2 decode
    steps: with the rotary + cache kernel the logits equal the eager modules' bit for bit; with
    the decode attention and RMSNorm kernels too, they are as far from the float32 model's as the
    eager bf16 ones."""
    from arcquant import engine_fusion
    model, tok = fresh_smollm
    ids = tok(["The capital of France is", "def add(a, b): return"], return_tensors="pt", padding=True).input_ids
    feed = torch.tensor([[264, 1345], [1232, 28]])
    ref = _decode_logits(model, ids, feed, fusions=False)              # float32, eager
    model = model.to(torch.bfloat16)
    with backend("triton"):
        eager = _decode_logits(model, ids, feed, fusions=False)
        fuse_engine(model, True, norms=False)                          # the rotary + cache kernel alone
        monkeypatch.setattr(engine_fusion, "DECODE_ATTENTION", False)
        rope = _decode_logits(model, ids, feed, fusions=None)
        monkeypatch.setattr(engine_fusion, "DECODE_ATTENTION", True)
        both = _decode_logits(model, ids, feed, fusions=True)
    assert torch.equal(rope, eager)
    err = lambda x: (x - ref).abs().mean().item()
    assert err(both) < 1.25 * err(eager), (err(both), err(eager))
    counts = fuse_engine(model, False)
    assert counts == {"attention": 30, "norms": 61, "layers": 30, "other_attention": []}
    assert "forward" not in model.model.layers[0].self_attn.__dict__ and "forward" not in vars(model.model.layers[0])


def test_residual_adds_go_into_the_projections(monkeypatch):
    """engine_fusion._layer_forward: a decoder layer's two residual adds handed to o_proj and
    down_proj (linear_residual) give the class forward's logits bit for bit where the add stays
    torch's (CPU nn.Linear); with addmm (BF16_ADDMM: CUDA only, forced here) one rounding instead of
    two, within an ulp of the add; residual=False leaves the class forward in place."""
    from transformers import StaticCache

    from arcquant import engine_fusion
    from conftest import tiny_llama
    model = tiny_llama(vocab=256).to(torch.bfloat16)
    ids = torch.randint(0, 256, (2, 6), generator=torch.Generator().manual_seed(5))

    def logits():
        cache = StaticCache(config=model.config, max_cache_len=8)
        with torch.no_grad():
            return model(input_ids=ids, past_key_values=cache, use_cache=True).logits

    with backend("triton"):
        assert fuse_engine(model, True, norms=False, residual=False)["layers"] == 0
        assert "forward" not in vars(model.model.layers[0])
        plain = logits()
        assert fuse_engine(model, True, norms=False)["layers"] == 2
        calls = []
        monkeypatch.setattr(engine_fusion, "linear_residual", lambda lin, x, r: calls.append(type(lin).__name__)
                            or (r + lin(x) if r is not None else lin(x)))
        spied = logits()
        assert calls == ["Linear"] * 4                                  # o_proj and down_proj of both layers
        monkeypatch.undo()
        assert torch.equal(logits(), plain) and torch.equal(spied, plain)
        fuse_engine(model, False)
    lin, x = model.model.layers[0].mlp.down_proj, torch.randn(3, 5, model.config.intermediate_size).bfloat16()
    r = torch.randn(3, 5, lin.out_features).bfloat16()
    monkeypatch.setattr(engine_fusion, "_addmm_fits", lambda *a: True)
    with torch.no_grad():
        y = lin(x)
        got, want = engine_fusion.linear_residual(lin, x, r), r + y
    assert got.shape == want.shape and got.abs().sum() > 0
    # r + bf16(y) rounds twice, addmm once: apart by at most an ulp of the larger term
    assert ((got.float() - want.float()).abs() <= ULP[torch.bfloat16] * (r.float().abs() + y.float().abs())).all()


def test_fused_attention_takes_batch_one_rotary_tables_and_falls_back_without_a_static_cache():
    """A forward with position_ids of batch 1 for two prompts (cos / sin broadcast over the batch)
    through a StaticCache gives the eager logits bit for bit (head size 24: the rotary kernel,
    then the model's SDPA); without a cache (DynamicCache) the class's own forward runs."""
    from transformers import StaticCache
    from conftest import tiny_llama
    model = tiny_llama(vocab=256).to(torch.bfloat16)
    ids = torch.randint(0, 256, (2, 6), generator=torch.Generator().manual_seed(3))
    pos = torch.arange(6)[None]                                        # (1, T): one table for both prompts

    def logits():
        cache = StaticCache(config=model.config, max_cache_len=8)
        with torch.no_grad():
            return model(input_ids=ids, position_ids=pos, past_key_values=cache, use_cache=True).logits

    eager = logits()
    with backend("triton"):
        assert fuse_engine(model, True, norms=False)["attention"] == 2
        fused = logits()
        with torch.no_grad():
            plain = model(input_ids=ids).logits                         # no static cache: eager attention
        fuse_engine(model, False)
    assert torch.equal(fused, eager)
    assert torch.equal(plain[:, -1].argmax(-1), eager[:, -1].argmax(-1))
