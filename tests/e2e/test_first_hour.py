"""A new user's first hour: a fresh app proposes defaults that fit the data and the machine, the run started
with them completes (the toast says so), and the Train form's draft survives leaving the page and a reload."""

from __future__ import annotations

import re

from conftest import fill, shot
from playwright.sync_api import Page, expect


def test_accept_the_proposed_defaults_start_and_keep_the_draft(page: Page, app_server):
    page.goto("/")
    expect(page.get_by_text("Fitted to the data and this machine")).to_be_visible(timeout=60_000)
    iters = page.get_by_label("Iterations", exact=True).input_value()
    expect(page.get_by_text(re.compile(rf"Estimated ≈ .+ on this machine \({iters} iterations;"))) \
        .to_be_visible(timeout=30_000)  # the estimate of the fitted form, not of the preset before it
    expect(page.get_by_text("Config is valid.")).to_be_visible()
    assert page.get_by_label("Max sequence length", exact=True).input_value() == "256"  # packed windows
    shot(page, "first-hour-fresh-form")

    page.get_by_role("button", name="Start training").click()
    expect(page).to_have_url(re.compile(r"/monitor/.+"), timeout=30_000)
    expect(page.get_by_text(re.compile(r"completed at iteration \d+"))).to_be_visible(timeout=300_000)
    shot(page, "first-hour-completed")

    page.goto("/train")
    fill(page, "Iterations", "77")
    fill(page, "Run name", "draft-kept")
    expect(page.get_by_text("Config is valid.")).to_be_visible()
    page.get_by_role("button", name="Runs", exact=True).first.click()
    expect(page).to_have_url(re.compile(r"/runs$"))
    page.get_by_role("button", name="Train", exact=True).first.click()
    expect(page).to_have_url(re.compile(r"/train$|/$"))
    expect(page.get_by_text("Your draft, as you left it")).to_be_visible()
    assert page.get_by_label("Iterations", exact=True).input_value() == "77"
    assert page.get_by_label("Run name", exact=True).input_value() == "draft-kept"
    page.reload()
    expect(page.get_by_label("Iterations", exact=True)).to_have_value("77", timeout=30_000)
    assert page.get_by_label("Run name", exact=True).input_value() == "draft-kept"
    shot(page, "first-hour-draft-back")
