"""Run listing, filters, sorting, config diffs and series alignment (services.training.index), and RunManager's
delete / set_label. No training: run folders are written by hand."""

from __future__ import annotations

import math
import subprocess
import time

import psutil
import pytest

from services.config import ConfigError
from services.training import index as run_index
from services.training.folder import CHECKPOINT_FILES, RunFolder


def info(run_id: str, **kw) -> dict:
    base = {"id": run_id, "name": run_id, "status": "completed", "mode": "cpt", "fine_tune_type": "lora",
            "model": "/ws/models/tiny", "data": "/ws/datasets/corpus", "created": 1_700_000_000.0,
            "started": 1_700_000_010.0, "ended": 1_700_000_070.0, "checkpoints": [], "best": None}
    return {**base, **kw}


def make_run(manager, run_id: str, **kw) -> RunFolder:
    folder = RunFolder(manager.workspace.runs / run_id)
    folder.path.mkdir(parents=True)
    folder.update(**info(run_id, **kw))
    folder.write_config({"model": "m", "learning_rate": 1e-4, "iters": 100})
    return folder


def test_run_row_and_filters():
    rows = [
        run_index.run_row(info("a", name="alpha", label="keeper", best={"iteration": 20, "val_loss": 1.5})),
        run_index.run_row(info("b", name="beta", mode="ift", fine_tune_type="dora", status="failed",
                               data="/ws/datasets/chat/train.jsonl", parent={"run": "a", "iteration": 10})),
        run_index.run_row(info("c", name="gamma", mode="mlx-lm", fine_tune_type="full", status="stopped",
                               best={"iteration": 5, "val_loss": 0.9})),
    ]
    a, b, _ = rows
    assert a["model"] == "tiny" and a["dataset"] == "corpus" and a["duration"] == 60.0
    assert a["best_val_loss"] == 1.5 and a["best_iteration"] == 20 and a["label"] == "keeper"
    assert b["dataset"] == "chat/train.jsonl" and b["parent"] == "a@10" and b["best_val_loss"] is None
    # the Resume button of a row is disabled, with the reason, when resuming would be refused
    assert a["resume_refusal"] == run_index.resume_refusal({"status": a["status"]}, []) != ""
    assert run_index.run_row(info("d", status="stopped", checkpoints=[{"iteration": 5}]))["resume_refusal"] == ""
    ids = lambda rs: [r["id"] for r in rs]  # noqa: E731
    assert ids(run_index.filter_rows(rows, "KEEP")) == ["a"]
    assert ids(run_index.filter_rows(rows, "chat dora")) == ["b"]
    assert ids(run_index.filter_rows(rows, "tiny")) == ["a", "b", "c"]
    assert ids(run_index.filter_rows(rows, status=["failed", "stopped"])) == ["b", "c"]
    assert ids(run_index.filter_rows(rows, mode=["cpt", "ift"], method=["lora"])) == ["a"]
    assert ids(run_index.sort_rows(rows, "best_val_loss", descending=False)) == ["c", "a", "b"]
    assert ids(run_index.sort_rows(rows, "best_val_loss", descending=True)) == ["a", "c", "b"]  # None stays last
    assert ids(run_index.sort_rows(rows, "name", descending=True)) == ["c", "b", "a"]
    with pytest.raises(ValueError):
        run_index.sort_rows(rows, "nope")


def test_active_duration_counts_up_to_now():
    row = run_index.run_row(info("r", status="running", ended=None, started=100.0), now=130.0)
    assert row["duration"] == 30.0
    assert run_index.run_row(info("q", status="queued", started=None))["duration"] is None


def test_duration_sums_every_session_of_a_resumed_run(tmp_path):
    folder = RunFolder(tmp_path / "run")
    folder.path.mkdir()
    folder.update(**info("run", status="running", started=100.0, ended=None))
    folder.end_session("stopped", "stopped by the user", ended=160.0)
    assert run_index.run_duration(folder.info()) == 60.0
    folder.update(status="running", started=1000.0, ended=None)  # what the worker writes when it resumes
    assert run_index.run_duration(folder.info(), now=1030.0) == 90.0
    folder.heartbeat_path.write_text("1040.0\n")
    folder.end_session("interrupted", "killed", ended=folder.heartbeat())
    folder.end_session("interrupted", "killed", ended=2000.0)  # a second close adds nothing
    assert run_index.run_duration(folder.info()) == 100.0 and folder.info()["status"] == "interrupted"


def test_series_alignment_by_iteration_epoch_tokens():
    records = [
        {"type": "val", "step": 0, "iteration": 0, "epoch": 0.0, "val_loss": 5.0, "val_perplexity": math.exp(5)},
        {"type": "train", "step": 5, "iteration": 5, "epoch": 0.5, "train_loss": 4.0, "perplexity": math.exp(4),
         "trained_tokens": 500},
        {"type": "train", "step": 10, "iteration": 10, "epoch": 1.0, "train_loss": 3.0, "perplexity": math.exp(3),
         "trained_tokens": 1100},
        {"type": "val", "step": 10, "iteration": 10, "epoch": 1.0, "val_loss": 3.5},
        {"type": "val", "step": 12, "iteration": 12, "val_loss": 3.4},  # past the last report, no epoch
        {"type": "train", "step": 15, "iteration": 15, "train_loss": float("nan"), "trained_tokens": 1700},
    ]
    train = run_index.metric_series(records, "train_loss")
    val = run_index.metric_series(records, "val_loss")
    assert run_index.align(train, "iteration") == [(5, 4.0), (10, 3.0)]  # the NaN is left out
    assert run_index.align(train, "tokens") == [(500, 4.0), (1100, 3.0)]
    assert run_index.align(val, "iteration") == [(0, 5.0), (10, 3.5), (12, 3.4)]
    assert run_index.align(val, "tokens") == [(0, 5.0), (1100, 3.5), (1340, 3.4)]  # interpolated from train
    assert run_index.align(val, "epoch") == [(0, 5.0), (1.0, 3.5), (1.2, 3.4)]
    assert [y for _, y in run_index.align(run_index.metric_series(records, "val_perplexity"))] == [math.exp(5)]
    with pytest.raises(ValueError):
        run_index.align(val, "seconds")


def test_config_diff_only_differing_keys():
    a = {"model": "m", "learning_rate": 1e-4, "lora_parameters": {"rank": 8, "scale": 20.0}, "mode": "cpt"}
    b = {"model": "m", "learning_rate": 2e-4, "lora_parameters": {"rank": 16, "scale": 20.0}, "mode": "cpt",
         "epochs": 2}
    diff = run_index.config_diff({"A": a, "B": b})
    assert [d["key"] for d in diff] == ["learning_rate", "lora_parameters.rank", "epochs"]
    assert diff[2]["values"] == {"A": None, "B": 2}
    assert run_index.config_diff({"A": a, "B": dict(a)}) == []


def test_without_defaults():
    assert run_index.without_defaults({"train": True, "adapter_path": "adapters", "test": True, "foo": 1}) == \
        {"test": True, "foo": 1}


def test_resume_refusal_and_fork_overrides():
    assert "stop it" in run_index.resume_refusal({"status": "running"}, [10])
    assert "completed" in run_index.resume_refusal({"status": "completed"}, [10])
    assert "no checkpoint" in run_index.resume_refusal({"status": "stopped"}, [])
    assert run_index.resume_refusal({"status": "interrupted"}, [10]) is None
    cfg = {"learning_rate": 1e-4, "iters": 30}
    assert run_index.fork_overrides(cfg, 10, {"name": " f ", "learning_rate": 5e-5, "iters": 40}) == \
        ({"name": "f", "learning_rate": 5e-5, "iters": 40}, [])
    assert run_index.fork_overrides(cfg, 10, {"learning_rate": 1e-4, "iters": 30.0}) == ({}, [])
    _, problems = run_index.fork_overrides(cfg, 30, {"learning_rate": 2, "iters": 30})
    assert len(problems) == 2
    assert run_index.default_fork_iters(cfg, 10) == 30 and run_index.default_fork_iters(cfg, 30) == 60
    over, problems = run_index.fork_overrides({"learning_rate": 1e-4, "epochs": 2}, 10, {"epochs": 3, "iters": 5})
    assert over == {"epochs": 3} and not problems


def test_checkpoint_rows_and_listing_stamp(manager):
    folder = make_run(manager, "r1", checkpoints=[{"iteration": 10, "val_loss": 2.0, "train_loss": 2.5,
                                                   "bytes": 1234}, {"iteration": 20, "val_loss": 1.0}],
                      best={"iteration": 20, "val_loss": 1.0})
    for it in (10, 20, 30):  # complete checkpoints (every file there; their contents do not matter here)
        folder.checkpoint_dir(it).mkdir(parents=True)
        for name in CHECKPOINT_FILES:
            (folder.checkpoint_dir(it) / name).write_bytes(b"")
    (folder.checkpoint_dir(30) / "adapters.safetensors").write_bytes(b"x" * 7)
    rows = run_index.checkpoint_rows(folder)
    assert [(r["iteration"], r["best"]) for r in rows] == [(10, False), (20, True), (30, False)]
    assert rows[0]["bytes"] == 1234 and rows[2]["bytes"] == 7 and rows[2]["val_loss"] is None
    assert rows[1]["perplexity"] == pytest.approx(math.e)
    stamp = run_index.listing_stamp(manager.workspace.runs)
    time.sleep(0.01)
    manager.set_label("r1", "  nice one ")
    assert folder.info()["label"] == "nice one"
    assert run_index.listing_stamp(manager.workspace.runs) != stamp
    manager.set_label("r1", "")
    assert folder.info()["label"] is None


@pytest.fixture
def sleeper():
    """A live process to stand in for a run's worker (the manager fixture stops active runs: not pytest itself)."""
    proc = subprocess.Popen(["sleep", "60"])
    yield proc
    proc.kill()
    proc.wait()


def test_delete_only_inside_workspace_and_not_while_active(manager, sleeper):
    done = make_run(manager, "done")
    active = make_run(manager, "live", status="running", pid=sleeper.pid,
                      pid_created=psutil.Process(sleeper.pid).create_time())
    with pytest.raises(ConfigError, match="stop it before deleting"):
        manager.delete("live")
    assert active.path.exists()
    for bad in ("../ws", "..", "nope", "live/../done/.."):
        with pytest.raises(ValueError):
            manager.delete(bad)
    assert manager.workspace.runs.exists()
    manager.delete("done")
    assert not done.path.exists() and [r["id"] for r in manager.list()] == ["live"]


def test_a_failed_or_interrupted_run_leads_with_why_and_where_to_go_on():
    note = run_index.ending_note({"status": "failed", "reason": "validation loss became nan at iteration 40; "
                                  "lower the learning rate (now 0.1)"}, [10, 20, 30])
    assert note == ("This run failed: validation loss became nan at iteration 40; lower the learning rate (now 0.1) "
                    "The last good checkpoint is 30: Resume continues from it, or fork it with other settings.")
    note = run_index.ending_note({"status": "interrupted", "reason": "a\nb\n\nc\nd"}, [])
    assert note == "This run was interrupted: a b c … No checkpoint was written: start the run again."
    assert all(run_index.ending_note({"status": s, "reason": "x"}, [10]) is None
               for s in ("completed", "stopped", "running", "waiting", "early-stopped"))
