"""A person trains on two processes from the browser: the Machines card asks for 2 (ring over loopback), the
Monitor shows both ranks (status, throughput, memory), Stop stops both, Resume restarts both, the run completes."""

from __future__ import annotations

import re

import pytest
from conftest import fill, pick, shot
from playwright.sync_api import Page, expect
from test_train_monitor import iteration

from services.training.manager import RunManager
from services.workspace import Workspace

ITERS = 100  # long enough that Stop lands mid-run on a quiet machine too (20 were done before Stop once)


@pytest.fixture
def no_run_left(e2e_workspace):
    """Whatever the test's outcome, no rank of its run keeps training after it (workers outlive the app)."""
    yield
    manager = RunManager(Workspace.resolve(e2e_workspace))
    for info in manager.active():
        manager.stop(info["id"])
        manager.wait(info["id"], timeout=60)


def ranks_table(page: Page):
    return page.locator(".q-table").filter(has_text="Tokens/s")


def rank_row(page: Page, rank: int):
    return ranks_table(page).locator("tbody tr").nth(rank)


def cell(page: Page, rank: int, column: str):
    """The cell of ``column`` (its header text) in ``rank``'s row of the ranks table."""
    headers = [h.strip() for h in ranks_table(page).locator("thead th").all_inner_texts()]
    return rank_row(page, rank).locator("td").nth(headers.index(column))


def top_shot(page: Page, name: str) -> None:
    """A full-page screenshot from the top (the fixed header drawn where it belongs)."""
    page.mouse.move(0, 0)  # no chart tooltip under the pointer
    page.mouse.wheel(0, -100_000)
    page.wait_for_timeout(300)
    shot(page, name)


def test_two_processes_from_the_train_page_watched_stopped_resumed(page: Page, app_server, no_run_left):
    page.goto("/train")
    pick(page, "Model", "tiny-llama")
    page.get_by_role("button", name="CPT").click()
    pick(page, "Dataset", "sample-cpt")
    small = {"Run name": "two-ranks", "Layers (-1 = all)": "2", "Iterations": str(ITERS), "Max sequence length": "48",
             "Report every": "2", "Evaluate every": "10", "Checkpoint every": "10",
             "Validation batches (-1 = all)": "2"}
    for label, value in small.items():
        fill(page, label, value)

    # bad input in the Machines card: a batch that does not split over the processes is named, nothing starts
    fill(page, "Batch size", "3")
    fill(page, "Processes", "2")
    expect(page.get_by_text(re.compile(r"batch_size = 3: is the global batch and must divide by the 2 "
                                       r"processes"))).to_be_visible()
    page.get_by_role("button", name="Start training").click()
    expect(page.get_by_text("Fix 1 problem(s) before starting")).to_be_visible()
    expect(page).to_have_url(re.compile(r"/train$"))
    fill(page, "Batch size", "4")
    expect(page.get_by_text("Config is valid.")).to_be_visible()
    page.get_by_role("button", name="Check machines").click()
    expect(page.get_by_text("rank 1 · 127.0.0.1 · this machine · ready")).to_be_visible(timeout=30_000)
    expect(page.get_by_text("rank 0 · 127.0.0.1 · this machine · ready")).to_be_visible()
    top_shot(page, "distributed-train-machines")
    page.get_by_role("button", name="Start training").click()

    # the Monitor: one row per rank, both training, each with its own tokens/s and memory
    expect(page).to_have_url(re.compile(r"/monitor/.+"))
    run_url = page.url
    expect(page.get_by_text("Ranks (2 processes)")).to_be_visible()
    expect(ranks_table(page).locator("tbody tr")).to_have_count(2)
    for rank in (0, 1):
        row = rank_row(page, rank)
        expect(row).to_contain_text("training", timeout=90_000)
        expect(cell(page, rank, "Tokens/s")).to_have_text(re.compile(r"^\s*[1-9][\d,]*\s*$"), timeout=90_000)
        for memory in ("MLX peak memory", "Process memory"):
            expect(cell(page, rank, memory)).to_have_text(re.compile(r"^\s*\d+\.\d+ GB\s*$"))
        assert float(cell(page, rank, "Process memory").inner_text().split()[0]) > 0
    top_shot(page, "distributed-monitor-running")

    page.get_by_role("button", name="Stop").click()
    expect(page.get_by_text("stopped", exact=True)).to_be_visible(timeout=60_000)
    stopped_at = iteration(page)
    assert 0 < stopped_at < ITERS
    for rank in (0, 1):
        expect(rank_row(page, rank)).to_contain_text("ended")
    top_shot(page, "distributed-monitor-stopped")

    page.get_by_role("button", name="Resume").click()  # mlx.launch and two imports: slow on a busy machine
    expect(page.get_by_text("running", exact=True)).to_be_visible(timeout=120_000)
    for rank in (0, 1):
        expect(rank_row(page, rank)).to_contain_text("training", timeout=90_000)
    expect(page.get_by_text("completed", exact=True)).to_be_visible(timeout=300_000)
    expect(page.get_by_text(f"iteration {ITERS} / {ITERS}")).to_be_visible()
    top_shot(page, "distributed-monitor-completed")

    # the Runs page: the run trained on 2 processes
    page.goto("/runs")
    row = page.locator("tr", has=page.get_by_text("two-ranks", exact=True))
    expect(row).to_contain_text("completed")
    headers = page.locator("thead th").all_inner_texts()  # a sortable header holds its sort icon's name too
    column = next(i for i, h in enumerate(headers) if "Processes" in h)
    assert row.locator("td").nth(column).inner_text().strip() == "2"
    top_shot(page, "distributed-runs")
    page.goto(run_url)  # the finished run still lists its ranks
    expect(ranks_table(page).locator("tbody tr")).to_have_count(2)
