"""services.training.series: the one metric registry, reader and downsampler of the watcher, Compare, the dashboard
and the model card."""

from __future__ import annotations

import math

from services.training import series
from services.training.dashboard import dashboard_data
from services.training.folder import RunFolder


def test_reading_takes_finite_numbers_from_the_metrics_own_record_type():
    assert series.reading({"type": "train", "iteration": 5, "train_loss": 2.5}, "train_loss") == (5.0, 2.5)
    assert series.reading({"type": "val", "iteration": 5, "val_loss": 2.5}, "val_loss") == (5.0, 2.5)
    # a checkpoint record repeats the val loss: it is not a second validation report
    assert series.reading({"type": "checkpoint", "iteration": 5, "val_loss": 2.5}, "val_loss") is None
    assert series.reading({"type": "train", "iteration": 5, "train_loss": math.nan}, "train_loss") is None
    assert series.reading({"type": "train", "iteration": None, "train_loss": 1.0}, "train_loss") is None
    assert series.reading({"type": "train", "iteration": 5, "train_loss": True}, "train_loss") is None
    records = [{"type": "train", "iteration": i, "train_loss": 1.0 / i, "learning_rate": 1e-4} for i in (1, 2)]
    assert series.read(records, ("train_loss", "val_loss")) == {"train_loss": [(1.0, 1.0), (2.0, 0.5)],
                                                                "val_loss": []}


def test_bound_keeps_series_short():
    pts = [(float(i), float(i % 2)) for i in range(1, 10_001)]
    out = series.bound(pts, 1000)
    assert len(out) == 1000 and out[-1][0] == 10_000 and all(y == 0.5 for _, y in out)
    assert series.bound(pts[:5], 10) == pts[:5]


def _pairwise(points, max_points):
    """The watcher's bounded series as it was written before the bound became one function (the reference)."""
    stored, bucket, width = [], [], 1
    for x, y in points:
        bucket.append((x, y))
        if len(bucket) < width:
            continue
        xs, ys = zip(*bucket, strict=True)
        bucket = []
        stored.append((xs[-1], sum(ys) / len(ys)))
        if len(stored) > max_points:
            merged = [(stored[i + 1][0], (stored[i][1] + stored[i + 1][1]) / 2) for i in range(0, len(stored) - 1, 2)]
            if len(stored) % 2:
                merged.append(stored[-1])
            stored, width = merged, width * 2
    return stored


def test_incremental_series_is_the_bound_kept_while_growing_bitwise():
    points = [(float(i), 5.0 / i + math.sin(i) / 7) for i in range(1, 3001)]
    s = series.Series(max_points=100)
    for x, y in points:
        s.add(x, y)
    assert s.width == 32 and 50 <= len(s.points) <= 100
    assert s.points == _pairwise(points, 100)  # == on floats: bit for bit


def test_loss_table_picks_reported_rows_evenly():
    records = [{"type": "train", "iteration": i, "train_loss": 10.0 - i / 10} for i in range(1, 101)]
    records += [{"type": "val", "iteration": i, "val_loss": 9.0 - i / 10} for i in (0, 50, 100)]
    rows = series.loss_table(records, rows=5)
    assert rows == [(0, None, 9.0), (25, 7.5, None), (50, 5.0, 4.0), (75, 2.5, None), (100, 0.0, -1.0)]
    assert series.loss_table(records[:3], rows=5) == [(1, 9.9, None), (2, 9.8, None), (3, 9.7, None)]


def test_dashboard_series_come_from_the_registry(tmp_path):
    folder = RunFolder(tmp_path / "run")
    folder.path.mkdir()
    folder.update(id="run", status="completed", checkpoints=[{"iteration": 10, "val_loss": math.nan}], best=None)
    folder.append_metric({"type": "val", "step": 0, "iteration": 0, "val_loss": 7.0})
    folder.append_metric({"type": "train", "step": 10, "iteration": 10, "train_loss": 4.0, "rss_gb": 0.1})
    folder.append_metric({"type": "val", "step": 10, "iteration": 10, "val_loss": 3.0})
    folder.append_metric({"type": "checkpoint", "step": 10, "iteration": 10, "val_loss": 3.0, "best": True})
    data = dashboard_data(folder)
    assert data["series"]["val_loss"] == [[0.0, 7.0], [10.0, 3.0]]  # the checkpoint record adds no point
    assert data["series"]["train_loss"] == [[10.0, 4.0]] and data["series"]["rss_gb"] == [[10.0, 0.1]]
    assert data["checkpoints"][0]["val_loss"] is None  # JSON has no NaN
