"""Perplexity of a checkpoint after export -> import, for every export format.

    python scripts/export_ppl.py --out results/export-smollm2.json
Quantizes the model with the default ARC recipe (and with rtn), exports each to
trtllm-arc / compressed-tensors / modelopt-nvfp4 (bfloat16 unquantized tensors, as the
engines run them), imports each folder back with arcquant's reader and evaluates it. The
imported layers use a static activation tensor scale (the calibration max), as the engines do.
"""
import argparse
import json
import tempfile
import time
from pathlib import Path

from arcquant.checkpoint import load_quantized
from arcquant.config import CalibConfig, QuantConfig
from arcquant.evaluate import perplexity
from arcquant.export import ExportError, export_checkpoint, load_exported
from arcquant.pipeline import quantize_to_folder


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--out", required=True)
    ap.add_argument("--tokens", type=int, default=65536)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--methods", nargs="+", default=["arc", "rtn"], choices=["arc", "rtn"])
    ap.add_argument("--formats", nargs="+", default=["trtllm-arc", "compressed-tensors", "modelopt-nvfp4"])
    ap.add_argument("--update", action="store_true",
                    help="replace only the rows recomputed here in an existing --out (checkpoint rows kept)")
    a = ap.parse_args()
    rows, ccfg = [], CalibConfig()
    with tempfile.TemporaryDirectory() as tmp:
        for method in a.methods:
            qcfg = QuantConfig(method=method)
            ck = Path(tmp) / method
            quantize_to_folder(a.model, ck, qcfg, ccfg, progress=False)
            if not a.update:
                model, tok, meta = load_quantized(ck)
                r = perplexity(model, tok, "wiki-test", a.seqlen, a.tokens, progress=False)
                rows.append({"method": method, "format": "arcquant checkpoint", "act_scale": qcfg.act_scale,
                             "avg_bits": meta["avg_bits"], **r})
                print(rows[-1], flush=True)
            for fmt in a.formats:
                out = Path(tmp) / f"{method}-{fmt}"
                t = time.time()
                try:
                    rec = export_checkpoint(ck, fmt, out)
                except ExportError as e:
                    rows.append({"method": method, "format": fmt, "refused": str(e)})
                    continue
                export_s = round(time.time() - t, 1)
                model, tok, meta = load_exported(out)
                r = perplexity(model, tok, "wiki-test", a.seqlen, a.tokens, progress=False)
                size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
                rows.append({"method": method, "format": fmt, "act_scale": "static (engine)",
                             "avg_bits": meta["avg_bits"], "exact_layers": rec["exact_layers"],
                             "layers": rec["layers"], "safetensors_bytes": size,
                             "export_s": export_s, "export_import_eval_s": round(time.time() - t, 1), **r})
                print(rows[-1], flush=True)
    if a.update and Path(a.out).exists():
        old = json.loads(Path(a.out).read_text())["rows"]
        new = {(r["method"], r["format"]): r for r in rows}
        rows = [new.pop((r["method"], r["format"]), r) for r in old] + list(new.values())
    Path(a.out).write_text(json.dumps({"model": a.model, "calibration": vars(ccfg), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
