"""Nothing lost under races, crashes and full disks (issue 15, D1–D5): each test reproduces the defect as the
drills found it (../shared/research/reliability-2026-12.md) and checks the fix."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import pytest
from conftest import base_config, mounted_tmpfs

from services.training.folder import RunFolder, checkpoint_problem, history
from services.workspace import append_jsonl, read_jsonl_tail

REPO = Path(__file__).resolve().parent.parent


def wait_done(manager, run_id: str, timeout: float = 300) -> dict:
    info = manager.wait(run_id, timeout=timeout)
    assert info["status"] in ("completed", "stopped", "early-stopped"), info
    return info


def stopped_run(manager, cfg: dict) -> RunFolder:
    """A run stopped after its first checkpoint (so it can be resumed)."""
    folder = manager.launch(cfg)
    deadline = time.time() + 120
    while not folder.checkpoint_iterations() and time.time() < deadline:
        time.sleep(0.05)
    manager.stop(folder.id)
    assert wait_done(manager, folder.id)["status"] == "stopped"
    return folder


def same_tensors(a: Path, b: Path) -> bool:
    ta, tb = mx.load(str(a)), mx.load(str(b))
    return sorted(ta) == sorted(tb) and all(mx.array_equal(ta[k], tb[k]).item() for k in ta)


# -- D1: exactly one worker per run, across processes ------------------------------------------------------

RESUME_AT = """
import sys, time
from pathlib import Path
from services.training.manager import RunManager
from services.workspace import Workspace
from services.config import ConfigError
manager = RunManager(Workspace(Path(sys.argv[1])))
while time.time() < float(sys.argv[3]):
    pass
try:
    manager.resume(sys.argv[2])
    print("started")
except ConfigError as e:
    print("refused:", e)
"""


def test_concurrent_resumes_start_exactly_one_worker(manager, tiny_model, chat_data):
    folder = stopped_run(manager, base_config(tiny_model, chat_data, iters=60, save_every=5, steps_per_eval=60))
    at = f"{time.time() + 4:.3f}"  # every process resumes at the same instant
    procs = [subprocess.Popen([sys.executable, "-c", RESUME_AT, str(manager.workspace.root), folder.id, at],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
             for _ in range(4)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert sum("started" in o for o in outs) == 1, outs
    assert all("started" in o or "refused:" in o for o in outs), outs
    assert wait_done(manager, folder.id)["status"] == "completed"
    records, _ = folder.metrics()
    assert sum(r["type"] == "resume" for r in records) == 1
    steps = [r["step"] for r in history(records) if r["type"] == "train"]
    assert len(steps) == len(set(steps))  # no report twice
    assert folder.log_path.read_text().count("resuming from") == 1


def test_a_second_worker_on_a_claimed_run_exits_without_touching_it(manager, tiny_model, chat_data):
    folder = manager.launch(base_config(tiny_model, chat_data, iters=400, save_every=200, steps_per_eval=400))
    deadline = time.time() + 120
    while manager.get(folder.id)["status"] != "running" and time.time() < deadline:
        time.sleep(0.05)
    before = folder.info()
    second = subprocess.run([sys.executable, "-m", "services.training.worker", str(folder.path)], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert second.returncode == 3
    assert folder.info()["pid"] == before["pid"] and folder.info()["status"] == "running"
    assert "another worker already trains this run" in folder.log_path.read_text()
    manager.stop(folder.id)
    wait_done(manager, folder.id)


# -- D2: the app's edits and the worker's never overwrite each other ------------------------------------------

def test_label_edits_during_training_lose_no_checkpoint_and_no_label(manager, tiny_model, chat_data):
    folder = manager.launch(base_config(tiny_model, chat_data, iters=60, save_every=1, steps_per_eval=60,
                                        steps_per_report=1))
    n = 0
    while manager.get(folder.id)["status"] in ("queued", "running"):
        n += 1
        manager.set_label(folder.id, f"label {n}")
    n += 1
    manager.set_label(folder.id, f"label {n}")
    assert n > 20  # the edits really ran beside the worker
    info = wait_done(manager, folder.id)
    listed = [c["iteration"] for c in info["checkpoints"]]
    assert listed == folder.checkpoint_iterations() == list(range(1, 61))
    assert info["label"] == f"label {n}"


# -- D3: appends are all or nothing; a torn tail is skipped and said -----------------------------------------

def test_a_torn_line_is_closed_before_the_next_record_and_reported(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    append_jsonl(path, {"type": "train", "step": 1})
    with open(path, "ab") as f:
        f.write(b'{"type": "train", "step": 2, "trained_tok')  # what a kill or ENOSPC mid-write leaves
    append_jsonl(path, {"type": "status", "status": "interrupted"})
    with caplog.at_level("WARNING", logger="forgellm"):
        records, offset = read_jsonl_tail(path)
    assert records == [{"type": "train", "step": 1}, {"type": "status", "status": "interrupted"}]
    assert offset == path.stat().st_size
    assert "skipped a torn record" in caplog.text and str(path) in caplog.text


@pytest.fixture
def tiny_disk(tmp_path):
    """An 8 MB tmpfs (root only)."""
    with mounted_tmpfs(tmp_path / "disk", "8m") as mnt:
        yield mnt


def fill(disk: Path) -> Path:
    """Fill ``disk`` up with one file (returned), written until the disk says no."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"x" * 4096)
    except OSError:
        pass
    finally:
        os.close(fd)
    return filler


def test_an_append_on_a_full_disk_leaves_no_partial_line(tiny_disk):
    path = tiny_disk / "metrics.jsonl"
    append_jsonl(path, {"type": "train", "step": 1})
    filler = fill(tiny_disk)
    size = path.stat().st_size
    with pytest.raises(OSError):
        append_jsonl(path, {"type": "train", "step": 2, "payload": "y" * 20000})
    assert path.stat().st_size == size  # nothing of the record stayed
    filler.unlink()
    append_jsonl(path, {"type": "status", "status": "interrupted"})
    assert [json.loads(line) for line in path.read_text().splitlines()] == [
        {"type": "train", "step": 1}, {"type": "status", "status": "interrupted"}]


# -- D4: a checkpoint exists only when complete; rotation is crash-safe ---------------------------------------

def test_a_partial_checkpoint_does_not_count_and_a_fork_from_it_is_refused(manager, tiny_model, chat_data):
    from services.config import ConfigError

    folder = manager.launch(base_config(tiny_model, chat_data, iters=20, save_every=5, steps_per_eval=20))
    wait_done(manager, folder.id)
    assert folder.checkpoint_iterations() == [5, 10, 15, 20]
    # what a kill inside the old rotation's rmtree left: a numbered folder with some files gone
    (folder.checkpoint_dir(5) / "state.json").unlink()
    (folder.checkpoint_dir(5) / "rng.npz").unlink()
    assert folder.checkpoint_iterations() == [10, 15, 20]
    with pytest.raises(ConfigError, match="no checkpoint at that iteration"):
        manager.fork(folder.id, 5, {"learning_rate": 1e-4})


def test_rotation_interrupted_midway_leaves_no_numbered_partial(tmp_path, monkeypatch):
    folder = RunFolder(tmp_path / "run")
    for it in (1, 2):
        d = folder.checkpoint_dir(it)
        d.mkdir(parents=True)
        for name in ("adapters.safetensors", "optimizer.safetensors", "rng.npz", "state.json"):
            (d / name).write_bytes(b"x")
    real_rmtree = shutil.rmtree

    def killed_midway(path, *a, **k):  # deletes one file, then the process dies
        if not Path(path).is_dir():
            return
        sorted(Path(path).iterdir())[0].unlink()
        raise KeyboardInterrupt

    monkeypatch.setattr(shutil, "rmtree", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        folder.remove_checkpoint(1)
    monkeypatch.setattr(shutil, "rmtree", real_rmtree)
    assert folder.checkpoint_iterations() == [2]
    folder.sweep_leftovers()
    assert sorted(p.name for p in folder.checkpoints.iterdir()) == ["0000002"]


def test_a_checkpoint_renamed_in_but_never_recorded_is_rotated(manager, tiny_model, chat_data):
    folder = stopped_run(manager, base_config(tiny_model, chat_data, iters=40, save_every=2, keep_checkpoints=2,
                                              steps_per_eval=40))
    info = folder.info()
    orphan = info["checkpoints"][-1]["iteration"]
    folder.update(checkpoints=info["checkpoints"][:-1])  # the worker died between the rename and run.json
    manager.resume(folder.id)
    final = wait_done(manager, folder.id)
    assert final["status"] == "completed"
    assert len(folder.checkpoint_iterations()) <= 3  # the last 2 plus the best
    assert folder.checkpoint_iterations() == sorted(c["iteration"] for c in final["checkpoints"])
    assert orphan not in folder.checkpoint_iterations() or orphan in [c["iteration"] for c in final["checkpoints"]]


# -- D5: checkpoints are verified; a damaged newest one falls back to the newest intact one -------------------

def test_a_damaged_newest_checkpoint_falls_back_and_still_resumes_exactly(manager, tiny_model, chat_data):
    cfg = base_config(tiny_model, chat_data, iters=40, save_every=10, steps_per_eval=10)
    ref = manager.launch({**cfg, "name": "ref"})
    wait_done(manager, ref.id)
    folder = manager.launch(cfg)
    deadline = time.time() + 120
    while len(folder.checkpoint_iterations()) < 2 and time.time() < deadline:
        time.sleep(0.05)
    manager.stop(folder.id)
    wait_done(manager, folder.id)
    its = folder.checkpoint_iterations()
    newest = folder.checkpoint_dir(its[-1])
    with open(newest / "optimizer.safetensors", "r+b") as f:  # same size, other bytes: only the checksum sees it
        f.seek(100)
        f.write(b"\0" * 16)
    assert "checksum" in checkpoint_problem(newest)
    manager.resume(folder.id)
    assert wait_done(manager, folder.id)["status"] == "completed"
    log = folder.log_path.read_text()
    assert f"checkpoint {its[-1]} is damaged" in log and f"resuming from checkpoint {its[-2]}" in log
    assert same_tensors(folder.checkpoint_dir(40) / "adapters.safetensors",
                        ref.checkpoint_dir(40) / "adapters.safetensors")


def test_a_truncated_checkpoint_to_fork_from_is_named(manager, tiny_model, chat_data):
    folder = manager.launch(base_config(tiny_model, chat_data, iters=10, save_every=5, steps_per_eval=10))
    wait_done(manager, folder.id)
    with open(folder.checkpoint_dir(10) / "adapters.safetensors", "r+b") as f:
        f.seek(50)
        f.write(b"\xff" * 8)
    fork = manager.fork(folder.id, 10, {"learning_rate": 1e-4})
    info = manager.wait(fork.id, timeout=120)
    assert info["status"] == "failed"
    assert "checkpoint 0000010" in info["reason"] and "adapters.safetensors" in info["reason"]


def test_checkpoint_files_are_fsynced_with_a_manifest(manager, tiny_model, chat_data):
    folder = manager.launch(base_config(tiny_model, chat_data, iters=5, save_every=5, steps_per_eval=5))
    wait_done(manager, folder.id)
    manifest = json.loads((folder.checkpoint_dir(5) / "manifest.json").read_text())
    assert set(manifest["files"]) >= {"adapters.safetensors", "optimizer.safetensors", "rng.npz", "state.json"}
    for name, entry in manifest["files"].items():
        assert (folder.checkpoint_dir(5) / name).stat().st_size == entry["bytes"]
    assert checkpoint_problem(folder.checkpoint_dir(5)) is None


# -- W1: a full disk is a named failure, nothing torn, and Resume works once space is free ---------------------

def test_a_disk_that_fills_up_mid_run_is_a_named_failure_and_resumes_exactly(tiny_disk, tiny_model, chat_data,
                                                                               manager):
    from services.training.manager import RunManager
    from services.workspace import Workspace

    cfg = base_config(tiny_model, chat_data, iters=200, save_every=20, steps_per_eval=50, steps_per_report=1)
    ref = manager.launch(cfg)  # the same run on a roomy disk
    full = RunManager(Workspace.resolve(tiny_disk / "ws"))
    folder = full.launch(cfg)
    deadline = time.time() + 120
    while len(folder.metrics()[0]) < 60 and time.time() < deadline:
        time.sleep(0.02)
    fill(tiny_disk)
    info = full.wait(folder.id, timeout=120)
    assert info["status"] == "failed" and "the workspace disk is full" in info["reason"], info
    for line in folder.metrics_path.read_bytes().splitlines():
        json.loads(line)  # no torn or glued line
    assert full.list()  # listing (what every page does) works while the disk is full
    (tiny_disk / "filler").unlink()
    full.resume(folder.id)
    final = full.wait(folder.id, timeout=300)
    assert final["status"] == "completed", final
    wait_done(manager, ref.id)
    assert same_tensors(folder.checkpoint_dir(200) / "adapters.safetensors",
                        ref.checkpoint_dir(200) / "adapters.safetensors")
