"""RunWatcher (incremental, resume-aware, bounded reads of a run folder) and the system status probe."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from services.system import installed_blas, system_status
from services.training.folder import RunFolder
from services.training.manager import RunManager
from services.training.series import Series
from services.training.watch import RunWatcher, WatcherPool

REPO = Path(__file__).resolve().parent.parent


def make_run(manager: RunManager, run_id: str = "r1", **info) -> RunFolder:
    folder = RunFolder(manager.workspace.runs / run_id)
    folder.path.mkdir(parents=True)
    folder.update(id=run_id, name=run_id, status="completed", iters=100, iteration=0, checkpoints=[], best=None,
                  **info)
    return folder


def train(it: int, loss: float, **extra) -> dict:
    return {"type": "train", "step": it, "iteration": it, "epoch": it / 50, "train_loss": loss,
            "perplexity": 2.718 ** loss, "learning_rate": 1e-4, "iterations_per_second": 2.0,
            "tokens_per_second": 1000.0 + it, "trained_tokens": 100 * it, "peak_memory_gb": 1.5, "rss_gb": 2.0,
            "eta_seconds": 100 - it, **extra}


@pytest.fixture
def run(manager):
    folder = make_run(manager)
    return folder, RunWatcher(manager, folder.id, min_interval=0)


def test_incremental_reads_only_new_bytes(run):
    folder, w = run
    for it in range(1, 6):
        folder.append_metric(train(it, 3.0 - it * 0.1))
    assert w.poll()
    assert [x for x, _ in w.series("train_loss")] == [1, 2, 3, 4, 5]
    offset = w._metrics_offset
    assert offset == folder.metrics_path.stat().st_size
    # a torn last line (worker mid-write) is not read until it is complete
    with open(folder.metrics_path, "a") as f:
        f.write(json.dumps(train(6, 2.3))[:20])
    w.poll()
    assert len(w.series("train_loss")) == 5 and w._metrics_offset == offset
    with open(folder.metrics_path, "a") as f:
        f.write(json.dumps(train(6, 2.3))[20:] + "\n")
    for it in range(7, 9):
        folder.append_metric(train(it, 2.0))
    assert w.poll()
    assert [x for x, _ in w.series("train_loss")] == list(range(1, 9))
    gen, replace, new = w.series_since("train_loss", *_sent(w, "train_loss", 5))
    assert not replace and [x for x, _ in new] == [6, 7, 8]
    latest = w.latest()
    assert latest["iteration"] == 8 and latest["train_loss"] == 2.0 and latest["trained_tokens"] == 800
    assert latest["progress"] == pytest.approx(0.08)


def _sent(w: RunWatcher, name: str, length: int) -> tuple[int, int]:
    return w._series[name].generation, length


def test_version_grows_only_on_change(run):
    folder, w = run
    w.poll()
    v = w.version
    assert not w.poll() and w.version == v
    folder.append_metric(train(1, 2.0))
    assert w.poll() and w.version == v + 1
    assert not w.poll() and w.version == v + 1
    folder.update(status="stopped", reason="stopped at iteration 1 of 100")
    assert w.poll() and w.version == v + 2
    assert w.status() == ("stopped", "stopped at iteration 1 of 100")
    throttled = RunWatcher(w.manager, folder.id, min_interval=60)
    assert throttled.poll() and not throttled.poll()  # the second call within min_interval reads nothing


def test_history_after_resume(run):
    folder, w = run
    for it in range(1, 9):
        folder.append_metric(train(it, 3.0))
        if it == 5:
            folder.append_metric({"type": "val", "step": 5, "iteration": 5, "val_loss": 2.9, "val_perplexity": 18.2})
            folder.append_metric({"type": "checkpoint", "step": 5, "iteration": 5, "val_loss": 2.9, "best": True})
    folder.append_metric({"type": "status", "step": 8, "status": "interrupted", "reason": "killed"})
    w.poll()
    gen, length = w._series["train_loss"].generation, len(w.series("train_loss"))
    # resumed from checkpoint 5: iterations 6..8 are produced again, with other values
    folder.append_metric({"type": "resume", "step": 5, "iteration": 5, "from": "ckpt"})
    for it in range(6, 11):
        folder.append_metric(train(it, 1.0))
    assert w.poll()
    pts = w.series("train_loss")
    assert [x for x, _ in pts] == list(range(1, 11))
    assert [y for x, y in pts if x > 5] == [1.0] * 5
    assert w.series("val_loss") == [(5.0, 2.9)]
    new_gen, replace, _ = w.series_since("train_loss", gen, length)
    assert replace and new_gen != gen
    # a fresh watcher (reload, second browser, app restart) sees the same history
    again = RunWatcher(w.manager, folder.id, min_interval=0)
    again.poll()
    assert again.series("train_loss") == pts


def test_series_stay_bounded():
    s = Series(max_points=100)
    for i in range(1, 10_001):
        s.add(i, float(i))
    assert 50 <= len(s.points) <= 100
    xs = [x for x, _ in s.points]
    assert xs == sorted(xs) and xs[-1] > 9_800
    # merged points are means of what they replace
    assert all(abs(y - x) < s.width for x, y in s.points)


def test_decimation_bound_through_watcher(manager):
    folder = make_run(manager, "long")
    w = RunWatcher(manager, folder.id, max_points=200, min_interval=0)
    with open(folder.metrics_path, "a") as f:
        for it in range(1, 5001):
            f.write(json.dumps(train(it, 5.0 / it)) + "\n")
    w.poll()
    for name in ("train_loss", "learning_rate", "tokens_per_second"):
        assert 0 < len(w.series(name)) <= 200
    for it in range(5001, 6001):
        folder.append_metric(train(it, 0.001))
    w.poll()
    assert len(w.series("train_loss")) <= 200
    assert w.latest()["iteration"] == 6000


def test_log_tail_bounded(run):
    folder, w = run
    with open(folder.log_path, "w") as f:
        f.writelines(f"line {i}\n" for i in range(500))
    w.poll()
    total, replace, lines = w.log_since(0)
    assert replace and len(lines) == 200 and lines[-1] == "line 499"
    with open(folder.log_path, "a") as f:
        f.write("a\nb\nhalf")
    w.poll()
    total2, replace, lines = w.log_since(total)
    assert not replace and lines == ["a", "b"] and total2 == total + 2
    with open(folder.log_path, "a") as f:
        f.write(" line\n")
    w.poll()
    assert w.log_since(total2)[2] == ["half line"]


def test_checkpoints_and_best(run):
    folder, w = run
    folder.update(checkpoints=[{"iteration": 10, "val_loss": 2.0}, {"iteration": 20, "val_loss": 1.5}],
                  best={"iteration": 20, "val_loss": 1.5})
    w.poll()
    assert w.checkpoints() == [{"iteration": 10, "val_loss": 2.0, "best": False},
                               {"iteration": 20, "val_loss": 1.5, "best": True}]
    assert w.latest()["best"] == {"iteration": 20, "val_loss": 1.5}
    snap = w.snapshot()
    assert snap["info"]["id"] == folder.id and set(snap["series"]) >= {"train_loss", "val_loss"}


def test_dead_worker_marked_interrupted(manager):
    folder = make_run(manager, "dead")
    folder.update(status="running", pid=2**22 + 12345, pid_created=time.time())
    w = RunWatcher(manager, folder.id, min_interval=0)
    w.poll()
    assert w.status()[0] == "interrupted"


def test_pool_shares_and_bounds(manager):
    for i in range(3):
        make_run(manager, f"p{i}")
    pool = WatcherPool(manager, size=2)
    a = pool.get("p0")
    assert pool.get("p0") is a
    pool.get("p1")
    pool.get("p2")
    assert pool.get("p0") is not a  # evicted as least recently used


def test_system_status(workspace, manager):
    s = system_status(workspace)
    assert s["ram_total_gb"] > 0 and 0 <= s["cpu_percent"] <= 100 * (s["cpu_count"] or 1)
    assert s["disk_free_gb"] > 0
    assert s["blas"] == installed_blas() and s["blas_source"] == "installed"
    folder = make_run(manager, "active", blas="reference")
    folder.update(status="queued", launched=time.time())
    s = system_status(workspace)
    assert s["blas"] == "reference" and s["blas_source"] == "run active"


def test_system_status_does_not_import_mlx(workspace):
    code = ("import sys; from services.system import system_status; from services.workspace import Workspace; "
            f"s = system_status(Workspace.resolve({str(workspace.root)!r})); "
            "assert 'mlx.core' not in sys.modules and s['mlx'] is None, s; print(s['blas'])")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() in ("mkl", "reference", "accelerate")
