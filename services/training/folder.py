"""A run's folder: the single source of truth for one training run.

::

    RUN/config.yaml          resolved config (mlx-lm keys + ForgeLLM keys)
    RUN/run.json             status, reason, timestamps, trained_seconds, versions, pid, checkpoints, best
    RUN/metrics.jsonl        append-only reports: train, val, checkpoint, resume, status
    RUN/dataset_stats.json   what the data preparation measured
    RUN/checkpoints/NNNNNNN/ adapters, optimizer state, RNG and trainer state
    RUN/adapters.safetensors + adapter_config.json   latest weights, as `mlx_lm.generate --adapter-path RUN` wants
    RUN/heartbeat            the worker's last sign of life
    RUN/stop                 present when a stop was requested
    RUN/worker.log           the worker's own log lines
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import yaml

from services.workspace import append_jsonl, read_json, read_jsonl_tail, write_atomic, write_json

ACTIVE = ("queued", "running")
WAITING = "waiting"  # in the training queue: starts when no run is active (RunManager.start_next)
FINISHED = ("completed", "stopped", "early-stopped", "failed", "interrupted")


class RunFolder:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._lock = threading.RLock()

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

    def config(self) -> dict[str, Any]:
        return yaml.safe_load(self.config_path.read_text())

    def write_config(self, cfg: dict[str, Any]) -> None:
        write_atomic(self.config_path, yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True))

    def info(self) -> dict[str, Any]:
        return read_json(self.run_json, {}) or {}

    def update(self, **fields: Any) -> dict[str, Any]:
        """Read-modify-write ``run.json`` atomically."""
        with self._lock:
            info = self.info()
            info.update(fields, updated=time.time())
            write_json(self.run_json, info)
            return info

    def end_session(self, status: str, reason: str | None, ended: float | None = None) -> dict[str, Any]:
        """Close the worker's session with its outcome and add its length to ``trained_seconds``."""
        with self._lock:
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
        """Complete checkpoints on disk (a checkpoint is complete once its folder has its final name)."""
        if not self.checkpoints.exists():
            return []
        return sorted(int(p.name) for p in self.checkpoints.iterdir() if p.name.isdigit() and p.is_dir())

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
