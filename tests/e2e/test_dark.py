"""Dark mode as the system asks for it: the page and its charts (grid lines that read on a dark page)."""

from __future__ import annotations

import pytest
from conftest import shot
from playwright.sync_api import expect


@pytest.fixture(scope="module")
def finished_run(e2e_workspace) -> str:
    from services.training.manager import RunManager
    from services.workspace import Workspace

    manager = RunManager(Workspace(e2e_workspace))
    ws = e2e_workspace
    cfg = {"model": str(ws / "models" / "tiny-llama"), "data": str(ws / "datasets" / "sample-cpt"),
           "num_layers": 2, "mode": "cpt", "name": "dark", "iters": 10, "batch_size": 2, "max_seq_length": 64,
           "save_every": 5, "steps_per_eval": 5, "steps_per_report": 2, "val_batches": 1}
    folder = manager.launch(cfg)
    assert manager.wait(folder.id, timeout=240)["status"] == "completed"
    return folder.id


def test_a_dark_system_gets_a_dark_monitor_with_readable_charts(browser, base_url, finished_run):
    context = browser.new_context(color_scheme="dark", viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.goto(f"{base_url}/monitor/{finished_run}")
    expect(page.locator("body.body--dark")).to_have_count(1, timeout=15_000)
    page.wait_for_timeout(1500)  # the charts draw
    expect(page.locator("canvas").first).to_be_visible()
    shot(page, "dark-monitor")
    context.close()
