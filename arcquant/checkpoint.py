"""Self-describing quantized checkpoints.

A folder:
    arcquant.json       format name and version, QuantConfig, calibration, per-layer plan
                        (in/out features, s, activation mode, group, calibration input
                        max |x| for W4A4 layers), average bits
    *.safetensors       every tensor of the model, in one file (model.safetensors) or, from the
                        streaming quantizer, one file per decoder layer plus rest.safetensors;
                        arcquant.json "files" lists them with their size and SHA-256, which
                        load_quantized verifies. Per quantized layer NAME:
                        NAME.weight_packed (N, Kp/2) uint8, NAME.weight_scale (N, Kp/B),
                        NAME.weight_global_scale () f32 (448*6/amax), NAME.perm (Kp,) i32,
                        NAME.tail (s,) i32, [NAME.weight_tail_packed / _scale when the weight
                        tail is not the last s columns], [NAME.input_global_scale for static
                        activation scales], [NAME.bias]
    config.json, tokenizer files   the HF model config (quantization markers cleared)
Written to a temporary sibling folder and renamed into place, so an interrupted save never
leaves a folder that looks complete. Loading needs no calibration data.
"""
import functools
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from . import __version__, arc
from .config import CalibConfig, QuantConfig
from .formats import get_format
from .modeling import UnsupportedModelError, init_buffers, set_submodule
from .qlinear import FINITE, QuantLinear, SharedInput

FORMAT = "arcquant"
FORMAT_VERSION = 2                 # 2: "files" with checksums; 1 (read still): one model.safetensors
META_FILE = "arcquant.json"


class CheckpointError(ValueError):
    pass


def is_checkpoint(path) -> bool:
    return (Path(path) / META_FILE).is_file()


def prepare_output(out: Path, force: bool) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not force:
            raise FileExistsError(f"output {str(out)!r} already exists and is not empty; "
                                  "choose another path or pass --force to replace it")


def atomic_folder(out: Path, force: bool, write) -> Path:
    """Call write(tmp_dir) then move tmp_dir to `out`; nothing is left at `out` on failure."""
    out = Path(out)
    prepare_output(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        write(tmp)
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def file_digest(path) -> dict:
    """{"bytes": size, "sha256": hex digest} of a file, read in 16 MiB pieces."""
    h, n = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(16 << 20):
            h.update(chunk)
            n += len(chunk)
    return {"bytes": n, "sha256": h.hexdigest()}


def verify_files(path: Path, files: dict) -> None:
    """Raise CheckpointError naming the first listed file that is missing, truncated or altered."""
    for rel, want in files.items():
        f = path / rel
        if not f.is_file():
            raise CheckpointError(f"{f} is missing; the checkpoint is incomplete: quantize again")
        size = f.stat().st_size
        if size != want["bytes"]:
            raise CheckpointError(f"{f} has {size} bytes, the checkpoint recorded {want['bytes']}: the file "
                                  "is truncated or damaged; quantize again or restore it")
        if file_digest(f)["sha256"] != want["sha256"]:
            raise CheckpointError(f"{f} does not match its recorded SHA-256: the file was altered or is "
                                  "damaged; quantize again or restore it")


def unique_state(model, exclude: str | None = None) -> dict:
    """state_dict without tied duplicates (safetensors refuses shared storage) and without the
    keys starting with `exclude`."""
    seen, out = set(), {}
    for k, t in model.state_dict().items():
        if exclude and k.startswith(exclude):
            continue
        key = (t.data_ptr(), t.shape, t.dtype) if t.numel() else (k,)
        if key in seen:
            continue
        seen.add(key)
        out[k] = t.detach().contiguous().cpu()
    return out


def layer_entries(module, report: dict, prefix: str = "") -> dict:
    """{dotted name: the arcquant.json entry} of every QuantLinear under `module`."""
    layers = {}
    for name, mod in module.named_modules():
        if isinstance(mod, QuantLinear):
            name = prefix + name
            row = next((r for r in report["layers"] if r["name"] == name), {})
            layers[name] = {"in_features": mod.in_features, "out_features": mod.out_features,
                            "fmt": mod.fmt.name, "act": mod.act, "act_scale": mod.act_scale,
                            "s": mod.s, "bias": mod.bias is not None, "group": row.get("group", name),
                            "input_amax": mod.input_amax, "rotate": mod.rotate,
                            "weight_residual": mod.weight_residual}
    return layers


def make_meta(layers: dict, files: dict, qcfg: QuantConfig, ccfg: CalibConfig | None, report: dict,
              source: str) -> dict:
    return {"format": FORMAT, "version": FORMAT_VERSION, "producer": f"arcquant {__version__}",
            "source_model": source, "quant": qcfg.to_dict(),
            "calibration": None if ccfg is None else vars(ccfg).copy(),
            "avg_bits": report["avg_bits"], "files": files, "moe": report.get("moe") or [],
            "layers": layers}


def write_folder_files(tmp: Path, model, tokenizer, meta: dict) -> None:
    """config.json (quantization markers cleared), tokenizer files and arcquant.json."""
    model.config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / META_FILE).write_text(json.dumps(meta, indent=1))


def save_quantized(model, tokenizer, out, qcfg: QuantConfig, ccfg: CalibConfig | None, report: dict,
                   source: str, force: bool = False) -> Path:
    layers = layer_entries(model, report)

    def write(tmp: Path):
        save_file(unique_state(model), str(tmp / "model.safetensors"), metadata={"format": FORMAT})
        files = {"model.safetensors": file_digest(tmp / "model.safetensors")}
        write_folder_files(tmp, model, tokenizer, make_meta(layers, files, qcfg, ccfg, report, source))

    return atomic_folder(Path(out), force, write)


def read_meta(path: Path) -> dict:
    try:
        meta = json.loads((path / META_FILE).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{str(path)!r} is not an arcquant checkpoint (no {META_FILE})") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path / META_FILE} is not valid JSON ({e}); the checkpoint is damaged") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path / META_FILE} has format {meta.get('format')!r}, expected {FORMAT!r}")
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path / META_FILE} is not a JSON object; the checkpoint is damaged")
    version = meta.get("version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(f"{path} was written in arcquant checkpoint format version {version!r}; this "
                              f"arcquant ({__version__}) reads versions up to {FORMAT_VERSION}: upgrade arcquant")
    bad = [k for k, typ in (("layers", dict), ("quant", dict), ("avg_bits", (int, float))) if not isinstance(meta.get(k), typ)]
    if meta.get("files") is not None and not isinstance(meta["files"], dict):
        bad.append("files")
    if bad:
        raise CheckpointError(f"{path / META_FILE}: fields {bad} are missing or malformed; the checkpoint is damaged")
    return meta


def _take(tensors: dict, key: str, path: Path, dtypes=None) -> torch.Tensor:
    if key not in tensors:
        raise CheckpointError(f"{path}: tensor {key!r} is missing from the checkpoint's files; "
                              "the checkpoint is incomplete: quantize again")
    t = tensors.pop(key)
    if dtypes is not None and t.dtype not in dtypes:
        raise CheckpointError(f"{path}: tensor {key!r} has dtype {t.dtype}, expected "
                              f"{' or '.join(str(d) for d in dtypes)}; the checkpoint is damaged")
    return t


INDEX = (torch.int16, torch.int32, torch.int64)
FLOAT = (torch.float32,)
PACKED = (torch.uint8,)


@functools.lru_cache(maxsize=None)
def _scale_dtype(fmt) -> tuple:
    return (fmt.quantize(torch.zeros(1, fmt.block), torch.ones(()))[1].dtype,)


def _check_plan(name: str, perm: torch.Tensor, tail: torch.Tensor, path: Path) -> None:
    k = perm.numel()
    if perm.dim() != 1 or not torch.equal(torch.sort(perm).values, torch.arange(k, dtype=perm.dtype)):
        raise CheckpointError(f"{path}: {name}.perm is not a permutation of 0..{k - 1}; the checkpoint is damaged")
    if tail.dim() != 1 or (tail.numel() and (int(tail.min()) < 0 or int(tail.max()) >= k)):
        raise CheckpointError(f"{path}: {name}.tail has channels outside 0..{k - 1}; the checkpoint is damaged")


def _build_layer(name: str, info: dict, tensors: dict, path: Path) -> QuantLinear:
    fmt = get_format(info["fmt"])
    perm, tail = _take(tensors, f"{name}.perm", path, INDEX), _take(tensors, f"{name}.tail", path, INDEX)
    _check_plan(name, perm, tail, path)
    plan = arc.ArcPlan(perm.long(), tail.long())
    packed = _take(tensors, f"{name}.weight_packed", path, PACKED)
    if packed.dim() != 2:
        raise CheckpointError(f"{path}: {name}.weight_packed has shape {tuple(packed.shape)}, expected 2 dimensions")
    codes = fmt.module.unpack(packed)
    scales = _take(tensors, f"{name}.weight_scale", path, _scale_dtype(fmt))
    tail_codes = tail_scales = None
    if f"{name}.weight_tail_packed" in tensors:
        tail_codes = fmt.module.unpack(_take(tensors, f"{name}.weight_tail_packed", path, PACKED))
        tail_scales = _take(tensors, f"{name}.weight_tail_scale", path, _scale_dtype(fmt))
        if tuple(tail_codes.shape) != (info["out_features"], info["s"]):
            raise CheckpointError(f"{path}: {name}.weight_tail_packed has the wrong shape; the checkpoint is damaged")
    n, kp = info["out_features"], perm.numel()
    expect = {"weight_packed": (codes.shape, (n, kp)), "weight_scale": (scales.shape, (n, kp // fmt.block)),
              "tail": (tail.shape, (info["s"],))}
    for key, (got, want) in expect.items():
        if tuple(got) != tuple(want):
            raise CheckpointError(f"{path}: {name}.{key} has shape {tuple(got)}, expected {tuple(want)}")
    if tail_codes is None and not plan.tail_reuses_weight():
        raise CheckpointError(f"{path}: {name}.weight_tail_packed is missing for a non-reused tail")
    qw = arc.QuantizedWeight(codes, scales, tail_codes, tail_scales)
    gs = _take(tensors, f"{name}.weight_global_scale", path, FLOAT)
    in_gs = _take(tensors, f"{name}.input_global_scale", path, FLOAT) if info["act_scale"] == "static" \
        and info["act"] in ("fp4", "mixed") else None
    for key, t in (("weight_global_scale", gs), ("input_global_scale", in_gs)):
        if t is not None and (t.numel() != 1 or not torch.isfinite(t).all() or float(t) <= 0):
            raise CheckpointError(f"{path}: {name}.{key} must be one finite positive number; the checkpoint is damaged")
    bias = _take(tensors, f"{name}.bias", path) if info["bias"] else None
    smooth = tensors.pop(f"{name}.smooth", None)
    tail8 = None
    if info["act"] == "mixed":
        tail8 = (_take(tensors, f"{name}.weight_tail8", path), _take(tensors, f"{name}.weight_tail8_scale", path))
    wres = None
    if info.get("weight_residual"):                              # arc+wres: (N, s) codes, (N, s/B) scales
        wres = (fmt.module.unpack(_take(tensors, f"{name}.weight_res_packed", path, PACKED)),
                _take(tensors, f"{name}.weight_res_scale", path, _scale_dtype(fmt)))
        if tuple(wres[0].shape) != (n, info["s"]) or tuple(wres[1].shape) != (n, info["s"] // fmt.block):
            raise CheckpointError(f"{path}: {name}.weight_res_packed / weight_res_scale have the wrong shape; "
                                  "the checkpoint is damaged")
    return QuantLinear(info["in_features"], n, info["fmt"], info["act"], info["act_scale"], plan, qw,
                       gs, in_gs, bias, info.get("rotate"), smooth, tail8, wres)


def load_files(path: Path, files) -> dict:
    """Every tensor of the safetensors files `files` (names relative to `path`), merged."""
    tensors = {}
    for rel in files:
        try:
            tensors.update(load_file(str(path / rel)))
        except FileNotFoundError:
            raise CheckpointError(f"{path}: {rel} is missing") from None
        except Exception as e:  # safetensors raises its own error types for damaged files
            raise CheckpointError(f"{path}/{rel} cannot be read ({e}); the file is damaged") from None
    return tensors


def read_tensors(path: Path, meta: dict, verify: bool = True) -> dict:
    """Every tensor of the checkpoint's files (checked against their checksums first)."""
    files = meta.get("files") or {"model.safetensors": None}            # version 1: one file
    if verify and meta.get("files"):
        verify_files(path, files)
    return load_files(path, files)


def load_quantized(path, device: str = "cpu", verify: bool = True, dtype=torch.float32):
    """-> (model, tokenizer, meta) from a checkpoint folder, in eval mode on `device`.
    verify: check every file's size and SHA-256 against arcquant.json first.
    dtype: of the unquantized tensors (embeddings, norms, head, biases): float32 for the CPU
    reference, bfloat16 on a GPU. The model is built on the meta device and takes the
    checkpoint's tensors as they are: no full-precision copy of the linear weights is ever made."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from .moe import unfuse_experts
    path = Path(path)
    meta = read_meta(path)
    tensors = read_tensors(path, meta, verify)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=dtype)
    unfuse_experts(model)
    groups: dict[str, SharedInput] = {}
    sizes: dict[str, int] = {}
    for info in meta["layers"].values():
        sizes[info["group"]] = sizes.get(info["group"], 0) + 1
    for name, info in meta["layers"].items():
        try:
            model.get_submodule(name)
        except AttributeError:
            raise UnsupportedModelError(f"{path}: layer {name!r} of the checkpoint does not exist in a "
                                        f"{type(model).__name__}; config.json and arcquant.json disagree") from None
        try:
            q = _build_layer(name, info, tensors, path)
        except (KeyError, TypeError) as e:
            raise CheckpointError(f"{path / META_FILE}: the entry of layer {name!r} is malformed (field {e}); "
                                  "the checkpoint is damaged") from None
        q.input_amax = info.get("input_amax")
        if sizes[info["group"]] > 1:
            q.shared = groups.setdefault(info["group"], SharedInput())
        set_submodule(model, name, q)
    try:
        missing, unexpected = model.load_state_dict(tensors, strict=False, assign=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: the checkpoint's tensors do not fit its config.json: {e}") from None
    tied = {k for k in missing if k.endswith("lm_head.weight") and model.config.tie_word_embeddings}
    quant_keys = {k for k in missing if k.rpartition(".")[0] in meta["layers"]}
    rest = [k for k in missing if k not in tied and k not in quant_keys]
    if rest or unexpected:
        raise CheckpointError(f"{path}: tensors missing {rest[:5]} / unexpected {list(unexpected)[:5]} in "
                              "the checkpoint's files; the checkpoint does not match its config")
    _finish_meta_model(model, dtype)
    tok = AutoTokenizer.from_pretrained(str(path))
    FINITE.install(model)                                         # NaN checks read once per forward on a GPU
    return model.to(device).eval(), tok, meta


def _finish_meta_model(model, dtype) -> None:
    """Unquantized tensors to `dtype`, tied weights tied, non-persistent buffers (rotary) computed."""
    for mod in model.modules():
        if isinstance(mod, QuantLinear):
            if mod.bias is not None:
                mod.bias = torch.nn.Parameter(mod.bias.data.to(dtype), requires_grad=False)
            continue
        for key, p in mod._parameters.items():
            if p is not None and p.is_floating_point() and p.device.type != "meta" and p.dtype != dtype:
                mod._parameters[key] = torch.nn.Parameter(p.data.to(dtype), requires_grad=False)
    model.tie_weights()
    init_buffers(model, model, "")
