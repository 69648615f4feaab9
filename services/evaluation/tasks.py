"""lm-eval task settings as plain data, checked without importing lm-eval or MLX (the heavy part is
:mod:`services.evaluation.harness`, which runs where the model is)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from services.errors import ForgeError


class TaskError(ForgeError, ValueError):
    """An lm-eval task folder or task name cannot be used; the message is lm-eval's reason, in one line."""


def task_spec(tasks: list[str] | str, task_dir: str | os.PathLike, limit: int | None = None,
              num_fewshot: int | None = None, chat_template: bool | None = None) -> dict[str, Any]:
    """A checked, plain-data description of an lm-eval run (what the worker and the run config carry)."""
    names = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t and t.strip()]
    if not names:
        raise TaskError("tasks: name at least one lm-eval task")
    folder = Path(task_dir).expanduser()
    if not folder.is_dir():
        raise TaskError(f"task folder {folder} does not exist")
    for key, value in (("limit", limit), ("num_fewshot", num_fewshot)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise TaskError(f"{key} must be an integer ≥ 0, got {value!r}")
    return {"tasks": names, "task_dir": str(folder.resolve()), "limit": limit, "num_fewshot": num_fewshot,
            "chat_template": chat_template}
