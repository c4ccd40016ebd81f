"""Zero-shot tasks (hellaswag, arc_easy, …) through EleutherAI's lm-evaluation-harness.

lm-eval is optional (``pip install lm-eval``): it is imported only when tasks are asked for. The
loaded model is handed to lm-eval's ``HFLM`` as it is (same dtype and device as every other figure),
tasks run with zero few-shot examples and fixed seeds. Task data is read through the
``datasets`` library, so it must be in the local cache or defined by a local task directory
(``task_path``: lm-eval task YAML files, passed to lm-eval's ``TaskManager`` as ``include_path``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Iterable, Optional, Sequence, Tuple

from structprune.errors import EvaluationError, MissingDependencyError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

INSTALL_HINT = "zero-shot tasks need lm-evaluation-harness, which is not installed: pip install lm-eval"


def run_tasks(
    model: "PreTrainedModel",
    tokenizer: "PreTrainedTokenizerBase",
    tasks: Sequence[str],
    *,
    batch_size: int,
    task_path: Optional[Path] = None,
    limit: Optional[int] = None,
    seed: int = 0,
) -> Dict[str, Dict[str, float]]:
    """Each task's metrics (``{"hellaswag": {"acc": …, "acc_stderr": …, "acc_norm": …}}``).

    ``limit`` evaluates only the first ``limit`` documents of each task (for a quick look; the
    figures are then not the task's). Raises :class:`MissingDependencyError` when lm-eval is not
    installed and :class:`EvaluationError` for an unknown task or task data that cannot be read.
    """
    simple_evaluate, lm_class, manager_class = _import_lm_eval()
    manager = manager_class(include_path=str(task_path) if task_path is not None else None)
    unknown = [task for task in tasks if task not in manager.all_tasks]
    if unknown:
        where = f" (including the task definitions in {task_path})" if task_path is not None else ""
        raise EvaluationError(f"unknown lm-eval task(s) {', '.join(unknown)}{where}: see `lm-eval ls tasks`")
    lm = lm_class(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    try:
        output = simple_evaluate(
            model=lm,
            tasks=list(tasks),
            num_fewshot=0,
            limit=limit,
            task_manager=manager,
            log_samples=False,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
        )
    except (OSError, ConnectionError, ValueError) as err:
        raise EvaluationError(
            f"lm-eval could not run {', '.join(tasks)}: {err} (task data must be in the local datasets "
            "cache or defined by --task-path; HF_DATASETS_OFFLINE=1 stops retries of the hub)"
        ) from err
    if output is None:
        raise EvaluationError(f"lm-eval returned no results for {', '.join(tasks)}")
    metric_names = output.get("higher_is_better", {})
    return {task: _metrics(output["results"].get(task, {}), metric_names.get(task, {})) for task in tasks}


def _import_lm_eval() -> Tuple[Any, Any, Any]:
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        raise MissingDependencyError(INSTALL_HINT) from err
    return simple_evaluate, HFLM, TaskManager


def _metrics(task_results: Dict[str, Any], metric_names: Iterable[str]) -> Dict[str, float]:
    """The task's metrics and their standard errors, lm-eval's ``"acc,none"`` keys as ``"acc"`` (a
    filter other than ``none`` kept as a suffix); bookkeeping (alias, sample counts) and ``"N/A"``
    standard errors dropped."""
    wanted = set(metric_names)
    metrics = {}
    for key, value in task_results.items():
        name, _, filter_name = key.partition(",")
        if name.removesuffix("_stderr") not in wanted or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        metrics[name if filter_name in ("", "none") else f"{name}[{filter_name}]"] = float(value)
    return metrics


__all__ = ["INSTALL_HINT", "run_tasks"]
