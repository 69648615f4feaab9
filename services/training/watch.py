"""Incremental, thread-safe view of one run for live displays (no UI code here).

A :class:`RunWatcher` reads only the bytes appended to ``metrics.jsonl`` and ``worker.log`` since its
last :meth:`RunWatcher.poll`, applies resumes (records superseded by a resume are dropped, see
:func:`services.training.folder.history`), and keeps every chart series bounded: once a series holds
``max_points`` points, neighbouring points are merged pairwise (mean value, later iteration) and
new points are averaged in buckets of the same width. ``version`` grows only when something changed.

A display keeps, per series, the ``(generation, length)`` it has shown and asks :meth:`RunWatcher.series_since`
for what is new: a changed generation means "replace everything" (after a merge or a resume).
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from services.training.folder import ACTIVE, RunFolder, history
from services.training.series import MAX_POINTS, METRICS, Point, Series, reading

if TYPE_CHECKING:
    from services.training.manager import RunManager

TRAIN_KEYS = ("iteration", "epoch", "train_loss", "perplexity", "learning_rate", "iterations_per_second",
              "tokens_per_second", "padding_share", "trained_tokens", "peak_memory_gb", "rss_gb", "eta_seconds", "time",
              "ranks")
LOG_TAIL_BYTES = 64 * 1024
REFRESH_SECONDS = 2.0  # how often an active run's worker is checked for life


class RunWatcher:
    """Live state of one run, read from its folder; safe to poll from any thread."""

    def __init__(self, manager: RunManager, run_id: str, max_points: int = MAX_POINTS, log_lines: int = 200,
                 min_interval: float = 0.2):
        self.manager, self.run_id = manager, run_id
        self.folder: RunFolder = manager.folder(run_id)
        self.max_points, self.log_lines, self.min_interval = max_points, log_lines, min_interval
        self.version = 0
        self._lock = threading.RLock()
        self._metrics_offset = 0
        self._log_offset: int | None = None
        self._log_partial = b""
        self._log: deque[str] = deque(maxlen=log_lines)
        self._log_total = 0
        self._info_stamp: tuple[int, int] | None = None
        self._info: dict[str, Any] = {}
        self._last_poll = 0.0
        self._last_refresh = 0.0
        self._reset_metrics()

    def _reset_metrics(self) -> None:
        self._series: dict[str, Series] = getattr(self, "_series", None) or {
            name: Series(self.max_points) for name in METRICS}
        for s in self._series.values():
            s.reset()
        self._train: dict[str, Any] = {}
        self._val: dict[str, Any] = {}
        self._events: dict[str, Any] = {}  # last status record
        self._ckpt_records: dict[int, dict[str, Any]] = {}
        self._phase: dict[str, Any] | None = None  # validating / saving, until the record that ends it

    # -- reading --------------------------------------------------------------------------------

    def poll(self, force: bool = False) -> bool:
        """Read what is new in the run folder; return whether anything changed."""
        with self._lock:
            now = time.monotonic()
            if not force and now - self._last_poll < self.min_interval:
                return False
            self._last_poll = now
            changed = self._poll_info(now)
            changed = self._poll_metrics() or changed
            changed = self._poll_log() or changed
            if changed:
                self.version += 1
            return changed

    def _poll_info(self, now: float) -> bool:
        try:
            st = os.stat(self.folder.run_json)
            stamp = (st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            stamp = None
        due = self._info.get("status") in ACTIVE and now - self._last_refresh >= REFRESH_SECONDS
        if stamp == self._info_stamp and not due:
            return False
        self._last_refresh = now
        info = self.manager.refresh(self.folder)  # marks a run whose worker died as interrupted
        self._info_stamp = stamp
        if info == self._info:
            return False
        self._info = info
        return True

    def _poll_metrics(self) -> bool:
        records, offset = self.folder.metrics(self._metrics_offset)
        if not records:
            self._metrics_offset = offset
            return False
        if any(r.get("type") == "resume" for r in records):  # rare: rebuild from the whole file
            self._reset_metrics()
            records, offset = self.folder.metrics(0)
            records = history(records)
        self._metrics_offset = offset
        for r in records:
            self._ingest(r)
        return True

    def _ingest(self, r: dict[str, Any]) -> None:
        kind = r.get("type")
        self._phase = {k: r.get(k) for k in ("phase", "iteration", "time")} if kind == "phase" else None
        if kind == "train":
            self._train = {k: r.get(k) for k in TRAIN_KEYS}
        elif kind == "val":
            self._val = {k: r.get(k) for k in ("iteration", "val_loss", "val_perplexity")}
        elif kind == "checkpoint":
            self._ckpt_records[int(r.get("iteration", 0))] = {"iteration": r.get("iteration"),
                                                                "val_loss": r.get("val_loss")}
        elif kind == "status":
            self._events = {"status": r.get("status"), "reason": r.get("reason")}
        for name, series in self._series.items():
            point = reading(r, name)
            if point is not None:
                series.add(*point)

    def _poll_log(self) -> bool:
        path = self.folder.log_path
        try:
            size = os.path.getsize(path)
        except FileNotFoundError:
            return False
        if self._log_offset is None:
            self._log_offset = max(0, size - LOG_TAIL_BYTES)
            skip_first = self._log_offset > 0  # the first line read is probably cut
        else:
            skip_first = False
        if size < self._log_offset:  # truncated or replaced: start again
            self._log_offset, self._log_partial = 0, b""
        if size == self._log_offset:
            return False
        with open(path, "rb") as f:
            f.seek(self._log_offset)
            data = f.read(size - self._log_offset)
        self._log_offset += len(data)
        data = self._log_partial + data
        end = data.rfind(b"\n") + 1
        self._log_partial = data[end:]
        lines = data[:end].decode("utf-8", "replace").splitlines()
        if skip_first and lines:
            lines = lines[1:]
        if not lines:
            return False
        self._log.extend(lines)
        self._log_total += len(lines)
        return True

    # -- plain-data views -----------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        with self._lock:
            return dict(self._info)

    def latest(self) -> dict[str, Any]:
        """Latest values: iteration, epoch, losses, perplexity, lr, speed, tokens, memory, ETA, progress."""
        with self._lock:
            info = self._info
            total = info.get("iters")
            it = max(self._train.get("iteration") or 0, info.get("iteration") or 0)
            eta = self._train.get("eta_seconds")
            if info.get("status") not in ACTIVE:
                eta = None
            best = info.get("best") or None
            return {**{k: self._train.get(k) for k in TRAIN_KEYS}, "iteration": it, "iters": total,
                    "progress": min(1.0, it / total) if total else 0.0, "eta_seconds": eta,
                    "val_loss": self._val.get("val_loss"), "val_perplexity": self._val.get("val_perplexity"),
                    "val_iteration": self._val.get("iteration"), "best": dict(best) if best else None,
                    "status": info.get("status"), "reason": info.get("reason"),
                    "preparing": info.get("preparing") if info.get("status") in ACTIVE else None,
                    "phase": dict(self._phase) if self._phase and info.get("status") in ACTIVE else None}

    def status(self) -> tuple[str | None, str | None]:
        with self._lock:
            return self._info.get("status"), self._info.get("reason")

    def checkpoints(self) -> list[dict[str, Any]]:
        """Checkpoints still on disk (per run.json), oldest first, each with ``best`` set on the best one."""
        with self._lock:
            best = (self._info.get("best") or {}).get("iteration")
            listed = self._info.get("checkpoints") or list(self._ckpt_records.values())
            return [{"iteration": c.get("iteration"), "val_loss": c.get("val_loss"),
                     "best": c.get("iteration") == best} for c in listed]

    def series(self, name: str) -> list[Point]:
        with self._lock:
            return list(self._series[name].points)

    def series_since(self, name: str, generation: int, length: int) -> tuple[int, bool, list[Point]]:
        """``(generation, replace, points)``: all points if ``generation`` is stale, else those after ``length``."""
        with self._lock:
            s = self._series[name]
            if s.generation != generation or length > len(s.points):
                return s.generation, True, list(s.points)
            return s.generation, False, s.points[length:]

    def log_since(self, seen: int) -> tuple[int, bool, list[str]]:
        """``(total, replace, lines)``: lines after ``seen`` (all kept lines if too many were missed)."""
        with self._lock:
            new = self._log_total - seen
            if new == 0:
                return self._log_total, False, []
            if seen == 0 or new < 0 or new > len(self._log):
                return self._log_total, True, list(self._log)
            return self._log_total, False, list(self._log)[-new:]

    def snapshot(self) -> dict[str, Any]:
        """Everything at once, as plain data."""
        with self._lock:
            return {"version": self.version, "info": self.info(), "latest": self.latest(),
                    "checkpoints": self.checkpoints(), "series": {n: self.series(n) for n in METRICS},
                    "log": list(self._log)}


class WatcherPool:
    """One shared watcher per run (clients viewing the same run share reads); least recently used dropped."""

    def __init__(self, manager: RunManager, size: int = 16, **kwargs: Any):
        self.manager, self.size, self.kwargs = manager, size, kwargs
        self._lock = threading.Lock()
        self._watchers: dict[str, RunWatcher] = {}

    def get(self, run_id: str) -> RunWatcher:
        with self._lock:
            w = self._watchers.pop(run_id, None) or RunWatcher(self.manager, run_id, **self.kwargs)
            self._watchers[run_id] = w
            while len(self._watchers) > self.size:
                self._watchers.pop(next(iter(self._watchers)))
            return w

    def drop(self, run_id: str) -> None:
        """Forget the watcher of ``run_id`` (its run was deleted); the next :meth:`get` starts afresh."""
        with self._lock:
            self._watchers.pop(run_id, None)
