"""GPU vs the CPU reference on a real model (issue 5): SmolLM2-135M quantized with ARC, cut to
its first layers so it travels to the GPU machine (64 MiB per call), embedding sent as int8 with
row scales (both sides use the same dequantized embedding).

    python scripts/gpu_vs_cpu.py prepare BUNDLE      # here: checkpoint slice + CPU reference
    PYTHONPATH=. python scripts/gpu_vs_cpu.py check BUNDLE --json OUT   # on the GPU
prepare records, per prompt, the CPU reference's 32 greedy tokens (engine, reference backend,
float32) and the teacher-forced logits at those positions, plus the CPU's own noise floor: the
same model decoding step by step vs one full forward (W4A4 rounding flips on ulp-level
differences). check runs the GPU with the kernels (CUDA where nvcc builds them, else Triton;
bf16) and with the reference backend (float32) and compares greedy tokens and teacher-forced logits with the CPU reference.
"""
import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from arcquant.checkpoint import file_digest, load_quantized
from arcquant.engine import Engine

PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ", "Photosynthesis is the process by which"]
NEW = 32


def teacher_logits(model, ids, gen):                       # (1, T) + (NEW,) -> (NEW, V) float32
    with torch.no_grad():
        full = model(torch.cat([ids, gen[None]], 1).to(next(model.parameters()).device)).logits[0]
    return full[ids.shape[1] - 1: ids.shape[1] - 1 + NEW].float().cpu()


def compare(logits, ref) -> dict:
    d = (logits - ref).abs()
    return {"top1_agree": float((logits.argmax(-1) == ref.argmax(-1)).float().mean()),
            "max_abs_diff": float(d.max()), "rel_diff": float((logits - ref).norm() / ref.norm())}


def prepare(bundle: Path, layers: int):
    from arcquant.checkpoint import save_quantized
    from arcquant.config import CalibConfig, QuantConfig
    from arcquant.pipeline import quantize_in_memory
    qcfg, ccfg = QuantConfig(), CalibConfig(nsamples=8, seqlen=256)
    model, tok, report = quantize_in_memory("smollm2-135m", qcfg, ccfg, progress=False)
    model.model.layers = model.model.layers[:layers]
    model.config.num_hidden_layers = layers
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[:layers]
    e = model.model.embed_tokens.weight.data
    scale = e.abs().amax(1, keepdim=True) / 127                     # (V, 1)
    q8 = torch.round(e / scale).to(torch.int8)
    model.model.embed_tokens.weight.data = q8.float() * scale
    model.tie_weights()
    report["layers"] = [r for r in report["layers"] if int(r["name"].split(".")[2]) < layers]
    ck = save_quantized(model, tok, bundle / "ck", qcfg, ccfg, report, "smollm2-135m (first layers)", force=True)
    t = load_file(str(ck / "model.safetensors"))
    del t["model.embed_tokens.weight"]
    save_file(t, str(ck / "model.safetensors"))
    save_file({"q8": q8, "scale": scale}, str(bundle / "embed_q8.safetensors"))
    ref, tokens, floor = {}, [], []
    for i, p in enumerate(PROMPTS):
        ids = tok(p, return_tensors="pt").input_ids
        gen = Engine(model, 1, ids.shape[1] + NEW + 1, graphs=False).generate(ids, NEW)[0]
        tl = teacher_logits(model, ids, gen)
        ref[f"logits{i}"] = tl.half()
        eng = Engine(model, 1, ids.shape[1] + NEW + 1, graphs=False)
        steps = [eng.prefill(ids)[0]] + [eng.step(gen[j].view(1, 1), ids.shape[1] + j)[0] for j in range(NEW - 1)]
        floor.append(compare(torch.stack(steps), tl))
        tokens.append({"prompt": p, "ids": ids[0].tolist(), "greedy": gen.tolist()})
    save_file(ref, str(bundle / "ref_logits.safetensors"))
    (bundle / "ref.json").write_text(json.dumps({"layers": layers, "prompts": tokens, "cpu_noise_floor": floor}, indent=1))
    print(json.dumps(floor, indent=1))


def assemble(bundle: Path) -> Path:
    ck = bundle / "ck"
    t = load_file(str(ck / "model.safetensors"))
    if "model.embed_tokens.weight" not in t:
        e = load_file(str(bundle / "embed_q8.safetensors"))
        t["model.embed_tokens.weight"] = e["q8"].float() * e["scale"]
        save_file(t, str(ck / "model.safetensors"))
        meta = json.loads((ck / "arcquant.json").read_text())
        meta["files"] = {"model.safetensors": file_digest(ck / "model.safetensors")}
        (ck / "arcquant.json").write_text(json.dumps(meta, indent=1))
    return ck


def check(bundle: Path, out: str):
    from arcquant.gpu import use_kernels
    ck, refj = assemble(bundle), json.loads((bundle / "ref.json").read_text())
    ref = load_file(str(bundle / "ref_logits.safetensors"))
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "layers": refj["layers"],
              "cpu_noise_floor": refj["cpu_noise_floor"], "runs": {}}
    for label, dtype, kernels in (("gpu-kernels-bf16", torch.bfloat16, True), ("gpu-reference-fp32", torch.float32, False)):
        model, _, _ = load_quantized(ck, device="cuda", dtype=dtype)
        counts = use_kernels(model, enable=kernels)
        rows = []
        for i, p in enumerate(refj["prompts"]):
            ids = torch.tensor([p["ids"]], device="cuda")
            gen = Engine(model, 1, ids.shape[1] + NEW + 1, graphs=kernels).generate(ids, NEW)[0].cpu()
            want = torch.tensor(p["greedy"])
            same = (gen == want).tolist()
            first = same.index(False) if False in same else NEW
            rows.append({"prompt": p["prompt"], "greedy_equal": first == NEW, "first_difference": first,
                         **compare(teacher_logits(model, ids.cpu(), want), ref[f"logits{i}"].float())})
        result["runs"][label] = {"backend": counts, "prompts": rows}
        del model
    print(json.dumps(result, indent=1))
    Path(out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["prepare", "check"])
    ap.add_argument("bundle")
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--json", default="gpu_vs_cpu.json")
    a = ap.parse_args()
    b = Path(a.bundle)
    b.mkdir(parents=True, exist_ok=True)
    prepare(b, a.layers) if a.mode == "prepare" else check(b, a.json)
    sys.exit(0)
