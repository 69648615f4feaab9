"""Datasets page: the prepared-data cache, listed with its size and deleted from the page."""

from __future__ import annotations

from pathlib import Path

from conftest import shot
from playwright.sync_api import Page, expect


def test_the_prepared_data_cache_is_listed_with_its_size_and_deleted(page: Page, app_server, e2e_workspace: Path):
    from mlx_lm.utils import load_tokenizer

    from services.config import resolve
    from services.training.prepared import PreparedCache
    from services.workspace import Workspace

    model = e2e_workspace / "models" / "tiny-llama"
    cache = PreparedCache.of(Workspace(e2e_workspace))
    cache.prepare(resolve({"model": str(model), "data": str(e2e_workspace / "datasets" / "sample-cpt"),
                           "mode": "cpt", "max_seq_length": 64}), load_tokenizer(model))
    key = cache.last["key"]
    page.set_viewport_size({"width": 1400, "height": 1000})
    page.goto("/datasets")
    card = page.locator("[data-testid=cache-card], .q-card").filter(has_text="Prepared data (cache)")
    row = card.locator(".row").filter(has_text="sample-cpt · tiny-llama").filter(has_text="cpt · seq 64")
    expect(row).to_be_visible(timeout=15_000)
    expect(row).to_contain_text("KB")
    expect(card).to_contain_text("tokenized once, reused by every run")
    page.evaluate("window.scrollTo(0, 0)")  # the header is fixed: a full-page shot from the top
    shot(page, "datasets-prepared-cache")
    row.get_by_role("button").click()
    expect(row).to_have_count(0)
    assert not (cache.root / key).exists()
    page.evaluate("window.scrollTo(0, 0)")
    shot(page, "datasets-prepared-cache-deleted")
