"""End-to-end speed and memory: BF16 and the quantized model in the same engine, same run.

For each model: decode tokens/s at several batch sizes (a prompt, then `decode` greedy steps
replayed from a CUDA graph; median of `repeats` timed runs after warm-up, CUDA events), prefill
latency of one `prefill`-token prompt, weight bytes, peak GPU memory, and a per-op profile of
one eager decode step (batch 1, and each batch of 2 - 16). Both models run with the engine
fusions (engine_fusion.py) and are timed again without them in the same run (fusion_ab).
Models: a checkpoint (the BF16 side is its source model), or a
model shape with random weights (arcquant/synth.py) quantized here with a short calibration.
"""
import gc
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from .engine import Engine
from .qlinear import QuantLinear
from .stacking import StackedLinear

PROMPT = 128


def weight_bytes(model) -> dict:
    """Bytes of the decoder linears as stored (packed codes, scales, plans) and of everything."""
    from .modeling import find_decoder_layers
    _, layers = find_decoder_layers(model)
    lin = 0
    for mod in layers.modules():
        if isinstance(mod, QuantLinear):
            lin += sum(t.numel() * t.element_size() for t in mod.buffers())
        elif isinstance(mod, (torch.nn.Linear, StackedLinear)):
            lin += mod.weight.numel() * mod.weight.element_size()
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return {"linear_bytes": lin, "total_bytes": total}


def _time(fn, repeats: int) -> float:
    """Median milliseconds of fn() over `repeats` runs (CUDA events)."""
    times = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def decode_tokens_per_s(model, batch: int, decode: int, repeats: int, vocab: int, compile: bool = False,
                        fusions: bool = True) -> float:
    e = Engine(model, batch, PROMPT + decode + 1, graphs=True, compile=compile, fusions=fusions)
    ids = torch.randint(0, vocab, (batch, PROMPT), device=e.device)
    logits = e.prefill(ids)
    tok = logits.argmax(-1, keepdim=True)

    def run():
        for i in range(decode):
            e.step(tok, PROMPT + i)
    run()                                                              # capture + warm-up
    return batch * decode / (_time(run, repeats) / 1e3)


def prefill_ms(model, tokens: int, repeats: int, vocab: int, graph: bool = False, fusions: bool = True) -> tuple:
    """-> (median ms of one `tokens`-token prefill at batch 1, the engine's prefill mode, the
    largest |logit| difference of the graph's prefill from an eager one (0.0 when eager));
    graph=True replays a CUDA graph captured for that prompt length."""
    e = Engine(model, 1, tokens + 1, graphs=False, prefill_graphs=graph, fusions=fusions)
    ids = torch.randint(0, vocab, (1, tokens), device=e.device)
    first = e.prefill(ids).float().clone()
    ms = _time(lambda: e.prefill(ids), repeats)
    if not e.prefill_graphs:                                   # eager (or the capture failed): nothing to compare
        return ms, e.prefill_mode, 0.0
    e.cache.reset()
    with torch.no_grad():
        eager = e._forward(ids, torch.arange(tokens, device=e.device)).float()
    return ms, e.prefill_mode, (first - eager).abs().max().item()


def _top_ops(fn, top: int) -> list:
    """Top CUDA ops of one call of fn (warm): [(name, calls, ms)], then ("all kernels", calls, ms)."""
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    rows = [(ev.key, ev.count, ev.device_time_total / 1e3) for ev in prof.key_averages()
            if ev.device_time_total > 0]
    total = ("all kernels", sum(r[1] for r in rows), sum(r[2] for r in rows))
    return sorted(rows, key=lambda r: -r[2])[:top] + [total]


def profile_step(model, vocab: int, top: int = 14, batch: int = 1) -> list:
    """Top CUDA ops of one eager decode step at `batch`: [(name, calls, ms)]."""
    e = Engine(model, batch, PROMPT + 4, graphs=False)
    ids = torch.randint(0, vocab, (batch, PROMPT), device=e.device)
    tok = e.prefill(ids).argmax(-1, keepdim=True)
    e.step(tok, PROMPT)
    return _top_ops(lambda: e.step(tok, PROMPT + 1), top)


def profile_prefill(model, tokens: int, vocab: int, top: int = 10) -> list:
    """Top CUDA ops of one `tokens`-token prefill (batch 1, eager): [(name, calls, ms)]."""
    e = Engine(model, 1, tokens + 1, graphs=False)
    ids = torch.randint(0, vocab, (1, tokens), device=e.device)
    e.prefill(ids)
    return _top_ops(lambda: e.prefill(ids), top)


def bench_one(model, label: str, batches, decode: int, prefill: int, repeats: int, compile_batches=()) -> dict:
    vocab = model.config.vocab_size
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    row = {"model": label, **weight_bytes(model), "gpu_bytes_at_start": torch.cuda.memory_allocated()}
    for b in batches:
        row[f"decode_tok_s_b{b}"] = decode_tokens_per_s(model, b, decode, repeats, vocab)
        print(f"  {label}: batch {b} decode {row[f'decode_tok_s_b{b}']:.1f} tok/s", flush=True)
    for b in compile_batches:                                          # the same with torch.compile
        try:
            row[f"decode_tok_s_b{b}_compiled"] = decode_tokens_per_s(model, b, decode, repeats, vocab, compile=True)
            print(f"  {label}: batch {b} decode, torch.compile {row[f'decode_tok_s_b{b}_compiled']:.1f} tok/s",
                  flush=True)
        except Exception as e:                                        # report, keep the eager figures
            row[f"decode_b{b}_compile_error"] = f"{type(e).__name__}: {str(e)[:300]}"
            print(f"  {label}: batch {b} torch.compile failed: {row[f'decode_b{b}_compile_error']}", flush=True)
        torch._dynamo.reset()
    gc.collect()                                   # the decode engines' caches and graphs: freed
    torch.cuda.empty_cache()                       # before prefill, whatever batches ran first
    row[f"prefill_ms_{prefill}"], _, _ = prefill_ms(model, prefill, repeats, vocab)
    gc.collect()
    torch.cuda.empty_cache()
    row[f"prefill_ms_{prefill}_graph"], row["prefill_graph_mode"], row["prefill_graph_vs_eager_max_abs"] = \
        prefill_ms(model, prefill, repeats, vocab, True)
    print(f"  {label}: prefill {prefill} eager {row[f'prefill_ms_{prefill}']:.1f} ms, "
          f"{row['prefill_graph_mode']} {row[f'prefill_ms_{prefill}_graph']:.1f} ms (logits vs eager: max "
          f"|diff| {row['prefill_graph_vs_eager_max_abs']:.3g})", flush=True)
    row["peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
    row["profile_b1"] = profile_step(model, vocab)
    for b in (b for b in batches if 2 <= b <= 16):                     # the tensor-core GEMVs' batches
        row[f"profile_b{b}"] = profile_step(model, vocab, batch=b)
    row[f"profile_prefill_{prefill}"] = profile_prefill(model, prefill, vocab)
    return row


def prefill_fusion_ab(model, tokens: int, repeats: int) -> dict:
    """The same run's A/B of the prefill fusions: the `tokens`-token graph prefill again with
    gpu.fuse_mlps off, then with gpu.fuse_norms off too, and the largest |logit| difference of each
    from the fused eager prefill (MLP: 0 - it repeats the unfused roundings; norms: the fused
    norm's sum of squares runs in another order, so a normalized value may move by an ulp)."""
    from .gpu import fuse_mlps, fuse_norms
    vocab = model.config.vocab_size
    e = Engine(model, 1, tokens + 1, graphs=False)
    ids = torch.randint(0, vocab, (1, tokens), device=e.device, generator=torch.Generator(device=e.device).manual_seed(0))
    fused = e.prefill(ids).float().clone()
    out = {}
    try:
        for name, off in (("mlp_unfused", lambda: fuse_mlps(model, False)), ("unfused", lambda: fuse_norms(model, False))):
            off()
            out[f"prefill_ms_{tokens}_graph_{name}"], mode, _ = prefill_ms(model, tokens, repeats, vocab, True)
            out[f"{name}_logits_max_abs_diff"] = (e.prefill(ids).float() - fused).abs().max().item()
            print(f"  arc, {name}: prefill {tokens} {mode} {out[f'prefill_ms_{tokens}_graph_{name}']:.1f} ms (logits vs "
                  f"fused: max |diff| {out[f'{name}_logits_max_abs_diff']:.3g})", flush=True)
            gc.collect()
            torch.cuda.empty_cache()
    finally:
        fuse_norms(model, True)
        fuse_mlps(model, True)
    return out


def fusion_ab(model, label: str, batches, decode: int, prefill: int, repeats: int) -> dict:
    """The same run's A/B of the engine fusions (engine_fusion.py): decode tokens/s and the graph
    prefill again with them off (the eager modules: the engine before v27), and how far the logits
    of 32 decode steps are from the fused ones, teacher-forced (both fed the fused run's greedy
    tokens, so a flipped near-tie does not send the two down different sequences): largest |diff|,
    relative difference and top-1 agreement (the RMSNorm kernel's sum of squares runs in another
    order, the attention kernel accumulates in another order)."""
    vocab, out = model.config.vocab_size, {}
    fused, fed = greedy_logits(model, 32, vocab)
    try:
        for b in batches:
            out[f"decode_tok_s_b{b}_unfused_engine"] = decode_tokens_per_s(model, b, decode, repeats, vocab, fusions=False)
            print(f"  {label}, engine fusions off: decode b{b} {out[f'decode_tok_s_b{b}_unfused_engine']:.1f} tok/s", flush=True)
            gc.collect()
            torch.cuda.empty_cache()
        out[f"prefill_ms_{prefill}_graph_unfused_engine"], _, _ = prefill_ms(model, prefill, repeats, vocab, True, fusions=False)
        out.update(logit_difference(greedy_logits(model, 32, vocab, fusions=False, tokens=fed)[0], fused,
                                    "unfused_engine"))
        print(f"  {label}, engine fusions off: prefill {out[f'prefill_ms_{prefill}_graph_unfused_engine']:.1f} ms; "
              f"teacher-forced logits vs fused: max |diff| {out['unfused_engine_logits_max_abs_diff']:.3g}, relative "
              f"{out['unfused_engine_logits_rel_diff']:.2e}, top-1 agree {100 * out['unfused_engine_top1_agree']:.0f} %",
              flush=True)
    finally:
        from .engine import set_fusions
        set_fusions(model, True)
    gc.collect()
    torch.cuda.empty_cache()
    return out


def decode_pipeline_ab(model, batches, decode: int, repeats: int) -> dict:
    """The same run's A/B of the pipelined decode GEMV: decode tokens/s at the batches of 3 - 16
    tokens again with gpu.pipelined_gemv off (every tensor-core GEMV unpipelined; fresh engines,
    so fresh CUDA graphs)."""
    from .gpu import pipelined_gemv
    vocab, out = model.config.vocab_size, {}
    try:
        pipelined_gemv(False)
        for b in (b for b in batches if 3 <= b <= 16):
            out[f"decode_tok_s_b{b}_unpipelined"] = decode_tokens_per_s(model, b, decode, repeats, vocab)
            print(f"  arc, pipelined GEMV off: decode b{b} {out[f'decode_tok_s_b{b}_unpipelined']:.1f} tok/s", flush=True)
            gc.collect()
            torch.cuda.empty_cache()
    finally:
        pipelined_gemv(True)
    return out


def pdl_ab(model, label: str, batches, decode: int, repeats: int) -> dict:
    """The same run's A/B of programmatic dependent launch (kernels/pdl.py), at the batches it is
    used for (up to pdl.max_rows() tokens): decode tokens/s again with it off (fresh engines, so
    fresh CUDA graphs), and the largest |logit| difference of 32 greedy decode steps at each batch
    with it on vs off (0: the overlap changes no value). Empty where the GPU has no PDL (before
    sm_90), it is off, or no batch is small enough."""
    from .kernels import pdl
    batches = [b for b in batches if b <= pdl.max_rows()]
    if torch.cuda.get_device_capability() < pdl.MIN_CAPABILITY or not pdl.enabled() or not batches:
        return {}
    vocab, out = model.config.vocab_size, {}
    on = [greedy_logits(model, 32, vocab, batch=b)[0] for b in batches]
    try:
        pdl.set_pdl(False)
        for b in batches:
            out[f"decode_tok_s_b{b}_no_pdl"] = decode_tokens_per_s(model, b, decode, repeats, vocab)
            print(f"  {label}, PDL off: decode b{b} {out[f'decode_tok_s_b{b}_no_pdl']:.1f} tok/s", flush=True)
            gc.collect()
            torch.cuda.empty_cache()
        out["pdl_logits_max_abs_diff"] = max((greedy_logits(model, 32, vocab, batch=b)[0] - want).abs().max().item()
                                             for b, want in zip(batches, on))
        print(f"  {label}: logits of 32 greedy steps at batch {', '.join(map(str, batches))}, PDL on vs off: "
              f"max |diff| {out['pdl_logits_max_abs_diff']:.3g}", flush=True)
    finally:
        pdl.set_pdl(True)
    return out


def residual_ab(model, label: str, batches, decode: int, prefill: int, repeats: int) -> dict:
    """The same run's A/B of the residual-add fusion (engine_fusion.linear_residual): decode
    tokens/s and the graph prefill again with the decoder layers' adds as separate kernels, and the
    teacher-forced logits of 32 decode steps vs fused (ARC: 0, the GEMV epilogue adds as torch
    does; BF16: cuBLAS addmm rounds once, so a logit may move)."""
    from .engine_fusion import fuse_engine
    vocab, out = model.config.vocab_size, {}
    fused, fed = greedy_logits(model, 32, vocab)
    try:
        if not fuse_engine(model, True, residual=False)["attention"]:
            return {}
        for b in batches:
            out[f"decode_tok_s_b{b}_no_residual"] = decode_tokens_per_s(model, b, decode, repeats, vocab)
            gc.collect()
            torch.cuda.empty_cache()
        out[f"prefill_ms_{prefill}_graph_no_residual"], _, _ = prefill_ms(model, prefill, repeats, vocab, True)
        out.update(logit_difference(greedy_logits(model, 32, vocab, tokens=fed)[0], fused, "no_residual"))
        print(f"  {label}, residual fusion off: " + ", ".join(f"decode b{b} {out[f'decode_tok_s_b{b}_no_residual']:.1f}"
                                                              for b in batches) +
              f" tok/s, prefill {out[f'prefill_ms_{prefill}_graph_no_residual']:.1f} ms; teacher-forced logits vs "
              f"fused: max |diff| {out['no_residual_logits_max_abs_diff']:.3g}", flush=True)
    finally:
        fuse_engine(model, True)
    gc.collect()
    torch.cuda.empty_cache()
    return out


def greedy_logits(model, steps: int, vocab: int, fusions: bool = True, tokens=None, graphs: bool = True,
                  batch: int = 1) -> tuple:
    """Logits of `steps` decode steps (CUDA graph) after a fixed 128-token prompt, each step fed
    the previous step's argmax (greedy) or, given `tokens` (steps,), tokens[i] (teacher forcing,
    batch 1) -> ((steps, V) float32 logits, (steps,) the tokens fed; batch > 1: (steps, batch, V)
    and (steps, batch)) - for comparing two settings of the same model step by step."""
    e = Engine(model, batch, PROMPT + steps + 1, graphs=graphs, fusions=fusions)
    ids = torch.randint(0, vocab, (batch, PROMPT), device=e.device,
                        generator=torch.Generator(device=e.device).manual_seed(0))
    tok, out, fed = e.prefill(ids).argmax(-1, keepdim=True), [], []
    for i in range(steps):
        if tokens is not None:
            tok = tokens[i].reshape(1, 1).to(e.device)
        fed.append((tok.reshape(()) if batch == 1 else tok.reshape(batch)).clone())
        logits = e.step(tok, PROMPT + i).float()
        out.append((logits[0] if batch == 1 else logits).clone())
        tok = logits.argmax(-1, keepdim=True)
    return torch.stack(out), torch.stack(fed)


def logit_difference(got: torch.Tensor, want: torch.Tensor, name: str) -> dict:
    """got vs want (steps, V): the largest |diff|, ||diff|| / ||want|| and the share of steps whose
    argmax agrees, under `name`_logits_max_abs_diff / _logits_rel_diff / _top1_agree."""
    d = got.float() - want.float()
    return {f"{name}_logits_max_abs_diff": d.abs().max().item(),
            f"{name}_logits_rel_diff": (d.norm() / want.float().norm()).item(),
            f"{name}_top1_agree": (got.argmax(-1) == want.argmax(-1)).float().mean().item()}


def decode_repeat(model) -> dict:
    """Two fresh engines' 32 greedy decode steps (batch 1, CUDA graphs) from one prompt: the
    largest |logit| difference (0: the decode step is deterministic - no race in the kernels)."""
    vocab = model.config.vocab_size
    d = (greedy_logits(model, 32, vocab)[0] - greedy_logits(model, 32, vocab)[0]).abs().max().item()
    print(f"  arc: logits of 32 greedy steps, two engines: max |diff| {d:.3g}", flush=True)
    gc.collect()
    torch.cuda.empty_cache()
    return {"decode_repeat_logits_max_abs_diff": d}


def quantized_shape(shape: str, work: Path, calib_source: str, tokenizer_dir=None) -> tuple:
    """Random weights of `shape` written to work/model and quantized (ARC defaults, 8 x 512
    calibration tokens) to work/arc; -> (source folder, checkpoint folder)."""
    from .config import CalibConfig, QuantConfig
    from .stream import quantize_streaming
    from .synth import write_random_model
    src = write_random_model(work / "model", shape, device="cuda", tokenizer_dir=tokenizer_dir)
    t = time.time()
    quantize_streaming(str(src), work / "arc", QuantConfig(), CalibConfig(calib_source, 8, 512), device="cuda",
                       force=True, restart=True, progress=False)
    print(f"quantized {shape} in {time.time() - t:.0f} s", flush=True)
    return src, work / "arc"


SHAPE_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "head_dim", "vocab_size")


def check_same_shape(source, checkpoint) -> None:
    """Refuse to compare a checkpoint with a BF16 model of another shape (its config.json against the
    checkpoint's): the table would time two different models."""
    def config(folder) -> dict:
        try:
            c = json.loads((Path(folder) / "config.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError) as e:
            raise ValueError(f"{folder}: no readable config.json ({type(e).__name__}); give a model folder") from None
        return c.get("text_config", c)
    want, got = config(checkpoint), config(source)
    diff = [f"{k} {got.get(k)} vs {want.get(k)}" for k in SHAPE_KEYS if got.get(k) != want.get(k)]
    if diff:
        raise ValueError(f"the checkpoint {checkpoint} was made for another model shape than {source} "
                         f"({'; '.join(diff)}, BF16 model vs checkpoint): give the model it was quantized from")


AB = ("fusion", "pdl", "residual", "pipeline", "prefill")   # the same run's A/Bs, run_bench(ab=)


def run_bench(source, checkpoint, batches=(1, 8, 32), decode: int = 64, prefill: int = 2048,
              repeats: int = 5, compile_batches=(), bf16_stacked: bool = True, ab=AB) -> list:
    """BF16 `source` folder vs the arcquant `checkpoint`, one after the other on one GPU.
    bf16_stacked: also time the BF16 model with q/k/v and gate/up stacked (stacking.py), as the
    quantized model's GEMVs are (gpu.stack_groups) - the fair baseline for them. ab: which of
    the A/Bs in AB to run as well (engine fusions, PDL, residual fusion, pipelined GEMV, prefill
    fusions)."""
    from transformers import AutoModelForCausalLM
    from .checkpoint import load_quantized
    from .gpu import use_kernels
    unknown = set(ab) - set(AB)
    if unknown:
        raise ValueError(f"unknown A/B {sorted(unknown)}: choose from {list(AB)}")
    check_same_shape(source, checkpoint)
    if not torch.cuda.is_available():
        raise ValueError("arcquant bench measures GPU speed and needs a CUDA GPU (none found); "
                         "on a CPU use arcquant eval for accuracy")
    rows = []
    model = AutoModelForCausalLM.from_pretrained(str(source), dtype=torch.bfloat16).cuda().eval()
    rows.append(bench_one(model, "bf16", batches, decode, prefill, repeats, compile_batches))
    rows[-1]["backend"] = "cuBLAS (torch)"
    rows[-1].update(_engine_abs(model, "bf16", ab, batches, decode, prefill, repeats))
    if bf16_stacked:
        from .stacking import stack_linears
        groups = stack_linears(model)
        rows.append(bench_one(model, "bf16-stacked", batches, decode, prefill, repeats, compile_batches))
        rows[-1]["backend"] = f"cuBLAS (torch), q/k/v and gate/up stacked in {groups} groups"
    del model
    gc.collect()                                   # engines and graphs form reference cycles
    torch.cuda.empty_cache()
    rows[-1]["gpu_bytes_left_after_free"] = torch.cuda.memory_allocated()
    model, _, _ = load_quantized(checkpoint, device="cuda", dtype=torch.bfloat16, verify=False)
    counts = use_kernels(model)
    row = bench_one(model, "arc", batches, decode, prefill, repeats, compile_batches)
    row["backend"] = (f"kernels for {counts['kernels']} layers (CUDA GEMVs for {counts['cuda_gemv']}), "
                      f"reference for {counts['reference']}, {counts['fused_mlps']} MLPs fused for prefill")
    row.update(decode_repeat(model))
    row.update(_engine_abs(model, "arc", ab, batches, decode, prefill, repeats))
    if counts["cuda_gemv"] and "pipeline" in ab:
        row.update(decode_pipeline_ab(model, batches, decode, repeats))
    if counts["fused_mlps"] and "prefill" in ab:
        row.update(prefill_fusion_ab(model, prefill, repeats))
    rows.append(row)
    return rows


def _engine_abs(model, label: str, ab, batches, decode: int, prefill: int, repeats: int) -> dict:
    """The A/Bs both models take (engine fusions, PDL, residual fusion), as chosen."""
    out = {}
    if "fusion" in ab:
        out.update(fusion_ab(model, label, batches, decode, prefill, repeats))
    if "pdl" in ab:
        out.update(pdl_ab(model, label, batches, decode, repeats))
    if "residual" in ab:
        out.update(residual_ab(model, label, batches, decode, prefill, repeats))
    return out


def engine_fusion_logits(rows) -> str:
    """The table's sentence on the fusions-off logits: teacher-forced figures where the rows have
    them (runs after v31), else the free-running greedy max |diff| older results recorded."""
    if all("unfused_engine_logits_rel_diff" in r for r in rows):
        return "teacher-forced logits of 32 decode steps vs fused: " + ", ".join(
            f"{r['model']} max |diff| {r['unfused_engine_logits_max_abs_diff']:.3g}, relative "
            f"{r['unfused_engine_logits_rel_diff']:.2e}, top-1 agree {100 * r['unfused_engine_top1_agree']:.0f} %"
            for r in rows)
    return "logits of 32 greedy steps vs fused: max |diff| " + ", ".join(
        f"{r['model']} {r['unfused_engine_logits_max_abs_diff']:.3g}" for r in rows)


def _ab_cells(rows: list, batches, key: str) -> list:
    """An A/B line's cell for each row: its decode tok/s with the setting off, `decode_tok_s_b{b}_{key}`,
    as "model b1 x, b8 y", each after the first row with its ratio to the first row's."""
    off = lambda r, b: r[f"decode_tok_s_b{b}_{key}"]                     # noqa: E731
    return [f"{r['model']} " + ", ".join(f"b{b} {off(r, b):.1f}" + ("" if r is rows[0] else
                                                                    f" ({off(r, b) / off(rows[0], b):.2f}x)")
                                         for b in batches) for r in rows]


def table(rows: list, batches, prefill: int) -> str:
    gib = lambda b: f"{b / 2**30:.2f}"
    graphed = all(f"prefill_ms_{prefill}_graph" in r for r in rows)
    head = ["model"] + [f"decode b{b} tok/s" for b in batches] + [f"prefill {prefill} ms"] + \
        ([f"prefill {prefill} ms, graph"] if graphed else []) + ["linear weights GiB",
                                                                  "all weights GiB", "peak GPU GiB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    base = rows[0]
    for r in rows:
        cells = [r["model"]]
        for b in batches:
            v = r[f"decode_tok_s_b{b}"]
            cells.append(f"{v:.1f}" + ("" if r is base else f" ({v / base[f'decode_tok_s_b{b}']:.2f}x)"))
        for key in [f"prefill_ms_{prefill}"] + ([f"prefill_ms_{prefill}_graph"] if graphed else []):
            p = r[key]
            cells.append(f"{p:.1f}" + ("" if r is base else f" ({p / base[key]:.2f}x)"))
        cells += [gib(r["linear_bytes"]) + ("" if r is base else f" ({base['linear_bytes'] / r['linear_bytes']:.2f}x smaller)"),
                  gib(r["total_bytes"]), gib(r["peak_gpu_bytes"])]
        lines.append("| " + " | ".join(cells) + " |")
    stacked = next((r for r in rows if r["model"] == "bf16-stacked"), None)
    if stacked is not None:                                             # the fair baseline for stacked GEMVs
        for r in rows:
            if r["model"] not in ("bf16", "bf16-stacked"):
                ratios = [f"decode b{b} {r[f'decode_tok_s_b{b}'] / stacked[f'decode_tok_s_b{b}']:.2f}x" for b in batches]
                key = f"prefill_ms_{prefill}" + ("_graph" if graphed else "")
                lines += ["", f"{r['model']} vs bf16-stacked: " + ", ".join(ratios) +
                          f", prefill {prefill}{' graph' if graphed else ''} {r[key] / stacked[key]:.2f}x the latency"]
    for r in rows:                                                      # the prefill fusions' A/B
        key = f"prefill_ms_{prefill}_graph"
        for name, what in (("mlp_unfused", "the MLP fusion off"), ("unfused", "the MLP and norm fusions off")):
            off = r.get(f"{key}_{name}")
            if off is not None:
                lines += ["", f"{r['model']} prefill {prefill} graph with {what}: {off:.1f} ms ({off / base[key]:.2f}x "
                          f"BF16; all fused {r[key]:.1f} ms); logits vs fused: max |diff| {r[f'{name}_logits_max_abs_diff']:.3g}"]
    if all(f"decode_tok_s_b{b}_unfused_engine" in r for r in rows for b in batches):   # the engine fusions' A/B
        cells = [c + f", prefill graph {r[f'prefill_ms_{prefill}_graph_unfused_engine']:.1f} ms"
                 for c, r in zip(_ab_cells(rows, batches, "unfused_engine"), rows)]
        lines += ["", "Engine fusions off (the eager attention and norms; tok/s): " + "; ".join(cells) + "; " +
                  engine_fusion_logits(rows)]
    for r in rows:                                                      # the pipelined GEMV's A/B
        for b in batches:
            off = r.get(f"decode_tok_s_b{b}_unpipelined")
            if off is not None:
                lines += ["", f"{r['model']} decode b{b} with the pipelined GEMV off: {off:.1f} tok/s "
                          f"({off / base[f'decode_tok_s_b{b}']:.2f}x BF16; on: {r[f'decode_tok_s_b{b}']:.1f})"]
    pdl_batches = [b for b in batches if all(f"decode_tok_s_b{b}_no_pdl" in r for r in rows)]
    if pdl_batches:                                                     # the PDL A/B
        cells = [c + f", logits on vs off: max |diff| {r['pdl_logits_max_abs_diff']:.3g}"
                 for c, r in zip(_ab_cells(rows, pdl_batches, "no_pdl"), rows)]
        lines += ["", "Programmatic dependent launch off (kernels/pdl.py; tok/s): " + "; ".join(cells)]
    if all(f"decode_tok_s_b{b}_no_residual" in r for r in rows for b in batches):   # the residual fusion's A/B
        cells = [c + f", prefill graph {r[f'prefill_ms_{prefill}_graph_no_residual']:.1f} ms, teacher-forced logits "
                 f"vs fused: max |diff| {r['no_residual_logits_max_abs_diff']:.3g}"
                 for c, r in zip(_ab_cells(rows, batches, "no_residual"), rows)]
        lines += ["", "Residual adds as separate kernels (engine_fusion.linear_residual off; tok/s): " + "; ".join(cells)]
    for r in rows:
        if "decode_repeat_logits_max_abs_diff" in r:
            lines += ["", f"{r['model']}: logits of 32 greedy decode steps from two fresh engines: max |diff| "
                      f"{r['decode_repeat_logits_max_abs_diff']:.3g}"]
    compiled = sorted({int(k[len("decode_tok_s_b"):-len("_compiled")]) for r in rows for k in r
                       if k.startswith("decode_tok_s_b") and k.endswith("_compiled")})
    if compiled:                                                        # torch.compile'd decode steps
        lines += ["", "| model, decode step through torch.compile | " + " | ".join(f"b{b} tok/s" for b in compiled) + " |",
                  "|---|" + "---|" * len(compiled)]
        for r in rows:
            cells = []
            for b in compiled:
                v, b0 = r.get(f"decode_tok_s_b{b}_compiled"), base.get(f"decode_tok_s_b{b}_compiled")
                cells.append("failed" if v is None else f"{v:.1f}" + ("" if r is base or not b0 else f" ({v / b0:.2f}x)"))
            lines.append(f"| {r['model']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def temp_work() -> Path:
    return Path(tempfile.mkdtemp(prefix="arcquant-bench-"))
