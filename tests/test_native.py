"""Native mode: ``forgellm start --native`` under Xvfb opens a Qt WebEngine window that loads the app, and
closing that window the way a window manager does (``WM_DELETE_WINDOW``) ends the process with code 0.

Needs the ``native`` extra (pywebview with Qt) and Debian's ``xvfb``; skipped without them.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
import os
import select
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.e2e.conftest import REPO, free_port

HAS_QT = all(importlib.util.find_spec(m) is not None for m in ("webview", "qtpy", "PyQt6"))
HAS_QT = HAS_QT and importlib.util.find_spec("PyQt6.QtWebEngineWidgets") is not None
XVFB = shutil.which("Xvfb")
TITLE = "ForgeLLM"  # the window title run_app passes to ui.run
CONNECTED = "native window connected:"  # run_app prints this from app.on_connect, with the page's user agent

pytestmark = [
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="native-window test drives an X server (Linux)"),
    pytest.mark.skipif(not HAS_QT, reason="pywebview/Qt not installed: pip install -e '.[native]'"),
    pytest.mark.skipif(not XVFB, reason="Xvfb not installed: apt-get install xvfb"),
]


# --------------------------------------------------------------------------- a bare X display, no window manager


@pytest.fixture
def xvfb_display():
    """``:N`` of a fresh Xvfb (the server picks a free display number and reports it on a pipe)."""
    read_fd, write_fd = os.pipe()
    proc = subprocess.Popen([XVFB, "-displayfd", str(write_fd), "-screen", "0", "1280x900x24", "-nolisten", "tcp",
                             "-noreset"], pass_fds=(write_fd,), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.close(write_fd)
    try:
        ready, _, _ = select.select([read_fd], [], [], 10)
        number = os.read(read_fd, 64).decode().strip() if ready else ""
        if not number:
            pytest.fail("Xvfb did not report a display number within 10 s")
        yield f":{number}"
    finally:
        os.close(read_fd)
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class _XClientMessage(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("serial", ctypes.c_ulong), ("send_event", ctypes.c_int),
                ("display", ctypes.c_void_p), ("window", ctypes.c_ulong), ("message_type", ctypes.c_ulong),
                ("format", ctypes.c_int), ("data", ctypes.c_long * 5)]


class _XEvent(ctypes.Union):
    _fields_ = [("xclient", _XClientMessage), ("pad", ctypes.c_long * 24)]


class XDisplay:
    """Just enough Xlib (through ctypes) to find a top-level window by title and ask it to close."""

    CLIENT_MESSAGE = 33

    def __init__(self, name: str):
        lib = ctypes.util.find_library("X11")
        if not lib:
            pytest.fail("libX11 not found (Debian: libx11-6)")
        x = self.x = ctypes.CDLL(lib)
        x.XOpenDisplay.restype, x.XOpenDisplay.argtypes = ctypes.c_void_p, [ctypes.c_char_p]
        x.XDefaultRootWindow.restype, x.XDefaultRootWindow.argtypes = ctypes.c_ulong, [ctypes.c_void_p]
        x.XInternAtom.restype, x.XInternAtom.argtypes = ctypes.c_ulong, [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int]
        x.XQueryTree.argtypes = [ctypes.c_void_p, ctypes.c_ulong, ctypes.POINTER(ctypes.c_ulong),
                                 ctypes.POINTER(ctypes.c_ulong), ctypes.POINTER(ctypes.POINTER(ctypes.c_ulong)),
                                 ctypes.POINTER(ctypes.c_uint)]
        x.XFetchName.argtypes = [ctypes.c_void_p, ctypes.c_ulong, ctypes.POINTER(ctypes.c_void_p)]
        x.XSendEvent.argtypes = [ctypes.c_void_p, ctypes.c_ulong, ctypes.c_int, ctypes.c_long,
                                 ctypes.POINTER(_XEvent)]
        x.XFree.argtypes = x.XCloseDisplay.argtypes = [ctypes.c_void_p]
        x.XSync.argtypes = [ctypes.c_void_p, ctypes.c_int]
        self.dpy = x.XOpenDisplay(name.encode())
        if not self.dpy:
            pytest.fail(f"cannot open X display {name}")

    def close(self) -> None:
        self.x.XCloseDisplay(self.dpy)

    def windows(self, title: str) -> list[int]:
        """Top-level windows (children of the root: there is no window manager) whose WM_NAME is ``title``."""
        x, root = self.x, self.x.XDefaultRootWindow(self.dpy)
        parent, top = ctypes.c_ulong(), ctypes.c_ulong()
        children, count = ctypes.POINTER(ctypes.c_ulong)(), ctypes.c_uint()
        if not x.XQueryTree(self.dpy, root, ctypes.byref(top), ctypes.byref(parent), ctypes.byref(children),
                            ctypes.byref(count)):
            return []
        found = []
        for i in range(count.value):
            name = ctypes.c_void_p()
            if x.XFetchName(self.dpy, children[i], ctypes.byref(name)) and name.value:
                if ctypes.string_at(name.value).decode(errors="replace") == title:
                    found.append(children[i])
                x.XFree(name)
        if children:
            x.XFree(children)
        return found

    def request_close(self, window: int) -> None:
        """What a window manager sends when the user clicks the close button: WM_PROTOCOLS / WM_DELETE_WINDOW."""
        ev = _XEvent()
        ev.xclient.type, ev.xclient.window, ev.xclient.format = self.CLIENT_MESSAGE, window, 32
        ev.xclient.message_type = self.x.XInternAtom(self.dpy, b"WM_PROTOCOLS", 0)
        ev.xclient.data[0] = self.x.XInternAtom(self.dpy, b"WM_DELETE_WINDOW", 0)
        ev.xclient.data[1] = 0  # CurrentTime
        if not self.x.XSendEvent(self.dpy, window, 0, 0, ctypes.byref(ev)):
            pytest.fail("XSendEvent failed")
        self.x.XSync(self.dpy, 0)


# --------------------------------------------------------------------------------------------------- the test


def _alive(p) -> bool:
    import psutil

    try:
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _kill_tree(pid: int) -> None:
    import psutil

    try:
        procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


@pytest.mark.parametrize("settle", [0.0, 1.5], ids=["close-right-after-load", "close-after-settling"])
def test_native_window_loads_the_app_and_closing_it_ends_the_process(tmp_path: Path, xvfb_display: str,
                                                                      settle: float):
    """Closing right after the page connected races NiceGUI's post-load JavaScript in the window process (which
    then never exits: see run_app); closing after a pause is the everyday case."""
    import psutil

    drop = {"PYTEST_CURRENT_TEST", "QT_QPA_PLATFORM", "WAYLAND_DISPLAY"}  # and NICEGUI_HOST/PORT/USER_SIMULATION…
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("NICEGUI_")}
    env.update(
        DISPLAY=xvfb_display, PYWEBVIEW_GUI="qt", NICEGUI_STORAGE_PATH=str(tmp_path / "nicegui"),
        XDG_DATA_HOME=str(tmp_path / "xdg-data"), XDG_CACHE_HOME=str(tmp_path / "xdg-cache"),
        MLX_DISABLE_COMPILE="1", HF_HUB_OFFLINE="1",
    )
    if os.geteuid() == 0:  # Chromium (inside Qt WebEngine) refuses to run as root with its sandbox
        env["QTWEBENGINE_CHROMIUM_FLAGS"] = (env.get("QTWEBENGINE_CHROMIUM_FLAGS", "") + " --no-sandbox").strip()
    port = free_port()
    cmd = [sys.executable, "-m", "app.cli", "--workspace", str(tmp_path / "ws"), "start", "--native",
           "--port", str(port)]
    lines: list[str] = []
    connected = threading.Event()

    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors="replace")

    def pump() -> None:
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            if line.startswith(CONNECTED) and "QtWebEngine" in line:
                connected.set()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    log = lambda: "\n".join(lines[-60:])  # noqa: E731
    display = XDisplay(xvfb_display)
    helpers: list = []
    try:
        # 1. the window's page ran NiceGUI's JavaScript and connected back over the websocket
        deadline = time.monotonic() + 25
        while not connected.is_set() and proc.poll() is None and time.monotonic() < deadline:
            connected.wait(0.2)
        assert connected.is_set(), f"no Qt WebEngine page connected (rc={proc.poll()}):\n{log()}"
        t_loaded = time.monotonic() - t0
        helpers = psutil.Process(proc.pid).children(recursive=True)
        assert any("QtWebEngineProcess" in (p.name() + " ".join(_cmdline(p))) for p in helpers), \
            f"no QtWebEngineProcess under the app: {[p.name() for p in helpers]}"

        # 2. exactly one top-level window with the app's title is on the display; close it
        time.sleep(settle)
        helpers += [p for p in psutil.Process(proc.pid).children(recursive=True) if p not in helpers]
        windows = display.windows(TITLE)
        assert len(windows) == 1, f"expected one '{TITLE}' window, found {len(windows)}"
        t_close = time.monotonic()
        display.request_close(windows[0])

        # 3. the process ends by itself, cleanly, and takes its window process and helpers with it
        try:
            rc = proc.wait(15)
        except subprocess.TimeoutExpired:
            pytest.fail(f"app still running 15 s after its window was closed:\n{log()}")
        t_exit = time.monotonic() - t_close
        assert rc == 0, f"app exited with {rc}:\n{log()}"
        deadline = time.monotonic() + 5
        while any(_alive(p) for p in helpers) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = [f"{p.pid} {p.name()}" for p in helpers if _alive(p)]
        assert not left, f"processes left behind after exit: {left}"
        assert display.windows(TITLE) == []
        reader.join(5)
        if settle:  # closing mid-load makes pywebview/NiceGUI log errors in the window process; a settled close not
            noise = [line for line in lines if line.startswith("Traceback") or "Vue failed to load" in line]
            assert not noise, f"errors in the app's output:\n{log()}"
        ua = next(line for line in lines if line.startswith(CONNECTED))
        print(f"\n{ua}\nwindow loaded the app after {t_loaded:.1f} s; process exited {t_exit:.1f} s after close")
    finally:
        (tmp_path / "app.log").write_text("\n".join(lines) + "\n")
        display.close()
        if proc.poll() is None:
            _kill_tree(proc.pid)
            proc.wait(5)
        for p in helpers:  # only if the test failed half-way: never leave a window process behind
            if _alive(p):
                p.kill()
        reader.join(5)


def _cmdline(p) -> list[str]:
    import psutil

    try:
        return p.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return []
