"""The shell's status strip and the Monitor read a running run's progress from one source (its RunWatcher)."""

from __future__ import annotations

import subprocess
from functools import partial

import psutil
import pytest
from nicegui import ui
from nicegui.testing import user_simulation
from uihelpers import el
from uihelpers import wait_for as _wait_for

from app.composition import build_services
from pages.shell import make_root, status_texts
from services.training.folder import RunFolder

wait_for = partial(_wait_for, timeout=10.0)


def train(it: int) -> dict:
    return {"type": "train", "step": it, "iteration": it, "train_loss": 3.0 - it / 100, "learning_rate": 1e-4}


@pytest.fixture
def services(workspace):
    s = build_services(workspace)
    yield s
    s.close()


@pytest.fixture
def running(services):
    """A run whose run.json says iteration 0 of 600 (it is rewritten at checkpoints) while it has reported 30;
    a live process stands in for its worker."""
    proc = subprocess.Popen(["sleep", "60"])
    folder = RunFolder(services.workspace.runs / "live")
    folder.path.mkdir(parents=True)
    folder.update(id="live", name="live", status="running", iters=600, iteration=0, checkpoints=[], best=None,
                  pid=proc.pid, pid_created=psutil.Process(proc.pid).create_time())
    for it in range(5, 35, 5):
        folder.append_metric(train(it))
    yield folder
    proc.kill()
    proc.wait()
    folder.update(status="stopped")


def test_the_status_board_follows_the_watcher_not_run_json(services, running):
    active = services.status.snapshot()["active"]
    assert active["id"] == "live" and active["status"] == "running"
    assert active["iteration"] == services.watchers.get("live").latest()["iteration"] == 30
    assert status_texts(services.status.snapshot())[0] == "▶ live · running · 30/600 (5%)"
    running.append_metric(train(35))  # within the cache's lifetime: the run list is cached, its progress is not
    services.watchers.get("live").poll(force=True)
    assert services.status.snapshot()["active"]["iteration"] == 35


async def test_strip_and_monitor_show_the_same_iteration(services, running):
    async with user_simulation(make_root(services)) as user:
        await user.open("/monitor/live")
        await wait_for(lambda: "iteration 30 / 600" in el(user, "progress-text").text)
        await wait_for(lambda: el(user, "status-run").text == "▶ live · running · 30/600 (5%)")


@pytest.mark.parametrize(("status", "enabled"), [("completed", False), ("interrupted", True)])
async def test_monitor_resume_follows_the_resume_rule(services, status, enabled):
    folder = RunFolder(services.workspace.runs / "done")
    folder.path.mkdir(parents=True)
    folder.update(id="done", name="done", status=status, iters=100, iteration=10,
                  checkpoints=[{"iteration": 10, "val_loss": 2.0}], best=None)
    (folder.checkpoints / "0000010").mkdir(parents=True)
    async with user_simulation(make_root(services)) as user:
        await user.open("/monitor/done")
        await wait_for(lambda: el(user, "status").text == status)
        assert el(user, "resume").enabled is enabled


async def test_theme_follows_the_system_until_a_person_picks_one(services):
    from nicegui import app

    async with user_simulation(make_root(services)) as user:
        await user.open("/train")
        await user.should_see(marker="dark-toggle")
        with user:
            dark = next(e for e in user.client.elements.values() if isinstance(e, ui.dark_mode))
        assert dark.value is None  # a fresh browser: as the operating system says
        seen = []
        for _ in range(3):
            user.find(marker="dark-toggle").click()
            seen.append((dark.value, app.storage.user.get("dark_mode")))
        assert seen == [(True, True), (False, False), (None, None)]  # dark, light, then the system's again


async def test_a_phone_gets_one_menu_button_that_reaches_the_pages(services):
    async with user_simulation(make_root(services)) as user:
        await user.open("/train")
        await user.should_see(marker="nav-menu")
        user.find(marker="nav-menu").click()
        user.find(marker="menu-monitor").click()
        await user.should_see("No runs yet.")
        user.find(marker="nav-menu").click()
        user.find(marker="menu-train").click()
        await user.should_see(marker="start")
