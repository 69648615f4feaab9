"""A person turns on Pack samples for an IFT run and sees the padding share and trained tokens/s on the Monitor."""

from __future__ import annotations

import re

from conftest import fill, pick, shot
from playwright.sync_api import Page, expect


def test_a_packed_ift_run_shows_its_padding_on_the_monitor(page: Page, app_server):
    page.goto("/train")
    pick(page, "Model", "tiny-llama")
    page.get_by_role("button", name="IFT").click()
    pick(page, "Dataset", "sample-ift")
    fill(page, "Run name", "packed-chats")
    fill(page, "Batch size", "2")
    fill(page, "Layers (-1 = all)", "-1")
    fill(page, "Iterations", "20")
    fill(page, "Max sequence length", "256")
    fill(page, "Report every", "5")
    fill(page, "Evaluate every", "10")
    fill(page, "Checkpoint every", "10")
    switch = page.get_by_role("switch", name="Pack samples")
    switch.click()
    expect(switch).to_be_checked()
    expect(page.get_by_text("Config is valid.")).to_be_visible()
    page.get_by_role("button", name="Start training").click()

    expect(page).to_have_url(re.compile(r"/monitor/.+"))
    expect(page.get_by_text("completed", exact=True)).to_be_visible(timeout=180_000)
    card = page.locator(".q-card", has=page.get_by_text("padding", exact=True))
    expect(card).to_contain_text(re.compile(r"\d+\.\d%"))
    expect(page.locator(".q-card", has=page.get_by_text("trained tokens/s", exact=True))) \
        .to_contain_text(re.compile(r"\d"))
    shot(page, "monitor-packed")
