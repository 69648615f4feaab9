"""The forgellm command line: train, runs, stop, resume, errors."""

from __future__ import annotations

import subprocess
import sys
import time

import yaml
from conftest import base_config

from services.training.manager import RunManager
from services.workspace import Workspace


def forgellm(ws, *args, timeout=300):
    return subprocess.run([sys.executable, "-m", "app.cli", "--workspace", str(ws), *args], capture_output=True,
                          text=True, timeout=timeout)


def test_train_cpt_and_ift_then_list(tiny_model, chat_data, cpt_corpus, tmp_path):
    ws = tmp_path / "ws"
    for data, mode in ((cpt_corpus, "cpt"), (chat_data, "ift")):
        cfg = tmp_path / f"{mode}.yaml"
        cfg.write_text(yaml.safe_dump(base_config(tiny_model, data, mode=mode, iters=20, max_seq_length=64)))
        proc = forgellm(ws, "train", str(cfg))
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "completed: 20 iterations" in proc.stdout and "best checkpoint: 20" in proc.stdout
    runs = forgellm(ws, "runs")
    assert runs.returncode == 0
    assert runs.stdout.count("completed") == 2 and " cpt " in runs.stdout and " ift " in runs.stdout
    manager = RunManager(Workspace.resolve(ws))
    for info in manager.list():
        records, _ = manager.folder(info["id"]).metrics()
        kinds = {r["type"] for r in records}
        assert {"train", "val", "checkpoint", "status"} <= kinds


def test_stop_a_detached_run_then_resume_it(tiny_model, chat_data, tmp_path):
    ws = tmp_path / "ws"
    cfg = tmp_path / "long.yaml"
    cfg.write_text(yaml.safe_dump(base_config(tiny_model, chat_data, mode="ift", iters=5000, save_every=1000)))
    proc = forgellm(ws, "train", str(cfg), "--detach")
    assert proc.returncode == 0
    run_id = proc.stdout.split()[1]
    manager = RunManager(Workspace.resolve(ws))
    deadline = time.time() + 60
    while manager.get(run_id).get("status") != "running" and time.time() < deadline:
        time.sleep(0.1)
    stop = forgellm(ws, "stop", run_id)
    assert stop.returncode == 0 and "stopped" in stop.stdout
    info = manager.get(run_id)
    assert info["status"] == "stopped" and info["iteration"] in manager.folder(run_id).checkpoint_iterations()
    # a fork from that checkpoint with a changed learning rate records its parent
    change = tmp_path / "change.yaml"
    change.write_text(yaml.safe_dump({"learning_rate": 5e-4, "iters": info["iteration"] + 5}))
    fork = forgellm(ws, "train", str(change), "--resume", f"{run_id}@{info['iteration']}")
    assert fork.returncode == 0, fork.stdout + fork.stderr
    child = [r for r in manager.list() if r["id"] != run_id][0]
    assert child["parent"]["run"] == run_id and child["parent"]["iteration"] == info["iteration"]
    assert child["status"] == "completed" and child["iteration"] == info["iteration"] + 5


def test_invalid_config_exits_with_the_field_and_makes_no_run(tiny_model, chat_data, tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml.safe_dump(base_config(tiny_model, chat_data, learning_rate=3.0)))
    proc = forgellm(tmp_path / "ws", "train", str(cfg))
    assert proc.returncode == 2
    assert "learning_rate = 3.0: must be a number between 0 and 1" in proc.stderr
    assert not list((tmp_path / "ws" / "runs").iterdir())
