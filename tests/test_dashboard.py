"""The exported dashboard: one self-contained HTML file with the run's metrics, and a PNG from headless Chromium."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from app.cli import main as cli_main
from services.training.dashboard import DashboardError, export_dashboard, find_chromium, render_png
from services.training.folder import RunFolder
from services.workspace import Workspace


def make_run(path: Path) -> RunFolder:
    """A finished run folder written by hand: 30 iterations, a resume from checkpoint 10, a test loss."""
    path.mkdir(parents=True)
    folder = RunFolder(path)
    ckpts = [{"iteration": it, "val_loss": v, "train_loss": v + 0.1, "epoch": it / 12, "trained_tokens": it * 80}
             for it, v in ((10, 3.2), (20, 2.7), (30, 2.9))]
    folder.update(id=path.name, name="demo", status="completed", reason="30 iterations", mode="ift",
                  fine_tune_type="lora", model="/models/tiny", data="/data/chat", seed=0, iters=30, iteration=30,
                  checkpoints=ckpts, best=ckpts[1], versions={"forgellm": "0.1.0", "mlx": "0.32.4"})
    folder.append_metric({"type": "val", "step": 0, "iteration": 0, "val_loss": 7.0})
    for it in range(5, 20, 5):  # the first attempt: its records after 10 are superseded by the resume
        folder.append_metric({"type": "train", "step": it, "iteration": it, "train_loss": 9.0 - it / 10,
                              "learning_rate": 1e-3, "tokens_per_second": 5000.0, "peak_memory_gb": 0.01,
                              "rss_gb": 0.12})
    folder.append_metric({"type": "resume", "step": 10, "iteration": 10})
    for it in range(15, 35, 5):
        folder.append_metric({"type": "train", "step": it, "iteration": it, "train_loss": 4.0 - it / 20,
                              "learning_rate": 5e-4, "tokens_per_second": 5200.0, "peak_memory_gb": 0.01,
                              "rss_gb": 0.13})
    for it, v in ((10, 3.2), (20, 2.7), (30, 2.9)):
        folder.append_metric({"type": "val", "step": it, "iteration": it, "val_loss": v})
    folder.append_metric({"type": "test", "step": 30, "iteration": 30, "test_loss": 2.95})
    return folder


def embedded_data(html: str) -> dict:
    m = re.search(r'<script type="application/json" id="forgellm-data">(.*?)</script>', html, re.S)
    return json.loads(m.group(1))


def test_html_is_self_contained_and_holds_the_run_metrics(tmp_path):
    folder = make_run(tmp_path / "runs" / "run-a")
    html_path, png = export_dashboard(folder, tmp_path / "out", png=False)
    assert png is None and html_path == tmp_path / "out" / "dashboard.html"
    html = html_path.read_text()
    assert len(html) > 1_000_000  # ECharts is inlined, not linked
    markup = re.sub(r"<script[^>]*>.*?</script>", "", html, flags=re.S)
    assert not re.search(r"\b(src|href)\s*=|@import|url\(", markup)  # nothing to fetch: no script, style or image links
    assert "globalThis.echarts=" in html and 'import("./' not in html and "sourceMappingURL" not in html
    assert html.count("<script") == html.count("</script>") == 3
    data = embedded_data(html)
    assert data["series"]["train_loss"][:2] == [[5, 8.5], [10, 8.0]]  # from the first attempt, before the resume
    assert [p[0] for p in data["series"]["train_loss"]] == [5, 10, 15, 20, 25, 30]  # superseded 15 dropped
    assert data["series"]["train_loss"][2] == [15, 3.25]
    assert data["series"]["val_loss"] == [[0, 7.0], [10, 3.2], [20, 2.7], [30, 2.9]]
    assert data["series"]["test_loss"] == [[30, 2.95]] and data["best"]["iteration"] == 20
    assert "20 ★ best" in html and "ForgeLLM run demo" in html


@pytest.mark.skipif(find_chromium() is None, reason="no Chromium installed")
def test_png_screenshot_with_headless_chromium(tmp_path):
    folder = make_run(tmp_path / "runs" / "run-b")
    html_path, png = export_dashboard(folder, tmp_path / "out")
    assert png == tmp_path / "out" / "dashboard.png"
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000


def test_clear_errors(tmp_path):
    (tmp_path / "page.html").write_text("<p>x</p>")
    with pytest.raises(DashboardError, match="cannot run Chromium"):
        render_png(tmp_path / "page.html", tmp_path / "x.png", chromium=str(tmp_path / "no-chromium"))
    with pytest.raises(DashboardError, match="not a run folder"):
        export_dashboard(tmp_path, tmp_path / "out")


def test_cli_export_dashboard(tmp_path, capsys):
    ws = Workspace.resolve(tmp_path / "ws")
    make_run(ws.runs / "run-c")
    assert cli_main(["--workspace", str(ws.root), "export-dashboard", "run-c", "--no-png"]) == 0
    assert (ws.runs / "run-c" / "dashboard" / "dashboard.html").is_file()
    assert cli_main(["--workspace", str(ws.root), "export-dashboard", "run-c", "--out", str(tmp_path / "d"),
                     "--no-png"]) == 0
    assert (tmp_path / "d" / "dashboard.html").is_file() and "opens offline" in capsys.readouterr().out
    assert cli_main(["--workspace", str(ws.root), "export-dashboard", "nope"]) == 2
