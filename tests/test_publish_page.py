"""Publish page and model card page through NiceGUI's simulated user, with real services and a real publish.

One tiny LoRA run is trained once per module; each test works on its own copy of that workspace. The publish
itself runs the publish worker (``python -m services.publishing.worker``) in a child process, as in the app.
"""

from __future__ import annotations

import asyncio
import shutil
from functools import partial
from pathlib import Path

import pytest
from conftest import base_config
from nicegui import ui
from nicegui.testing import User, user_simulation
from uihelpers import el
from uihelpers import wait_for as _wait_for

from app.composition import build_services
from pages.shell import make_root
from services.publishing.rules import PublishError
from services.training.manager import RunManager
from services.workspace import Workspace

wait_for = partial(_wait_for, timeout=120.0)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model, chat_data) -> tuple[Path, str]:
    ws = Workspace.resolve(tmp_path_factory.mktemp("publish-page") / "ws")
    manager = RunManager(ws)
    folder = manager.launch(base_config(tiny_model, chat_data, name="pub-run", mode="ift", iters=20))
    assert manager.wait(folder.id, timeout=240)["status"] == "completed", folder.log_path.read_text()[-2000:]
    return ws.root, folder.id


@pytest.fixture
def services(trained, tmp_path):
    root, _ = trained
    shutil.copytree(root, tmp_path / "ws", symlinks=True)
    s = build_services(tmp_path / "ws")
    yield s
    s.publisher_jobs.stop()
    s.models.unload()


@pytest.fixture
async def user(services) -> User:
    async with user_simulation(make_root(services)) as u:
        yield u


async def test_publish_from_the_page_shows_parity_pass_and_the_model_card(user: User, services, trained):
    _, run_id = trained
    best = services.manager.get(run_id)["best"]["iteration"]
    await user.open(f"/runs/{run_id}/publish")
    await user.should_see("Publish a checkpoint")
    assert el(user, "publish-checkpoint").value == best
    assert "best validation loss" in el(user, "checkpoint-why").text.lower()
    name = el(user, "publish-name")
    assert name.value == f"pub-run-{best}" and not name.error

    user.find(marker="publish-name").clear().type("tiny-pub")
    user.find(marker="publish-go").click()
    jobs = services.publisher_jobs
    await wait_for(lambda: jobs.jobs() and jobs.jobs()[-1]["status"] != "running")
    job = jobs.jobs()[-1]
    assert job["status"] == "done", jobs.get(job["id"])["log"]
    await user.should_see(marker="parity-result", retries=30)
    assert el(user, "parity-verdict").text == "PASS"
    assert el(user, "publish-phase").text == "Done"
    assert el(user, "publish-go").enabled, el(user, "publish-go")._props
    checks = el(user, "parity-checks").rows
    assert checks and all(r["result"] == "ok" for r in checks)
    card = el(user, "model-card-text").content
    assert "# tiny-pub" in card and "Parity check" in card and "data:image/svg+xml;base64," in card
    published = services.workspace.published / "tiny-pub"
    assert el(user, "published-path").text == str(published)
    assert (published / "README.md").is_file() and (published / "config.json").is_file()
    user.find(marker="publish-name").clear().type("tiny-pub")  # the name is taken now
    await asyncio.sleep(0.1)
    assert "already exists" in (el(user, "publish-name").error or "")
    assert job["result"]["reason"].startswith("best validation loss")  # the default was published as "the best"

    # the published model is offered by the Train page's and the Playground's model pickers
    await user.open("/train")
    await user.should_see("Start training")
    with user:
        models = next(iter(user.find(marker="field-model").elements))
    assert "published/tiny-pub" in models.options
    await user.open("/playground?model=published/tiny-pub")
    await user.should_see("Playground")
    assert el(user, "model").value == str(published.resolve())
    assert el(user, "adapter").value == "none"

    # and its card can be opened later
    await user.open("/published/tiny-pub")
    await user.should_see(marker="model-card")
    assert el(user, "parity-verdict").text == "PASS"
    assert "# tiny-pub" in el(user, "model-card-text").content


async def test_a_bad_name_is_refused_inline_and_nothing_is_published(user: User, services, trained):
    _, run_id = trained
    await user.open(f"/runs/{run_id}/publish?iteration=10")
    await user.should_see("Publish a checkpoint")
    assert el(user, "publish-checkpoint").value == 10
    assert "the best is" in el(user, "checkpoint-why").text
    user.find(marker="publish-name").clear().type("../x")
    await asyncio.sleep(0.1)
    assert "plain folder name" in (el(user, "publish-name").error or "")
    user.find(marker="publish-go").click()
    await asyncio.sleep(0.5)
    assert services.publisher_jobs.jobs() == []
    await user.should_not_see(marker="publish-progress")
    assert list(services.workspace.published.iterdir()) == []
    assert not (services.workspace.root / "x").exists() and not (services.workspace.root.parent / "x").exists()

    # a good name, but an option the base model cannot do: refused next to the form, nothing starts
    user.find(marker="publish-name").clear().type("fine-name")
    el(user, "publish-gguf").set_value("q8_0")
    el(user, "publish-quantize").set_value(4)
    await asyncio.sleep(0.1)
    assert "GGUF export needs float weights" in el(user, "options-error").text
    user.find(marker="publish-go").click()
    await asyncio.sleep(0.3)
    assert services.publisher_jobs.jobs() == []


async def test_unknown_run_and_unknown_card(user: User):
    await user.open("/runs/no-such-run/publish")
    await user.should_see(marker="run-missing")
    await user.open("/published/.hidden")
    await user.should_see(marker="published-missing")
    await user.should_not_see(kind=ui.markdown)


async def test_publish_jobs_refuse_bad_names_up_front_and_report_the_publishers_error(services):
    jobs = services.publisher_jobs
    for bad in ("../x", "", "a/b", ".hidden"):
        with pytest.raises(PublishError):
            jobs.start("whatever", None, bad)
    with pytest.raises(PublishError, match="quantize_bits"):
        jobs.start("whatever", None, "fine", {"quantize_bits": 3})
    assert jobs.jobs() == []
    job_id = jobs.start("no-such-run", None, "fine")  # the child process says why: a JSON error line, exit 2
    await wait_for(lambda: jobs.get(job_id)["status"] != "running", timeout=60)
    job = jobs.get(job_id)
    assert job["status"] == "failed" and job["returncode"] == 2 and "no-such-run" in job["error"], job
    assert list(services.workspace.published.iterdir()) == []


async def test_a_cancelled_publish_failed_and_says_so_and_one_runs_at_a_time(services, trained):
    _, run_id = trained
    jobs = services.publisher_jobs
    job_id = jobs.start(run_id, None, "gone")
    with pytest.raises(PublishError, match="another publish is running"):
        jobs.start(run_id, None, "second")
    assert jobs.cancel(job_id)
    await wait_for(lambda: jobs.get(job_id)["status"] != "running", timeout=60)
    job = jobs.get(job_id)
    assert job["status"] == "failed" and job["error"] == "cancelled", job
    assert not (services.workspace.published / "gone").exists()
