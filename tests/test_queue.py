"""The training queue: waiting runs start one after another, handed over by the worker that ends (no app
needed), or by whoever finds a dead worker; a waiting run can leave the queue or start at once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import yaml
from conftest import base_config

from services.training.folder import ACTIVE, WAITING


def wait_status(manager, run_id: str, statuses: tuple[str, ...], timeout: float = 240) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        info = manager.get(run_id)
        if info.get("status") in statuses:
            return info
        time.sleep(0.2)
    raise AssertionError(f"{run_id} is {manager.get(run_id).get('status')}, not one of {statuses}")


def test_waiting_runs_start_one_after_another(manager, tiny_model, chat_data, tmp_path):
    a, b = (manager.enqueue(base_config(tiny_model, chat_data, name=n, iters=20)) for n in "ab")
    assert manager.get(a.id)["status"] in ACTIVE  # nothing was running: the first starts at once
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(base_config(tiny_model, chat_data, name="c", iters=20)))
    cli = subprocess.run([sys.executable, "-m", "app.cli", "--workspace", str(manager.workspace.root), "train",
                          str(config), "--queue"], capture_output=True, text=True, timeout=120)
    assert cli.returncode == 0 and "waiting in the training queue (2 waiting)" in cli.stdout, cli.stdout + cli.stderr
    c = manager.folder(cli.stdout.split()[1])
    assert [r["id"] for r in manager.waiting()] == [b.id, c.id]
    manager.stop(c.id)
    assert manager.get(c.id)["status"] == "stopped" and "queue" in manager.get(c.id)["reason"]
    first = wait_status(manager, a.id, ("completed",))
    second = wait_status(manager, b.id, ("completed",))  # handed over by a's worker: this process did nothing
    assert second["started"] >= first["ended"]  # never side by side
    assert f"started the next run in the queue: {b.id}" in a.log_path.read_text()
    assert manager.get(c.id)["status"] == "stopped" and "started" not in manager.get(c.id)
    assert manager.waiting() == []


def test_a_dead_worker_hands_over_through_whoever_finds_it(manager, tiny_model, chat_data):
    a = manager.enqueue(base_config(tiny_model, chat_data, name="long", iters=2000, save_every=1000,
                                    steps_per_eval=1000))
    b = manager.enqueue(base_config(tiny_model, chat_data, name="next", iters=10))
    pid = wait_status(manager, a.id, ("running",), timeout=120)["pid"]
    assert manager.get(b.id)["status"] == WAITING
    os.kill(pid, signal.SIGKILL)
    time.sleep(0.3)
    assert manager.get(a.id)["status"] == "interrupted"  # found dead: the next one starts
    assert wait_status(manager, b.id, ("completed",))["status"] == "completed"


def test_a_waiting_run_can_start_at_once(manager, tiny_model, chat_data):
    a = manager.enqueue(base_config(tiny_model, chat_data, name="first", iters=2000, save_every=1000,
                                    steps_per_eval=1000))
    b = manager.enqueue(base_config(tiny_model, chat_data, name="eager", iters=10))
    assert manager.get(b.id)["status"] == WAITING
    manager.resume(b.id)  # "start now", next to the active run
    assert wait_status(manager, b.id, ("completed",))["status"] == "completed"
    manager.stop(a.id)
    assert manager.wait(a.id)["status"] == "stopped"


# The end of a worker started before services moved into rooms, verbatim (its _hand_over), in a process that
# still holds pre-move modules: the old ``services.run_folder`` and a ``services.workspace`` without what the
# move added.
PRE_MOVE_WORKER_END = """
import pathlib, sys, types
from services.workspace import Workspace
import services.workspace as ws_mod
del ws_mod.disk_size, ws_mod.files_stamp
sys.modules["services.run_folder"] = types.ModuleType("services.run_folder")
from services.runs import RunManager
print("started", RunManager(Workspace(pathlib.Path(sys.argv[1]).resolve())).start_next())
"""


def test_a_worker_started_before_the_move_still_hands_the_queue_on(manager, tiny_model, chat_data):
    b = manager.create(base_config(tiny_model, chat_data, name="after-upgrade", iters=10), status=WAITING)
    assert manager.get(b.id)["status"] == WAITING
    out = subprocess.run([sys.executable, "-c", PRE_MOVE_WORKER_END, str(manager.workspace.root)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and f"started {b.id}" in out.stdout, out.stdout + out.stderr
    assert wait_status(manager, b.id, ("completed",))["status"] == "completed"


def test_ended_workers_are_reaped_so_a_long_lived_app_keeps_no_zombies(manager, tiny_model, chat_data):
    import psutil

    runs = [manager.launch(base_config(tiny_model, chat_data, name="z1", iters=2))]
    manager.wait(runs[0].id)
    runs.append(manager.launch(base_config(tiny_model, chat_data, name="z2", iters=2)))
    manager.wait(runs[1].id)
    time.sleep(1.0)  # the workers exit a moment after their runs are recorded as ended
    pids = {manager._procs[r.id].pid for r in runs if r.id in manager._procs}  # noqa: SLF001
    manager.list()
    zombies = [p.pid for p in psutil.Process().children() if p.pid in pids and p.status() == psutil.STATUS_ZOMBIE]
    assert zombies == [] and not manager._procs  # noqa: SLF001
