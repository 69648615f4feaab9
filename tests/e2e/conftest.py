"""Playwright end-to-end fixtures: the real app in a subprocess, driven in Debian's Chromium.

Run on their own (``pytest tests/e2e``): sync Playwright and the async NiceGUI ``User`` tests must not share
one pytest session. Screenshots are written to ``tests/artifacts/``.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "tests" / "artifacts"
CHROMIUM = os.environ.get("CHROMIUM_PATH") or shutil.which("chromium") or "/usr/bin/chromium"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"app exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer within {timeout} s")


class AppProcess:
    """``forgellm start`` in a child process; can be restarted on the same port and workspace."""

    def __init__(self, workspace: Path, log: Path, extra: tuple[str, ...] = ()):
        self.workspace, self.log, self.extra = workspace, log, extra
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if k not in {"PYTEST_CURRENT_TEST", "NICEGUI_HOST", "NICEGUI_PORT"}}
        env.update(NICEGUI_STORAGE_PATH=str(self.workspace / ".nicegui"), MLX_DISABLE_COMPILE="1", HF_HUB_OFFLINE="1")
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "app.cli", "--workspace", str(self.workspace), "start", "--no-show",
                 "--port", str(self.port), *self.extra], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        wait_http(self.url + "/", self.proc)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def restart(self) -> None:
        self.stop()
        self.start()


@pytest.fixture(scope="session")
def e2e_workspace(tmp_path_factory) -> Path:
    from services.library.samples import install_samples
    from services.library.tiny_model import build_tiny_model
    from services.workspace import Workspace

    ws = Workspace.resolve(tmp_path_factory.mktemp("e2e") / "ws")
    build_tiny_model(ws.models / "tiny-llama")
    install_samples(ws.datasets)
    return ws.root


@pytest.fixture(scope="session")
def app_server(e2e_workspace):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    app = AppProcess(e2e_workspace, ARTIFACTS / "app.log")
    app.start()
    yield app
    app.stop()


@pytest.fixture(scope="session")
def base_url(app_server) -> str:
    return app_server.url


@pytest.fixture(scope="session")
def browser_type_launch_args(browser_type_launch_args):
    if not Path(CHROMIUM).exists():
        pytest.fail(f"Chromium not found at {CHROMIUM}: install Debian's chromium or set CHROMIUM_PATH")
    return {**browser_type_launch_args, "executable_path": CHROMIUM, "args": [
        "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]}


def shot(page, name: str) -> Path:
    """Full-page screenshot into tests/artifacts/NAME.png."""
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def pick(page, label: str, option: str) -> None:
    """Choose ``option`` in the select labelled ``label``."""
    page.get_by_label(label, exact=True).click()
    page.get_by_role("option").filter(has_text=option).first.click()


def fill(page, label: str, value: str) -> None:
    """Type ``value`` into the input labelled ``label`` and leave it (as a person tabbing on)."""
    box = page.get_by_label(label, exact=True)
    box.fill(value)
    box.blur()
