"""arcquant command line: quantize | eval | generate | compare | export. The only module using argparse."""
import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

from . import distributed, pipeline
from .arc import ORDERS
from .checkpoint import CheckpointError, is_checkpoint
from .compare import PRESETS
from .config import ACT_SCALES, CALIB_SOURCES, METHODS, ROTATED, WEIGHT_RESIDUAL, CalibConfig, QuantConfig
from .data import TEXTS
from .export import EXPORT_FORMATS, export_checkpoint
from .export.writer import parse_size
from .zeroshot import TASKS as ZS_TASKS
from .formats import FORMATS
from .modeling import DEFAULT_MODEL, UnsupportedModelError
from .bench import AB as BENCH_AB
from .synth import SHAPES

DEFAULTS = QuantConfig()
COMPARE_METHODS = ["fp", "w4a16", "w4a8", "rtn", "arc"]


def _quant_args(p, method_default="arc"):
    g = p.add_argument_group("quantization")
    g.add_argument("--method", default=method_default, choices=METHODS, help="default: %(default)s")
    g.add_argument("--fmt", default=DEFAULTS.fmt, choices=list(FORMATS), help="default: %(default)s")
    g.add_argument("--act-scale", default=DEFAULTS.act_scale, choices=ACT_SCALES,
                   help="activation tensor scale (default: %(default)s)")
    g.add_argument("--order", default=DEFAULTS.order, choices=ORDERS,
                   help="ARC channel order (default: %(default)s; 'sorted' is the paper's)")
    g.add_argument("--paper", action="store_true",
                   help="the published recipe: --order sorted --act-scale dynamic --target-bits 0")
    g.add_argument("--threshold", type=float, default=DEFAULTS.threshold, help="default: %(default)s")
    g.add_argument("--s-multiple", type=int, default=DEFAULTS.s_multiple, help="default: %(default)s")
    g.add_argument("--rotate", type=int, default=None,
                   help="hadamard / arc+hadamard rotation block: 0 = full width, 16/32/64/128 "
                        "(default: full for hadamard, 16 for arc+hadamard)")
    g.add_argument("--alpha", type=float, default=DEFAULTS.alpha, help="SmoothQuant strength (default: %(default)s)")
    g.add_argument("--target-bits", type=float, default=DEFAULTS.target_bits,
                   help="average bits; residual blocks go where they remove the most error "
                        "(default: %(default)s; 0 = the paper's threshold rule for s)")
    g.add_argument("--wres-skip", nargs="+", default=[], metavar="NAME",
                   help="arc+wres: linears (e.g. down_proj) whose groups get plain arc's single tail")
    c = p.add_argument_group("calibration")
    c.add_argument("--calib-source", default="c4",
                   help=f"{' | '.join(CALIB_SOURCES)} | path of a UTF-8 text file (default: %(default)s)")
    c.add_argument("--calib-samples", type=int, default=32, help="default: %(default)s")
    c.add_argument("--calib-seqlen", type=int, default=512, help="default: %(default)s")
    c.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="compute device: calibration and evaluation (default: cpu)")


def _configs(a, method=None):
    kw = dict(method=method or a.method, fmt=a.fmt, act_scale=a.act_scale, order=a.order,
              threshold=a.threshold, s_multiple=a.s_multiple, target_bits=a.target_bits or None,
              alpha=a.alpha)
    if a.rotate is not None and (kw["method"] in ROTATED or method is None):
        kw["rotate"] = a.rotate                    # compare: only the rotated methods take it
    if a.wres_skip and (kw["method"] in WEIGHT_RESIDUAL or method is None):
        kw["wres_skip"] = tuple(a.wres_skip)     # compare: only the wres methods take it; else refused
    if a.paper:
        kw.update(order="sorted", act_scale="dynamic", target_bits=None)
    return QuantConfig(**kw), CalibConfig(a.calib_source, a.calib_samples, a.calib_seqlen, a.seed)


def _eval_args(p):
    p.add_argument("--text", default="wiki-test", choices=TEXTS, help="held-out text (default: %(default)s)")
    p.add_argument("--seqlen", type=int, default=512, help="window length (default: %(default)s)")
    p.add_argument("--tokens", type=int, default=65536, help="tokens evaluated (default: %(default)s)")


def cmd_quantize(a):
    qcfg, ccfg = _configs(a)
    t = time.time()
    budget = None if a.max_memory is None else parse_size(a.max_memory)
    rep = pipeline.quantize_to_folder(a.model, a.out, qcfg, ccfg, a.device, a.force, restart=a.restart,
                                      max_memory=budget, snapshot_every=a.snapshot_every)
    if distributed.rank() > 0:
        return                                                     # torchrun: rank 0 reports
    print(f"wrote {a.out}: {qcfg.method} {qcfg.fmt}, {len(rep['layers'])} layers, "
          f"average bits {rep['avg_bits']:.3f}, {time.time() - t:.0f} s")
    for row in rep.get("moe", []):
        if row["under_calibrated"]:
            print(f"under-calibrated experts (few routed calibration tokens; statistics from all tokens): "
                  f"{', '.join(row['under_calibrated'])}")


def cmd_eval(a):
    if a.method == "fp" or a.method is None:
        model, tok, meta = pipeline.load_any(a.model, a.device)
        method, bits = (meta["quant"]["method"], meta["avg_bits"]) if meta else ("fp", 16.0)
    else:
        if is_checkpoint(a.model):
            raise ValueError(f"{a.model!r} is already a quantized checkpoint; evaluate it without --method")
        qcfg, ccfg = _configs(a)
        model, tok, rep = pipeline.quantize_in_memory(a.model, qcfg, ccfg, a.device)
        method, bits = qcfg.method, rep["avg_bits"]
    r = pipeline.evaluate(model, tok, a.text, a.seqlen, a.tokens, a.device)
    row = {"model": a.model, "method": method, "avg_bits": bits, **r}
    print(json.dumps(row))
    if a.json:
        Path(a.json).write_text(json.dumps(row, indent=1))


def cmd_generate(a):
    if a.device.startswith("cuda"):
        print(a.prompt + pipeline.generate_gpu(a.model, a.prompt, a.max_new_tokens, a.device))
        return
    model, tok, _ = pipeline.load_any(a.model, a.device)
    print(a.prompt + pipeline.generate(model, tok, a.prompt, a.max_new_tokens, a.device))


def cmd_bench(a):
    from .bench import quantized_shape, run_bench, table, temp_work
    import torch
    if not torch.cuda.is_available():
        raise ValueError("arcquant bench measures GPU speed and needs a CUDA GPU (none found); "
                         "on a CPU use arcquant eval for accuracy")
    if (a.checkpoint is None) == (a.shape is None):
        raise ValueError("give a checkpoint folder or --shape (e.g. --shape llama-3.1-8b), not both")
    if a.shape:
        src, ck = quantized_shape(a.shape, Path(a.work) if a.work else temp_work(), a.calib_source)
    else:
        from .checkpoint import read_meta
        from .modeling import resolve_model
        meta = read_meta(Path(a.checkpoint))
        src, ck = resolve_model(meta["source_model"]), a.checkpoint
    rows = run_bench(src, ck, a.batch, a.decode, a.prefill, a.repeats, ab=a.ab)
    print(table(rows, a.batch, a.prefill))
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1, default=str))

def cmd_compare(a):
    from .compare import preset_configs, run_comparison, table, write_outputs
    if a.preset and a.methods:
        raise SystemExit("--preset and --methods: choose one (the preset names its own methods)")
    if a.only and not a.preset:
        raise SystemExit("--only picks labels of a --preset; with --methods, list the methods instead")
    ccfg = _configs(a, method="fp")[1]
    if a.preset:
        base = {k: v for k, v in _configs(a, method="arc")[0].to_dict().items() if k not in ("method", "rotate")}
        configs = preset_configs(a.preset, base, a.only)
        if a.wres_skip:
            configs = {k: (replace(q, wres_skip=tuple(a.wres_skip)) if q.method in WEIGHT_RESIDUAL else q)
                       for k, q in configs.items()}
    else:
        configs = {m: _configs(a, method=m)[0] for m in a.methods or COMPARE_METHODS}
    rows = run_comparison(a.model, configs, ccfg, a.out, a.text, a.seqlen, a.tokens, a.tasks or (), a.limit,
                          a.device, batch_size=a.batch_size)
    print("\n" + table(rows))
    if a.out:
        write_outputs(rows, Path(a.out))
        print(f"wrote {a.out}/table.md, results.json, results.jsonl (resumable) and plot.png")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))


def cmd_export(a):
    rec = export_checkpoint(a.checkpoint, a.format, a.out, a.force, a.dtype, a.max_shard_size)
    print(f"wrote {a.out}: {a.format}, {rec['layers']} quantized layers ({rec['exact_layers']} exactly as in "
          f"the checkpoint), {len(rec['files'])} safetensors file(s), excluded {rec['excluded']}")


def cmd_zeroshot(a):
    from .zeroshot import evaluate_zeroshot
    if a.method in (None, "fp"):
        model, tok, meta = pipeline.load_any(a.model, a.device)
        method, bits = (meta["quant"]["method"], meta["avg_bits"]) if meta else ("fp", 16.0)
    else:
        qcfg, ccfg = _configs(a)
        model, tok, rep = pipeline.quantize_in_memory(a.model, qcfg, ccfg, a.device)
        method, bits = qcfg.method, rep["avg_bits"]
    r = evaluate_zeroshot(model, tok, a.tasks, a.limit, a.batch_size, a.device)
    row = {"model": a.model, "method": method, "avg_bits": bits, **r}
    print(json.dumps(row))
    if a.json:
        Path(a.json).write_text(json.dumps(row, indent=1))


def cmd_analyze(a):
    from .analysis import layer_errors, write_report
    qcfg, ccfg = _configs(a)                       # --method: any ARC variant (default arc)
    rep = layer_errors(a.model, qcfg, ccfg, a.eval_samples, a.device)
    js, png = write_report(rep, Path(a.out))
    print(json.dumps(rep["summary"]))
    print(f"wrote {js} and {png}")


def build_parser():
    ap = argparse.ArgumentParser(prog="arcquant", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("quantize", help="calibrate, quantize and save a checkpoint folder")
    p.add_argument("--model", default=DEFAULT_MODEL, help="built-in name, HF folder or .gguf (default: %(default)s)")
    p.add_argument("--out", required=True, help="checkpoint folder to write (must not exist)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument("--restart", action="store_true",
                   help="discard an interrupted run's work folder instead of resuming it")
    p.add_argument("--max-memory", default=None,
                   help="refuse to start if the estimated peak memory exceeds this (e.g. 8GB)")
    p.add_argument("--snapshot-every", type=float, default=600.0,
                   help="seconds between saved calibration activations, so a resumed run skips the "
                        "layers before them (default: %(default)s)")
    _quant_args(p)
    p.set_defaults(fn=cmd_quantize)
    p = sub.add_parser("eval", help="held-out perplexity (GPTQ protocol) of a model or checkpoint")
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL, help="checkpoint folder or model (default: %(default)s)")
    p.add_argument("--json", help="also write the result to this JSON file")
    _quant_args(p, method_default=None)
    _eval_args(p)
    p.set_defaults(fn=cmd_eval)
    p = sub.add_parser("generate", help="greedy completion from a checkpoint or model")
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL)
    p.add_argument("--prompt", default="The capital of France is")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--device", default="cpu")
    p.set_defaults(fn=cmd_generate)
    p = sub.add_parser("bench", help="GPU decode / prefill speed and memory, BF16 vs the quantized model")
    p.add_argument("checkpoint", nargs="?", help="arcquant checkpoint (its source model is the BF16 side)")
    p.add_argument("--shape", choices=list(SHAPES), help="random weights of this shape instead, quantized here")
    p.add_argument("--work", help="folder for the random model and its checkpoint (default: a temp folder)")
    p.add_argument("--calib-source", default="c4")
    p.add_argument("--batch", nargs="+", type=int, default=[1, 8, 32])
    p.add_argument("--decode", type=int, default=64, help="decode steps timed (default: %(default)s)")
    p.add_argument("--prefill", type=int, default=2048, help="prompt length timed (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--ab", nargs="*", default=list(BENCH_AB), choices=BENCH_AB,
                   help="the same run's A/Bs to make as well (default: all; none: just the two models)")
    p.add_argument("--json", help="also write the rows to this JSON file")
    p.set_defaults(fn=cmd_bench)
    p = sub.add_parser("compare", help="perplexity of several methods on one model, as a table")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--methods", nargs="+", choices=METHODS,
                   help=f"one cell per method (default: {' '.join(COMPARE_METHODS)})")
    p.add_argument("--preset", choices=list(PRESETS),
                   help="a named set of cells instead of --methods: 'paper' = every baseline of the paper, "
                        "ARC in NVFP4/MXFP4/INT4, arc+hadamard, arc+gptq, arc+wres")
    p.add_argument("--only", nargs="+", metavar="LABEL", help="run only these labels of the preset")
    p.add_argument("--batch-size", type=int, default=16, help="zero-shot batch size (default: %(default)s)")
    p.add_argument("--json", help="also write the rows to this JSON file")
    p.add_argument("--out", help="folder for results.jsonl (finished cells are skipped on a rerun), table.md, "
                                 "results.json and plot.png")
    p.add_argument("--tasks", nargs="*", choices=ZS_TASKS, help="zero-shot tasks too (lm-evaluation-harness)")
    p.add_argument("--limit", type=int, default=None, help="documents per zero-shot task (default: full splits)")
    _quant_args(p)
    _eval_args(p)
    p.set_defaults(fn=cmd_compare, tokens=16384)
    p = sub.add_parser("zeroshot", help="zero-shot tasks through lm-evaluation-harness (local data)")
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL, help="checkpoint, export folder or model")
    p.add_argument("--tasks", nargs="+", default=list(ZS_TASKS), choices=ZS_TASKS)
    p.add_argument("--limit", type=int, default=None, help="documents per task (default: the full split)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--json", help="also write the result to this JSON file")
    _quant_args(p, method_default=None)
    p.set_defaults(fn=cmd_zeroshot)
    p = sub.add_parser("analyze", help="per-layer output error of rtn / arc / w4a8 / MXFP8 (JSON + PNG)")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--out", required=True, help="folder for layer-errors.json and layer-errors.png")
    p.add_argument("--eval-samples", type=int, default=4, help="calibration-text windows measured (default: 4)")
    _quant_args(p)
    p.set_defaults(fn=cmd_analyze)
    p = sub.add_parser("export", help="write a checkpoint in a serving engine's format")
    p.add_argument("checkpoint", help="arcquant checkpoint folder")
    p.add_argument("--format", required=True, choices=EXPORT_FORMATS,
                   help="trtllm-arc (TensorRT-LLM NVFP4_ARC), compressed-tensors (vLLM/SGLang NVFP4), "
                        "modelopt-nvfp4 (TensorRT-LLM NVFP4)")
    p.add_argument("--out", required=True, help="folder to write (must not exist)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                   help="dtype of the unquantized tensors (embeddings, norms, bias; default: %(default)s)")
    p.add_argument("--max-shard-size", default="5GB", help="default: %(default)s")
    p.set_defaults(fn=cmd_export)
    return ap


def check_device(device: str) -> None:
    """A --device value this machine has, else a ValueError saying what to pass instead."""
    import torch
    try:
        d = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {device!r} is not a device: use cpu, cuda or cuda:N") from None
    if d.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA GPU here; use --device cpu (the reference backend)")
    if d.type == "cuda" and d.index is not None and d.index >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                         f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")


def main(argv=None):
    a = build_parser().parse_args(argv)
    try:
        if getattr(a, "device", None) is not None:
            check_device(a.device)
        a.fn(a)
    except (ValueError, FileNotFoundError, FileExistsError, FloatingPointError, CheckpointError,
            UnsupportedModelError) as e:
        print(f"arcquant {a.cmd}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
