"""A run's ``eval`` settings: which suites and lm-eval tasks judge every checkpoint, and ``best_by``. No MLX.

::

    eval:
      suites: [answers.yaml, ...]      # files: absolute, or under the workspace's evals/, or the workspace root
      tasks: [forge_sample_mc]         # optional lm-eval tasks, from task_dir
      task_dir: configs/evals/tasks/forge_sample
      limit: 8                         # optional: samples per task
      num_fewshot: 0
      every: checkpoint                # the only schedule: each saved checkpoint (and the base, before step 1)
    best_by: eval:answers              # or val_loss (the default)
    early_stopping: {by: eval:answers, patience: 2}   # stop when that score stops improving
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.errors import ForgeError
from services.evaluation.results import EvalConfigError, best_by_name
from services.evaluation.suites import Suite, SuiteError, load_suite
from services.evaluation.tasks import TaskError, task_spec
from services.workspace import Workspace

EVAL_KEYS = {"suites", "tasks", "task_dir", "limit", "num_fewshot", "chat_template", "every"}


@dataclass
class EvalPlan:
    """What to evaluate at every checkpoint of a run."""

    suites: list[Suite] = field(default_factory=list)
    tasks: dict[str, Any] | None = None
    best_by: str | None = None  # a suite/task name, or None: validation loss
    stop_by: str | None = None
    patience: int = 3
    min_delta: float = 0.0

    def names(self) -> list[str]:
        return [s.name for s in self.suites] + list((self.tasks or {}).get("tasks") or [])


def suite_path(value: str, workspace: Workspace | None) -> Path:
    """A suite file given as a path or as a name under the workspace's ``evals/`` folder."""
    p = Path(value).expanduser()
    if p.is_absolute() or workspace is None:
        return p
    for candidate in (workspace.evals / p, workspace.root / p, Path.cwd() / p):
        if candidate.is_file():
            return candidate
    return workspace.evals / p


def plan_for(cfg: dict[str, Any], workspace: Workspace | None = None) -> EvalPlan | None:
    """The run's eval plan (None when it has no ``eval`` and ``best_by`` is validation loss).

    Raises :class:`EvalConfigError` (naming the field), :class:`SuiteError` or :class:`TaskError`.
    """
    ev = cfg.get("eval")
    best = best_by_name(cfg.get("best_by"))
    es = cfg.get("early_stopping") or {}
    stop = best_by_name(es.get("by")) if isinstance(es, dict) else None
    if ev is None:
        if best or stop:
            raise EvalConfigError(f"{'best_by' if best else 'early_stopping.by'}: eval:{best or stop} needs an "
                                  "'eval' section naming that suite")
        return None
    if not isinstance(ev, dict):
        raise EvalConfigError("eval: must be a mapping with suites, tasks, task_dir, limit, every")
    unknown = set(ev) - EVAL_KEYS
    if unknown:
        raise EvalConfigError(f"eval: unknown key(s) {sorted(unknown)}; use {', '.join(sorted(EVAL_KEYS))}")
    if ev.get("every", "checkpoint") != "checkpoint":
        raise EvalConfigError(f"eval.every: only 'checkpoint' is supported, got {ev.get('every')!r}")
    suites = ev.get("suites") or []
    if not isinstance(suites, list) or not all(isinstance(s, str) for s in suites):
        raise EvalConfigError("eval.suites: must be a list of suite files")
    plan = EvalPlan(suites=[load_suite(suite_path(s, workspace)) for s in suites], best_by=best, stop_by=stop,
                    patience=int(es.get("patience", 3)), min_delta=float(es.get("min_delta") or 0.0))
    if ev.get("tasks"):
        plan.tasks = task_spec(ev["tasks"], ev.get("task_dir") or "", ev.get("limit"), ev.get("num_fewshot"),
                               ev.get("chat_template"))
    for key, name in (("best_by", best), ("early_stopping.by", stop)):
        if name and name not in plan.names():
            raise EvalConfigError(f"{key}: eval:{name} names no suite or task of eval (there: "
                                  f"{', '.join(plan.names()) or 'none'})")
    if not plan.names():
        raise EvalConfigError("eval: name at least one suite or task")
    return plan


def config_problems(cfg: dict[str, Any], workspace: Workspace | None = None) -> list[tuple[str, str]]:
    """(field, reason) for what is wrong with a config's eval settings; on success its suite files and task
    folder are made absolute in ``cfg`` (the worker runs elsewhere)."""
    try:
        plan = plan_for(cfg, workspace)
        if plan is not None:
            cfg["eval"] = {**cfg["eval"], "suites": [s.path for s in plan.suites]}
            if plan.tasks:
                cfg["eval"]["task_dir"] = plan.tasks["task_dir"]
    except (SuiteError, TaskError) as e:
        return [("eval", str(e))]
    except (EvalConfigError, ForgeError) as e:
        text = str(e)
        key, _, reason = text.partition(": ")
        return [(key, reason or text)]
    return []
