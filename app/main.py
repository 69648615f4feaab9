"""``run_app``: build the services, gate the LAN, and serve the shell (in a browser tab or a native window).

Nothing is built at import time: ``run_app`` builds the services (:mod:`app.composition`), then hands
``make_root(services)`` (:mod:`pages.shell`) to ``ui.run``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from nicegui import app, background_tasks, ui

from app.composition import Services, build_services
from app.lan import LanAccess, add_gate, lan_qr, persisted_secret
from pages.shell import make_root
from services.notify import DesktopNotifier
from services.settings import load_settings
from services.system import is_loopback
from services.workspace import Workspace

LAG_LOG_ENV = "FORGELLM_LOOP_LAG_LOG"  # diagnostics: append event-loop lag samples (ms) to this file


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


def start_serving(services: Services, port: int, lan: bool) -> None:
    """Start the OpenAI-compatible endpoint; a port in use is printed, the app goes on without it."""
    from services.serving.server import ServeError  # noqa: PLC0415

    try:
        print(f"OpenAI-compatible endpoint: {services.serving.start(port, lan)}", flush=True)
    except ServeError as e:
        print(f"the OpenAI-compatible endpoint did not start: {e}", file=sys.stderr, flush=True)


def run_app(workspace: Workspace | str | os.PathLike, host: str | None = None, port: int = 8080,
            native: bool = False, lan: bool = False, show: bool = True) -> None:
    """Build the services and serve the app (blocks). Loopback only unless ``lan`` (token-gated); every request's
    Host and Origin are checked (:func:`app.lan.add_gate`)."""
    from nicegui.storage import Storage  # noqa: PLC0415

    services = build_services(workspace)
    app.on_shutdown(services.close)  # the model worker, publishes and imports end with the app
    state = services.workspace.root / ".forgellm"
    secret = persisted_secret(state / "secret")
    if "NICEGUI_STORAGE_PATH" not in os.environ:
        Storage.path = (state / "nicegui").resolve()
    if lan and host is None:
        host = "0.0.0.0"
    host = host or "127.0.0.1"
    if not is_loopback(host):  # anything reachable from other machines is token-gated
        services.lan = LanAccess(services.workspace, port)
    add_gate(services.lan, load_settings(services.workspace).allowed_hosts)  # Host and Origin are checked always
    if services.lan:
        urls = services.lan.urls()
        print("ForgeLLM is reachable from the LAN; other devices need the access token once:", flush=True)
        for url in urls:
            print(f"  {url}", flush=True)
        print(lan_qr(urls[0]), flush=True)
    if native:  # one line per page that connected back over its websocket (the window rendered the app)
        app.on_connect(lambda client: print(
            f"native window connected: {client.request.headers.get('user-agent', '?')}", flush=True))
        # stop when the window closes, not when its process ends: that process can hang on exit (pywebview's Qt
        # backend never answers an evaluate_js still pending at close, e.g. NiceGUI's own right after page load)
        app.native.on("closed", app.shutdown)
        DesktopNotifier(services.events).start()  # run endings and new bests reach the desktop, window hidden or not
        if sys.platform.startswith("linux"):
            app.native.start_args["gui"] = "qt"  # the supported backend here (GTK would fail first, noisily)
            if os.geteuid() == 0 and "--no-sandbox" not in os.environ.get("QTWEBENGINE_CHROMIUM_FLAGS", ""):
                # QtWebEngine refuses to run as root with its sandbox and then shows no window at all
                os.environ["QTWEBENGINE_CHROMIUM_FLAGS"] = (
                    os.environ.get("QTWEBENGINE_CHROMIUM_FLAGS", "") + " --no-sandbox").strip()
    serving = load_settings(services.workspace).serving
    if serving.enabled:  # kept on in the Settings page: the endpoint starts with the app
        app.on_startup(lambda: start_serving(services, serving.port, serving.lan))
    if os.environ.get(LAG_LOG_ENV):
        app.on_startup(lambda: background_tasks.create(probe_loop_lag(Path(os.environ[LAG_LOG_ENV]))))
    ui.run(make_root(services), host=host, port=port, reload=False, show=show, title="ForgeLLM",
           storage_secret=secret, native=native, reconnect_timeout=10.0, favicon="🔥")
