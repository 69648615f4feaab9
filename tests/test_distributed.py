"""Distributed training on mx.distributed (ring over loopback, two processes launched by mlx.launch)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml
from conftest import base_config
from test_engine import REPO, reports, run_to_end, tensors_equal

from services import config as config_mod
from services.config import ConfigProblems
from services.training import distributed
from services.training.folder import RunFolder

TWO = {"distributed": {"processes": 2}}


def short(model: Path, data: Path, **over) -> dict:
    """A short run: 20 iterations, reports every 5, validation every 10."""
    return base_config(model, data, iters=20, steps_per_report=5, steps_per_eval=10, save_every=10, **over)


def fields(errors: ConfigProblems) -> dict[str, str]:
    return {e.field: e.reason for e in errors.errors}


def test_config_names_every_bad_distributed_field():
    with pytest.raises(ConfigProblems) as e:
        config_mod.resolve({"model": "m", "data": "d", "batch_size": 3, "distributed": {"processes": 2}})
    assert "global batch" in fields(e.value)["batch_size"]
    with pytest.raises(ConfigProblems) as e:
        config_mod.resolve({"model": "m", "data": "d", "distributed": {"hosts": ["mac1.local", "10.0.0.2"],
                                                                        "backend": "tcp", "python": "python3",
                                                                        "gpus": 2}})
    bad = fields(e.value)
    assert set(bad) == {"distributed.gpus", "distributed.backend", "distributed.python"}
    with pytest.raises(ConfigProblems) as e:
        config_mod.resolve({"model": "m", "data": "d", "distributed": {"hosts": ["mac1.local", "10.0.0.2"]}})
    assert "IP address" in fields(e.value)["distributed.hosts.0"]  # ring needs an IP; the second one is one
    with pytest.raises(ConfigProblems) as e:
        config_mod.resolve({"model": "m", "data": "d", "distributed": {"processes": 2, "hosts": ["a", "b"]}})
    assert "either processes" in fields(e.value)["distributed"]
    cfg = config_mod.resolve({"model": "m", "data": "d", "distributed": {
        "hosts": [{"ssh": "mac1.local", "ips": ["10.0.0.1"]}, "10.0.0.2"], "python": "/opt/venv/bin/python"}})
    assert config_mod.world_size(cfg) == 2
    assert distributed.hosts(cfg) == [{"ssh": "mac1.local", "ips": ["10.0.0.1"]}, {"ssh": "10.0.0.2",
                                                                                    "ips": ["10.0.0.2"]}]


def test_hostfile_and_launch_command(tmp_path):
    folder = RunFolder(tmp_path)
    cfg = {"distributed": {"processes": 2}}
    cmd = distributed.launch_command(folder, cfg, sys.executable, tmp_path / "checkpoints" / "0000010")
    hostfile = json.loads((tmp_path / "hostfile.json").read_text())
    assert hostfile["backend"] == "ring" and [h["ips"] for h in hostfile["hosts"]] == [["127.0.0.1"]] * 2
    assert "FORGELLM_MLX_PROCESSES=2" in hostfile["envs"]  # the two ranks share this host's cores
    assert cmd[0].endswith("mlx.launch") and cmd[cmd.index("--python") + 1] == sys.executable
    assert cmd[cmd.index("--") + 1:] == ["-m", "services.training.worker", str(tmp_path), "--resume",
                                         str(tmp_path / "checkpoints" / "0000010")]


def test_preflight_of_local_processes_names_a_missing_path(tiny_model, tmp_path):
    ok = distributed.preflight({"model": str(tiny_model), "data": str(tiny_model), **TWO})
    assert [c["ok"] for c in ok] == [True, True] and all(c["local"] for c in ok)
    bad = distributed.preflight({"model": str(tmp_path / "gone"), "data": str(tiny_model), **TWO})
    assert not bad[0]["ok"] and bad[0]["problems"] == [f"{tmp_path / 'gone'} does not exist"]


def ranks_of(folder: RunFolder) -> list[dict]:
    return [r["ranks"] for r in reports(folder, "train")]


def test_two_processes_equal_one_process_with_the_same_global_batch(manager, tiny_model, chat_data):
    # ForgeLLM IFT: samples of different lengths, so the two ranks' token counts differ in most batches
    cfg = short(tiny_model, chat_data, mode="ift", name="single", learning_rate=1e-4)
    one = run_to_end(manager, cfg)
    two = run_to_end(manager, {**cfg, **TWO, "name": "two"})
    a_train, b_train = reports(one, "train"), reports(two, "train")
    a_val, b_val = reports(one, "val"), reports(two, "val")
    assert [r["iteration"] for r in a_train] == [r["iteration"] for r in b_train] == [5, 10, 15, 20]
    assert [r["iteration"] for r in a_val] == [r["iteration"] for r in b_val] == [0, 10, 20]
    diffs = [abs(a[k] - b[k]) for k, x, y in (("train_loss", a_train, b_train), ("val_loss", a_val, b_val))
             for a, b in zip(x, y, strict=True)]
    print("largest |1 process - 2 processes| loss difference:", max(diffs))
    assert max(diffs) <= 1e-5, diffs  # sums reduced across ranks: equal up to float32 reassociation
    assert [r["trained_tokens"] for r in a_train] == [r["trained_tokens"] for r in b_train]
    per_rank = ranks_of(two)
    assert all(len(r) == 2 and all(x["tokens_per_second"] > 0 for x in r) for r in per_rank)
    assert two.info()["checkpoints"][-1]["iteration"] == 20
    assert (two.path / "ranks" / "1.log").exists() and not (two.path / "ranks" / "1.stats.json").read_text() == ""


def mlx_launch_reference(cfg: dict, tmp_path: Path) -> list[dict]:
    """Reports of ``mlx.launch -n 2 --backend ring -- PYTHON tests/mlx_reference.py`` (mlx-lm's own trainer)."""
    cfg_path = tmp_path / "mlx.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    launcher = Path(sys.executable).with_name("mlx.launch")
    proc = subprocess.run([str(launcher), "-n", "2", "--backend", "ring", "--", sys.executable,
                           str(REPO / "tests" / "mlx_reference.py"), str(cfg_path), str(tmp_path / "mlx_adapters")],
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(x) for x in proc.stdout.splitlines() if x.startswith('{"type"')]


def test_two_processes_match_mlx_lm_under_mlx_launch_report_for_report(manager, tiny_model, chat_data, tmp_path):
    cfg = short(tiny_model, chat_data, mask_prompt=True)
    ref = mlx_launch_reference(cfg, tmp_path)
    ours = run_to_end(manager, {**cfg, **TWO})
    ref_train = [r for r in ref if r["type"] == "train"]
    ref_val = [r for r in ref if r["type"] == "val"]
    assert [r["iteration"] for r in reports(ours, "train")] == [r["iteration"] for r in ref_train] == [5, 10, 15, 20]
    assert [r["iteration"] for r in reports(ours, "val")] == [r["iteration"] for r in ref_val] == [0, 9, 19]
    for a, b in zip(reports(ours, "train"), ref_train, strict=True):
        assert a["train_loss"] == b["train_loss"] and a["trained_tokens"] == b["trained_tokens"]
    for a, b in zip(reports(ours, "val"), ref_val, strict=True):
        assert a["val_loss"] == b["val_loss"]
    tensors_equal(ours.path / "adapters.safetensors", tmp_path / "mlx_adapters" / "adapters.safetensors")


@pytest.fixture(scope="module")
def straight(tmp_path_factory, tiny_model, cpt_corpus):
    """A 2-process CPT run straight through (the reference for stop/resume and kill -9)."""
    from services.training.manager import RunManager
    from services.workspace import Workspace

    manager = RunManager(Workspace.resolve(tmp_path_factory.mktemp("ws-dist")))
    cfg = base_config(tiny_model, cpt_corpus, mode="cpt", max_seq_length=48, iters=60, steps_per_report=5,
                      steps_per_eval=20, save_every=10, **TWO)
    try:
        yield cfg, run_to_end(manager, cfg)
    finally:  # a run that outlived its wait (a busy machine) must not train on after the tests
        for info in manager.active():
            manager.stop(info["id"])
            manager.wait(info["id"], timeout=60)


def final_equal(folder: RunFolder, ref: RunFolder, it: int) -> None:
    for name in ("adapters.safetensors", "optimizer.safetensors"):
        tensors_equal(folder.checkpoint_dir(it) / name, ref.checkpoint_dir(it) / name)
    ours = [(r["iteration"], r["train_loss"]) for r in reports(folder, "train")]
    assert ours == [(r["iteration"], r["train_loss"]) for r in reports(ref, "train")]
    assert [r["val_loss"] for r in reports(folder, "val")] == [r["val_loss"] for r in reports(ref, "val")]


def wait_for(predicate, timeout: float = 180.0, what: str = "condition") -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_stop_and_resume_of_two_processes_is_bitwise_identical(manager, straight):
    cfg, ref = straight
    folder = manager.launch(cfg)
    wait_for(lambda: any(r["iteration"] >= 15 for r in reports(folder, "train")), what="iteration 15")
    manager.stop(folder.id)
    info = manager.wait(folder.id)
    assert info["status"] == "stopped", info
    k = info["iteration"]
    assert 15 <= k < 60 and folder.checkpoint_iterations()[-1] == k  # one final checkpoint, at the agreed step
    assert f"stopped at iteration {k}" in (folder.path / "ranks" / "1.log").read_text()  # rank 1 stopped there too
    manager.resume(folder.id)
    info = manager.wait(folder.id)
    assert info["status"] == "completed", info
    final_equal(folder, ref, 60)


def run_pids(folder: RunFolder) -> list[int]:
    return [b[1] for b in (distributed.read_beat(p) for p in sorted((folder.path / "ranks").glob("*.heartbeat")))
            if b]


def test_kill_9_of_rank_1_interrupts_the_run_leaves_no_process_and_resumes(manager, straight):
    cfg, ref = straight
    folder = manager.launch(cfg)
    wait_for(lambda: folder.checkpoint_iterations(), what="a checkpoint")
    launcher = manager._procs[folder.id]
    pids = run_pids(folder)
    assert len(pids) == 2
    rank1 = distributed.read_beat(folder.path / "ranks" / "1.heartbeat")[1]
    os.kill(rank1, signal.SIGKILL)
    wait_for(lambda: manager.get(folder.id)["status"] == "interrupted", timeout=distributed.PEER_TIMEOUT + 10,
             what="the run marked interrupted")
    info = manager.get(folder.id)
    assert "rank 1" in info["reason"] and "resume from checkpoint" in info["reason"], info["reason"]
    launcher.wait(timeout=30)
    wait_for(lambda: not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
                             for p in pids), timeout=30, what="every rank gone")
    manager.resume(folder.id)
    info = manager.wait(folder.id)
    assert info["status"] == "completed", info
    final_equal(folder, ref, 60)
