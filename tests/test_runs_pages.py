"""Runs, Run detail and Compare pages through NiceGUI's simulated user, with real services.

Two tiny runs are trained once per module in real workers; each test works on its own copy of that workspace.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from functools import partial
from pathlib import Path

import psutil
import pytest
from conftest import base_config
from nicegui import ui
from nicegui.testing import User, user_simulation
from uihelpers import el
from uihelpers import wait_for as _wait_for

from app.composition import build_services
from pages.shell import make_root
from services.training.folder import RunFolder
from services.training.manager import RunManager
from services.workspace import Workspace

wait_for = partial(_wait_for, timeout=10.0)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model, chat_data, cpt_corpus) -> tuple[Path, dict[str, str]]:
    """A workspace with two completed runs: ``ift`` (LoRA on chats) and ``cpt`` (DoRA on a corpus)."""
    ws = Workspace.resolve(tmp_path_factory.mktemp("runs-pages") / "ws")
    manager = RunManager(ws)
    ift = manager.launch(base_config(tiny_model, chat_data, name="ift-run", mode="ift", iters=20))
    cpt = manager.launch(base_config(tiny_model, cpt_corpus, name="cpt-run", mode="cpt", iters=20,
                                     fine_tune_type="dora", learning_rate=5e-4))
    for folder in (ift, cpt):
        assert manager.wait(folder.id, timeout=240)["status"] == "completed", folder.log_path.read_text()[-2000:]
    return ws.root, {"ift": ift.id, "cpt": cpt.id}


@pytest.fixture
def services(trained, tmp_path):
    root, _ = trained
    shutil.copytree(root, tmp_path / "ws", symlinks=True)
    s = build_services(tmp_path / "ws")
    yield s
    for info in s.manager.active():
        s.manager.stop(info["id"])
        s.manager.wait(info["id"], timeout=60)


@pytest.fixture
def ids(trained) -> dict[str, str]:
    return trained[1]


@pytest.fixture
async def user(services) -> User:
    async with user_simulation(make_root(services)) as u:
        yield u


def rows(user: User, marker: str = "runs-table") -> list[dict]:
    return list(el(user, marker).rows)


def names(user: User) -> list[str]:
    return sorted(r["name"] for r in rows(user))


def act(user: User, action: str, run_id: str) -> None:
    user.find(marker="runs-table").trigger("row_action", {"action": action, "id": run_id})


def record_navigation(user: User) -> list[str]:
    """Record ``ui.navigate.to`` targets instead of opening them (for pages that are heavy or not ours)."""
    targets: list[str] = []
    user.navigate.to = targets.append
    return targets


# ------------------------------------------------------------------------------------------ Runs page


async def test_runs_list_search_filters_label_and_resume(user: User, services, ids):
    await user.open("/runs")
    assert names(user) == ["cpt-run", "ift-run"]
    row = next(r for r in rows(user) if r["id"] == ids["cpt"])
    assert (row["status"], row["mode"], row["method"], row["model"]) == ("completed", "cpt", "dora", "tiny")
    assert row["best_val_loss"] is not None and row["best_text"].endswith("@ 20") and row["duration"] > 0
    user.find(marker="runs-search").type("cpt")
    await wait_for(lambda: names(user) == ["cpt-run"])
    user.find(marker="runs-search").clear()
    await wait_for(lambda: len(rows(user)) == 2)
    el(user, "runs-mode").value = ["ift"]
    await wait_for(lambda: names(user) == ["ift-run"])
    el(user, "runs-method").value = ["dora"]
    await wait_for(lambda: names(user) == [])
    el(user, "runs-mode").value = None
    el(user, "runs-method").value = None
    el(user, "runs-status").value = ["failed"]
    await wait_for(lambda: names(user) == [])
    el(user, "runs-status").value = ["completed"]
    await wait_for(lambda: len(rows(user)) == 2)
    # label: edit in the dialog, stored in run.json, searchable
    act(user, "label", ids["ift"])
    user.find(marker="label-input").type("baseline")
    user.find(marker="label-save").click()
    assert services.manager.get(ids["ift"])["label"] == "baseline"
    user.find(marker="runs-search").type("baseline")
    await wait_for(lambda: names(user) == ["ift-run"])
    # a completed run is not resumed: the reason is shown and nothing starts
    act(user, "resume", ids["ift"])
    await user.should_see("fork it from a checkpoint")
    assert services.manager.active() == []


async def test_delete_asks_and_removes_the_folder(user: User, services, ids):
    await user.open("/runs")
    folder = services.manager.folder(ids["cpt"]).path
    act(user, "delete", ids["cpt"])
    assert "removed for good" in el(user, "delete-text").text
    user.find(marker="delete-cancel").click()
    assert folder.exists()
    act(user, "delete", ids["cpt"])
    user.find(marker="delete-confirm").click()
    assert not folder.exists()
    await wait_for(lambda: names(user) == ["ift-run"])


async def test_delete_of_an_active_run_is_refused(user: User, services):
    sleeper = subprocess.Popen(["sleep", "60"])  # stands in for the run's worker
    try:
        folder = RunFolder(services.workspace.runs / "20990101-000000-live")
        folder.path.mkdir()
        folder.update(id=folder.id, name="live-run", status="running", pid=sleeper.pid,
                      pid_created=psutil.Process(sleeper.pid).create_time(), created=time.time())
        await user.open("/runs")
        await wait_for(lambda: "live-run" in names(user))
        act(user, "delete", folder.id)
        await user.should_see("Cannot delete live-run: it is running")
        assert not el(user, "delete-text").text  # no confirmation was offered
        with pytest.raises(ValueError, match="stop it before deleting"):
            services.manager.delete(folder.id)
        assert folder.path.exists()
        folder.update(status="stopped", pid=None)  # so that teardown does not try to stop it
    finally:
        sleeper.kill()
        sleeper.wait()


async def test_clone_fills_the_train_page(user: User, services, ids):
    await user.open("/runs")
    act(user, "clone", ids["cpt"])
    await wait_for(lambda: user.back_history[-1] == f"/train?from={ids['cpt']}")
    await user.should_see("Config is valid.")
    cfg = services.manager.folder(ids["cpt"]).config()
    assert el(user, "field-name").value == "cpt-run"
    assert el(user, "field-model").value == cfg["model"]
    assert el(user, "field-data").value == cfg["data"]
    assert (el(user, "field-mode").value, el(user, "field-fine_tune_type").value) == ("cpt", "dora")
    assert (el(user, "field-iters").value, el(user, "field-learning_rate").value) == (20, 5e-4)
    assert el(user, "field-num_layers").value == 2


async def test_fork_from_a_checkpoint(user: User, services, ids):
    await user.open("/runs")
    act(user, "fork", ids["ift"])
    assert el(user, "fork-checkpoint").value == services.manager.get(ids["ift"])["best"]["iteration"]
    el(user, "fork-checkpoint").value = 10
    el(user, "fork-iters").value = 10
    user.find(marker="fork-start").click()
    assert "above the checkpoint's 10" in el(user, "fork-problems").text
    el(user, "fork-iters").value = 15
    el(user, "fork-learning_rate").value = 2e-4
    user.find(marker="fork-start").click()
    fork = await wait_for(lambda: [r for r in services.manager.list() if r.get("parent")])
    info = services.manager.wait(fork[0]["id"], timeout=120)
    assert info["parent"]["run"] == ids["ift"] and info["parent"]["iteration"] == 10
    assert services.manager.folder(info["id"]).config()["learning_rate"] == 2e-4
    await user.open(f"/runs/{info['id']}")
    await user.should_see(marker="parent-link")
    assert el(user, "parent-link").props["href"] == f"/runs/{ids['ift']}"


# ------------------------------------------------------------------------------------------ Run detail


async def test_run_detail_checkpoints_charts_and_actions(user: User, services, ids):
    run_id = ids["ift"]
    info = services.manager.get(run_id)
    await user.open(f"/runs/{run_id}")
    await wait_for(lambda: el(user, "detail-status").text == "completed")
    table = rows(user, "checkpoints")
    assert [r["iteration"] for r in table] == [10, 20]
    assert [r["iteration"] for r in table if r["best"]] == [info["best"]["iteration"]]
    assert all(r["size_text"] != "?" and r["val_text"] != "–" for r in table)
    loss = el(user, "detail-loss").options["series"]
    assert [x for x, _ in loss[0]["data"]] == [5, 10, 15, 20] and [x for x, _ in loss[1]["data"]] == [0, 10, 20]
    assert sum("best" in m["name"] for m in loss[0]["markPoint"]["data"]) == 1
    assert el(user, "detail-perplexity").options["series"][1]["data"]
    assert "mode: ift" in el(user, "config").content
    await user.should_see(marker="split-stats")
    targets = record_navigation(user)
    user.find(marker="checkpoints").trigger("checkpoint_action", {"action": "chat", "iteration": 10})
    user.find(marker="checkpoints").trigger("checkpoint_action", {"action": "publish", "iteration": 20})
    user.find(marker="open-monitor").click()
    assert targets == [f"/playground?run={run_id}&iteration=10", f"/runs/{run_id}/publish?iteration=20",
                       f"/monitor/{run_id}"]


async def test_run_detail_of_unknown_run(user: User):
    await user.open("/runs/nope")
    await user.should_see("no such run")


# ------------------------------------------------------------------------------------------ Compare


async def test_compare_overlays_series_and_diffs_configs(user: User, services, ids):
    await user.open("/runs")
    table = el(user, "runs-table")
    assert not el(user, "runs-compare").enabled
    with user:
        table.selected = [r for r in table.rows]
    user.find(marker="runs-table").trigger("selection", {"rows": [], "keys": [], "added": True})
    await wait_for(lambda: el(user, "runs-compare").enabled)
    user.find(marker="runs-compare").click()
    await wait_for(lambda: user.back_history[-1].startswith("/compare?runs="))
    await user.should_see(marker="compare-summary")
    series = el(user, "compare-loss").options["series"]
    assert len(series) == 4 and all(s["data"] for s in series)
    assert {s["name"] for s in series} == {"ift-run train", "ift-run val", "cpt-run train", "cpt-run val"}
    diff = {r["key"]: r for r in rows(user, "compare-diff")}
    assert {"mode", "fine_tune_type", "learning_rate", "data", "name"} <= set(diff)
    assert "model" not in diff and "iters" not in diff and "batch_size" not in diff
    summary = rows(user, "compare-summary")
    best = [r["best_val_loss"] for r in summary]
    assert best == sorted(best) and [r["rank"] for r in summary] == [1, 2]
    # x axis: trained tokens (the last train point is the run's token count), then epochs
    el(user, "compare-axis").value = "tokens"
    await wait_for(lambda: el(user, "compare-loss").options["xAxis"]["name"] == "trained tokens")
    for run in ("ift", "cpt"):
        records = [r for r in services.manager.folder(ids[run]).metrics()[0] if r.get("type") == "train"]
        name = f"{run}-run train"
        data = next(s["data"] for s in el(user, "compare-loss").options["series"] if s["name"] == name)
        assert data[-1][0] == records[-1]["trained_tokens"]
    el(user, "compare-axis").value = "epoch"
    await wait_for(lambda: el(user, "compare-perplexity").options["xAxis"]["name"] == "epoch")
    val = el(user, "compare-perplexity").options["series"][1]["data"]
    assert val[0][0] == 0 and val[-1][0] > 0


async def test_compare_follows_a_run_that_reports_again(user: User, services, ids):
    await user.open(f"/compare?runs={ids['ift']},{ids['cpt']}")
    await user.should_see(marker="compare-summary")
    folder = services.manager.folder(ids["cpt"])
    last = [r for r in folder.metrics()[0] if r.get("type") == "train"][-1]
    # what a resumed worker appends: one more report, further on
    folder.append_metric({**last, "step": last["step"] + 5, "iteration": last["iteration"] + 5, "train_loss": 0.125,
                          "trained_tokens": last["trained_tokens"] + 100})

    def cpt_train() -> list:
        return next(s["data"] for s in el(user, "compare-loss").options["series"] if s["name"] == "cpt-run train")

    await wait_for(lambda: tuple(cpt_train()[-1]) == (last["iteration"] + 5, 0.125))
    await wait_for(lambda: next(r for r in rows(user, "compare-summary") if r["id"] == ids["cpt"])["final_text"]
                   == "0.1250")


async def test_compare_needs_two_runs(user: User, ids):
    await user.open(f"/compare?runs={ids['ift']},missing")
    await user.should_see("Not in the workspace: missing")
    await user.should_see(marker="compare-empty")
    with user:
        assert isinstance(el(user, "compare-runs"), ui.select)
