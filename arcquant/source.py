"""Reading a model's weights one tensor at a time, without holding the model in memory.

SafetensorsSource parses the headers of an HF folder's safetensors files (one file, or shards
listed by model.safetensors.index.json) and reads a tensor with plain file reads - no
memory map, so only the tensors asked for take memory. skeleton() builds the model on the
meta device and fills in everything outside the decoder layers; materialize() fills one
decoder layer. MoE experts unfused by arcquant.moe are found under their checkpoint names
(Mixtral's block_sparse_moe.experts.E.w1/w3/w2, Qwen-MoE's experts.E.gate/up/down_proj, or
fused 3D gate_up_proj / down_proj).
"""
import json
import re
import struct
from pathlib import Path

import torch
from torch import nn

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
          "U8": torch.uint8, "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn}
EXPERT = re.compile(r"^(.*)\.experts\.(\d+)\.(gate_up|down)\.weight$")
EXPERT_NAMES = {"gate_up": (("w1", "w3"), ("gate_proj", "up_proj")), "down": (("w2",), ("down_proj",))}


class SourceError(ValueError):
    pass


class SafetensorsSource:
    def __init__(self, folder):
        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() \
            else [p.name for p in sorted(self.folder.glob("*.safetensors"))]
        if not files:
            raise SourceError(f"{self.folder} has no safetensors weights; the streaming quantizer reads "
                              "safetensors (GGUF files are converted first by name)")
        self.entries = {}                                  # name -> (file, dtype, shape, start, end)
        for f in files:
            self.entries.update(_header(self.folder / f))

    def files(self) -> dict:
        return {f.name: f.stat().st_size for f in {self.folder / e[0] for e in self.entries.values()}}

    def nbytes(self, prefix: str = "") -> int:
        return sum(e[4] - e[3] for k, e in self.entries.items() if k.startswith(prefix))

    def read(self, name: str) -> torch.Tensor:
        file, dtype, shape, start, end = self.entries[name]
        buf = bytearray(end - start)
        with open(self.folder / file, "rb") as f:
            f.seek(start)
            if f.readinto(buf) != len(buf):
                raise SourceError(f"{self.folder / file} is truncated: tensor {name!r} runs past its end")
        if not buf:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(buf, dtype=dtype).reshape(shape)

    def get(self, name: str) -> torch.Tensor | None:
        """The tensor the model calls `name`, under its own or its checkpoint's name; None if absent."""
        if name in self.entries:
            return self.read(name)
        for names, index in _aliases(name):
            if all(a in self.entries for a in names):
                parts = [self.read(a) for a in names]
                t = torch.cat(parts) if len(parts) > 1 else parts[0]
                return t if index is None else t[index].clone()
        return None


def _header(path: Path) -> dict:
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise SourceError(f"{path} is not a safetensors file (shorter than its header)")
        (n,) = struct.unpack("<Q", raw)
        try:
            head = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise SourceError(f"{path} has a damaged safetensors header ({e})") from None
    out, base = {}, 8 + n
    for name, e in head.items():
        if name == "__metadata__":
            continue
        if e["dtype"] not in DTYPES:
            raise SourceError(f"{path}: tensor {name!r} has dtype {e['dtype']}, which arcquant cannot read")
        s, t = e["data_offsets"]
        out[name] = (path.name, DTYPES[e["dtype"]], tuple(e["shape"]), base + s, base + t)
    return out


def _aliases(name: str) -> list:
    """[([checkpoint names concatenated on dim 0], index or None)] for an unfused expert / router."""
    prefixes = lambda p: [p, p.replace(".mlp", ".block_sparse_moe")] if ".mlp" in p else [p]
    m = EXPERT.match(name)
    if m:
        p, e, kind = m.group(1), int(m.group(2)), m.group(3)
        out = [([f"{q}.experts.{e}.{n}.weight" for n in names], None)
               for q in prefixes(p) for names in EXPERT_NAMES[kind]]
        fused = "gate_up_proj" if kind == "gate_up" else "down_proj"
        return out + [([f"{q}.experts.{fused}"], e) for q in prefixes(p)]
    if name.endswith(".gate.weight"):
        return [([q + ".gate.weight"], None) for q in prefixes(name[: -len(".gate.weight")])[1:]]
    return []


def fill(module: nn.Module, prefix: str, source: SafetensorsSource, dtype, skip=()) -> list[str]:
    """Give every meta parameter/persistent buffer of `module` its tensor from `source`;
    -> names not found (non-persistent buffers are reported separately by the caller)."""
    missing = []
    for mod_name, mod in module.named_modules():
        if any(mod_name == s or mod_name.startswith(s + ".") for s in skip):
            continue
        persistent = set(mod._buffers) - mod._non_persistent_buffers_set
        for store, keys in ((mod._parameters, set(mod._parameters)), (mod._buffers, persistent)):
            for key in keys:
                t = store.get(key)
                if t is None or t.device.type != "meta":
                    continue
                full = ".".join(x for x in (prefix, mod_name, key) if x)
                got = source.get(full)
                if got is None:
                    missing.append(full)
                    continue
                if tuple(got.shape) != tuple(t.shape):
                    raise SourceError(f"{source.folder}: tensor {full!r} has shape {tuple(got.shape)}, the "
                                      f"model's config expects {tuple(t.shape)}")
                new = got.to(dtype if got.is_floating_point() else got.dtype)
                store[key] = nn.Parameter(new, requires_grad=False) if isinstance(t, nn.Parameter) else new
    return missing
