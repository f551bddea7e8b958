"""Launch settings of the decode attention kernel (kernels/decode_attention.py) on the card:
key block BN (32, 64), warps per program (2, 4), the least key blocks a split takes (MIN_SPLIT_BLOCKS 1 or 4, so
the split count), for the Llama-3.1-8B (32 / 8 heads of 128) and Qwen2.5-7B (28 / 4) heads at
batch 1 and 8, one new token, caches of 161 keys (the e2e bench's) and 1240 of 2049 written.

    PYTHONPATH=. python3 scripts/tune_decode_attention.py --out results/decode-attention-tune-h200.json
Median of do_bench_cudagraph per call; every setting's output checked against the float32
oracle (max error in bf16 ulps, relative to max(|o|, 0.5)).
"""
import argparse
import itertools
import json

import torch
from triton.testing import do_bench_cudagraph

from arcquant.kernels import decode_attention as da


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    rows = []
    for (name, hq, hkv), b, (L, keys) in itertools.product((("llama", 32, 8), ("qwen", 28, 4)), (1, 8),
                                                            ((161, 161), (2049, 1240))):
        g = torch.Generator(device="cuda").manual_seed(b + L)
        q = torch.randn(b, 1, hq, 128, device="cuda", generator=g).bfloat16().transpose(1, 2)
        k, v = (torch.randn(b, hkv, L, 128, device="cuda", generator=g).bfloat16() for _ in range(2))
        mask = (torch.arange(L, device="cuda") < keys)[None, None, None].expand(b, 1, 1, L)
        nvalid = torch.tensor([keys], device="cuda")
        want = da.decode_attention_reference(q, k, v, mask, 128 ** -0.5).float()
        for bn, warps, msb in itertools.product((32, 64), (2, 4), (1, 4)):
            da.BN, da.NUM_WARPS, da.MIN_SPLIT_BLOCKS = bn, warps, msb
            got = da.decode_attention(q, k, v, mask, 128 ** -0.5, nvalid)
            err = ((got.float() - want).abs() / (want.abs().clamp(min=0.5) * 2 ** -7)).max().item()
            us = do_bench_cudagraph(lambda: da.decode_attention(q, k, v, mask, 128 ** -0.5, nvalid)) * 1e3
            rows.append({"heads": name, "b": b, "L": L, "keys": keys, "BN": bn, "warps": warps, "min_split_blocks": msb,
                         "splits": da.splits(b * hkv, L), "us": us, "max_ulps": err})
        best = min((r for r in rows if r["heads"] == name and r["b"] == b and r["L"] == L), key=lambda r: r["us"])
        cur = next(r for r in rows if r["heads"] == name and r["b"] == b and r["L"] == L and r["BN"] == 64
                   and r["warps"] == 4 and r["min_split_blocks"] == 4)
        print(f"{name} b{b} L{L}: current {cur['us']:.2f} us (splits {cur['splits']}); best {best['us']:.2f} us "
              f"BN {best['BN']} warps {best['warps']} min blocks {best['min_split_blocks']} (splits {best['splits']})",
              flush=True)
    print("max error (bf16 ulps):", max(r["max_ulps"] for r in rows))
    with open(a.out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
