"""Publishing from the UI: each publish is one :class:`~services.jobs.ChildJob` running
:mod:`services.publishing.worker` (no MLX in the UI).

::

    jobs = PublishJobs(workspace)
    job_id = jobs.start("RUN", 20, "my-model", {"quantize_bits": 4})   # raises PublishError at once if refused
    jobs.get(job_id)   # {"status": "running", "phase": "fusing", "fraction": 0.35, ...}; later "done"/"failed"

The child job's reader thread turns the worker's JSON lines into plain state and bumps its ``version``, so
pages poll :attr:`PublishJobs.version` from a ``ui.timer`` (threads never touch UI). One publish runs at a time:
each loads a whole model, and two at once would only compete for memory.
"""

from __future__ import annotations

import threading
import uuid
from dataclasses import dataclass
from typing import Any

from services.jobs import CANCELLED, FAILED, ChildJob
from services.publishing import worker
from services.publishing.rules import PublishError, check_options, published_path
from services.workspace import Workspace


@dataclass
class _Publish:
    """One publish: what was asked for and its child job."""

    id: str
    run_id: str
    iteration: int | None
    name: str
    options: dict[str, Any]
    job: ChildJob

    def state(self) -> dict[str, Any]:
        """Plain data for the pages; a cancelled publish reads as failed with the error "cancelled"."""
        snap = self.job.snapshot()
        status = FAILED if snap["state"] == CANCELLED else snap["state"]
        error = snap["error"] or ("cancelled" if snap["state"] == CANCELLED else None)
        return {"id": self.id, "run_id": self.run_id, "iteration": self.iteration, "name": self.name,
                "options": dict(self.options), "status": status, "phase": snap["phase"],
                "fraction": snap["fraction"] or 0.0, "message": snap["message"], "result": snap["result"],
                "error": error, "returncode": snap["returncode"], "started": snap["started"],
                "finished": snap["finished"]}


class PublishJobs:
    """Publish jobs of one workspace, each in its own child process; thread-safe, plain data out."""

    def __init__(self, workspace: Workspace, env: dict[str, str] | None = None):
        self.workspace = workspace
        self.env = env
        self._lock = threading.Lock()
        self._jobs: dict[str, _Publish] = {}

    @property
    def version(self) -> int:
        """Moves whenever a job starts or any job's state changes."""
        with self._lock:
            return sum(1 + p.job.version for p in self._jobs.values())

    def start(self, run_id: str, iteration: int | None, name: str, options: dict[str, Any] | None = None) -> str:
        """Start publishing ``run_id`` (checkpoint ``iteration``, None: the best) as ``name``; return the job id.

        Raises :class:`PublishError` (nothing started) for a bad name or option, or while another publish runs.
        """
        options = dict(options or {})
        check_options(options)
        published_path(self.workspace, name, overwrite=bool(options.get("overwrite")))
        with self._lock:
            busy = next((p for p in self._jobs.values() if p.job.running), None)
            if busy is not None:
                raise PublishError(f"another publish is running ({busy.name} from {busy.run_id}); wait for it "
                                   "to finish")
            job = ChildJob(worker.MODULE, worker.args(self.workspace, run_id, iteration, name, options),
                           env=self.env, what="publisher")
            try:
                job.start()
            except OSError as e:
                raise PublishError(f"cannot start the publisher: {e}") from None
            job_id = uuid.uuid4().hex[:12]
            self._jobs[job_id] = _Publish(job_id, run_id, iteration, name, options, job)
        return job_id

    def get(self, job_id: str) -> dict[str, Any] | None:
        """A copy of one job's state (with its ``log`` tail), or None."""
        with self._lock:
            p = self._jobs.get(job_id)
        return {**p.state(), "log": list(p.job.log)} if p else None

    def jobs(self, run_id: str | None = None) -> list[dict[str, Any]]:
        """All jobs (of ``run_id``), oldest first, without logs."""
        with self._lock:
            found = [p for p in self._jobs.values() if run_id is None or p.run_id == run_id]
        return [p.state() for p in found]

    def running(self) -> dict[str, Any] | None:
        """The running job's state, or None."""
        with self._lock:
            p = next((p for p in self._jobs.values() if p.job.running), None)
        return p.state() if p else None

    def cancel(self, job_id: str) -> bool:
        """Stop a running publish (its half-built folder is removed by the next publish); True if it was running."""
        with self._lock:
            p = self._jobs.get(job_id)
        return p.job.cancel() if p else False

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel every running publish and wait for the processes to end."""
        with self._lock:
            running = [p.job for p in self._jobs.values() if p.job.running]
        for job in running:
            job.cancel(grace=timeout)
        for job in running:
            job.wait(timeout + 1.0)
