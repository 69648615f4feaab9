"""Child processes: how ForgeLLM starts them, and one job type for the short-lived ones.

Every ``python -m services.…`` child (training workers, the model worker, model imports, publishes) gets
its environment from :func:`child_env`. Short-lived jobs (an import, a publish) are a :class:`ChildJob`:
the child writes one JSON object a line on stdout, the parent turns them into plain attributes that pages
poll (``version``) or bind to, and anything else the child prints is kept as a log tail::

    {"type": "progress", "phase": "fusing", "fraction": 0.35, "message": "layer 3 of 8"}
    {"type": "result", ...any fields...}     # the job's answer; a job without one has failed
    {"type": "error", "message": "what went wrong, where"}

The child side writes these with :func:`emit`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from services import blas

REPO_ROOT = Path(__file__).resolve().parent.parent
LOG_LINES = 200
RUNNING, DONE, FAILED, CANCELLED = "running", "done", "failed", "cancelled"


def child_env(**overrides: str) -> dict[str, str]:
    """This process's environment for a child: ``overrides`` applied, the repository importable from any
    working directory, and pytest's per-test variable dropped (the child is not part of that test)."""
    env = {**os.environ, **overrides}
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("PYTEST_CURRENT_TEST", None)
    return env


def emit(kind: str, **fields: Any) -> None:
    """Child side: write one protocol line (``progress``, ``result`` or ``error``) to stdout."""
    print(json.dumps({"type": kind, **fields}, default=str), flush=True)


class ChildJob:
    """One child process (``python -m MODULE ARGS``) speaking the JSON-line protocol; thread-safe.

    Plain state for the UI: ``state`` (running | done | failed | cancelled), ``phase``, ``fraction``
    (0..1, or None while unknown), ``message``, ``result`` (the result line's fields), ``error``,
    ``returncode`` and ``version`` (bumped on every change). ``on_end(job)`` runs once the child ended.
    """

    def __init__(self, module: str, args: list[str], *, env: dict[str, str] | None = None, what: str = "job",
                 cancelled_message: str = "cancelled", on_end: Callable[[ChildJob], None] | None = None):
        self.cmd = [sys.executable, "-m", module, *args]
        self.what = what
        self.state, self.phase, self.fraction, self.message = RUNNING, "starting", 0.0, f"starting the {what}"
        self.result: dict[str, Any] | None = None
        self.error: str | None = None
        self.returncode: int | None = None
        self.started, self.finished = time.time(), None
        self.version = 0
        self.log: deque[str] = deque(maxlen=LOG_LINES)
        self._env = env or {}
        self._cancelled_message = cancelled_message
        self._on_end = on_end
        self._cancelled = False
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None

    def start(self) -> ChildJob:
        """Start the child (its own process group, so a cancel reaches its children too); OSError if it can't."""
        env = child_env(**{"PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", **blas.SIDE, **self._env})
        self._proc = subprocess.Popen(self.cmd, cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                                      errors="replace", start_new_session=True)
        threading.Thread(target=self._read, name=f"job-{self.what}", daemon=True).start()
        return self

    @property
    def running(self) -> bool:
        return self.state == RUNNING

    def _read(self) -> None:
        proc = self._proc
        assert proc is not None and proc.stdout is not None
        for line in proc.stdout:
            self._line(line.rstrip("\n"))
        rc = proc.wait()
        with self._lock:
            self.returncode, self.finished = rc, time.time()
            if self._cancelled:
                self.state, self.message = CANCELLED, self._cancelled_message
            elif rc == 0 and self.result is not None:
                self.state, self.phase, self.fraction = DONE, "done", 1.0
            else:
                self.state = FAILED
                if self.error is None:
                    tail = [s for s in self.log if s.strip()][-3:]
                    self.error = f"the {self.what} process ended with code {rc}" + \
                        (": " + " | ".join(tail) if tail else ": no output")
                self.message = self.error
            self.version += 1
        if self._on_end is not None:
            self._on_end(self)

    def _line(self, line: str) -> None:
        event: Any = None
        if line.startswith("{"):
            try:
                event = json.loads(line)
            except ValueError:
                event = None
        kind = event.get("type") if isinstance(event, dict) else None
        with self._lock:
            if kind == "progress":
                self.phase = event.get("phase", self.phase)
                self.fraction, self.message = event.get("fraction"), event.get("message", "")
                frac = f"{self.fraction:4.0%}" if isinstance(self.fraction, (int, float)) else "  … "
                self.log.append(f"[{frac}] {self.phase}: {self.message}")
            elif kind == "result":
                self.result = {k: v for k, v in event.items() if k != "type"}
            elif kind == "error":
                self.error = str(event.get("message") or f"the {self.what} failed")
                self.log.append(f"error: {self.error}")
            else:
                self.log.append(line)
            self.version += 1

    def cancel(self, grace: float = 10.0) -> bool:
        """SIGTERM to the child's process group, SIGKILL after ``grace`` s if still there; True if it ran."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return False
        self._cancelled = True

        def kill(sig: int) -> None:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    pass

        kill(signal.SIGTERM)
        timer = threading.Timer(grace, kill, args=(signal.SIGKILL,))
        timer.daemon = True
        timer.start()
        return True

    def wait(self, timeout: float = 600.0) -> str:
        """Block until the job ended (or ``timeout``); return its state."""
        deadline = time.time() + timeout
        while self.state == RUNNING and time.time() < deadline:
            time.sleep(0.05)
        return self.state

    def snapshot(self) -> dict[str, Any]:
        """A copy of the plain state (without the log)."""
        with self._lock:
            return {"state": self.state, "phase": self.phase, "fraction": self.fraction, "message": self.message,
                    "result": self.result, "error": self.error, "returncode": self.returncode,
                    "started": self.started, "finished": self.finished}
