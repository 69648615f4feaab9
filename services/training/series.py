"""A run's metric series: the one registry of metrics, the one reader of records and the one downsampler.

* :data:`METRICS`: every metric a run reports, by the record type that carries it (the key is the metric's name);
* :func:`reading` / :func:`read`: ``(iteration, value)`` points of a metric, finite numbers only;
* :func:`bound`: at most ``max_points`` points, neighbours averaged in equal buckets (each at its last x);
* :class:`Series`: the same bound kept incrementally, for a live display that appends point by point;
* :func:`loss_table`: a few train/val loss rows for a model card.

The live watcher, the Compare page's series, the exported dashboard and the model card all read through here.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

Point = tuple[float, float]

# metric → the type of the metrics.jsonl record that reports it (under the metric's own name)
METRICS: dict[str, str] = {
    "train_loss": "train", "val_loss": "val", "test_loss": "test",
    "perplexity": "train", "val_perplexity": "val",
    "learning_rate": "train", "tokens_per_second": "train", "iterations_per_second": "train",
    "peak_memory_gb": "train", "rss_gb": "train",
    # tokens_per_second counts loss-bearing tokens (mlx-lm's figure); padding_share: padding cells of the batches
    "padding_share": "train",
    # preference runs (services.training.preference_loss.REPORTED), on train reports and, prefixed, on validations
    **{f"{prefix}{m}": kind for prefix, kind in (("", "train"), ("val_", "val"))
       for m in ("rewards_chosen", "rewards_rejected", "reward_margin", "preference_accuracy", "logps_chosen",
                 "logps_rejected")},
}
MAX_POINTS = 2000  # what a live chart or an exported dashboard keeps per series


def number(v: Any) -> float | None:
    """``v`` as a float if it is a finite number (not a bool), else ``None``."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


def reading(record: dict[str, Any], metric: str) -> Point | None:
    """``(iteration, value)`` of ``metric`` in one record, or ``None`` when the record does not report it."""
    if record.get("type") != METRICS[metric]:
        return None
    x, y = number(record.get("iteration")), number(record.get(metric))
    return None if x is None or y is None else (x, y)


def read(records: Iterable[dict[str, Any]], metrics: Iterable[str]) -> dict[str, list[Point]]:
    """Every point of each of ``metrics`` in ``records`` (as they stand after resumes), in record order."""
    out: dict[str, list[Point]] = {m: [] for m in metrics}
    for r in records:
        for metric, points in out.items():
            p = reading(r, metric)
            if p is not None:
                points.append(p)
    return out


def bound(points: list[Point], max_points: int = MAX_POINTS) -> list[Point]:
    """At most ``max_points`` points: neighbours averaged in equal buckets (each at its last x)."""
    if len(points) <= max_points:
        return points
    width = math.ceil(len(points) / max_points)
    out = []
    for i in range(0, len(points), width):
        bucket = points[i:i + width]
        out.append((bucket[-1][0], sum(p[1] for p in bucket) / len(bucket)))
    return out


class Series:
    """A series bounded while it grows: past ``max_points`` points it is :func:`bound` to half (neighbours
    pairwise averaged), and later points are averaged in buckets of the same width before they are stored."""

    def __init__(self, max_points: int = MAX_POINTS):
        self.max_points = max(4, max_points)
        self.points: list[Point] = []
        self.generation = 0  # grows whenever stored points change (not only grow): a display replaces its copy
        self.width = 1  # raw points per stored point
        self._bucket: list[Point] = []

    def add(self, x: float, y: float) -> None:
        self._bucket.append((x, y))
        if len(self._bucket) < self.width:
            return
        self.points.extend(bound(self._bucket, 1))
        self._bucket = []
        if len(self.points) > self.max_points:
            self.points = bound(self.points, self.max_points)  # max_points + 1 points: buckets of two
            self.width *= 2
            self.generation += 1

    def reset(self) -> None:
        self.points, self._bucket, self.width = [], [], 1
        self.generation += 1


def loss_table(records: Iterable[dict[str, Any]], rows: int = 15) -> list[tuple[int, float | None, float | None]]:
    """``(iteration, train loss, val loss)`` for at most ``rows`` iterations, evenly spread from first to last.

    A table shows losses as reported (``None`` where that iteration has no such report), so rows are picked, not
    averaged as :func:`bound` does for a chart.
    """
    series = read(records, ("train_loss", "val_loss"))
    by_it: dict[int, list[float | None]] = {}
    for col, metric in enumerate(("train_loss", "val_loss")):
        for x, y in series[metric]:
            by_it.setdefault(int(x), [None, None])[col] = y
    table = [(it, train, val) for it, (train, val) in sorted(by_it.items())]
    if len(table) <= rows:
        return table
    picked = sorted({round(i * (len(table) - 1) / (rows - 1)) for i in range(rows)})
    return [table[i] for i in picked]
