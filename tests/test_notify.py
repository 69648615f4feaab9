"""Notifications (issue 16, item 2): webhooks from the worker in four formats, retried and never in the way, and
a toast on every open page for each run event."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from conftest import base_config
from nicegui.testing import User

from app.composition import build_services
from pages.shell import make_root
from services.notify import DesktopNotifier, RunEvents, deliver, desktop_command, notify, run_event, webhook_request
from services.settings import SettingsError, Webhook, load_settings, set_webhooks
from services.training.folder import RunFolder


class Receiver:
    """A local HTTP endpoint that keeps every POST (path, headers, body)."""

    def __init__(self):
        got = self.got = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers["Content-Length"]))
                got.append((self.path, dict(self.headers), body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def events(self) -> list[dict]:
        return [json.loads(body) for _, _, body in self.got]


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.server.shutdown()


INFO = {"id": "r1", "name": "demo", "status": "completed", "iteration": 40,
        "best": {"iteration": 30, "val_loss": 1.23456}}


def test_each_format_is_what_its_service_expects():
    event = run_event("completed", INFO)
    assert event["text"] == "demo completed at iteration 40 (best val loss 1.2346 at 30)"
    req = webhook_request(Webhook("http://x.test/h", "json"), event)
    assert req.get_method() == "POST" and json.loads(req.data) == event
    assert json.loads(webhook_request(Webhook("http://x.test/h", "slack"), event).data) == {"text": event["text"]}
    assert json.loads(webhook_request(Webhook("http://x.test/h", "discord"), event).data) == \
        {"content": event["text"]}
    ntfy = webhook_request(Webhook("http://x.test/h", "ntfy"), event)
    assert ntfy.data == event["text"].encode() and ntfy.get_header("Title") == "ForgeLLM: completed"
    failed = run_event("failed", {**INFO, "status": "failed", "reason": "loss became nan\ntraceback…"})
    assert failed["text"].endswith(": loss became nan")


def test_webhooks_are_settings_checked_and_kept_with_the_others(workspace):
    set_webhooks(workspace, [Webhook("https://ntfy.sh/runs", "ntfy")])
    assert load_settings(workspace).webhooks == (Webhook("https://ntfy.sh/runs", "ntfy"),)
    with pytest.raises(SettingsError, match="url 'ftp://x': give an http"):
        set_webhooks(workspace, [Webhook("ftp://x", "json")])
    with pytest.raises(SettingsError, match="format 'teams': choose one of json, ntfy, slack, discord"):
        set_webhooks(workspace, [Webhook("https://x.test/h", "teams")])
    path = workspace.root / ".forgellm" / "settings.json"
    path.write_text('{"webhooks": [{"url": "https://ok.test/h"}, {"url": "nope"}]}')
    with pytest.raises(SettingsError, match=r"settings.json: webhooks\[1\]: url 'nope'"):
        load_settings(workspace)


def test_a_receiver_that_is_down_is_retried_logged_and_never_waited_on_for_long(workspace, caplog):
    sleeps = []
    with caplog.at_level("WARNING", logger="forgellm"):
        problem = deliver(Webhook("http://127.0.0.1:9/h"), run_event("completed", INFO), timeout=1, sleep=sleeps.append)
    assert problem and sleeps == [0.5, 1.0] and "not delivered after 3 tries" in caplog.text
    set_webhooks(workspace, [Webhook("http://127.0.0.1:9/h")])
    t0 = time.monotonic()
    threads = notify(workspace, run_event("completed", INFO), wait=0.2)
    assert time.monotonic() - t0 < 1.0 and len(threads) == 1  # the caller goes on; delivery retries behind it


def test_a_real_run_posts_its_best_checkpoints_its_end_and_the_empty_queue(manager, tiny_model, chat_data, receiver):
    set_webhooks(manager.workspace, [Webhook(receiver.url + "/hook")])
    folder = manager.enqueue(base_config(tiny_model, chat_data, iters=20, save_every=10, steps_per_eval=10))
    assert manager.wait(folder.id, timeout=240)["status"] == "completed"
    deadline = time.time() + 20
    while "queue-empty" not in [e["event"] for e in receiver.events()] and time.time() < deadline:
        time.sleep(0.1)
    kinds = [e["event"] for e in receiver.events()]
    assert kinds.count("completed") == 1 and "best" in kinds and kinds[-1] == "queue-empty", kinds
    done = next(e for e in receiver.events() if e["event"] == "completed")
    assert done["run"] == folder.id and done["iteration"] == 20 and done["text"].startswith(f"{folder.id} completed")
    assert all(path == "/hook" and headers["Content-Type"] == "application/json" for path, headers, _ in receiver.got)


def test_run_events_are_the_changes_between_two_looks():
    events = RunEvents()
    runs = [{"id": "a", "status": "running", "best": None}, {"id": "b", "status": "completed"}]
    events.observe(runs)
    assert events.version == 0  # the first look only learns what is there
    events.observe([{"id": "a", "status": "running", "best": {"iteration": 10, "val_loss": 2.0}},
                    {"id": "b", "status": "completed"}])
    events.observe([{"id": "a", "status": "failed", "reason": "boom", "best": {"iteration": 10, "val_loss": 2.0}},
                    {"id": "b", "status": "completed"}])
    seen, new = events.since(0)
    assert seen == 2 and [e["event"] for e in new] == ["best", "failed"]
    assert events.since(seen) == (2, [])


def test_the_desktop_command_of_each_platform():
    event = run_event("failed", {"id": "r", "name": 'say "hi"', "status": "failed", "reason": "boom"})
    mac = desktop_command(event, "darwin")
    assert mac[:2] == ["osascript", "-e"] and json.dumps(event["text"]) in mac[2] and '\\"hi\\"' in mac[2]
    assert desktop_command(event, "win32") is None


def test_a_native_window_hands_each_new_event_to_the_desktop(tmp_path, monkeypatch):
    shown = tmp_path / "shown.txt"
    exe = tmp_path / "bin" / "notify-send"  # a real program in place of the desktop's, recording what it was asked
    exe.parent.mkdir()
    exe.write_text(f"#!/bin/sh\nprintf '%s|' \"$@\" >> {shown}\necho >> {shown}\n")
    exe.chmod(0o755)
    monkeypatch.setenv("PATH", f"{exe.parent}:/usr/bin:/bin")
    events = RunEvents()
    events.observe([{"id": "a", "name": "demo", "status": "running", "best": None}])
    notifier = DesktopNotifier(events, interval=0.05, system="linux").start()
    try:
        events.observe([{"id": "a", "name": "demo", "status": "completed", "iteration": 4, "best": None}])
        deadline = time.monotonic() + 10
        while notifier.shown < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        notifier.stop()
    lines = shown.read_text().splitlines()
    assert len(lines) == 1 and lines[0].startswith("--app-name=ForgeLLM|ForgeLLM|demo completed")


@pytest.fixture
def services(workspace):
    s = build_services(workspace)
    yield s
    s.close()


async def test_an_open_page_toasts_a_run_that_ends(services):
    from nicegui.testing import user_simulation

    folder = RunFolder(services.workspace.runs / "r1")
    folder.path.mkdir(parents=True)
    folder.update(id="r1", name="demo", status="stopped", iteration=5, checkpoints=[], best=None)
    async with user_simulation(make_root(services)) as user:
        user: User
        await user.open("/train")
        await user.should_see(marker="status-strip")
        folder.update(status="completed", iteration=40, best={"iteration": 30, "val_loss": 1.5})
        services.status.forget()
        await user.should_see("demo completed at iteration 40 (best val loss 1.5000 at 30)")


def test_whoever_finds_a_killed_worker_sends_interrupted(manager, tiny_model, chat_data, receiver):
    import os
    import signal

    set_webhooks(manager.workspace, [Webhook(receiver.url, "slack")])
    folder = manager.launch(base_config(tiny_model, chat_data, iters=2000, save_every=1000, steps_per_eval=1000))
    deadline = time.time() + 120
    while manager.get(folder.id).get("status") != "running" and time.time() < deadline:
        time.sleep(0.05)
    os.kill(manager.get(folder.id)["pid"], signal.SIGKILL)
    time.sleep(0.5)
    assert manager.get(folder.id)["status"] == "interrupted"
    texts = [json.loads(body)["text"] for _, _, body in receiver.got]
    assert len(texts) == 1 and texts[0].startswith(f"{folder.id} interrupted at iteration"), texts
