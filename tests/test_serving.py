"""The OpenAI-compatible endpoint (issue 16, serving), driven by the ``openai`` client over real HTTP on a real
tiny run: the models listed, a chat completion streamed from a checkpoint, greedy output equal to
``forgellm generate``, one resident copy of the base, OpenAI-style errors, and the bearer token on the LAN.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import httpx
import openai
import pytest
from conftest import base_config

from app.composition import build_services, build_serving
from app.lan import LanAccess, lan_token
from services.serving.server import ServeError
from services.training.manager import RunManager
from services.workspace import Workspace

REPO = Path(__file__).resolve().parent.parent
PROMPT = "the cat eats"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model, chat_data) -> tuple[RunManager, str]:
    """A workspace with ``models/tiny``, a published copy and a 20-step LoRA run with checkpoints 10 and 20."""
    ws = Workspace.resolve(tmp_path_factory.mktemp("serve") / "ws")
    os.symlink(tiny_model, ws.models / "tiny")
    shutil.copytree(tiny_model, ws.published / "tiny-pub")
    manager = RunManager(ws)
    folder = manager.launch(base_config(ws.models / "tiny", chat_data, iters=20, save_every=10, steps_per_eval=10))
    info = manager.wait(folder.id, timeout=600)
    assert info["status"] == "completed", info
    return manager, folder.id


@pytest.fixture(scope="module")
def server(trained):
    manager, _ = trained
    srv = build_serving(manager)
    srv.start(free_port())
    yield srv
    srv.stop()


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key="unused-on-loopback", max_retries=0, timeout=120)


def forgellm_generate(manager: RunManager, *args: str) -> str:
    """What ``forgellm generate`` prints (the text, then one newline)."""
    proc = subprocess.run([sys.executable, "-m", "app.cli", "--workspace", str(manager.workspace.root), "generate",
                           "--model", "tiny", "--prompt", PROMPT, "--max-tokens", "16", *args],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.endswith("\n")
    return proc.stdout[:-1]


def test_lists_the_base_the_published_model_every_checkpoint_and_the_run(client, trained):
    _, run = trained
    ids = [m.id for m in client.models.list()]
    assert ids == ["tiny", "published/tiny-pub", run, f"{run}@20", f"{run}@10"], ids
    described = client.models.retrieve(f"{run}@10")
    assert described.id == f"{run}@10" and described.owned_by == "forgellm"


def test_a_streamed_chat_completion_from_a_checkpoint_equals_forgellm_generate(client, trained):
    manager, run = trained
    stream = client.chat.completions.create(model=f"{run}@10", messages=[{"role": "user", "content": PROMPT}],
                                            max_tokens=16, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 1  # streamed, not one block
    text = "".join(pieces)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].usage.completion_tokens > 0 and chunks[-1].usage.prompt_tokens > 0
    assert text == forgellm_generate(manager, "--adapter", f"{run}@10")
    base = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": PROMPT}],
                                          max_tokens=16, temperature=0)
    assert base.choices[0].message.content == forgellm_generate(manager)
    assert base.choices[0].message.content != text  # the checkpoint's adapter really is swapped in


def test_run_name_is_its_best_checkpoint_and_completions_equal_generate_in_completion_format(client, trained):
    manager, run = trained
    best = manager.get(run)["best"]["iteration"]
    by_run = client.completions.create(model=run, prompt=PROMPT, max_tokens=16, temperature=0)
    by_ckpt = client.completions.create(model=f"{run}@{best}", prompt=PROMPT, max_tokens=16, temperature=0)
    assert by_run.choices[0].text == by_ckpt.choices[0].text
    assert by_run.choices[0].text == forgellm_generate(manager, "--adapter", f"{run}@{best}", "--format",
                                                        "completion")
    streamed = client.completions.create(model=f"{run}@{best}", prompt=PROMPT, max_tokens=16, temperature=0,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == by_ckpt.choices[0].text


def test_base_checkpoint_base_keeps_one_copy_of_the_base(client, server, trained):
    _, run = trained
    figures = []
    for name in ("tiny", f"{run}@10", f"{run}@20", "tiny"):
        client.completions.create(model=name, prompt=PROMPT, max_tokens=4, temperature=0)
        resident = server.pool.resident()
        assert len(resident) == 1, resident  # one worker: the base
        (status,) = resident.values()
        figures.append((name, status["pid"], status["adapter_label"], status["memory"]["rss_gb"]))
    print("\nresident after each request (model, worker pid, adapter, worker RSS GB):")
    for f in figures:
        print(f"  {f[0]:<40} pid {f[1]}  {f[2]:<30} {f[3]:.3f} GB")
    assert len({f[1] for f in figures}) == 1  # never a second process, never a reload in a new one
    assert [f[2] for f in figures] == ["base", f"{run}@10", f"{run}@20", "base"]


def test_stop_sequences_cut_the_text(client, trained):
    _, run = trained
    full = client.completions.create(model=f"{run}@10", prompt=PROMPT, max_tokens=16, temperature=0)
    text = full.choices[0].text
    assert len(text) > 4
    stop = text[2:4]
    cut = client.completions.create(model=f"{run}@10", prompt=PROMPT, max_tokens=16, temperature=0, stop=[stop])
    assert cut.choices[0].text == text[:text.find(stop)] and cut.choices[0].finish_reason == "stop"


def test_bad_requests_get_openai_errors_naming_the_field(client, server):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"
    assert "'nope' is not served here" in e.value.body["message"] and "tiny" in e.value.body["message"]
    cases = [({"model": "tiny", "messages": []}, "messages"),
             ({"model": "tiny", "messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
             ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, "temperature"),
             ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 0},
              "max_completion_tokens"),
             ({"messages": [{"role": "user", "content": "x"}]}, "model"),
             ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "n": 3}, "n")]
    for body, param in cases:
        r = httpx.post(f"{server.base_url}/chat/completions", json=body, timeout=30)
        assert r.status_code == 400, (body, r.text)
        error = r.json()["error"]
        assert error["param"] == param and error["message"].startswith(param), error
    r = httpx.post(f"{server.base_url}/completions", content=b"{not json", timeout=30)
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = httpx.get(f"{server.base_url}/embeddings", timeout=30)
    assert r.status_code == 404 and "/v1/chat/completions" in r.json()["error"]["message"]
    r = httpx.get(f"{server.base_url}/models", headers={"Host": "attacker.example"}, timeout=30)
    assert r.status_code == 421  # DNS rebinding: a foreign name resolved to 127.0.0.1 gets nothing


def test_a_port_in_use_is_named(server, trained):
    manager, _ = trained
    with pytest.raises(ServeError, match=rf"port {server.port}: cannot listen"):
        build_serving(manager).start(server.port)
    with pytest.raises(ServeError, match="already serving"):
        server.start(server.port)


def test_requests_for_two_checkpoints_at_once_take_turns_on_the_one_base(client, trained):
    """A request never swaps the adapter under another one's generation: each gets its own checkpoint's text."""
    from concurrent.futures import ThreadPoolExecutor

    _, run = trained
    names = [f"{run}@10", f"{run}@20", "tiny", f"{run}@10"]

    def ask(name: str) -> str:
        stream = client.chat.completions.create(model=name, messages=[{"role": "user", "content": PROMPT}],
                                                max_tokens=16, temperature=0, stream=True)
        return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    alone = {name: ask(name) for name in set(names)}
    with ThreadPoolExecutor(len(names)) as pool:
        together = list(pool.map(ask, names))
    assert together == [alone[n] for n in names]
    assert len(set(alone.values())) == 3


async def test_the_pool_keeps_at_most_max_bases_resident(trained):
    """A published model is a base of its own; past ``max_bases`` the least recently used idle base is unloaded."""
    import psutil

    from services.serving.catalog import find_served
    from services.serving.pool import ModelPool

    manager, run = trained
    tiny, ckpt, pub = (find_served(manager, n) for n in ("tiny", f"{run}@10", "published/tiny-pub"))
    assert ckpt.model == tiny.model and pub.model != tiny.model
    pool = ModelPool(max_bases=1)
    try:
        first = (await pool.acquire(ckpt)).worker_pid
        pool.release(ckpt)
        await pool.acquire(pub)
        pool.release(pub)
        assert list(pool.resident()) == [str(pub.model)]
        assert not psutil.pid_exists(first) or psutil.Process(first).status() == psutil.STATUS_ZOMBIE
    finally:
        pool.close()
    assert pool.resident() == {}


def test_forgellm_serve_prints_the_url_and_serves_until_ctrl_c(trained):
    import signal

    manager, run = trained
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "app.cli", "--workspace", str(manager.workspace.root), "serve",
                             "--port", str(port)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        first = proc.stdout.readline()
        assert first == f"OpenAI-compatible endpoint: http://127.0.0.1:{port}/v1\n", (first, proc.stderr.read())
        assert proc.stdout.readline() == f"try: curl http://127.0.0.1:{port}/v1/models\n"
        listed = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=30).json()
        assert f"{run}@20" in [m["id"] for m in listed["data"]]
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
    bad = subprocess.run([sys.executable, "-m", "app.cli", "--workspace", str(manager.workspace.root), "serve",
                          "--port", "80"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--port: 80: give a port number from 1024 to 65535" in bad.stderr


CLIENT = textwrap.dedent("""
    import json, sys, urllib.request, urllib.error
    url, out = sys.argv[1], []
    for key in sys.argv[2:]:
        req = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key != "-" else {})
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                out.append([r.status, json.loads(r.read())])
        except urllib.error.HTTPError as e:
            out.append([e.code, json.loads(e.read())])
    print(json.dumps(out))
""")


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("ip") or not sys.platform.startswith("linux"),
                    reason="needs root and iproute2 (Linux) to create a network namespace")
def test_on_the_lan_a_client_without_the_token_gets_401(trained, netns):
    manager, _ = trained
    ns, host_ip = netns
    srv = build_serving(manager)
    port = free_port()
    srv.start(port, lan=True)
    try:
        token = lan_token(manager.workspace)
        assert srv.api_key == token
        assert f"http://{host_ip}:{port}/v1" in srv.urls()
        proc = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", CLIENT,
                               f"http://{host_ip}:{port}/v1/models", "-", "wrong", token],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        (no_key, no_body), (wrong, wrong_body), (right, right_body) = json.loads(proc.stdout)
        local = httpx.get(f"{srv.base_url}/models", timeout=30)  # this machine needs no key
        new = LanAccess(manager.workspace, port).rotate()  # Settings → Rotate, or another process of the workspace
        assert srv.api_key == new
        rotated = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", CLIENT,
                                  f"http://{host_ip}:{port}/v1/models", token, new],
                                 capture_output=True, text=True, timeout=60)
        assert rotated.returncode == 0, rotated.stderr
        (old_after, _), (new_after, _) = json.loads(rotated.stdout)
    finally:
        srv.stop()
    assert (old_after, new_after) == (401, 200)  # the endpoint's key changed with the token, without a restart
    assert no_key == 401 and no_body["error"]["code"] == "invalid_api_key"
    assert "Bearer" in no_body["error"]["message"]
    assert wrong == 401
    assert right == 200 and "tiny" in [m["id"] for m in right_body["data"]]
    assert local.status_code == 200


async def test_the_settings_page_starts_and_stops_serving_and_shows_the_url(trained):
    from nicegui.testing import user_simulation
    from uihelpers import el, set_value, wait_for

    from pages.shell import make_root
    from services.settings import Serving, load_settings

    manager, run = trained
    services = build_services(manager.workspace)
    port = free_port()
    try:
        async with user_simulation(make_root(services)) as user:
            await user.open("/settings")
            await user.should_see("Not serving.")
            set_value(user, "serve-port", 80)
            user.find(marker="serve-toggle").click()
            await user.should_see("port: 80: give a port number from 1024 to 65535")
            assert not services.serving.running
            set_value(user, "serve-port", port)
            user.find(marker="serve-toggle").click()
            url = f"http://127.0.0.1:{port}/v1"
            await wait_for(lambda: services.serving.running, timeout=30)
            await user.should_see(url, marker="serve-url")
            await user.should_see(f"curl {url}/models")
            await user.should_see("Stop serving")
            assert not el(user, "serve-port").enabled  # the port of a running endpoint cannot be edited
            user.find(marker="serve-url-copy").click()
            await user.should_see("Copied")
            assert load_settings(manager.workspace).serving == Serving(True, port, False)
            listed = httpx.get(f"{url}/models", timeout=30).json()
            assert f"{run}@10" in [m["id"] for m in listed["data"]]
            user.find(marker="serve-toggle").click()
            await wait_for(lambda: not services.serving.running, timeout=30)
            await user.should_see("Not serving.")
            assert load_settings(manager.workspace).serving == Serving(False, port, False)
            with pytest.raises(httpx.ConnectError):
                httpx.get(f"{url}/models", timeout=5)
            el(user, "serve-lan").value = True
            user.find(marker="serve-toggle").click()
            await wait_for(lambda: services.serving.running, timeout=30)
            await user.should_see(lan_token(manager.workspace), marker="serve-key")
            assert load_settings(manager.workspace).serving == Serving(True, port, True)
            user.find(marker="serve-toggle").click()
            await wait_for(lambda: not services.serving.running, timeout=30)
    finally:
        services.close()


def test_serving_settings_are_checked_and_kept_with_the_others(workspace):
    from services.settings import (
        Serving,
        SettingsError,
        Webhook,
        load_settings,
        set_serving,
        set_webhooks,
        settings_path,
    )

    assert load_settings(workspace).serving == Serving(False, 8090, False)
    set_webhooks(workspace, [Webhook("https://ntfy.sh/runs", "ntfy")])
    set_serving(workspace, True, 9001, True)
    set_webhooks(workspace, [Webhook("https://ntfy.sh/other", "ntfy")])
    settings = load_settings(workspace)
    assert settings.serving == Serving(True, 9001, True) and settings.webhooks[0].url == "https://ntfy.sh/other"
    with pytest.raises(SettingsError, match="port: 99999: give a port number from 1024 to 65535"):
        set_serving(workspace, True, 99999, False)
    path = settings_path(workspace)
    for bad, where in (({"port": "x"}, "serving.port: 'x'"), ({"enabled": "yes"}, "serving.enabled: expected true"),
                       ({"host": "0.0.0.0"}, "serving: unknown key(s) host"), ([], "serving: expected an object")):
        path.write_text(json.dumps({"serving": bad}))
        with pytest.raises(SettingsError, match=rf"settings.json: {where}".replace("(", r"\(").replace(")", r"\)")):
            load_settings(workspace)
