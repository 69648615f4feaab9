"""A person compares two runs, opens the better one and publishes its best checkpoint (with a q8_0 GGUF), then reads
the model card."""

from __future__ import annotations

import re

import pytest
from conftest import shot
from playwright.sync_api import Page, expect


@pytest.fixture(scope="module")
def two_runs(e2e_workspace) -> dict[str, dict]:
    """Two tiny LoRA runs on the sample chats that differ only in learning rate; name → run.json."""
    from services.training.manager import RunManager
    from services.workspace import Workspace

    ws = Workspace.resolve(e2e_workspace)
    manager = RunManager(ws)
    common = {"model": str(ws.models / "tiny-llama"), "data": str(ws.datasets / "sample-ift"), "mode": "ift",
              "fine_tune_type": "lora", "seed": 0, "num_layers": 2, "batch_size": 4, "iters": 20, "val_batches": 2,
              "steps_per_report": 5, "steps_per_eval": 10, "save_every": 10, "max_seq_length": 128,
              "lora_parameters": {"rank": 8, "dropout": 0.0, "scale": 20.0}}
    folders = {name: manager.launch({**common, "name": name, "learning_rate": lr})
               for name, lr in (("pub-fast", 2e-3), ("pub-slow", 1e-5))}
    out = {}
    for name, folder in folders.items():
        info = manager.wait(folder.id, timeout=300)
        assert info["status"] == "completed", folder.log_path.read_text()[-2000:]
        out[name] = info
    return out


def test_compare_open_the_better_run_publish_its_best_checkpoint_and_read_the_card(page: Page, two_runs):
    better, worse = sorted(two_runs, key=lambda n: two_runs[n]["best"]["val_loss"])
    best_it = two_runs[better]["best"]["iteration"]

    page.goto("/runs")
    for name in (better, worse):
        row = page.get_by_role("row").filter(has_text=name)
        expect(row).to_be_visible()
        row.get_by_role("checkbox").click()
    page.get_by_role("button", name="Compare").click()
    expect(page).to_have_url(re.compile(r"/compare\?runs="))
    summary = page.locator(".q-table").first
    expect(summary.get_by_text(better, exact=True)).to_be_visible()
    expect(summary.get_by_text(worse, exact=True)).to_be_visible()
    expect(summary.get_by_role("row").nth(1)).to_contain_text(better)  # ranked first by best validation loss
    expect(page.locator(".nicegui-echart canvas").first).to_be_visible()
    shot(page, "compare-runs")

    summary.get_by_text(better, exact=True).click()
    expect(page).to_have_url(re.compile(rf"/runs/{re.escape(two_runs[better]['id'])}$"))
    best_row = page.get_by_role("row").filter(has_text="★ best")
    expect(best_row).to_contain_text(str(best_it))
    best_row.get_by_role("button", name="Publish").click()

    expect(page).to_have_url(re.compile(rf"/publish\?iteration={best_it}$"))
    expect(page.get_by_text("Publish a checkpoint")).to_be_visible()
    expect(page.get_by_text(re.compile(r"Best validation loss \(\d"))).to_be_visible()
    name = page.get_by_label("Name", exact=True)
    name.fill("../escape")
    expect(page.get_by_text(re.compile(r"give a plain folder name"))).to_be_visible()
    name.fill("sourdough-tiny")
    expect(page.get_by_text(re.compile(r"give a plain folder name"))).to_be_hidden()
    page.get_by_role("button", name="q8_0", exact=True).click()  # a GGUF for llama.cpp / Ollama / LM Studio too
    shot(page, "publish-form-gguf")
    page.get_by_role("button", name="Publish", exact=True).click()

    expect(page.get_by_text("PASS", exact=True)).to_be_visible(timeout=120_000)
    expect(page.get_by_text("Done", exact=True)).to_be_visible()
    expect(page.get_by_text(re.compile(r"published/sourdough-tiny$"))).to_be_visible()
    expect(page.get_by_role("heading", name="sourdough-tiny")).to_be_visible()
    shot(page, "publish-done")

    page.get_by_role("button", name="Open model card").click()
    expect(page).to_have_url(re.compile(r"/published/sourdough-tiny$"))
    expect(page.get_by_role("heading", name="Parity check")).to_be_visible()
    expect(page.get_by_role("img", name="Loss curve")).to_be_visible()
    expect(page.get_by_text("PASS", exact=True)).to_be_visible()
    expect(page.get_by_text("ollama create sourdough-tiny -f Modelfile")).to_be_visible()
    expect(page.get_by_role("cell", name="GGUF logits")).to_be_visible()
    shot(page, "model-card")

    # from the card to a chat with the published model: the Playground loads it on its own
    page.get_by_role("button", name="Chat with it").click()
    expect(page).to_have_url(re.compile(r"/playground\?model=published/sourdough-tiny$"))
    expect(page.get_by_text("ready", exact=True)).to_be_visible(timeout=60_000)
    expect(page.get_by_text("sourdough-tiny (no adapter)")).to_be_visible()
    page.get_by_placeholder("Message (Ctrl+Enter sends)").fill("How do I feed my starter?")
    page.get_by_role("button", name="Send", exact=True).click()
    expect(page.locator(".q-message").filter(has_text=re.compile(r"generated tokens"))).to_have_count(1,
                                                                                                    timeout=30_000)
