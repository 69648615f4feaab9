"""A person trains from the browser: configure, start, watch, stop, resume, a second browser, an app restart."""

from __future__ import annotations

import re

from conftest import fill, pick, shot
from playwright.sync_api import Error as PlaywrightError
from playwright.sync_api import Page, expect

ITERS = 600


def iteration(page: Page) -> int:
    text = page.get_by_text(re.compile(r"iteration \d+ / ")).first.inner_text()
    return int(re.search(r"iteration (\d+) /", text).group(1))


def wait_iteration_above(page: Page, n: int, timeout: float = 60_000) -> int:
    page.wait_for_function("() => true")  # let the event loop turn
    expect(page.get_by_text(re.compile(r"iteration \d+ / "))).to_be_visible(timeout=timeout)
    page.wait_for_timeout(100)
    deadline = timeout
    while iteration(page) <= n and deadline > 0:
        page.wait_for_timeout(250)
        deadline -= 250
    assert iteration(page) > n
    return iteration(page)


def test_train_watch_stop_resume_second_browser_and_restart(page: Page, app_server, browser):
    page.goto("/")
    expect(page.get_by_role("button", name="Start training")).to_be_visible()

    # bad input first: nothing starts, the reason is shown next to the form
    pick(page, "Model", "tiny-llama")
    pick(page, "Dataset", "sample-cpt")
    page.get_by_role("button", name="CPT").click()
    fill(page, "Batch size", "0")
    expect(page.get_by_text(re.compile(r"batch_size.*must be an integer"))).to_be_visible()
    page.get_by_role("button", name="Start training").click()
    expect(page).to_have_url(re.compile(r"/$|/train$"))

    fill(page, "Batch size", "4")
    fill(page, "Layers (-1 = all)", "-1")
    fill(page, "Iterations", str(ITERS))
    fill(page, "Max sequence length", "64")
    fill(page, "Report every", "5")
    fill(page, "Evaluate every", "50")
    fill(page, "Checkpoint every", "50")
    expect(page.get_by_text("Config is valid.")).to_be_visible()
    shot(page, "train-page")
    page.get_by_role("button", name="Start training").click()

    # the Monitor page of the new run: loss points arrive live
    expect(page).to_have_url(re.compile(r"/monitor/.+"))
    run_url = page.url
    wait_iteration_above(page, 20)
    expect(page.locator(".nicegui-echart canvas").first).to_be_visible()
    shot(page, "monitor-running")

    page.get_by_role("button", name="Stop").click()
    expect(page.get_by_text("stopped", exact=True)).to_be_visible(timeout=30_000)
    stopped_at = iteration(page)
    page.get_by_role("button", name="Resume").click()
    expect(page.get_by_text("running", exact=True)).to_be_visible(timeout=30_000)
    wait_iteration_above(page, stopped_at)

    # a second browser sees the same run, live
    other = browser.new_context(base_url=app_server.url).new_page()
    other.goto(run_url)
    seen = wait_iteration_above(other, 0)
    wait_iteration_above(other, seen)
    other.context.close()

    # the app restarts mid-run; the worker keeps training and the page comes back with the whole history
    before = iteration(page)
    app_server.restart()
    for attempt in range(5):  # the page's own reconnect may reload it at the same moment
        try:
            page.goto(run_url)
            break
        except PlaywrightError:
            if attempt == 4:
                raise
            page.wait_for_timeout(500)
    after = wait_iteration_above(page, before)
    assert after > before
    expect(page.get_by_text("completed", exact=True)).to_be_visible(timeout=180_000)
    expect(page.get_by_text(f"iteration {ITERS} / {ITERS}")).to_be_visible()
    shot(page, "monitor-completed")
