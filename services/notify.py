"""Run events, told to the person wherever they are: webhooks from the training worker, toasts in the app.

Events: a run ``completed``, ``failed``, ``early-stopped``, ``stopped`` or was ``interrupted``; a ``best``
checkpoint; the training queue is ``queue-empty``. Each is one plain dict (:func:`run_event`).

- The worker sends its own events to the workspace's webhooks (``.forgellm/settings.json``), so a run that ends
  overnight tells someone even with the app closed. Delivery runs on its own thread, retries with back-off and
  logs a failure; it never raises into training and never waits longer than ``timeout`` in all.
- The app's :class:`RunEvents` sees the same transitions from the run folders (also for runs another process
  started) and keeps them as a list with a version counter that every open page polls for toasts.
- In a native window, :class:`DesktopNotifier` also hands each of them to the desktop (Notification Center through
  ``osascript`` on macOS, ``notify-send`` on Linux), so a run that ends while the window is hidden is seen.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from typing import Any

from services.settings import SettingsError, Webhook, load_settings
from services.workspace import Workspace

log = logging.getLogger("forgellm")
ENDINGS = ("completed", "failed", "early-stopped", "stopped", "interrupted")
EVENTS = (*ENDINGS, "best", "queue-empty")
RETRIES = 3


def run_event(kind: str, info: dict[str, Any]) -> dict[str, Any]:
    """One event about a run (``info`` is its run.json) with a sentence a person reads first."""
    name = info.get("name") or info.get("id") or "a run"
    best = info.get("best") or {}
    best_text = (f" (best val loss {best['val_loss']:.4f} at {best['iteration']})"
                 if isinstance(best.get("val_loss"), (int, float)) else "")
    if kind == "best":
        text = f"{name}: new best checkpoint {best.get('iteration')}" + \
            (f", val loss {best['val_loss']:.4f}" if isinstance(best.get("val_loss"), (int, float)) else "")
    elif kind == "queue-empty":
        text = f"The training queue is empty: {name} was the last run"
    else:
        text = f"{name} {kind.replace('-', ' ')} at iteration {info.get('iteration') or 0}{best_text}"
        if kind in ("failed", "interrupted") and info.get("reason"):
            text += f": {str(info['reason']).splitlines()[0]}"
    return {"event": kind, "run": info.get("id"), "name": name, "status": info.get("status"),
            "iteration": info.get("iteration"), "reason": info.get("reason"), "best": best or None,
            "text": text, "time": round(time.time(), 3)}


def webhook_request(hook: Webhook, event: dict[str, Any]) -> urllib.request.Request:
    """The HTTP request of ``event`` in the webhook's format: our JSON, ntfy (text, title header), Slack or Discord."""
    headers = {"User-Agent": "ForgeLLM"}
    if hook.format == "ntfy":
        body = event["text"].encode()
        headers |= {"Content-Type": "text/plain; charset=utf-8", "Title": f"ForgeLLM: {event['event']}",
                    "Tags": "warning" if event["event"] in ("failed", "interrupted") else "white_check_mark"}
    else:
        payload = {"slack": {"text": event["text"]}, "discord": {"content": event["text"]}}.get(hook.format, event)
        body = json.dumps(payload).encode()
        headers["Content-Type"] = "application/json"
    return urllib.request.Request(hook.url, data=body, headers=headers, method="POST")


def deliver(hook: Webhook, event: dict[str, Any], timeout: float = 5.0, retries: int = RETRIES,
            sleep: Callable[[float], None] = time.sleep) -> str | None:
    """POST ``event`` to ``hook``, retrying with back-off; None when delivered, else why not (also logged)."""
    problem = None
    for attempt in range(retries):
        try:
            with urllib.request.urlopen(webhook_request(hook, event), timeout=timeout) as r:
                if 200 <= r.status < 300:
                    return None
                problem = f"HTTP {r.status}"
        except OSError as e:  # refused, unreachable, timed out, HTTP errors
            problem = str(e)
        if attempt + 1 < retries:
            sleep(0.5 * 2**attempt)
    log.warning("webhook %s: %s not delivered after %d tries: %s", hook.url, event["event"], retries, problem)
    return problem


def notify(ws: Workspace, event: dict[str, Any], wait: float = 0.0) -> list[threading.Thread]:
    """Send ``event`` to every webhook of the workspace on background threads; wait up to ``wait`` seconds for
    them (the worker waits a little as it ends, so the message leaves before the process does)."""
    try:
        hooks = load_settings(ws).webhooks
    except SettingsError as e:
        log.warning("no notification sent: %s", e)
        return []
    threads = [threading.Thread(target=deliver, args=(h, event), name="webhook", daemon=True) for h in hooks]
    for t in threads:
        t.start()
    wait_for(threads, wait)
    return threads


def wait_for(threads: list[threading.Thread], seconds: float) -> None:
    """Give the sending threads up to ``seconds`` in all (retries included), e.g. before a process exits."""
    deadline = time.monotonic() + seconds
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))


class RunEvents:
    """Run events the app sees in the run folders, for toasts on every open page; thread-safe.

    :meth:`observe` takes the runs as listed (run.json of each) and records endings and new best checkpoints
    since the last look; the first look only learns what is there. ``version`` moves with every new event.
    """

    def __init__(self, keep: int = 100):
        self.keep = keep
        self.version = 0
        self._lock = threading.Lock()
        self._events: list[dict[str, Any]] = []
        self._seen: dict[str, tuple[str | None, int | None]] | None = None

    def observe(self, runs: list[dict[str, Any]]) -> None:
        now = {r["id"]: (r.get("status"), (r.get("best") or {}).get("iteration")) for r in runs if r.get("id")}
        with self._lock:
            before, self._seen = self._seen, now
            if before is None:
                return
            new = []
            for r in runs:
                status, best = now.get(r.get("id"), (None, None))
                old_status, old_best = before.get(r.get("id"), (None, None))
                if best is not None and best != old_best and status not in ENDINGS:
                    new.append(run_event("best", r))
                if status in ENDINGS and status != old_status and old_status is not None:
                    new.append(run_event(status, r))
            if new:
                self._events = (self._events + new)[-self.keep:]
                self.version += len(new)

    def since(self, seen: int) -> tuple[int, list[dict[str, Any]]]:
        """The events after the first ``seen`` (a page's count so far), and the count to pass next time."""
        with self._lock:
            missed = self.version - seen
            return self.version, self._events[-missed:] if 0 < missed <= len(self._events) else []


def desktop_command(event: dict[str, Any], system: str = sys.platform) -> list[str] | None:
    """The command that shows ``event`` as a desktop notification here, or None where there is none."""
    text = event["text"]
    if system == "darwin":  # AppleScript strings take JSON's quoting of " and \\
        return ["osascript", "-e", f"display notification {json.dumps(text)} with title \"ForgeLLM\""]
    if system.startswith("linux") and (exe := shutil.which("notify-send")):
        return [exe, "--app-name=ForgeLLM", "ForgeLLM", text]
    return None


class DesktopNotifier:
    """Follows :class:`RunEvents` on a daemon thread and shows each new event on the desktop (native mode)."""

    def __init__(self, events: RunEvents, interval: float = 1.0, system: str = sys.platform):
        self.events, self.interval, self.system = events, interval, system
        self.seen = events.version
        self.shown = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> DesktopNotifier:
        self._thread = threading.Thread(target=self._follow, name="desktop-notifier", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _follow(self) -> None:
        while not self._stop.wait(self.interval):
            self.seen, new = self.events.since(self.seen)
            for event in new:
                self.show(event)

    def show(self, event: dict[str, Any]) -> bool:
        """One notification; False (and a log line) when the desktop has no notifier or it failed."""
        cmd = desktop_command(event, self.system)
        if cmd is None:
            return False
        try:
            subprocess.run(cmd, capture_output=True, timeout=10, check=True, stdin=subprocess.DEVNULL)
        except (OSError, subprocess.SubprocessError) as e:
            log.warning("desktop notification not shown: %s", e)
            return False
        self.shown += 1
        return True
