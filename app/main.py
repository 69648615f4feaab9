"""Composition root of the browser app: services, the SPA shell (header, status strip, sub pages) and ``run_app``.

Nothing is built at import time: ``run_app`` builds the services, then hands ``make_root(services)``
to ``ui.run``. Pages are plain builder functions that get ``services`` through ``ui.sub_pages(data=...)``.
"""

from __future__ import annotations

import io
import ipaddress
import os
import secrets
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import segno
from nicegui import app, background_tasks, ui

from pages.compare import compare_page
from pages.datasets import datasets_page
from pages.models import models_page
from pages.monitor import monitor_page
from pages.playground import playground_page
from pages.publish import publish_page, published_page
from pages.run_detail import run_detail_page
from pages.runs import runs_page
from pages.train import train_page
from services.library import ImportJob
from services.model_service import ModelService
from services.publish_jobs import PublishJobs
from services.run_folder import ACTIVE, WAITING
from services.run_watch import RunWatcher, WatcherPool
from services.runs import RunManager
from services.system import system_status
from services.workspace import Workspace

CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"
NAV = (("Train", "/train"), ("Monitor", "/monitor"), ("Playground", "/playground"), ("Runs", "/runs"),
       ("Models", "/models"), ("Datasets", "/datasets"))
STATUS_SECONDS = 1.5
LAG_LOG_ENV = "FORGELLM_LOOP_LAG_LOG"  # diagnostics: append event-loop lag samples (ms) to this file


@dataclass
class Services:
    """Everything the pages use; one instance per app process, shared by all clients."""

    workspace: Workspace
    manager: RunManager
    watchers: WatcherPool
    models: ModelService = field(default_factory=ModelService)  # the Playground's model worker
    configs_dir: Path = CONFIGS_DIR
    lan_urls: list[str] = field(default_factory=list)  # set when serving beyond loopback, token included
    publisher_jobs: PublishJobs | None = None  # publishes in child processes (build_services makes it)
    model_imports: list[ImportJob] = field(default_factory=list)  # the Models page's imports, newest last
    _status: tuple[float, dict[str, Any]] = field(default=(0.0, {}), repr=False)
    _status_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def watcher(self, run_id: str) -> RunWatcher:
        return self.watchers.get(run_id)

    def status(self) -> dict[str, Any]:
        """``{"active": run.json of the running run or None, "waiting": runs in the queue, "system":
        system_status}``, cached for all clients."""
        with self._status_lock:
            stamp, value = self._status
            if time.monotonic() - stamp < STATUS_SECONDS and value:
                return value
            runs = self.manager.list()  # also finds a dead worker, which moves the queue on
            run = next((r for r in runs if r.get("status") in ACTIVE), None)
            value = {"active": run, "waiting": sum(r.get("status") == WAITING for r in runs),
                     "system": system_status(self.workspace, run or {})}
            self._status = (time.monotonic(), value)
            return value


def build_services(workspace: Workspace | str | os.PathLike, configs_dir: Path | None = None) -> Services:
    ws = workspace if isinstance(workspace, Workspace) else Workspace.resolve(workspace)
    manager = RunManager(ws)
    return Services(workspace=ws, manager=manager, watchers=WatcherPool(manager), models=ModelService(),
                    configs_dir=configs_dir or CONFIGS_DIR, publisher_jobs=PublishJobs(ws))


def _status_texts(status: dict[str, Any]) -> tuple[str, str | None, str]:
    """(run text, run link or None, machine text) for the status strip."""
    run, sysd = status.get("active"), status.get("system") or {}
    if run:
        it, total = run.get("iteration") or 0, run.get("iters")
        pct = f" ({it / total:.0%})" if total else ""
        run_text = f"▶ {run.get('name') or run.get('id')} · {run.get('status')} · {it}/{total or '?'}{pct}"
        link = f"/monitor/{run['id']}"
    else:
        run_text, link = "no run active", None
    if status.get("waiting"):
        run_text += f" · {status['waiting']} waiting"
        link = link or "/runs"
    parts = [f"CPU {sysd.get('cpu_percent', 0):.0f}%",
             f"RAM {sysd.get('ram_used_gb', 0):.1f}/{sysd.get('ram_total_gb', 0):.1f} GB"]
    if sysd.get("swap_used_gb"):
        parts.append(f"swap {sysd['swap_used_gb']:.1f} GB")
    if sysd.get("mlx"):
        parts.append(f"MLX {sysd['mlx']['active_gb']:.1f} GB")
    parts.append(f"BLAS {sysd.get('blas', '?')}")
    if sysd.get("disk_free_gb") is not None:
        parts.append(f"disk {sysd['disk_free_gb']:.0f} GB free")
    return run_text, link, " · ".join(parts)


def make_root(services: Services):
    """The SPA shell: header with navigation, status strip and dark-mode toggle, and the sub pages."""

    def root() -> None:
        dark = ui.dark_mode()
        try:
            dark.bind_value(app.storage.user, "dark_mode")
        except RuntimeError:  # no storage secret (never the case under run_app or the test simulation)
            pass
        with ui.header().classes("items-center gap-1 py-1 px-3"):
            ui.label("ForgeLLM").classes("text-lg font-bold mr-4")
            for label, path in NAV:
                ui.button(label, on_click=lambda p=path: ui.navigate.to(p)).props("flat color=white no-caps") \
                    .mark(f"nav-{label.lower()}")
            ui.space()
            if services.lan_urls and _is_local_client():
                with ui.dialog() as lan_dialog, ui.card():
                    ui.label("Open ForgeLLM on another device").classes("text-lg font-semibold")
                    ui.label("These links carry the access token; anyone with one can use this app.") \
                        .classes("text-sm text-grey-7")
                    for url in services.lan_urls:
                        ui.image(segno.make(url, error="m").svg_data_uri(scale=4)).classes("w-48 self-center")
                        ui.link(url, url).classes("font-mono text-sm")
                    ui.button("Close", on_click=lan_dialog.close).props("flat")
                ui.button(icon="wifi", on_click=lan_dialog.open).props("flat round color=white") \
                    .tooltip("LAN access").mark("lan-access")
            ui.button(icon="dark_mode", on_click=lambda: dark.set_value(not dark.value)) \
                .props("flat round color=white").tooltip("dark mode").mark("dark-toggle")
        with ui.row().classes("w-full items-center gap-4 px-3 py-1 text-xs border-b border-grey-5") \
                .mark("status-strip"):
            run_link = ui.link("no run active", "/monitor").classes("font-medium").mark("status-run")
            machine = ui.label("").classes("opacity-80").mark("status-machine")

        def update_strip() -> None:
            run_text, link, machine_text = _status_texts(services.status())
            run_link.set_text(run_text)
            if run_link.props.get("href") != (link or "/monitor"):
                run_link.props["href"] = link or "/monitor"
            machine.set_text(machine_text)

        update_strip()
        ui.timer(2.0, update_strip)
        with ui.column().classes("w-full p-3"):
            ui.sub_pages({"/": train_page, "/train": train_page, "/monitor": monitor_page,
                          "/monitor/{run_id}": monitor_page, "/playground": playground_page,
                          "/playground/{run}": playground_page, "/playground/{run}/{iteration}": playground_page,
                          "/runs": runs_page, "/runs/{run_id}": run_detail_page, "/compare": compare_page,
                          "/runs/{run_id}/publish": publish_page, "/published/{name}": published_page,
                          "/models": models_page, "/datasets": datasets_page},
                         data={"services": services}).classes("w-full")  # pages take the whole width

    return root


# ------------------------------------------------------------------------------------------- LAN and run


def persisted_secret(path: Path, nbytes: int = 32) -> str:
    """A random secret created once (mode 0600) and read back on every later start."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        value = path.read_text().strip()
        if value:
            return value
        path.unlink()
        return persisted_secret(path, nbytes)
    value = secrets.token_urlsafe(nbytes)
    with os.fdopen(fd, "w") as f:
        f.write(value + "\n")
    return value


def _is_loopback(host: str | None) -> bool:
    try:
        return ipaddress.ip_address(host or "").is_loopback
    except ValueError:
        return host == "localhost"


async def probe_loop_lag(path: Path, interval: float = 0.01) -> None:
    """Diagnostics for ``bench/ui_latency.py``: how late a 10 ms sleep wakes up, one line per second."""
    import asyncio  # noqa: PLC0415

    loop = asyncio.get_running_loop()
    samples: list[float] = []
    while True:
        t0 = loop.time()
        await asyncio.sleep(interval)
        samples.append((loop.time() - t0 - interval) * 1000)
        if len(samples) >= int(1 / interval):
            with open(path, "a") as f:
                f.write(" ".join(f"{x:.2f}" for x in samples) + "\n")
            samples.clear()


def _is_local_client() -> bool:
    """Whether the page is being built for a browser on this machine (only those see the LAN token)."""
    request = getattr(ui.context.client, "request", None)
    host = request.client.host if request is not None and request.client else "127.0.0.1"
    return _is_loopback(host)


def add_token_gate(token: str) -> None:
    """Let loopback clients through; others must present ``?token=`` once (remembered in their session)."""
    from starlette.middleware.base import BaseHTTPMiddleware  # noqa: PLC0415
    from starlette.responses import PlainTextResponse, RedirectResponse  # noqa: PLC0415

    class TokenGate(BaseHTTPMiddleware):
        async def dispatch(self, request, call_next):
            client = request.client.host if request.client else ""
            if _is_loopback(client) or app.storage.user.get("lan_ok"):
                return await call_next(request)
            if secrets.compare_digest(request.query_params.get("token", ""), token):
                app.storage.user["lan_ok"] = True
                return RedirectResponse(request.url.path)
            return PlainTextResponse("401: open the link with ?token=… that `forgellm start --lan` printed",
                                     status_code=401)

    app.add_middleware(TokenGate)


def lan_qr(url: str) -> str:
    """A QR code of ``url`` drawn with text blocks, for a phone's camera to read off the terminal."""
    buf = io.StringIO()
    segno.make(url, error="m").terminal(out=buf, compact=True)
    return buf.getvalue()


def lan_urls(port: int, token: str) -> list[str]:
    import socket  # noqa: PLC0415

    import psutil  # noqa: PLC0415

    urls = []
    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family == socket.AF_INET and not ipaddress.ip_address(a.address).is_loopback:
                urls.append(f"http://{a.address}:{port}/?token={token}")
    return sorted(set(urls))


def run_app(workspace: Workspace | str | os.PathLike, host: str | None = None, port: int = 8080,
            native: bool = False, lan: bool = False, show: bool = True) -> None:
    """Build the services and serve the app (blocks). Loopback only unless ``lan`` (token-gated)."""
    from nicegui.storage import Storage  # noqa: PLC0415

    services = build_services(workspace)
    app.on_shutdown(services.models.unload)  # the model worker process ends with the app
    if services.publisher_jobs is not None:
        app.on_shutdown(services.publisher_jobs.stop)  # a half-done publish is cancelled and cleaned up
    state = services.workspace.root / ".forgellm"
    secret = persisted_secret(state / "secret")
    if "NICEGUI_STORAGE_PATH" not in os.environ:
        Storage.path = (state / "nicegui").resolve()
    if lan and host is None:
        host = "0.0.0.0"
    host = host or "127.0.0.1"
    if not _is_loopback(host):  # anything reachable from other machines is token-gated
        token = persisted_secret(state / "token", nbytes=16)
        add_token_gate(token)
        services.lan_urls = lan_urls(port, token) or [f"http://<this machine>:{port}/?token={token}"]
        print("ForgeLLM is reachable from the LAN; other devices need the access token once:", flush=True)
        for url in services.lan_urls:
            print(f"  {url}", flush=True)
        print(lan_qr(services.lan_urls[0]), flush=True)
    if native:  # one line per page that connected back over its websocket (the window rendered the app)
        app.on_connect(lambda client: print(
            f"native window connected: {client.request.headers.get('user-agent', '?')}", flush=True))
        # stop when the window closes, not when its process ends: that process can hang on exit (pywebview's Qt
        # backend never answers an evaluate_js still pending at close, e.g. NiceGUI's own right after page load)
        app.native.on("closed", app.shutdown)
        if sys.platform.startswith("linux"):
            app.native.start_args["gui"] = "qt"  # the supported backend here (GTK would fail first, noisily)
            if os.geteuid() == 0 and "--no-sandbox" not in os.environ.get("QTWEBENGINE_CHROMIUM_FLAGS", ""):
                # QtWebEngine refuses to run as root with its sandbox and then shows no window at all
                os.environ["QTWEBENGINE_CHROMIUM_FLAGS"] = (
                    os.environ.get("QTWEBENGINE_CHROMIUM_FLAGS", "") + " --no-sandbox").strip()
    if os.environ.get(LAG_LOG_ENV):
        app.on_startup(lambda: background_tasks.create(probe_loop_lag(Path(os.environ[LAG_LOG_ENV]))))
    ui.run(make_root(services), host=host, port=port, reload=False, show=show, title="ForgeLLM",
           storage_secret=secret, native=native, reconnect_timeout=10.0, favicon="🔥")
