"""A run's dashboard export from the run page, and Hub upload from the command line (offline here)."""

from __future__ import annotations

import subprocess
import sys
import time

from conftest import base_config
from nicegui.testing import User, user_simulation

from app.composition import build_services
from pages.shell import make_root


async def test_export_dashboard_from_the_run_page(workspace, tiny_model, chat_data):
    services = build_services(workspace)
    folder = services.manager.launch(base_config(tiny_model, chat_data, mode="ift", iters=10))
    assert services.manager.wait(folder.id, timeout=120)["status"] == "completed"
    async with user_simulation(make_root(services)) as user:
        user: User
        await user.open(f"/runs/{folder.id}")
        user.find(marker="export-dashboard").click()
        await user.should_see("Dashboard written to", retries=200)  # the PNG takes a Chromium start
    html = (folder.path / "dashboard" / "dashboard.html").read_text()
    assert "<script" in html and folder.id in html and "https://" not in html.split("<body", 1)[1][:2000]


def test_upload_fails_fast_and_clearly_offline(tmp_path, monkeypatch):
    ws = tmp_path / "ws"
    model = ws / "published" / "m"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    (model / "README.md").write_text("---\nlicense: mit\n---\n")
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "app.cli", "--workspace", str(ws), "upload", "m", "--repo", "me/m"],
                          capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 2 and time.time() - t0 < 15  # includes interpreter and import start-up
    assert "offline" in proc.stderr.lower()
    proc = subprocess.run([sys.executable, "-m", "app.cli", "--workspace", str(ws), "upload", "../x", "--repo", "a/b"],
                          capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 2 and "no published model '../x'" in proc.stderr
