"""A person closes the loop in Chromium: rate four blind pairs of two SFT checkpoints in the Playground, press
"Train on these ratings", start the DPO run and watch its reward-margin chart."""

from __future__ import annotations

import re

import pytest
from conftest import fill, shot
from playwright.sync_api import Page, expect

from services.training.manager import RunManager
from services.workspace import Workspace

PROMPTS = ("What is a sourdough starter?", "How do I feed my starter?", "Why is my loaf dense?",
           "How long should dough proof?")


@pytest.fixture(scope="module")
def sft_run(e2e_workspace) -> str:
    """A 20-iteration LoRA SFT run of the tiny model on the sample chats (checkpoints 10 and 20)."""
    manager = RunManager(Workspace.resolve(e2e_workspace))
    folder = manager.launch({"model": "tiny-llama", "data": "sample-ift", "mode": "ift", "fine_tune_type": "lora",
                             "name": "sft", "seed": 0, "num_layers": 2, "batch_size": 4, "iters": 20,
                             "val_batches": 1, "learning_rate": 1e-3, "steps_per_report": 5, "steps_per_eval": 10,
                             "save_every": 10, "max_seq_length": 128,
                             "lora_parameters": {"rank": 8, "dropout": 0.0, "scale": 20.0}})
    info = manager.wait(folder.id, timeout=300)
    assert info["status"] == "completed", info.get("reason")
    return folder.id


def test_rate_four_pairs_then_train_dpo_on_them(page: Page, sft_run: str):
    page.goto("/playground")
    page.get_by_role("button", name="Load", exact=True).click()
    expect(page.get_by_text("ready", exact=True)).to_be_visible(timeout=60_000)
    fill(page, "Max tokens", "16")
    page.get_by_role("tab", name="Compare").click()
    page.get_by_text("Base model", exact=True).click()  # off: the two checkpoints (the base's answers can be blank)
    page.get_by_label("Checkpoints", exact=True).click()
    for it in (10, 20):
        page.get_by_role("option").filter(has_text=f"{sft_run} @ {it}").click()
    page.keyboard.press("Escape")
    page.get_by_text("Blind A/B", exact=True).click()
    expect(page.get_by_label("Save ratings to dataset", exact=True)).to_have_value(re.compile(r"^ratings-\d"))
    session = page.get_by_label("Save ratings to dataset", exact=True).input_value()

    for i, prompt in enumerate(PROMPTS):
        page.get_by_label("Prompt", exact=True).fill(prompt)
        page.get_by_role("button", name="Compare", exact=True).click()
        better = page.get_by_role("button", name="AB"[i % 2] + " is better", exact=True)
        expect(better).to_be_visible(timeout=60_000)
        if i == 0:  # the two answers, blind
            expect(page.locator(".q-card").filter(has_text=re.compile(r"generated tokens"))).to_have_count(2)
            page.mouse.wheel(0, -10_000)
            shot(page, "preference-blind-pair")
        better.click()
        expect(page.get_by_text(f"{i + 1} pair(s) to train on")).to_be_visible()
    expect(page.get_by_text(re.compile(r"A = " + re.escape(sft_run) + r" @ (10|20)"))).to_be_visible()
    page.mouse.wheel(0, -10_000)
    page.wait_for_timeout(200)
    shot(page, "preference-rated")

    # "Train on these ratings": the Train page on DPO, the session's pairs, forked from the rated checkpoint
    page.get_by_role("button", name="Train on these ratings").click()
    expect(page).to_have_url(re.compile(r"/train\?preference=" + session))
    fork = page.get_by_text(re.compile(rf"Starts from checkpoint {re.escape(sft_run)}@(10|20)"))
    expect(fork).to_be_visible()
    start = int(re.search(r"@(\d+)", fork.inner_text()).group(1))  # the checkpoint chosen more often
    expect(page.get_by_text("Preference tuning", exact=True)).to_be_visible()
    fill(page, "Batch size", "1")
    # a fork counts on from its checkpoint: the parent's 20 iterations, or 20 more from checkpoint 20
    expect(page.get_by_label("Iterations", exact=True)).to_have_value("40" if start == 20 else "20")
    fill(page, "Iterations", "60")
    fill(page, "Report every", "4")
    fill(page, "Evaluate every", "20")
    fill(page, "Checkpoint every", "20")
    fill(page, "Learning rate", "0.001")
    expect(page.get_by_text("Config is valid.")).to_be_visible()
    page.mouse.wheel(0, -10_000)
    page.wait_for_timeout(200)
    shot(page, "preference-train-page")
    page.get_by_role("button", name="Start training").click()

    # the Monitor: the reward margin moves away from 0 as the run learns the ratings
    expect(page).to_have_url(re.compile(r"/monitor/.+"))
    charts = page.locator(".nicegui-echart")
    expect(charts).to_have_count(9)  # loss, perplexity, lr, speed, memory + reward margin, accuracy, rewards, logps
    expect(page.get_by_text("completed", exact=True)).to_be_visible(timeout=180_000)
    page.wait_for_timeout(1500)  # the last points reach the charts
    page.mouse.wheel(0, -10_000)  # the fixed header is drawn where the page was scrolled to
    page.wait_for_timeout(200)
    shot(page, "preference-monitor")
