"""Streaming quantization: bounded memory, resumable, checksummed output.

The model is built on the meta device; only the modules outside the decoder layers (embedding,
final norm, head) are read up front. quantize_model then runs its two passes through a
DiskStore: pass 1 reads one layer from the source files, calibrates it, saves its statistics
and frees it; pass 2 reads it again, quantizes it and writes it as its own safetensors file.
Peak memory: one layer + the calibration activations + the modules outside the layers.

Everything goes to a work folder next to the output (.NAME.partial) with progress.json, which
records each finished file's size and SHA-256. An interrupted run started again with the same
settings verifies those files and continues after the last good one (a damaged file is redone);
the calibration activations are snapshotted every `snapshot_every` seconds so pass 1 resumes
without re-running the layers before the snapshot. When all layers are done the work folder
gets rest.safetensors, config, tokenizer and arcquant.json and is renamed to the output.
"""
import ctypes
import json
import os
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from . import __version__, distributed
from .arc import ChannelStats
from .checkpoint import (FORMAT, CheckpointError, file_digest, layer_entries, make_meta, prepare_output,
                         unique_state, verify_files, write_folder_files)
from .config import CalibConfig, QuantConfig
from .formats import get_format
from .modeling import find_decoder_layers, init_buffers, resolve_model
from .moe import unfuse_experts
from .quantize import GroupInfo, quantize_model
from .source import SafetensorsSource, SourceError, fill

PROGRESS = "progress.json"
STATS_FIELDS = ("absmax", "sqerr", "sumsq")


def fixed_mmap_threshold() -> None:
    """glibc raises its mmap threshold after large frees, so freed layers end up as heap
    fragments that are never returned (measured: 0.6 GiB -> 3.5 GiB over a 96-layer run).
    A fixed threshold keeps every tensor-sized block in its own mapping, returned on free."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 128 << 10)             # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass                                                        # not glibc: nothing to do


def work_dir(out: Path) -> Path:
    return out.parent / f".{out.name}.partial"


def build_skeleton(folder: Path, source: SafetensorsSource, dtype=torch.float32):
    """-> (model with meta decoder layers and everything else read from `source`, layers' name)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), dtype=dtype)
    unfuse_experts(model)
    lname, _ = find_decoder_layers(model)
    fill(model, "", source, dtype, skip=[lname])
    model.tie_weights()
    init_buffers(model, model, "")
    missing = [n for n, t in model.state_dict(keep_vars=True).items()
               if t.device.type == "meta" and not n.startswith(lname + ".")]
    if missing:
        raise SourceError(f"{folder}: tensors {missing[:5]} are not in its safetensors files")
    return model.eval(), lname


def materialize_layer(model, layer, prefix: str, source: SafetensorsSource, dtype=torch.float32):
    """Give the meta decoder layer `layer` (named `prefix`) its tensors from `source`."""
    missing = fill(layer, prefix, source, dtype)
    if missing:
        raise SourceError(f"{source.folder}: tensors {missing[:5]} are not in its safetensors files (names "
                          "arcquant cannot map); quantize without streaming (arcquant eval --method ...)")
    init_buffers(model, layer, prefix + ".")
    return layer


def estimate_memory(source: SafetensorsSource, lname: str, n_layers: int, hidden: int, inter: int,
                    ccfg: CalibConfig, batch_size: int = 8) -> dict:
    """Bytes of the largest pieces held at once (float32 compute)."""
    numel = lambda prefix: sum(torch.Size(e[2]).numel() for k, e in source.entries.items()
                               if k.startswith(prefix))
    layer = max(numel(f"{lname}.{i}.") for i in range(n_layers)) * 4
    tokens = ccfg.nsamples * ccfg.seqlen
    est = {"layer": int(layer * 2.5),                              # fp32 weights + quantization temporaries
           "outside_layers": (numel("") - numel(f"{lname}.")) * 4,
           "activations": tokens * hidden * 4 * 2 + min(tokens, batch_size * ccfg.seqlen) * inter * 4 * 3}
    est["total"] = sum(est.values())
    return est


class DiskStore:
    """quantize_model's layer store on disk (see MemoryStore in quantize.py)."""

    def __init__(self, work: Path, model, lname: str, source, qcfg: QuantConfig, fingerprint: dict,
                 snapshot_every: float = 600.0, log=print):
        self.work, self.model, self.lname, self.source = work, model, lname, source
        self.layers = find_decoder_layers(model)[1]
        self.fmt, self.threshold = get_format(qcfg.fmt), qcfg.threshold
        self.snapshot_every, self.last_snapshot, self.log = snapshot_every, time.time(), log
        self.leader = distributed.rank() == 0                     # writes stats, progress, the folder
        if distributed.world() > 1:
            self.snapshot_every = float("inf")                     # activations are split over ranks
        (work / "layers").mkdir(parents=True, exist_ok=True)
        (work / "stats").mkdir(exist_ok=True)
        p = work / PROGRESS
        self.progress = json.loads(p.read_text()) if p.is_file() else \
            {"fingerprint": fingerprint, "stats": {}, "layers": {}, "snapshot": None}
        self._check_fingerprint(fingerprint)
        self._verify()

    def _check_fingerprint(self, fp: dict) -> None:
        old = self.progress["fingerprint"]
        diff = [f"{k}: {old.get(k)!r} then, {v!r} now" for k, v in fp.items() if old.get(k) != v]
        if diff:
            raise ValueError(f"{self.work} holds an interrupted run with other settings ({'; '.join(diff)}); "
                             "pass --restart to discard it, or choose another --out")

    def _verify(self) -> None:
        """Drop finished entries whose file is missing or damaged (they are redone)."""
        for kind in ("stats", "layers"):
            for i, e in list(self.progress[kind].items()):
                if not self._intact(e):
                    self.log(f"resume: {e['file']} is missing or damaged; layer {i} is redone")
                    del self.progress[kind][i]
        snap = self.progress["snapshot"]
        if snap and not self._intact(snap):
            self.progress["snapshot"] = None
        done = len(self.progress["stats"]), len(self.progress["layers"])
        if any(done):
            self.log(f"resume: {done[0]} layers calibrated and {done[1]} quantized earlier, files verified")

    def _intact(self, e: dict) -> bool:
        try:
            verify_files(self.work, {e["file"]: e})
            return True
        except CheckpointError:
            return False

    def _write(self, rel: str, tensors: dict) -> dict:
        tmp = self.work / (rel + ".tmp")
        save_file(tensors, str(tmp), metadata={"format": FORMAT})
        os.replace(tmp, self.work / rel)
        return {"file": rel, **file_digest(self.work / rel)}

    def _save_progress(self) -> None:
        if not self.leader:
            return
        tmp = self.work / (PROGRESS + ".tmp")
        tmp.write_text(json.dumps(self.progress, indent=1))
        os.replace(tmp, self.work / PROGRESS)

    # --- the store interface ---
    def has_stats(self, i):
        return str(i) in self.progress["stats"]

    def has_layer(self, i):
        return str(i) in self.progress["layers"]

    def layer_rows(self, i):
        return self.progress["layers"][str(i)]["rows"]

    def materialize(self, i, device):
        return materialize_layer(self.model, self.layers[i], f"{self.lname}.{i}", self.source).to(device)

    def release(self, i):
        self.layers[i].to("meta")                                  # frees the layer's memory

    def save_stats(self, i, infos: list, moe_rows: list, hidden: list) -> None:
        if not self.leader:
            return
        if not self.has_stats(i):
            tensors = {}
            for j, g in enumerate(infos):
                tensors[f"{j}.col_norm2"] = g.col_norm2.contiguous()
                if g.col_werr2 is not None:
                    tensors[f"{j}.col_werr2"] = g.col_werr2.contiguous()
                if g.stats is not None:
                    tensors.update({f"{j}.{f}": getattr(g.stats, f).contiguous() for f in STATS_FIELDS})
                    if g.stats.xtx is not None:
                        tensors[f"{j}.xtx"] = g.stats.xtx.contiguous()
            entry = self._write(f"stats/layer-{i:05d}.safetensors", tensors)
            entry.update(groups=[{"names": g.names, "k_padded": g.k_padded, "outliers": g.stats.outliers,
                                  "tokens": g.stats.tokens} if g.stats is not None else
                                 {"names": g.names, "k_padded": g.k_padded} for g in infos], moe=moe_rows)
            self.progress["stats"][str(i)] = entry
        if time.time() - self.last_snapshot >= self.snapshot_every and i + 1 < len(self.layers):
            snap = self._write("hidden.safetensors", {str(j): h.contiguous().cpu() for j, h in enumerate(hidden)})
            self.progress["snapshot"] = {**snap, "layer": i + 1}
            self.last_snapshot = time.time()
        self._save_progress()

    def load_stats(self, i):
        e = self.progress["stats"][str(i)]
        t = load_file(str(self.work / e["file"]))
        infos = []
        for j, g in enumerate(e["groups"]):
            st = None
            if "tokens" in g:
                st = ChannelStats(g["k_padded"], self.threshold, self.fmt)
                for f in STATS_FIELDS:
                    setattr(st, f, t[f"{j}.{f}"])
                st.outliers, st.tokens = g["outliers"], g["tokens"]
                st.xtx = t.get(f"{j}.xtx")
            infos.append(GroupInfo(g["names"], g["k_padded"], t[f"{j}.col_norm2"], st, t.get(f"{j}.col_werr2")))
        return infos, e["moe"]

    def snapshot(self):
        snap = self.progress["snapshot"]
        if not snap:
            return 0, None
        t = load_file(str(self.work / snap["file"]))
        self.log(f"resume: calibration activations restored at layer {snap['layer']}")
        return snap["layer"], [t[str(j)] for j in range(len(t))]

    def _source_dtype(self, tensors: dict) -> dict:
        """Unquantized tensors (embeddings, norms, biases) go back to the source's dtype."""
        out = {}
        for k, v in tensors.items():
            e = self.source.entries.get(k)
            out[k] = v.to(e[1]) if e is not None and v.is_floating_point() and e[1].is_floating_point else v
        return out

    def save_layer(self, i, rows) -> None:
        layer, prefix = self.layers[i], f"{self.lname}.{i}."
        tensors = self._source_dtype({prefix + k: v.detach().contiguous().cpu()
                                      for k, v in layer.state_dict().items()})
        entry = self._write(f"layers/layer-{i:05d}.safetensors", tensors)
        entry.update(rows=rows, entries=layer_entries(layer, {"layers": rows}, prefix))
        self.progress["layers"][str(i)] = entry
        self._save_progress()

    def layer_entries(self) -> dict:
        return self.progress["layers"]

    def merge_layers(self, parts: list) -> None:
        """Record the layer files every rank wrote (rank 0 writes progress.json)."""
        for part in parts:
            self.progress["layers"].update(part)
        self._save_progress()

    def finish(self, out: Path, tokenizer, qcfg, ccfg, report, source_name: str, force: bool) -> Path:
        rest = self._source_dtype(unique_state(self.model, exclude=self.lname + "."))
        entry = self._write("rest.safetensors", rest)
        files = {e["file"]: {"bytes": e["bytes"], "sha256": e["sha256"]}
                 for e in sorted(self.progress["layers"].values(), key=lambda e: e["file"])}
        files[entry["file"]] = {"bytes": entry["bytes"], "sha256": entry["sha256"]}
        layers = {k: v for e in self.progress["layers"].values() for k, v in e["entries"].items()}
        write_folder_files(self.work, self.model, tokenizer,
                           make_meta(layers, files, qcfg, ccfg, report, source_name))
        for leftover in (PROGRESS, "hidden.safetensors"):
            (self.work / leftover).unlink(missing_ok=True)
        shutil.rmtree(self.work / "stats")
        prepare_output(out, force)
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        os.replace(self.work, out)
        return out


def quantize_streaming(model_name: str, out, qcfg: QuantConfig, ccfg: CalibConfig, device="cpu",
                       force=False, restart=False, max_memory: int | None = None,
                       snapshot_every: float = 600.0, progress=True, log=print) -> dict:
    """Quantize `model_name` layer by layer from its files into the checkpoint folder `out`."""
    from transformers import AutoTokenizer
    if qcfg.method == "fp":
        raise ValueError("--method fp quantizes nothing; use the source model itself")
    out = Path(out)
    prepare_output(out, force)                                     # refuse before spending minutes
    fixed_mmap_threshold()
    device = distributed.init_from_env(device)
    if distributed.rank() > 0:
        log, progress = (lambda m: None), False
    folder = resolve_model(model_name)
    source = SafetensorsSource(folder)
    model, lname = build_skeleton(folder, source)
    cfg = model.config
    est = estimate_memory(source, lname, len(find_decoder_layers(model)[1]), cfg.hidden_size,
                          getattr(cfg, "intermediate_size", 4 * cfg.hidden_size), ccfg)
    gib = lambda b: f"{b / 2**30:.2f} GiB"
    log(f"estimated peak memory {gib(est['total'])}: largest layer {gib(est['layer'])}, outside the layers "
        f"{gib(est['outside_layers'])}, calibration activations {gib(est['activations'])}")
    if max_memory is not None and est["total"] > max_memory:
        raise ValueError(f"the estimated peak memory {gib(est['total'])} exceeds --max-memory {gib(max_memory)}; "
                         f"lower --calib-samples or --calib-seqlen (activations take {gib(est['activations'])})")
    work = work_dir(out)
    if restart and distributed.rank() == 0:
        shutil.rmtree(work, ignore_errors=True)
    distributed.barrier()
    fingerprint = {"quant": qcfg.to_dict(), "calibration": vars(ccfg).copy(), "source": str(folder),
                   "source_files": source.files(), "arcquant": __version__}
    store = DiskStore(work, model, lname, source, qcfg, fingerprint, snapshot_every, log)
    tok = AutoTokenizer.from_pretrained(str(folder))
    distributed.barrier()                                          # every rank read the same progress
    report = quantize_model(model, tok, qcfg, ccfg, device=device, progress=progress, store=store)
    if store.leader:
        store.finish(out, tok, qcfg, ccfg, report, model_name, force)
    distributed.barrier()
    report["memory_estimate"] = est
    return report
