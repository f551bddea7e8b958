"""The comparison command: one cell per method, resumable, rendered as table / JSON / plot."""
import json

import pytest

from arcquant.compare import run_comparison, write_outputs
from arcquant.config import CalibConfig, QuantConfig
from conftest import tiny_folder

CAL = CalibConfig(nsamples=2, seqlen=64)


def test_comparison_resumes_and_renders(tokenizer, tmp_path):
    tiny_folder(tokenizer, tmp_path / "tiny")
    configs = {"rtn": QuantConfig(method="rtn"), "arc": QuantConfig(), "atom": QuantConfig(method="atom")}
    out = tmp_path / "cmp"
    logs = []
    kw = dict(seqlen=64, tokens=256, tasks=["piqa"], limit=2, log=logs.append)
    rows = run_comparison(str(tmp_path / "tiny"), configs, CAL, out, **kw)
    assert [r["label"] for r in rows] == ["rtn", "arc", "atom"]
    assert all(r["tokens"] == 256 and "piqa" in r["zeroshot"] for r in rows)
    assert rows[1]["avg_bits"] > rows[0]["avg_bits"] == 4.5
    # an interruption cut the last line: only that cell is computed again
    lines = (out / "results.jsonl").read_text().splitlines()
    (out / "results.jsonl").write_text("\n".join(lines[:2]) + "\n" + lines[2][:40])
    logs.clear()
    again = run_comparison(str(tmp_path / "tiny"), configs, CAL, out, **kw)
    assert sum("skipped" in line for line in logs) == 2
    assert [r["ppl"] for r in again] == [r["ppl"] for r in rows]          # deterministic, same cells
    write_outputs(again, out)
    md = (out / "table.md").read_text()
    assert "| arc |" in md and "piqa" in md and "first 2 documents" in md
    assert len(json.loads((out / "results.json").read_text())) == 3
    assert (out / "plot.png").read_bytes()[:4] == b"\x89PNG"
    # a later run with one more method adds its row to the table; the earlier cells stay
    more = run_comparison(str(tmp_path / "tiny"), {"w4a8": QuantConfig(method="w4a8")}, CAL, out, **kw)
    write_outputs(more, out)
    labels = [r["label"] for r in json.loads((out / "results.json").read_text())]
    assert labels == ["rtn", "arc", "atom", "w4a8"]
    # another comparison (other evaluation size) in the same folder is not mixed in
    other = run_comparison(str(tmp_path / "tiny"), {"rtn": QuantConfig(method="rtn")}, CAL, out,
                           **{**kw, "tokens": 128})
    write_outputs(other, out)
    assert [r["label"] for r in json.loads((out / "results.json").read_text())] == ["rtn"]



def test_paper_preset_has_every_baseline_and_checks_labels():
    import pytest
    from arcquant.compare import preset_configs
    cfgs = preset_configs("paper", {"target_bits": 5.5})
    got = {(q.method, q.fmt, q.rotate) for q in cfgs.values()}
    for want in [("rtn", f, None) for f in ("nvfp4", "mxfp4", "int4")] + \
                [("arc", f, None) for f in ("nvfp4", "mxfp4", "int4")] + \
                [("fp", "nvfp4", None), ("w4a16", "nvfp4", None), ("w4a8", "nvfp4", None),
                 ("hadamard", "nvfp4", 0), ("smoothquant", "nvfp4", None), ("atom", "nvfp4", None),
                 ("arc+hadamard", "nvfp4", 16), ("arc+gptq", "nvfp4", None)]:
        assert want in got, want
    assert all(q.target_bits == 5.5 for q in cfgs.values())                  # the base applies to every cell
    assert list(preset_configs("paper", {}, ["atom", "fp", "atom"])) == ["atom", "fp"]   # the order given
    assert list(preset_configs("paper", {}))[:3] == ["fp", "w4a16", "w4a8"]            # else the preset's
    with pytest.raises(ValueError, match="its labels: fp, w4a16"):
        preset_configs("paper", {}, ["arc nvfp5"])
    with pytest.raises(ValueError, match="valid: paper"):
        preset_configs("papers", {})


def test_compare_cli_refuses_preset_with_methods(capsys):
    import pytest
    from arcquant.cli import main
    with pytest.raises(SystemExit, match="choose one"):
        main(["compare", "--preset", "paper", "--methods", "rtn"])
    with pytest.raises(SystemExit, match="picks labels of a --preset"):
        main(["compare", "--only", "atom"])


def test_cli_names_a_device_this_machine_lacks(capsys):
    import torch
    from arcquant.cli import main
    assert main(["compare", "--methods", "rtn", "--device", "cuda:7x"]) == 2
    assert "'cuda:7x' is not a device: use cpu, cuda or cuda:N" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["zeroshot", "--device", "cuda"]) == 2
        assert "no CUDA GPU here; use --device cpu" in capsys.readouterr().err


def test_cells_from_task_rows_average_and_refusals(tmp_path):
    """scripts/zeroshot_tasks.py's one-task rows become whole-table rows: accuracies per task, the
    average over the seven only where all are there, perplexity from the run of the same config."""
    from arcquant.compare import cells_from_tasks, table, write_outputs
    cfg = {"method": "arc", "fmt": "nvfp4"}
    common = {"model": "m", "calibration": {"source": "c4", "nsamples": 32, "seqlen": 512, "seed": 0},
              "device": "NVIDIA H200", "torch": "2.11", "lm_eval": "0.4.13", "seconds": 10.0}
    accs = {"piqa": 0.6, "arc_easy": 0.5, "arc_challenge": 0.25, "hellaswag": 0.3, "winogrande": 0.52,
            "lambada_openai": 0.41, "boolq": 0.55}
    rows = [{**common, "label": "arc nvfp4", "config": cfg, "avg_bits": 5.5, "task": t, "acc": a, "peak_gpu_gib": 7.0 + i}
            for i, (t, a) in enumerate(accs.items())]
    rows.append({**common, "label": "arc nvfp4", "config": cfg, "avg_bits": 5.5, "task": "piqa", "acc": 0.9,
                 "limit": 10})                                                   # a timing row: left out
    rows += [{**common, "label": "fp", "config": {"method": "fp"}, "avg_bits": 16.0, "task": t, "acc": a}
             for t, a in list(accs.items())[:6]]                                 # one task short
    ppl = [{"model": "m", "config": c, "ppl": p, "text": "wiki-test", "seqlen": 512, "tokens": 65536}
           for c, p in ((cfg, 33.98), ({"method": "fp"}, 31.01))]
    cells = cells_from_tasks(rows, ppl)
    assert [c["label"] for c in cells] == ["arc nvfp4", "fp"]
    arc_cell, fp_cell = cells
    assert arc_cell["zeroshot"]["piqa"]["acc"] == 0.6 and arc_cell["ppl"] == 33.98
    assert abs(arc_cell["average_acc"] - sum(accs.values()) / 7) < 1e-12
    assert arc_cell["seconds"] == 70.0 and arc_cell["peak_gpu_gib"] == 13.0
    assert "average_acc" not in fp_cell and len(fp_cell["zeroshot"]) == 6
    md = table(cells)
    assert "| fp | 16.00 | 31.01 |" in md and md.splitlines()[3].endswith("| - |")
    assert f"{100 * sum(accs.values()) / 7:.1f}" in md.splitlines()[2]
    write_outputs(cells, tmp_path)
    assert (tmp_path / "table.md").read_text() == md
    with pytest.raises(ValueError, match="no perplexity row for 'arc nvfp4'"):
        cells_from_tasks(rows, ppl[1:])
