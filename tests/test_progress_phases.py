"""The Monitor says when a run validates or saves, and its ETA counts the validations and checkpoints to come:
the trainer's phase records (a real run of the tiny model), the watcher's view of them, the Monitor's text."""

from __future__ import annotations

import subprocess
import sys

import psutil
import pytest
from conftest import base_config
from test_run_watch import make_run, train

from pages.monitor import progress_text
from services.training.watch import RunWatcher


def test_a_run_says_what_it_does_between_reports_and_its_eta_counts_validation(manager, tiny_model, chat_data):
    folder = manager.launch(base_config(tiny_model, chat_data, mode="ift", iters=30, steps_per_eval=10,
                                        save_every=15, steps_per_report=5))
    assert manager.wait(folder.id, timeout=300)["status"] == "completed"
    records, _ = folder.metrics()
    for i, r in enumerate(records):
        if r["type"] == "val":  # each validation is announced just before it
            before = [x for x in records[:i] if x["type"] != "checkpoint"][-1]
            assert before["type"] == "phase" and before["phase"] == "validating"
            assert before["iteration"] == r["iteration"]
        if r["type"] == "checkpoint":
            assert records[i - 1]["type"] == "phase" and records[i - 1]["phase"] == "saving"
            assert records[i - 1]["iteration"] == r["iteration"]
    vals = [r["val_time"] for r in records if r["type"] == "val"]
    assert [r["iteration"] for r in records if r["type"] == "val"] == [0, 10, 20, 30]
    first = next(r for r in records if r["type"] == "train")  # at 5: validations at 10, 20 and 30 are to come
    assert first["iteration"] == 5 and first["eta_seconds"] >= 3 * vals[0]
    done_before = [r for r in records if r["type"] == "val" and r["time"] <= first["time"]]
    assert len(done_before) == 1


@pytest.fixture
def worker_pid():
    """A live process standing in for a run's worker."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield proc.pid
    proc.kill()
    proc.wait()


def test_the_watcher_and_the_monitor_show_the_phase_until_it_ends(manager, worker_pid):
    folder = make_run(manager)
    folder.update(status="running", pid=worker_pid, pid_created=psutil.Process(worker_pid).create_time())
    w = RunWatcher(manager, folder.id, min_interval=0)
    folder.append_metric(train(10, 2.0))
    folder.append_metric({"type": "phase", "step": 10, "iteration": 10, "phase": "validating"})
    w.poll(force=True)
    latest = w.latest()
    assert latest["phase"]["phase"] == "validating"
    assert "validating at iteration 10" in progress_text({**latest, "status": "running"})
    folder.append_metric({"type": "val", "step": 10, "iteration": 10, "val_loss": 1.5})
    folder.append_metric({"type": "phase", "step": 10, "iteration": 10, "phase": "saving"})
    w.poll(force=True)
    assert w.latest()["phase"]["phase"] == "saving"
    assert "saving checkpoint 10" in progress_text({**w.latest(), "status": "running"})
    folder.append_metric({"type": "checkpoint", "step": 10, "iteration": 10, "val_loss": 1.5})
    w.poll(force=True)
    assert w.latest()["phase"] is None
    assert progress_text({"iteration": 0, "iters": 20, "status": "running",
                          "phase": {"phase": "validating", "iteration": 0}}).startswith(
        "iteration 0 / 20 · validating the initial weights")
