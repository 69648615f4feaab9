"""A run's folder: the single source of truth for one training run.

::

    RUN/config.yaml          resolved config (mlx-lm keys + ForgeLLM keys)
    RUN/run.json             status, reason, timestamps, trained_seconds, versions, pid, checkpoints, best
    RUN/metrics.jsonl        append-only reports: train, val, checkpoint, resume, status
    RUN/dataset_stats.json   what the data preparation measured
    RUN/checkpoints/NNNNNNN/ adapters, optimizer state, RNG and trainer state, and manifest.json (the size and
                             sha256 of every file, written last: a checkpoint without it is not one)
    RUN/adapters.safetensors + adapter_config.json   latest weights, as `mlx_lm.generate --adapter-path RUN` wants
    RUN/heartbeat            the worker's last sign of life
    RUN/stop                 present when a stop was requested
    RUN/worker.log           the worker's own log lines
    RUN/.run.lock            held (flock) by whoever reads-modifies-writes run.json or decides to start a worker
    RUN/.worker.lock         held (flock) by the one worker training the run, for its whole life
    RUN/.reserve             disk space the worker frees to record its outcome when the disk is full
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import yaml

from services.workspace import Workspace, append_jsonl, read_json, read_jsonl_tail, write_atomic, write_json

ACTIVE = ("queued", "running")
WAITING = "waiting"  # in the training queue: starts when no run is active (RunManager.start_next)
FINISHED = ("completed", "stopped", "early-stopped", "failed", "interrupted")
MANIFEST = "manifest.json"
CHECKPOINT_FILES = ("adapters.safetensors", "optimizer.safetensors", "rng.npz", "state.json")  # a complete one has

_locks_guard = threading.Lock()
_path_locks: dict[str, _PathLock] = {}


class _PathLock:
    """A lock on one file, across threads (RLock) and processes (flock), reentrant within a thread.

    One per path per process: flock locks belong to an open file, so two opens of one path in one process
    would exclude each other; every RunFolder of a path shares this object instead.
    """

    def __init__(self, path: Path):
        self.path, self.rlock, self.depth, self.file = path, threading.RLock(), 0, None

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        with self.rlock:
            if self.depth == 0:
                self.file = open(self.path, "a")  # noqa: SIM115 (kept open while held)
                fcntl.flock(self.file, fcntl.LOCK_EX)
            self.depth += 1
            try:
                yield
            finally:
                self.depth -= 1
                if self.depth == 0 and self.file is not None:
                    self.file.close()  # releases the flock
                    self.file = None


def _path_lock(path: Path) -> _PathLock:
    key = os.path.abspath(path)
    with _locks_guard:
        lock = _path_locks.get(key)
        if lock is None:
            lock = _path_locks[key] = _PathLock(Path(key))
        return lock


def fsync_path(path: Path) -> None:
    """Flush a file's or a folder's contents to the disk (the commit point of a write must survive a crash)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_manifest(folder: Path) -> None:
    """Record the size and sha256 of every file of a checkpoint being built, fsync them and the folder."""
    files = {}
    for f in sorted(folder.iterdir()):
        if f.is_file() and f.name != MANIFEST:
            fsync_path(f)
            files[f.name] = {"bytes": f.stat().st_size, "sha256": file_sha256(f)}
    write_json(folder / MANIFEST, {"files": files})
    fsync_path(folder)


def checkpoint_problem(folder: Path, deep: bool = True) -> str | None:
    """Why the checkpoint at ``folder`` cannot be resumed from (a missing, short or changed file), or None.

    ``deep`` also compares checksums. Checkpoints written before manifests existed count when their files
    are all there.
    """
    manifest = read_json(folder / MANIFEST) if (folder / MANIFEST).is_file() else None
    if manifest is None:
        missing = [n for n in CHECKPOINT_FILES if not (folder / n).is_file()]
        return f"{folder}: incomplete checkpoint ({', '.join(missing)} missing)" if missing else None
    for name, want in manifest.get("files", {}).items():
        f = folder / name
        if not f.is_file():
            return f"{f} is missing"
        size = f.stat().st_size
        if size != want["bytes"]:
            return f"{f} has {size} bytes, {want['bytes']} were written"
        if deep and file_sha256(f) != want["sha256"]:
            return f"{f} does not match the checksum recorded when it was written"
    return None


class RunFolder:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    @property
    def id(self) -> str:
        return self.path.name

    config_path = property(lambda self: self.path / "config.yaml")
    run_json = property(lambda self: self.path / "run.json")
    metrics_path = property(lambda self: self.path / "metrics.jsonl")
    stats_path = property(lambda self: self.path / "dataset_stats.json")
    checkpoints = property(lambda self: self.path / "checkpoints")
    heartbeat_path = property(lambda self: self.path / "heartbeat")
    stop_path = property(lambda self: self.path / "stop")
    log_path = property(lambda self: self.path / "worker.log")

    def exists(self) -> bool:
        return self.run_json.exists()

    def workspace(self) -> Workspace | None:
        """The workspace this run folder belongs to (``WS/runs/RUN``), or None for a folder outside one."""
        return Workspace(self.path.parent.parent.resolve()) if self.path.parent.name == "runs" else None

    def lock(self) -> contextlib.AbstractContextManager[None]:
        """Exclusive across threads and processes: every read-modify-write of run.json and every decision to
        start a worker holds it (so the app's edits and the worker's never overwrite each other)."""
        return _path_lock(self.path / ".run.lock").hold()

    def claim_worker(self) -> IO[str] | None:
        """For the worker: own this run for the life of the process (the OS releases it when the process ends,
        however it ends). None when another live worker owns it already."""
        f = open(self.path / ".worker.lock", "a")  # noqa: SIM115 (held for the process's life)
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            return None
        return f

    def reserve_space(self, nbytes: int = 256 * 1024) -> None:
        """Set aside disk space for the worker's last words (status, metric, log) should the disk fill up."""
        with contextlib.suppress(OSError):
            write_atomic(self.path / ".reserve", b"\0" * nbytes)

    def release_space(self) -> None:
        (self.path / ".reserve").unlink(missing_ok=True)

    def worker_alive(self) -> bool:
        """Whether some process (this one or another) holds the run's worker claim."""
        path = self.path / ".worker.lock"
        if not path.exists():
            return False
        with open(path, "a") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            return False

    def config(self) -> dict[str, Any]:
        return yaml.safe_load(self.config_path.read_text())

    def write_config(self, cfg: dict[str, Any]) -> None:
        write_atomic(self.config_path, yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True))

    def info(self) -> dict[str, Any]:
        return read_json(self.run_json, {}) or {}

    def update(self, **fields: Any) -> dict[str, Any]:
        """Read-modify-write ``run.json`` atomically, under :meth:`lock` (writers in other processes wait)."""
        with self.lock():
            info = self.info()
            info.update(fields, updated=time.time())
            write_json(self.run_json, info)
            return info

    def end_session(self, status: str, reason: str | None, ended: float | None = None) -> dict[str, Any]:
        """Close the worker's session with its outcome and add its length to ``trained_seconds``."""
        with self.lock():
            info = self.info()
            ended = time.time() if ended is None else ended
            total = info.get("trained_seconds") or 0.0
            if info.get("started") is not None and info.get("ended") is None:
                total += max(0.0, ended - info["started"])
            return self.update(status=status, reason=reason, ended=ended, trained_seconds=round(total, 3), pid=None,
                               pid_created=None)

    def append_metric(self, record: dict[str, Any]) -> None:
        append_jsonl(self.metrics_path, {**record, "time": round(time.time(), 3)})

    def metrics(self, offset: int = 0) -> tuple[list[dict], int]:
        return read_jsonl_tail(self.metrics_path, offset)

    def checkpoint_dir(self, iteration: int) -> Path:
        return self.checkpoints / f"{iteration:07d}"

    def checkpoint_iterations(self) -> list[int]:
        """Complete checkpoints on disk: folders with their final name whose files are all there (a cheap check:
        sizes against the manifest; :func:`checkpoint_problem` with ``deep`` also compares checksums)."""
        if not self.checkpoints.exists():
            return []
        return sorted(int(p.name) for p in self.checkpoints.iterdir()
                      if p.name.isdigit() and p.is_dir() and checkpoint_problem(p, deep=False) is None)

    def remove_checkpoint(self, iteration: int) -> None:
        """Delete a checkpoint crash-safely: renamed out of the numbered names first (one atomic step), then
        removed, so a kill midway never leaves a partial checkpoint that still counts."""
        src = self.checkpoint_dir(iteration)
        dst = self.checkpoints / f".del-{iteration:07d}"
        if src.exists():
            shutil.rmtree(dst, ignore_errors=True)
            os.rename(src, dst)
        shutil.rmtree(dst, ignore_errors=True)

    def sweep_leftovers(self) -> None:
        """Remove what a killed worker left half-done: checkpoints being built or deleted."""
        if self.checkpoints.exists():
            for p in self.checkpoints.iterdir():
                if p.name.startswith((".tmp-", ".del-")):
                    shutil.rmtree(p, ignore_errors=True)

    def heartbeat(self) -> float | None:
        try:
            return float(self.heartbeat_path.read_text().split()[0])
        except (FileNotFoundError, ValueError, IndexError):
            return None

    def last_sign_of_life(self) -> float | None:
        """When the worker was last seen alive: its heartbeat or its last metric, whichever is later."""
        try:
            metric = self.metrics_path.stat().st_mtime
        except FileNotFoundError:
            metric = None
        seen = [t for t in (self.heartbeat(), metric) if t is not None]
        return max(seen) if seen else None

    def log(self, message: str) -> None:
        with open(self.log_path, "a") as f:
            f.write(f"{time.strftime('%H:%M:%S')} {message}\n")


def history(records: list[dict]) -> list[dict]:
    """Metric records as they stand after resumes.

    Each record carries ``step``, the loop iteration that produced it; a resume from checkpoint k
    supersedes every earlier record produced after step k (the resumed run produces them again).
    """
    out: list[dict] = []
    for r in records:
        if r.get("type") == "resume":
            cut = r["step"]
            out = [x for x in out if x.get("step", 0) <= cut or x.get("type") == "status"]
        out.append(r)
    return out
