"""How ForgeLLM starts its ``python -m services.…`` / ``app.cli`` child processes (training workers, the
model worker, model imports, publishes)."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def child_env(**overrides: str) -> dict[str, str]:
    """This process's environment for a child: ``overrides`` applied, the repository importable from any
    working directory, and pytest's per-test variable dropped (the child is not part of that test)."""
    env = {**os.environ, **overrides}
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("PYTEST_CURRENT_TEST", None)
    return env
