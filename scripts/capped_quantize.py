"""Quantize a model under a hard cap on the process's private memory (RLIMIT_DATA), and print
the measured peaks as JSON. The cap is set after the imports, at VmData + --budget MB, so it
bounds what quantization itself allocates (malloc and anonymous maps; file reads included).

    python scripts/capped_quantize.py MODEL_DIR OUT --budget 200 [--in-memory]
--in-memory loads the whole model the usual way instead (expected to fail under the cap).
"""
import argparse
import json
import resource
import sys
import time


def status() -> dict:
    out = {}
    for line in open("/proc/self/status"):
        k, _, v = line.partition(":")
        if k in ("VmData", "VmHWM", "VmRSS", "VmPeak"):
            out[k] = int(v.split()[0]) // 1024                     # MiB
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("out")
    ap.add_argument("--budget", type=int, required=True, help="MiB above the data size after imports")
    ap.add_argument("--in-memory", action="store_true")
    ap.add_argument("--samples", type=int, default=4)
    a = ap.parse_args()
    import torch
    from arcquant.config import CalibConfig, QuantConfig
    from arcquant.pipeline import quantize_in_memory
    from arcquant.stream import quantize_streaming
    from transformers import AutoConfig, AutoTokenizer
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING
    from arcquant.data import calibration_batches
    torch.set_num_threads(1)
    torch.ones(64, 64) @ torch.ones(64, 64)                        # thread pools etc. exist before the cap
    MODEL_FOR_CAUSAL_LM_MAPPING[type(AutoConfig.from_pretrained(a.model))]    # lazy imports done
    calibration_batches(AutoTokenizer.from_pretrained(a.model), "c4", 1, 64, 0)
    before = status()
    cap = (before["VmData"] + a.budget) << 20
    resource.setrlimit(resource.RLIMIT_DATA, (cap, cap))
    qcfg, ccfg = QuantConfig(), CalibConfig(nsamples=a.samples, seqlen=64)
    t = time.time()
    try:
        if a.in_memory:
            quantize_in_memory(a.model, qcfg, ccfg, progress=False)
        else:
            quantize_streaming(a.model, a.out, qcfg, ccfg, progress=False, log=lambda m: None)
        ok, err = True, None
    except MemoryError as e:
        ok, err = False, f"MemoryError: {e}"
    except RuntimeError as e:                                      # torch reports failed allocations so
        ok, err = False, f"RuntimeError: {str(e)[:200]}"
    after = status()
    print(json.dumps({"ok": ok, "error": err, "seconds": round(time.time() - t, 1), "budget_mib": a.budget,
                      "data_before_mib": before["VmData"], "rss_before_mib": before["VmRSS"],
                      "peak_rss_mib": after["VmHWM"], "data_after_mib": after["VmData"]}))
    return 0 if ok else 3


if __name__ == "__main__":
    sys.exit(main())
