"""Publishing from the UI: each publish runs ``forgellm publish --json`` in a child process (no MLX in the UI).

::

    jobs = PublishJobs(workspace)
    job_id = jobs.start("RUN", 20, "my-model", {"quantize_bits": 4})   # raises PublishError at once if refused
    jobs.get(job_id)   # {"status": "running", "phase": "fusing", "fraction": 0.35, ...}; later "done"/"failed"

A reader thread turns the child's JSON lines into plain per-job state and bumps :attr:`PublishJobs.version`,
so pages poll it from a ``ui.timer`` (threads never touch UI). One publish runs at a time: each loads a
whole model, and two at once would only compete for memory.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import uuid
from collections import deque
from typing import IO, Any

from services.jobs import REPO_ROOT, child_env
from services.publishing.rules import GROUP_SIZES, QUANT_BITS, PublishError, published_path
from services.workspace import Workspace

LOG_LINES = 200
OPTION_KEYS = ("dequantize", "quantize_bits", "group_size", "gguf", "license", "overwrite")


def _job(job_id: str, run_id: str, iteration: int | None, name: str, options: dict[str, Any]) -> dict[str, Any]:
    return {"id": job_id, "run_id": run_id, "iteration": iteration, "name": name, "options": dict(options),
            "status": "running", "phase": "starting", "fraction": 0.0, "message": "starting the publisher",
            "result": None, "error": None, "returncode": None, "started": time.time(), "finished": None}


def publish_command(workspace: Workspace, run_id: str, iteration: int | None, name: str,
                    options: dict[str, Any]) -> list[str]:
    """The ``forgellm publish --json`` command line for a job."""
    ref = f"{run_id}@{iteration}" if iteration is not None else run_id
    cmd = [sys.executable, "-m", "app.cli", "--workspace", str(workspace.root), "publish", ref, "--name", name,
           "--json"]
    if options.get("dequantize"):
        cmd.append("--dequantize")
    if options.get("quantize_bits") is not None:
        cmd += ["--quantize", str(options["quantize_bits"]), "--group-size", str(options.get("group_size") or 64)]
    if options.get("gguf"):
        cmd.append("--gguf")
    if options.get("license"):
        cmd += ["--license", str(options["license"])]
    if options.get("overwrite"):
        cmd.append("--overwrite")
    return cmd


class PublishJobs:
    """Publish jobs of one workspace, each in its own child process; thread-safe, plain data out."""

    def __init__(self, workspace: Workspace, env: dict[str, str] | None = None):
        self.workspace = workspace
        self.env = env
        self.version = 0
        self._lock = threading.Lock()
        self._jobs: dict[str, dict[str, Any]] = {}
        self._logs: dict[str, deque[str]] = {}
        self._procs: dict[str, subprocess.Popen] = {}

    # -- starting -----------------------------------------------------------------------------------

    def check(self, name: str, options: dict[str, Any] | None = None) -> None:
        """Raise :class:`PublishError` when ``name`` or ``options`` would be refused (no MLX needed)."""
        options = options or {}
        unknown = set(options) - set(OPTION_KEYS)
        if unknown:
            raise PublishError(f"unknown option(s) {sorted(unknown)}; known: {list(OPTION_KEYS)}")
        published_path(self.workspace, name, overwrite=bool(options.get("overwrite")))
        bits = options.get("quantize_bits")
        if bits is not None and bits not in QUANT_BITS:
            raise PublishError(f"quantize_bits {bits!r}: choose one of {list(QUANT_BITS)} (or none for float)")
        if options.get("group_size", 64) not in GROUP_SIZES:
            raise PublishError(f"group_size {options.get('group_size')!r}: choose one of {list(GROUP_SIZES)}")

    def start(self, run_id: str, iteration: int | None, name: str, options: dict[str, Any] | None = None) -> str:
        """Start publishing ``run_id`` (checkpoint ``iteration``, None: the best) as ``name``; return the job id.

        Raises :class:`PublishError` (nothing started) for a bad name or option, or while another publish runs.
        """
        options = dict(options or {})
        self.check(name, options)
        with self._lock:
            busy = next((j for j in self._jobs.values() if j["status"] == "running"), None)
            if busy is not None:
                raise PublishError(f"another publish is running ({busy['name']} from {busy['run_id']}); wait for it "
                                   "to finish")
            job_id = uuid.uuid4().hex[:12]
            env = child_env(**{**(self.env or {}), "PYTHONUNBUFFERED": "1"})
            cmd = publish_command(self.workspace, run_id, iteration, name, options)
            try:
                proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True, bufsize=1, errors="replace")
            except OSError as e:
                raise PublishError(f"cannot start the publisher: {e}") from None
            self._jobs[job_id] = _job(job_id, run_id, iteration, name, options)
            self._logs[job_id] = deque(maxlen=LOG_LINES)
            self._procs[job_id] = proc
            self.version += 1
        threading.Thread(target=self._read, args=(job_id, proc), name=f"publish-{name}", daemon=True).start()
        return job_id

    # -- the reader thread --------------------------------------------------------------------------

    def _read(self, job_id: str, proc: subprocess.Popen) -> None:
        stdout: IO[str] = proc.stdout  # type: ignore[assignment]
        for line in stdout:
            self._line(job_id, line.rstrip("\n"))
        rc = proc.wait()
        with self._lock:
            job = self._jobs[job_id]
            job["returncode"], job["finished"] = rc, time.time()
            if job["result"] is not None:
                job["status"], job["phase"], job["fraction"] = "done", "done", 1.0
            else:
                job["status"] = "failed"
                if job["error"] is None:
                    tail = [s for s in self._logs[job_id] if s.strip()][-3:]
                    job["error"] = f"the publisher exited with code {rc}" + (": " + " | ".join(tail) if tail else "")
            self._procs.pop(job_id, None)
            self.version += 1

    def _line(self, job_id: str, line: str) -> None:
        event: Any = None
        if line.startswith("{"):
            try:
                event = json.loads(line)
            except ValueError:
                event = None
        with self._lock:
            job, log = self._jobs[job_id], self._logs[job_id]
            kind = event.get("type") if isinstance(event, dict) else None
            if kind == "progress":
                job["phase"], job["message"] = event.get("phase", job["phase"]), event.get("message", "")
                job["fraction"] = max(job["fraction"], float(event.get("fraction") or 0.0))
                log.append(f"[{job['fraction']:4.0%}] {job['phase']}: {job['message']}")
            elif kind == "result":
                job["result"] = {k: v for k, v in event.items() if k != "type"}
                log.append(f"published {event.get('path')}: {event.get('summary')}")
            elif kind == "error":
                job["error"] = str(event.get("message") or "publishing failed")
                log.append(f"error: {job['error']}")
            else:
                log.append(line)
            self.version += 1

    # -- reading ------------------------------------------------------------------------------------

    def get(self, job_id: str) -> dict[str, Any] | None:
        """A copy of one job's state (with its ``log`` tail), or None."""
        with self._lock:
            job = self._jobs.get(job_id)
            return {**job, "log": list(self._logs[job_id])} if job else None

    def jobs(self, run_id: str | None = None) -> list[dict[str, Any]]:
        """All jobs (of ``run_id``), oldest first, without logs."""
        with self._lock:
            return [dict(j) for j in self._jobs.values() if run_id is None or j["run_id"] == run_id]

    def running(self) -> dict[str, Any] | None:
        with self._lock:
            job = next((j for j in self._jobs.values() if j["status"] == "running"), None)
            return dict(job) if job else None

    # -- stopping -----------------------------------------------------------------------------------

    def cancel(self, job_id: str) -> bool:
        """Stop a running publish (its half-built folder is removed by the next publish); True if it was running."""
        with self._lock:
            proc = self._procs.get(job_id)
            if proc is None or proc.poll() is not None:
                return False
            self._jobs[job_id]["error"] = "cancelled"
        proc.terminate()
        return True

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel every running publish and wait for the processes to end."""
        with self._lock:
            procs = list(self._procs.values())
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()
