"""Why does the paper's channel reorder raise activation error on SmolLM2? Measured, per layer.

    python scripts/why_reorder.py --out results/why-reorder-smollm2.json

On the inputs of every linear group (full-precision model, c4 calibration windows), for plain
NVFP4 (no residual) in the original order and in the paper's sorted order, with per-token and
dynamic (per-batch) tensor scales, it reports:
  act_err     ||Q(X) - X|| / ||X||
  out_err     ||(Q(X) - X) W^T|| / ||X W^T||    (what the model feels)
  err_top / err_rest   the squared error share carried by the top-s (outlier) channels / the rest
  zero_scale  fraction of 16-blocks whose E4M3 scale rounds to 0 (whole block flushed)
  sub_scale   fraction of blocks with a subnormal E4M3 scale (< 2^-6: fewer than 3 mantissa bits)
  flushed     fraction of elements with |x| > 1% of their token's max that quantize to 0
  large_somewhere  channels > 1/8 of their token's max in at least one token (vs s)
  cooccur     in the sorted order, mean over the outlier blocks of (#channels in the block that
              are > 1/8 of the token's max in some token) -- how many "large somewhere"
              channels share a block
"""
import argparse
import json

import torch

from arcquant import arc
from arcquant.calibrate import capture_inputs, move_outside_layers
from arcquant.data import calibration_batches
from arcquant.formats import get_format
from arcquant.modeling import find_decoder_layers, find_linears, load_model

F = get_format("nvfp4")


def quant(x, perm, mode):
    xp = x[:, perm]
    gs = F.global_scale(xp.abs().amax(1, keepdim=True) if mode == "token" else xp.abs().amax())
    codes, scales = F.quantize(xp, gs)
    dq = F.dequantize(codes, scales, gs)
    back = torch.empty_like(dq)
    back[:, perm] = dq
    return back, scales.float()


def measure(x, w, perm, mode, top):
    q, scales = quant(x, perm, mode)
    e = q - x
    e2 = e.pow(2).sum(0)
    big = x.abs() > 0.01 * x.abs().amax(1, keepdim=True)
    return {"act_err": (e.norm() / x.norm()).item(),
            "out_err": ((e @ w.t()).norm() / (x @ w.t()).norm()).item(),
            "err_top": (e2[top].sum() / e2.sum()).item(),
            "zero_scale": (scales == 0).float().mean().item(),
            "sub_scale": ((scales > 0) & (scales < 2 ** -6)).float().mean().item(),
            "flushed": ((q == 0) & big).sum().item() / max(1, big.sum().item())}


@torch.no_grad()
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    model, tok = load_model(a.model)
    lname, layers = find_decoder_layers(model)
    batches = calibration_batches(tok, "c4", a.samples, a.seqlen, seed=1)
    move_outside_layers(model, layers, "cpu")
    hidden, kwargs = capture_inputs(model, layers, batches, "cpu", 8)
    rows = []
    for i, layer in enumerate(layers):
        lin = find_linears(layer, f"{lname}.{i}")
        seen = {}
        hooks = [m.register_forward_hook(lambda m, a_, o, n=n: seen.setdefault(n, []).append(a_[0]))
                 for n, m in lin.items() if n.endswith(("q_proj", "gate_proj", "o_proj", "down_proj"))]
        hidden = [layer(h, **kwargs) for h in hidden]
        hidden = [h[0] if isinstance(h, tuple) else h for h in hidden]
        for hd in hooks:
            hd.remove()
        for n, xs in seen.items():
            x = torch.cat([t.reshape(-1, t.shape[-1]) for t in xs]).float()          # (T, K)
            w = lin[n].weight.float()
            st = arc.ChannelStats(x.shape[1], 0.125, F)
            st.update(x)
            s = arc.num_augmented(st.outliers, st.tokens, x.shape[1], 64)
            sorted_perm = torch.sort(st.absmax, stable=True).indices
            top = sorted_perm[-s:]
            ident = torch.arange(x.shape[1])
            big = x.abs() > 0.125 * x.abs().amax(1, keepdim=True)                     # (T, K)
            ever = big.any(0)[sorted_perm].view(-1, 16).sum(1).float()               # per sorted block
            row = {"layer": f"{i}.{n}", "K": x.shape[1], "s": s,
                   "large_somewhere": int(big.any(0).sum()),
                   "cooccur_sorted_top_blocks": ever[-s // 16:].mean().item()}
            for mode in ("token", "dynamic"):
                row[f"orig_{mode}"] = measure(x, w, ident, mode, top)
                row[f"sorted_{mode}"] = measure(x, w, sorted_perm, mode, top)
            rows.append(row)
            print(json.dumps({k: (round(v['out_err'], 4) if isinstance(v, dict) else v)
                              for k, v in row.items()}), flush=True)
    summary = {}
    for key in ("orig_token", "sorted_token", "orig_dynamic", "sorted_dynamic"):
        summary[key] = {m: sum(r[key][m] for r in rows) / len(rows) for m in rows[0][key]}
    print(json.dumps(summary, indent=1))
    with open(a.out, "w") as f:
        json.dump({"summary": summary, "rows": rows, "tokens": a.samples * a.seqlen}, f, indent=1)


if __name__ == "__main__":
    main()
