"""A person uses the Playground in Chromium: load the tiny model, chat, stop a long answer, edit a past
message, regenerate, and compare the base model with a checkpoint of a run trained for the purpose."""

from __future__ import annotations

import re

import pytest
from conftest import shot
from playwright.sync_api import Page, expect

from services.training.manager import RunManager
from services.workspace import Workspace


@pytest.fixture(scope="module")
def run_id(e2e_workspace) -> str:
    """A 20-iteration LoRA run of the tiny model on the sample chats (checkpoints 10 and 20)."""
    ws = Workspace.resolve(e2e_workspace)
    manager = RunManager(ws)
    folder = manager.launch({"model": "tiny-llama", "data": "sample-ift", "fine_tune_type": "lora", "seed": 0,
                             "name": "playground", "num_layers": 2, "batch_size": 4, "iters": 20, "val_batches": 1,
                             "learning_rate": 1e-3, "steps_per_report": 5, "steps_per_eval": 10, "save_every": 10,
                             "max_seq_length": 128, "lora_parameters": {"rank": 8, "dropout": 0.0, "scale": 20.0}})
    info = manager.wait(folder.id, timeout=300)
    assert info["status"] == "completed", info.get("reason")
    return folder.id


def send(page: Page, text: str) -> None:
    page.get_by_placeholder("Message (Ctrl+Enter sends)").fill(text)
    page.get_by_role("button", name="Send", exact=True).click()


def answers(page: Page):
    return page.locator(".q-message").filter(has_text=re.compile(r"generated tokens"))


def test_chat_stop_edit_regenerate_and_compare(page: Page, run_id: str):
    page.goto("/playground")
    expect(page.get_by_text("Playground", exact=True).first).to_be_visible()
    # the model bar shows what the shared model worker holds (another test may have left a checkpoint loaded)
    page.get_by_label("Adapter", exact=True).click()
    page.get_by_role("option", name="none (base model)").click()
    page.get_by_role("button", name="Load", exact=True).click()
    expect(page.get_by_text("ready", exact=True)).to_be_visible(timeout=60_000)
    expect(page.get_by_text("tiny-llama (no adapter)")).to_be_visible()

    # chat: the answer streams into its bubble and gets its token counts
    send(page, "How do I feed my starter?")
    expect(answers(page)).to_have_count(1, timeout=30_000)
    expect(answers(page).first).to_contain_text("tokens/s")

    # a very long answer is stopped part way
    box = page.get_by_label("Max tokens", exact=True)
    box.fill("100000")
    box.blur()
    send(page, "Tell me everything about bread.")
    expect(page.get_by_text(re.compile(r"^\d+ tokens…$"))).to_be_visible(timeout=30_000)
    shot(page, "playground-streaming")
    page.get_by_role("button", name="Stop", exact=True).first.click()
    expect(answers(page)).to_have_count(2, timeout=30_000)
    expect(answers(page).nth(1)).to_contain_text("stopped")

    # edit the first message: the conversation continues from there, the later exchange is gone
    box.fill("24")
    box.blur()
    page.locator(".q-message").filter(has_text="How do I feed my starter?").get_by_role("button").click()
    expect(page.get_by_text("Editing your message 1")).to_be_visible()
    send(page, "How warm should the kitchen be?")
    expect(answers(page)).to_have_count(1, timeout=30_000)
    expect(page.get_by_text("Tell me everything about bread.")).to_have_count(0)
    expect(page.get_by_text("How warm should the kitchen be?")).to_be_visible()

    # regenerate the last answer
    old = answers(page).first
    text = old.locator(".nicegui-markdown").last.inner_text()
    handle = old.element_handle()
    page.get_by_role("button", name="Regenerate", exact=True).click()
    handle.wait_for_element_state("hidden")  # the old answer is replaced
    expect(answers(page)).to_have_count(1, timeout=30_000)
    assert answers(page).first.locator(".nicegui-markdown").last.inner_text() == text  # greedy: same answer
    page.mouse.wheel(0, -10_000)  # the fixed header is drawn where the page was scrolled to
    page.wait_for_timeout(200)
    shot(page, "playground-chat")

    # compare the base with checkpoint 10 of the run, side by side
    page.get_by_role("tab", name="Compare").click()
    page.get_by_label("Prompt", exact=True).fill("What is a sourdough starter?")
    page.get_by_label("Checkpoints", exact=True).click()
    page.get_by_role("option").filter(has_text=f"{run_id} @ 10").click()
    page.keyboard.press("Escape")
    page.get_by_role("button", name="Compare", exact=True).click()
    columns = page.locator(".q-card").filter(has_text=re.compile(r"generated tokens"))
    expect(columns).to_have_count(2, timeout=60_000)
    expect(columns.nth(0)).to_contain_text("base")
    expect(columns.nth(1)).to_contain_text(f"{run_id} @ 10")
    page.mouse.wheel(0, -10_000)  # the fixed header is drawn where the page was scrolled to
    page.wait_for_timeout(200)
    shot(page, "playground-compare")
