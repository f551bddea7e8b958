"""The engine fusions' kernels on the GPU (engine_fusion.py): exactness and time per call.

    PYTHONPATH=. python3 scripts/check_engine_fusion.py --out results/engine-fusion-h200.json
- rotary + KV-cache write (kernels/rope_cache.py) against its torch oracle, bit for bit, bf16,
  fp16 and fp32, for the Llama-3.1-8B (32 / 8 heads of 128), Qwen2.5-7B (28 / 4) and SmolLM2 (9 / 3
  of 64) heads, batch 1 and 8, 1 / 7 / 2048 tokens, a random start, q/k/v as views of one
  stacked projection, random data;
- decode attention (kernels/decode_attention.py) against the float32 oracle: the largest error
  in ulps of the dtype (relative to max(|o|, 0.5)), the same heads, batch 1 / 8, 1 / 4 / 16
  new tokens, caches of 161 / 2049 / 8192 positions with the causal edge in the second half (or
  at 200 of 8192: a long static cache early in generation), keys bounded by the count written;
- RMSNorm (kernels/rmsnorm.py) against transformers' formula: fraction of elements that differ
  and the largest difference in ulps (the sum of squares runs in another order);
- time of one call of each, CUDA graphs, median of do_bench, against the eager ops they replace
  (the rotary and StaticLayer.update's ops; repeat_kv + SDPA with the boolean mask, as
  transformers' sdpa_attention_forward; transformers' RMSNorm), same run.
"""
import argparse
import json

import torch
import triton
from triton.testing import do_bench_cudagraph

from arcquant.kernels.decode_attention import decode_attention, decode_attention_reference, splits
from arcquant.kernels.rmsnorm import rmsnorm, rmsnorm_reference
from arcquant.kernels.rope_cache import rope_cache, rope_cache_reference

HEADS = {"llama-3.1-8b": (32, 8, 128), "qwen2.5-7b": (28, 4, 128), "smollm2-135m": (9, 3, 64)}


def rope_case(dt, b, t, hq, hkv, d, L, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    n = (hq + 2 * hkv) * d
    qkv = (torch.randn(b, t, n, device="cuda", generator=g) * 3).to(dt)
    q, k, v = qkv[..., :hq * d], qkv[..., hq * d:(hq + hkv) * d], qkv[..., (hq + hkv) * d:]
    ang = torch.rand(b, t, d // 2, device="cuda", generator=g) * 2000
    ang = torch.cat([ang, ang], -1)
    kc, vc = (torch.randn(b, hkv, L, d, device="cuda", generator=g).to(dt) for _ in range(2))
    start = torch.randint(0, L - t + 1, (1,), device="cuda", generator=g)
    return (q, k, v, ang.cos().to(dt), ang.sin().to(dt), kc, vc, start)


def eager_rope(q, k, v, cos, sin, kc, vc, start):
    """What the eager model runs: apply_rotary_pos_emb on head views, then StaticLayer.update."""
    b, t, _ = q.shape
    d = cos.shape[-1]
    heads = lambda x: x.view(b, t, -1, d).transpose(1, 2)
    rot = lambda x: torch.cat((-x[..., d // 2:], x[..., :d // 2]), -1)
    c, s = cos[:, None], sin[:, None]
    qh, kh = heads(q), heads(k)
    qo, ko = qh * c + rot(qh) * s, kh * c + rot(kh) * s
    pos = torch.arange(t, device=q.device) + start
    kc.index_copy_(2, pos, ko)
    vc.index_copy_(2, pos, heads(v))
    return qo


def check_rope(rows):
    for shape, (hq, hkv, d) in HEADS.items():
        for dt in (torch.bfloat16, torch.float16, torch.float32):
            for b, t in ((1, 1), (8, 1), (1, 7), (1, 2048)):
                args = rope_case(dt, b, t, hq, hkv, d, t + 160, b * 131 + t)
                ref = [a.clone() for a in args]
                got = rope_cache(*args)
                want = rope_cache_reference(*ref)
                diff = max((got.float() - want.float()).abs().max().item(),
                           (args[5].float() - ref[5].float()).abs().max().item(),
                           (args[6].float() - ref[6].float()).abs().max().item())
                row = {"kernel": "rope_cache", "shape": shape, "dtype": str(dt), "b": b, "t": t, "max_abs_diff": diff}
                row["exact"] = diff == 0
                if dt == torch.bfloat16 and t in (1, 2048):
                    row["us"] = do_bench_cudagraph(lambda: rope_cache(*args)) * 1e3
                    row["eager_us"] = do_bench_cudagraph(lambda: eager_rope(*args)) * 1e3
                rows.append(row)
                print(row, flush=True)


def eager_attention(q, k, v, mask, scale):
    """transformers' sdpa_attention_forward with a mask: repeat_kv, SDPA, transpose."""
    g = q.shape[1] // k.shape[1]
    rep = lambda x: x[:, :, None].expand(-1, -1, g, -1, -1).reshape(x.shape[0], -1, *x.shape[2:])
    o = torch.nn.functional.scaled_dot_product_attention(q, rep(k), rep(v), attn_mask=mask, scale=scale)
    return o.transpose(1, 2).contiguous()


def check_attention(rows):
    for shape, (hq, hkv, d) in HEADS.items():
        for dt in (torch.bfloat16, torch.float16):
            for b, t, L, early in ((1, 1, 161, 0), (8, 1, 161, 0), (1, 4, 2049, 0), (8, 16, 2049, 0), (1, 1, 8192, 0),
                                   (8, 1, 8192, 0), (1, 1, 8192, 200), (8, 1, 8192, 200)):
                gen = torch.Generator(device="cuda").manual_seed(b * 7 + t + L)
                q = torch.randn(b, t, hq, d, device="cuda", generator=gen).to(dt).transpose(1, 2)
                k, v = (torch.randn(b, hkv, L, d, device="cuda", generator=gen).to(dt) for _ in range(2))
                first = early or int(torch.randint(L // 2, L - t + 1, (1,), generator=torch.Generator().manual_seed(L + t)))
                pos = first + torch.arange(t, device="cuda")           # the causal edge: late in the cache, or early
                nvalid = pos[-1:] + 1                                   # keys written (the engine: cumulative_length)
                mask = (torch.arange(L, device="cuda")[None, :] <= pos[:, None]).expand(b, 1, -1, -1)
                got = decode_attention(q, k, v, mask, d ** -0.5, nvalid)
                want = decode_attention_reference(q, k, v, mask, d ** -0.5).float()
                ulp = 2 ** -7 if dt == torch.bfloat16 else 2 ** -10
                err = ((got.float() - want).abs() / (want.abs().clamp(min=0.5) * ulp)).max().item()
                sdpa = ((eager_attention(q, k, v, mask, d ** -0.5).float() - want).abs() /
                        (want.abs().clamp(min=0.5) * ulp)).max().item()
                row = {"kernel": "decode_attention", "shape": shape, "dtype": str(dt), "b": b, "t": t, "L": L,
                       "keys": int(pos[-1]) + 1, "splits": splits(b * hkv * t, L),
                       "max_ulps": round(err, 2), "sdpa_max_ulps": round(sdpa, 2)}
                if dt == torch.bfloat16 and shape != "smollm2-135m":
                    row["us"] = do_bench_cudagraph(lambda: decode_attention(q, k, v, mask, d ** -0.5, nvalid)) * 1e3
                    row["eager_us"] = do_bench_cudagraph(lambda: eager_attention(q, k, v, mask, d ** -0.5)) * 1e3
                rows.append(row)
                print(row, flush=True)


def check_rmsnorm(rows):
    for n in (576, 1040, 3584, 4096):
        for dt in (torch.bfloat16, torch.float16):
            for m in (1, 8, 2048):
                g = torch.Generator(device="cuda").manual_seed(m + n)
                x = (torch.randn(m, n, device="cuda", generator=g) * 3).to(dt)
                w = (1 + 0.3 * torch.randn(n, device="cuda", generator=g)).to(dt)
                got, want = rmsnorm(x, w, 1e-5), rmsnorm_reference(x, w, 1e-5)
                ulps = int((got.view(torch.int16).int() - want.view(torch.int16).int()).abs().max())
                row = {"kernel": "rmsnorm", "n": n, "dtype": str(dt), "m": m, "max_ulps": ulps,
                       "differ": (got != want).float().mean().item()}
                if dt == torch.bfloat16 and n in (3584, 4096):
                    row["us"] = do_bench_cudagraph(lambda: rmsnorm(x, w, 1e-5)) * 1e3
                    row["eager_us"] = do_bench_cudagraph(lambda: rmsnorm_reference(x, w, 1e-5)) * 1e3
                rows.append(row)
                print(row, flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    rows = []
    check_rope(rows)
    check_attention(rows)
    check_rmsnorm(rows)
    exact = [r for r in rows if "exact" in r]
    ok = sum(r["exact"] for r in exact) == len(exact) and all(r["max_ulps"] <= 2 for r in rows if "max_ulps" in r)
    # decode attention: allowed 2 ulps of the dtype relative to max(|o|, 0.5), as the CPU test
    head = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "rope_exact": f"{sum(r['exact'] for r in exact)}/{len(exact)}", "ok": ok}
    print(head, flush=True)
    with open(a.out, "w") as f:
        json.dump({**head, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
