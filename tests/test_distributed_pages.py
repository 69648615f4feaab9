"""Distributed training in the app (NiceGUI ``User``): the Train page's Machines card, the Monitor's ranks table
and the Runs page's world size. The real 2-process run from the browser is tests/e2e/test_distributed.py."""

from __future__ import annotations

import socket
import subprocess
import time
from functools import partial

import psutil
import pytest
import test_pages
from nicegui.testing import User
from test_pages import fill_tiny_run, make_run, train
from uihelpers import el, els, set_value
from uihelpers import wait_for as _wait_for

from pages.train.form import config_to_form, default_form, form_to_config, hosts_text, parse_hosts
from services.config import parse_yaml
from services.training.folder import RunFolder

services, ui_user, tiny_in_workspace = test_pages.services, test_pages.ui_user, test_pages.tiny_in_workspace
wait_for = partial(_wait_for, timeout=10.0)
HOST = socket.gethostname()


def checks(user: User) -> list[str]:
    """The Machines card's lines, one per host, after a check."""
    return [e.text for e in els(user, "machine-check")]


def problems(user: User) -> str:
    return el(user, "problems").text


# ------------------------------------------------------------------------------------------ Machines card


async def test_machines_card_processes_check_and_bad_input(ui_user: User, services, tiny_in_workspace):
    await ui_user.open("/train")
    await fill_tiny_run(ui_user)
    assert els(ui_user, "field-backend") == []  # one machine: no backend to choose (hidden)
    set_value(ui_user, "field-processes", 2)
    await ui_user.should_see("Config is valid.")
    ui_user.find(marker="check-machines").click()
    await wait_for(lambda: checks(ui_user) == ["rank 0 · 127.0.0.1 · this machine · ready",
                                               "rank 1 · 127.0.0.1 · this machine · ready"])
    set_value(ui_user, "field-name", "renamed")  # not what a check looks at: the lines stay
    await ui_user.should_see("Config is valid.")
    assert len(checks(ui_user)) == 2

    set_value(ui_user, "field-batch_size", 3)  # the global batch must split over the processes
    await ui_user.should_see("batch_size = 3: is the global batch and must divide by the 2 processes of distributed")
    assert "divide by the 2 processes" in el(ui_user, "field-batch_size").error
    set_value(ui_user, "field-batch_size", 4)
    set_value(ui_user, "field-processes", 0)
    await ui_user.should_see("distributed.processes = 0: must be an integer ≥ 1")
    assert el(ui_user, "field-processes").error.startswith("must be an integer ≥ 1")
    ui_user.find(marker="check-machines").click()  # nothing to check while the config is wrong: it says so
    await ui_user.should_see("Fix the config first")
    ui_user.find(marker="start").click()
    await ui_user.should_see("Fix 1 problem(s) before starting")
    assert services.manager.list() == []  # nothing started


async def test_machines_card_hosts_each_checked_for_reachability(ui_user: User, services, tiny_in_workspace):
    await ui_user.open("/train")
    await fill_tiny_run(ui_user)
    # two Macs: this one, and one whose ssh name does not resolve (its bridge address is a documentation IP)
    set_value(ui_user, "field-hosts", "127.0.0.1\nmac-mini.invalid 192.0.2.7")
    await ui_user.should_see("Config is valid.")
    assert el(ui_user, "field-backend").visible and el(ui_user, "field-backend").value == "ring"
    ui_user.find(marker="check-machines").click()
    await wait_for(lambda: len(checks(ui_user)) == 2 and "checking" not in checks(ui_user)[0], timeout=30)
    local, remote = checks(ui_user)
    assert local == "rank 0 · 127.0.0.1 · this machine · ready"
    assert remote.startswith("rank 1 · mac-mini.invalid · over ssh · cannot run ")
    assert "over ssh mac-mini.invalid: ssh: Could not resolve hostname mac-mini.invalid" in remote
    assert "set up ssh keys and the same paths, see the README" in remote

    # bad input, named field by field: a host without an IP (ring needs one), one host only, both ways at once
    set_value(ui_user, "field-hosts", "mac-studio.local\n10.0.0.2")
    await wait_for(lambda: checks(ui_user) == [])  # the lines were for other hosts: gone
    await ui_user.should_see("distributed.hosts.0 = 'mac-studio.local': the ring backend needs the host's IP address")
    assert "needs the host's IP address" in el(ui_user, "field-hosts").error
    set_value(ui_user, "field-hosts", "10.0.0.2")
    await ui_user.should_see("must list at least two hosts")
    assert "at least two hosts" in el(ui_user, "field-hosts").error
    set_value(ui_user, "field-hosts", "10.0.0.1\n10.0.0.2")
    set_value(ui_user, "field-processes", 2)
    await ui_user.should_see("give either processes (on this machine) or hosts (several machines)")
    assert "either processes" in el(ui_user, "field-processes").error
    ui_user.find(marker="start").click()
    await ui_user.should_see("before starting")
    assert services.manager.list() == []


def test_hosts_field_to_config_and_back():
    form = {**default_form(), "model": "m", "data": "d", "hosts": "mac-studio.local 10.0.0.1\n\n10.0.0.2, \n",
            "backend": "jaccl"}
    cfg = form_to_config(form)
    assert cfg["distributed"] == {"hosts": [{"ssh": "mac-studio.local", "ips": ["10.0.0.1"]}, "10.0.0.2"],
                                  "backend": "jaccl"}
    back = config_to_form(cfg)
    assert back["hosts"] == "mac-studio.local 10.0.0.1\n10.0.0.2" and back["backend"] == "jaccl"
    assert "distributed" not in back["extra"]
    assert form_to_config({**form, "hosts": "  \n"}).get("distributed") is None
    assert parse_hosts("a 1.2.3.4 1.2.3.5") == [{"ssh": "a", "ips": ["1.2.3.4", "1.2.3.5"]}]
    # what the field cannot hold (a python path, rdma devices) stays YAML, untouched, for validation to judge
    yaml_cfg = parse_yaml("model: m\ndata: d\ndistributed:\n  hosts: [{ssh: a, ips: [10.0.0.1], rdma: [rdma_en3]}, "
                          "10.0.0.2]\n  backend: jaccl\n  python: /opt/venv/bin/python\n")
    kept = config_to_form(yaml_cfg)
    assert kept["hosts"] == "" and kept["extra"]["distributed"] == yaml_cfg["distributed"]
    assert form_to_config(kept)["distributed"] == yaml_cfg["distributed"]
    assert hosts_text([{"ssh": "a", "ips": ["10.0.0.1"], "rdma": ["x"]}]) == ""


# ------------------------------------------------------------------------------------------ Monitor: ranks


def beat(folder: RunFolder, rank: int, pid: int, age: float = 0.0) -> None:
    """``ranks/RANK.heartbeat`` as a rank writes it: time, pid, host."""
    (folder.path / "ranks").mkdir(exist_ok=True)
    (folder.path / "ranks" / f"{rank}.heartbeat").write_text(f"{time.time() - age:.3f} {pid} {HOST}\n")


def rank_rows(user: User) -> list[dict]:
    return list(el(user, "ranks").rows)


@pytest.fixture
def live_run(services):
    """A running 2-process run folder whose ranks are two live processes (each beats its heartbeat file)."""
    procs = [subprocess.Popen(["sleep", "120"]) for _ in range(3)]
    folder = make_run(services.manager, "20990101-000000-two")
    folder.write_config({"model": "m", "data": "d", "distributed": {"processes": 2}})
    folder.update(status="running", pid=procs[0].pid, pid_created=psutil.Process(procs[0].pid).create_time(),
                  world_size=2, iteration=5)
    yield folder, procs
    folder.update(status="stopped", pid=None)  # so that teardown does not try to stop it
    for p in procs:
        p.kill()
        p.wait()


async def test_ranks_table_shows_each_rank_and_a_dead_one(ui_user: User, services, live_run):
    folder, procs = live_run
    beat(folder, 0, procs[1].pid)
    beat(folder, 1, procs[2].pid)
    folder.append_metric({**train(5, 2.5), "tokens_per_second": 300.0, "ranks": [
        {"rank": 0, "tokens_per_second": 151.25, "peak_memory_gb": 0.5, "rss_gb": 0.75},
        {"rank": 1, "tokens_per_second": 148.75, "peak_memory_gb": 0.25, "rss_gb": 0.625}]})
    await ui_user.open(f"/monitor/{folder.id}")
    await ui_user.should_see("Ranks (2 processes)")
    await wait_for(lambda: len(rank_rows(ui_user)) == 2 and rank_rows(ui_user)[1]["tokens_per_second"] != "–")
    first, second = rank_rows(ui_user)
    assert {k: first[k] for k in ("rank", "host", "pid", "status", "tokens_per_second", "peak_memory_gb",
                                  "rss_gb")} == {"rank": 0, "host": "127.0.0.1", "pid": procs[1].pid,
                                                 "status": "training", "tokens_per_second": "151",
                                                 "peak_memory_gb": "0.50 GB", "rss_gb": "0.75 GB"}
    assert (second["status"], second["tokens_per_second"], second["peak_memory_gb"], second["rss_gb"]) == (
        "training", "149", "0.25 GB", "0.62 GB")
    assert first["heartbeat"].endswith("s ago") and first["color"] == "positive"

    procs[2].kill()  # rank 1's process dies: no report comes any more, the table still says so
    procs[2].wait()
    await wait_for(lambda: rank_rows(ui_user)[1]["status"] == "dead")
    assert rank_rows(ui_user)[1]["color"] == "negative" and rank_rows(ui_user)[0]["status"] == "training"
    beat(folder, 0, procs[1].pid, age=60)  # a rank (on another host, say) that stopped beating
    await wait_for(lambda: rank_rows(ui_user)[0]["status"] == "silent")

    folder.update(status="interrupted", reason="rank 1 (pid 1) ended after iteration 5", pid=None)
    await wait_for(lambda: [r["status"] for r in rank_rows(ui_user)] == ["ended", "ended"])


async def test_ranks_table_before_the_first_report_and_not_for_one_process(ui_user: User, services, live_run):
    folder, procs = live_run
    beat(folder, 0, procs[1].pid)  # rank 1 has not beaten yet
    await ui_user.open(f"/monitor/{folder.id}")
    await wait_for(lambda: [r["status"] for r in rank_rows(ui_user)] == ["training", "starting"])
    assert [r["tokens_per_second"] for r in rank_rows(ui_user)] == ["–", "–"] and rank_rows(ui_user)[1]["pid"] == "–"
    single = make_run(services.manager, "20990101-000001-one")
    single.write_config({"model": "m", "data": "d"})
    await ui_user.open(f"/monitor/{single.id}")
    await wait_for(lambda: el(ui_user, "status").text == "completed")
    await ui_user.should_not_see("Ranks (1 processes)")  # one process: no ranks table


# ------------------------------------------------------------------------------------------ Runs: world size


async def test_runs_page_shows_the_world_size(ui_user: User, services):
    two = make_run(services.manager, "20990101-000000-two")
    two.update(world_size=2)
    make_run(services.manager, "20990101-000001-one")  # a run before distributed existed has no world_size
    await ui_user.open("/runs")
    await wait_for(lambda: len(el(ui_user, "runs-table").rows) == 2)
    sizes = {r["id"]: r["world_size"] for r in el(ui_user, "runs-table").rows}
    assert sizes == {"20990101-000000-two": 2, "20990101-000001-one": 1}
    assert any(c["name"] == "world_size" and c["label"] == "Processes" for c in el(ui_user, "runs-table").columns)
