"""An exported dashboard opens in Chromium with the network cut off: every chart draws, nothing is fetched."""

from __future__ import annotations

import sys
from pathlib import Path

from conftest import shot
from playwright.sync_api import Route

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for the hand-made run folder

from test_dashboard import make_run

from services.training.dashboard import export_dashboard


def test_exported_dashboard_renders_offline(browser, tmp_path):
    html_path, _ = export_dashboard(make_run(tmp_path / "runs" / "run-e2e"), tmp_path / "out", png=False)
    context = browser.new_context(offline=True, viewport={"width": 1280, "height": 1400})
    page = context.new_page()
    requests, blocked, errors = [], [], []
    page.on("request", lambda r: requests.append(r.url))
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)

    def only_files(route: Route) -> None:
        if route.request.url.startswith("file://"):
            route.continue_()
        else:
            blocked.append(route.request.url)
            route.abort()

    page.route("**/*", only_files)
    page.goto(html_path.as_uri())
    page.wait_for_function("document.body.dataset.ready === '1'", timeout=15_000)
    for chart in ("chart-loss", "chart-lr", "chart-speed", "chart-memory"):
        assert page.locator(f"#{chart} canvas").count() >= 1, chart
    box = page.locator("#chart-loss canvas").first.bounding_box()
    assert box["width"] > 600 and box["height"] > 250
    assert page.evaluate("typeof echarts.getInstanceByDom(document.getElementById('chart-loss'))") == "object"
    series = page.evaluate("echarts.getInstanceByDom(document.getElementById('chart-loss')).getOption().series"
                           ".map(s => [s.name, s.data.length])")
    assert series == [["train", 6], ["validation", 4], ["test", 1]]
    shot(page, "dashboard-offline")
    assert blocked == [] and errors == []
    assert all(u.startswith(("file://", "data:", "blob:")) for u in requests), requests
    context.close()
