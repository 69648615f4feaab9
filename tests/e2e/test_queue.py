"""A person queues two runs from the Train page: the second waits, then starts when the first ends."""

from __future__ import annotations

import re

from conftest import fill, pick, shot
from playwright.sync_api import Page, expect


def configure(page: Page, name: str, iters: int) -> None:
    page.goto("/train")
    pick(page, "Model", "tiny-llama")
    page.get_by_role("button", name="IFT").click()
    pick(page, "Dataset", "sample-ift")
    fill(page, "Run name", name)
    fill(page, "Layers (-1 = all)", "-1")
    fill(page, "Iterations", str(iters))
    fill(page, "Max sequence length", "64")
    fill(page, "Report every", "5")
    fill(page, "Evaluate every", "50")
    fill(page, "Checkpoint every", "50")
    expect(page.get_by_text("Config is valid.")).to_be_visible()


def run_row(page: Page, name: str):
    return page.locator("tr", has=page.get_by_text(name, exact=True))


def test_queue_two_runs_the_second_starts_when_the_first_ends(page: Page, app_server):
    configure(page, "queue-first", 200)
    page.get_by_role("button", name="Queue").click()  # nothing is training: it starts at once
    expect(page).to_have_url(re.compile(r"/monitor/.+"))

    configure(page, "queue-second", 40)
    page.get_by_role("button", name="Queue").click()
    expect(page.get_by_text(re.compile("queued: it starts after the active run"))).to_be_visible()

    page.goto("/runs")
    expect(run_row(page, "queue-second")).to_contain_text("waiting")
    expect(page.get_by_text(re.compile(r"· 1 waiting"))).to_be_visible()
    shot(page, "runs-queue")

    expect(run_row(page, "queue-first")).to_contain_text("completed", timeout=180_000)
    expect(run_row(page, "queue-second")).to_contain_text("completed", timeout=180_000)
    expect(page.get_by_text("no run active", exact=True)).to_be_visible(timeout=10_000)
    shot(page, "runs-queue-done")
