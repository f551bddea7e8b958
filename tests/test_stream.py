"""Streaming quantization: same checkpoint as the in-memory path, bounded memory, resume."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from arcquant import stream
from arcquant.checkpoint import load_quantized, read_meta, read_tensors, save_quantized
from arcquant.config import CalibConfig, QuantConfig
from arcquant.pipeline import quantize_in_memory
from arcquant.stream import quantize_streaming, work_dir
from arcquant.synth import model_bytes, write_random_model

ROOT = Path(__file__).resolve().parents[1]
CAL = CalibConfig(nsamples=4, seqlen=64)
QUIET = dict(progress=False, log=lambda m: None)


def tensors_of(folder):
    return read_tensors(Path(folder), read_meta(Path(folder)))


def assert_same_checkpoint(a, b):
    ta, tb = tensors_of(a), tensors_of(b)
    assert set(ta) == set(tb)
    assert [k for k in ta if not torch.equal(ta[k], tb[k])] == []
    assert read_meta(Path(a))["layers"] == read_meta(Path(b))["layers"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """SmolLM2 quantized the in-memory way (the independent reference)."""
    out = tmp_path_factory.mktemp("ref") / "mem"
    model, tok, report = quantize_in_memory("smollm2-135m", QuantConfig(), CAL, progress=False)
    return save_quantized(model, tok, out, QuantConfig(), CAL, report, "smollm2-135m")


def test_streaming_writes_the_in_memory_checkpoint(reference, tmp_path):
    out = tmp_path / "stream"
    report = quantize_streaming("smollm2-135m", out, QuantConfig(), CAL, **QUIET)
    assert_same_checkpoint(out, reference)
    meta = read_meta(out)
    assert len([f for f in meta["files"] if f.startswith("layers/")]) == 30 and "rest.safetensors" in meta["files"]
    assert not work_dir(out).exists() and report["memory_estimate"]["total"] > 0
    model, tok, _ = load_quantized(out)                            # every file verified and read
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    ref_model, _, _ = load_quantized(reference)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref_model(ids).logits)


def _run_cli(out, extra=()):
    cmd = [sys.executable, "-m", "arcquant.cli", "quantize", "--out", str(out), "--calib-samples", "8",
           "--calib-seqlen", "128", *extra]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def _kill_when(proc, work: Path, kind: str, count: int):
    """SIGKILL `proc` once progress.json lists `count` finished entries of `kind`."""
    while proc.poll() is None:
        try:
            if len(json.loads((work / "progress.json").read_text())[kind]) >= count:
                proc.send_signal(signal.SIGKILL)
                break
        except (FileNotFoundError, json.JSONDecodeError):
            pass
        time.sleep(0.02)
    log = proc.communicate()[0]
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be interrupted"
    return log


@pytest.mark.parametrize("snapshot", ["600", "0"])
def test_killed_run_resumes_to_the_same_checkpoint(tmp_path, snapshot):
    ref = tmp_path / "ref"
    quantize_streaming("smollm2-135m", ref, QuantConfig(), CalibConfig(nsamples=8, seqlen=128), **QUIET)
    out = tmp_path / "ck"
    _kill_when(_run_cli(out, ["--snapshot-every", snapshot]), work_dir(out), "stats", 8)    # in pass 1
    assert not out.exists()
    log = _kill_when(_run_cli(out, ["--snapshot-every", snapshot]), work_dir(out), "layers", 6)  # pass 2
    done = re.search(r"resume: (\d+) layers calibrated and 0 quantized earlier", log)
    assert done and 8 <= int(done.group(1)) < 30, log
    assert ("calibration activations restored" in log) == (snapshot == "0")
    proc = _run_cli(out)
    log, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, log
    assert "30 layers calibrated and" in log and "files verified" in log
    assert_same_checkpoint(out, ref)


def test_damaged_work_file_is_redone_and_settings_must_match(tmp_path, monkeypatch, capsys):
    out = tmp_path / "ck"
    real_save = stream.DiskStore.save_layer

    def interrupted(self, i, rows):
        real_save(self, i, rows)
        if i == 5:
            raise KeyboardInterrupt
    monkeypatch.setattr(stream.DiskStore, "save_layer", interrupted)
    with pytest.raises(KeyboardInterrupt):
        quantize_streaming("smollm2-135m", out, QuantConfig(), CAL, **QUIET)
    monkeypatch.setattr(stream.DiskStore, "save_layer", real_save)
    with pytest.raises(ValueError, match=r"interrupted run with other settings \(quant: .*'rtn'.*--restart"):
        quantize_streaming("smollm2-135m", out, QuantConfig(method="rtn"), CAL, **QUIET)
    layer2 = work_dir(out) / "layers" / "layer-00002.safetensors"
    layer2.write_bytes(layer2.read_bytes()[:-8] + b"\0" * 8)          # same size, altered
    logs = []
    quantize_streaming("smollm2-135m", out, QuantConfig(), CAL, progress=False, log=logs.append)
    assert any("layer-00002.safetensors is missing or damaged; layer 2 is redone" in m for m in logs)
    assert any("30 layers calibrated and 5 quantized earlier" in m for m in logs)
    mem = tmp_path / "mem"
    quantize_streaming("smollm2-135m", mem, QuantConfig(), CAL, **QUIET)
    assert_same_checkpoint(out, mem)


def test_memory_budget_refused_before_work(tmp_path):
    with pytest.raises(ValueError, match=r"estimated peak memory .* exceeds --max-memory 0\.00 GiB.*calib-samples"):
        quantize_streaming("smollm2-135m", tmp_path / "ck", QuantConfig(), CAL, max_memory=1 << 20, **QUIET)
    assert list(tmp_path.iterdir()) == []


def test_model_several_times_larger_than_the_memory_cap(tmp_path):
    """768 MiB of bf16 weights on disk, quantized with private memory capped at the size after
    imports + 256 MiB (RLIMIT_DATA); loading the model the usual way fails under the same cap."""
    folder = write_random_model(tmp_path / "rnd", dict(
        model_type="llama", hidden_size=512, intermediate_size=2048, num_hidden_layers=96,
        num_attention_heads=8, num_key_value_heads=4, vocab_size=49152, tie_word_embeddings=True))
    budget = 256
    assert model_bytes(folder) >= 3 * budget * 2**20

    def capped(*extra):
        cmd = [sys.executable, str(ROOT / "scripts" / "capped_quantize.py"), str(folder), str(tmp_path / "q"),
               "--budget", str(budget), *extra]
        env = {**os.environ, "MALLOC_ARENA_MAX": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)   # one malloc arena:
        # under CPU contention extra threads each opened their own, and their committed pages count
        return json.loads(res.stdout.strip().splitlines()[-1])
    streamed = capped()
    assert streamed["ok"], streamed
    assert streamed["peak_rss_mib"] - streamed["rss_before_mib"] < budget
    print("memory-cap run:", streamed)
    in_memory = capped("--in-memory")
    assert not in_memory["ok"] and "allocate" in in_memory["error"]
    meta = read_meta(tmp_path / "q")
    assert len(meta["layers"]) == 96 * 7


def test_two_processes_write_the_single_process_checkpoint(tmp_path):
    """torchrun, 2 ranks (gloo on CPU): calibration samples split, statistics all-reduced, layers
    quantized on alternate ranks -> bit-identical to one process."""
    one = tmp_path / "one"
    quantize_streaming("smollm2-135m", one, QuantConfig(), CalibConfig(nsamples=8, seqlen=64), **QUIET)
    two = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29533",
           "-m", "arcquant.cli", "quantize", "--out", str(two), "--calib-samples", "8", "--calib-seqlen", "64"]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("wrote ") == 1                          # rank 0 reports
    assert_same_checkpoint(two, one)
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "same_checkpoint.py"), str(one), str(two)],
                         capture_output=True, text=True)
    assert res.returncode == 0 and "0 differ" in res.stdout


def test_resume_keeps_the_weight_error_of_arc_wres(tmp_path):
    """The statistics a resumed run reloads carry arc+wres's per-column weight error (its budget
    and tail choice use it), equal to what was saved; groups without it stay without."""
    from conftest import tiny_llama
    from arcquant.arc import ChannelStats
    from arcquant.formats import get_format
    from arcquant.quantize import GroupInfo
    from arcquant.stream import DiskStore
    model = tiny_llama()
    qcfg = QuantConfig(method="arc+wres")
    st = ChannelStats(48, qcfg.threshold, get_format("nvfp4"))
    st.update(torch.randn(16, 48))
    infos = [GroupInfo(["self_attn.q_proj"], 48, torch.rand(48), st, torch.rand(48)),
             GroupInfo(["mlp.down_proj"], 80, torch.rand(80), None)]
    store = DiskStore(tmp_path / "work", model, "model.layers", None, qcfg, {"k": 1}, log=lambda m: None)
    store.save_stats(0, infos, [], [torch.zeros(1)])
    again = DiskStore(tmp_path / "work", model, "model.layers", None, qcfg, {"k": 1}, log=lambda m: None)
    got, _ = again.load_stats(0)
    assert torch.equal(got[0].col_werr2, infos[0].col_werr2) and torch.equal(got[0].col_norm2, infos[0].col_norm2)
    assert got[1].col_werr2 is None and torch.equal(got[0].stats.sqerr, st.sqerr)
