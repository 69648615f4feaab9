"""Issue 15, security: server paths only for this machine (S1), Host/Origin checks (S2), the websocket behind the
token (S3), throttled and logged wrong tokens (S5), no writing through symlinked run folders (S6).

The gate is tested here as ASGI over a tiny Starlette app with the same session middleware NiceGUI uses; the real
app over a veth pair into a network namespace is in ``tests/test_lan.py``.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.responses import PlainTextResponse
from starlette.routing import Route, WebSocketRoute
from starlette.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from app.lan import Gate, HostNames, Throttle
from services.config import ConfigError
from services.library.datasets import SCAN_LIMIT, dataset_format, import_dataset, list_datasets
from services.library.models import LibraryError
from services.settings import SettingsError, add_settings, load_settings, settings_path
from services.system import host_name, is_local_request
from services.training.manager import RunManager
from services.workspace import Workspace

TOKEN = "right-token"


# -- S2, S3, S5: the gate ------------------------------------------------------------------------------------------

class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def gated(token: str | None = TOKEN, clock: Clock | None = None) -> Starlette:
    async def page(request):
        return PlainTextResponse("the app")

    async def socket(ws):
        await ws.accept()
        await ws.send_text("connected")
        await ws.close()

    throttle = Throttle(clock=clock or Clock())
    return Starlette(routes=[Route("/", page), WebSocketRoute("/_nicegui_ws/socket.io/", socket)], middleware=[
        Middleware(SessionMiddleware, secret_key="s"),  # outside the gate, as under ui.run
        Middleware(Gate, hosts=HostNames(("forge.example",)), token=token, throttle=throttle)])


def remote(app: Starlette, host: str = "forge.example:8080") -> TestClient:
    return TestClient(app, base_url=f"http://{host}", client=("10.213.0.2", 40000))


def local(app: Starlette, host: str = "127.0.0.1:8080") -> TestClient:
    return TestClient(app, base_url=f"http://{host}", client=("127.0.0.1", 40000))


def socket_reply(c: TestClient, headers: dict | None = None) -> str:
    """What the websocket under NiceGUI's path says: ``connected``, or the gate's reason for closing it."""
    try:
        with c.websocket_connect(str(c.base_url).replace("http", "ws", 1) + "/_nicegui_ws/socket.io/",
                                 headers=headers or {}) as ws:
            return ws.receive_text()
    except WebSocketDisconnect as e:
        assert e.code == 1008
        return e.reason


def test_host_names_and_local_requests():
    assert host_name("[::1]:8080") == "::1" and host_name("LocalHost:80") == "localhost"
    assert host_name("10.0.0.1") == "10.0.0.1" and host_name("") == ""
    assert is_local_request("127.0.0.1", "localhost:8080") and is_local_request("::1", "[::1]:1")
    assert not is_local_request("127.0.0.1", "attacker.example:8080")  # DNS rebinding: a foreign name on loopback
    assert not is_local_request("10.0.0.2", "127.0.0.1:8080")


def test_foreign_host_is_refused_even_on_loopback_without_token():
    """S2: a page on attacker.example resolved to 127.0.0.1 gets nothing, with or without --lan."""
    for token in (TOKEN, None):
        c = local(gated(token), "attacker.example:8080")
        r = c.get("/")
        assert r.status_code == 421 and "attacker.example" in r.text
        assert socket_reply(c).startswith("421")
    assert local(gated(), "localhost:8080").get("/").text == "the app"
    assert local(gated(), "forge.example:8080").get("/").status_code == 401  # an owner's name: not loopback trust
    assert local(gated(None), "forge.example:8080").get("/").text == "the app"


def test_foreign_origin_is_refused_on_the_websocket_and_http():
    c = local(gated())
    assert socket_reply(c, {"origin": "http://attacker.example"}).startswith("403")
    assert socket_reply(c, {"origin": "http://127.0.0.1:9999"}).startswith("403")  # another port is another origin
    assert c.get("/", headers={"origin": "http://attacker.example"}).status_code == 403
    assert c.get("/", headers={"origin": "null"}).status_code == 403
    assert socket_reply(c, {"origin": "http://127.0.0.1:8080"}) == "connected"
    assert socket_reply(c) == "connected"


def test_websocket_needs_the_token_session():
    """S3: the websocket is refused without the token; after ?token= the session cookie admits it."""
    c = remote(gated())
    assert socket_reply(c).startswith("401")
    assert c.get("/").status_code == 401
    r = c.get(f"/?token={TOKEN}", follow_redirects=False)
    assert r.status_code == 307 and r.headers["location"] == "/" and "session" in r.cookies
    assert c.get("/").text == "the app"
    assert socket_reply(c) == "connected"
    assert socket_reply(c, {"origin": "http://attacker.example"}).startswith("403")  # signed in, foreign page
    other = remote(gated(token="a-new-token"))  # the token file replaced: old sessions are out
    other.cookies = c.cookies
    assert other.get("/").status_code == 401


def test_wrong_tokens_are_throttled_per_address_and_logged(caplog):
    """S5: 5 wrong tokens pass as 401, then the address waits 1, 2, 4… s (429, even for the right token);
    every failure is one log line with the address, a summary counts the tries refused while throttled."""
    clock = Clock()
    c = remote(gated(clock=clock))
    with caplog.at_level(logging.WARNING, logger="forgellm.lan"):
        codes = [c.get(f"/?token=wrong{i}").status_code for i in range(8)]
        assert codes == [401] * 5 + [429] * 3
        r = c.get(f"/?token={TOKEN}")
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        other = TestClient(c.app, base_url="http://forge.example:8080", client=("10.213.0.3", 1))
        assert other.get("/?token=wrong").status_code == 401  # another address is not held up
        clock.t += 1.5
        assert c.get("/?token=wrong-again").status_code == 401  # checked again, and barred for 2 s now
        assert c.get(f"/?token={TOKEN}").status_code == 429
        clock.t += 2.5
        assert c.get(f"/?token={TOKEN}", follow_redirects=False).status_code == 307
    lines = [r.getMessage() for r in caplog.records]
    assert sum("wrong access token from 10.213.0.2" in m for m in lines) == 6
    assert any("throttling 10.213.0.2" in m for m in lines)
    assert any("10.213.0.2: 4 token tries refused while throttled" in m for m in lines)
    assert sum("10.213.0.3" in m for m in lines) == 1


# -- S1: server paths ----------------------------------------------------------------------------------------------

@pytest.fixture
def secrets_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "server" / "secrets"
    folder.mkdir(parents=True)
    (folder / "id_rsa").write_text("PRIVATE KEY")
    (folder / "notes.txt").write_text("canary")
    return folder


def test_server_paths_are_for_this_machine_only(workspace: Workspace, secrets_folder: Path):
    """S1: a remote client cannot import or link server files; this machine can (and a copy takes only the
    dataset files: no id_rsa)."""
    for link in (False, True):
        with pytest.raises(LibraryError, match="upload your file instead"):
            import_dataset(workspace, secrets_folder, "stolen", link=link, local=False)
        with pytest.raises(LibraryError, match="upload your file instead"):
            import_dataset(workspace, secrets_folder / "notes.txt", local=False)
    assert not list(workspace.datasets.iterdir())
    copied = import_dataset(workspace, secrets_folder, "mine", local=True)
    assert sorted(p.name for p in copied.iterdir()) == ["notes.txt"]


def test_allow_listed_import_roots_for_remote_clients(workspace: Workspace, tmp_path: Path, secrets_folder: Path):
    shared = tmp_path / "shared"
    (shared / "corpus").mkdir(parents=True)
    (shared / "corpus" / "a.txt").write_text("allowed text")
    add_settings(workspace, import_roots=[str(shared)])
    assert load_settings(workspace).import_roots == (shared.resolve(),)
    assert import_dataset(workspace, shared / "corpus", "corpus", local=False).is_dir()
    with pytest.raises(LibraryError, match="not under a folder the owner allowed"):
        import_dataset(workspace, secrets_folder / "notes.txt", local=False)
    with pytest.raises(LibraryError, match="not under a folder the owner allowed"):
        import_dataset(workspace, shared / ".." / "server" / "secrets", "up", local=False)
    with pytest.raises(LibraryError, match="absolute path"):
        import_dataset(workspace, "corpus", "rel", local=False)
    (shared / "corpus" / "key.txt").symlink_to(secrets_folder / "notes.txt")
    with pytest.raises(LibraryError, match="symlink that leaves the allowed folders"):
        import_dataset(workspace, shared / "corpus", "corpus2", local=False)
    (shared / "escape.txt").symlink_to(secrets_folder / "notes.txt")
    with pytest.raises(LibraryError, match="not under a folder the owner allowed"):
        import_dataset(workspace, shared / "escape.txt", local=False)


def test_huge_trees_are_not_datasets_and_listing_is_bounded(workspace: Workspace, tmp_path: Path):
    """S1: linking a big tree that is no dataset is refused; a link made before stays cheap to list."""
    big = tmp_path / "big"
    big.mkdir()
    for i in range(SCAN_LIMIT + 10):
        (big / f"f{i:05d}.txt").touch()
    with pytest.raises(LibraryError, match=f"over {SCAN_LIMIT} files"):
        import_dataset(workspace, big, "big", link=True, local=True)
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "a.bin").write_bytes(b"x")
    with pytest.raises(LibraryError, match="not a dataset folder"):
        import_dataset(workspace, bare, "bare", link=True, local=True)
    (workspace.datasets / "old-link").symlink_to(big, target_is_directory=True)  # linked by an older version
    assert dataset_format(workspace.datasets / "old-link") == f"documents ({SCAN_LIMIT}+ files)"
    assert [d["key"] for d in list_datasets(workspace)] == ["old-link"]


def test_settings_file_errors_name_the_file_and_field(workspace: Workspace):
    path = settings_path(workspace)
    path.parent.mkdir(parents=True, exist_ok=True)
    for text, match in (('{"import_roots": [', r"settings.json:1: not valid JSON"),
                        ('{"import_root": []}', "unknown key.*import_root"),
                        ('{"import_roots": ["rel/dir"]}', r"import_roots\[0\]: 'rel/dir' is not an absolute"),
                        ('{"allowed_hosts": [3]}', "allowed_hosts: expected a list"),
                        ("[]", "expected a JSON object")):
        path.write_text(text)
        with pytest.raises(SettingsError, match=match):
            load_settings(workspace)
        with pytest.raises(SettingsError):
            import_dataset(workspace, path, local=False)
    path.unlink()
    add_settings(workspace, allowed_hosts=["Forge.Lan"])
    assert load_settings(workspace).allowed_hosts == ("forge.lan",)
    with pytest.raises(SettingsError, match="no such folder"):
        add_settings(workspace, import_roots=["/no/such/folder"])


# -- S6: symlinked run folders -------------------------------------------------------------------------------------

def fake_running_run(folder: Path) -> Path:
    folder.mkdir(parents=True)
    info = {"id": folder.name, "status": "running", "pid": 2 ** 22 + 12345, "iteration": 3, "created": 1.0}
    (folder / "run.json").write_text(json.dumps(info))
    return folder / "run.json"


def test_symlinked_run_folder_is_never_written(workspace: Workspace, tmp_path: Path, caplog):
    """S6: `forgellm runs` (and the pages' listing) neither refresh nor write a run folder that is a symlink, or
    that holds a symlink leaving the workspace."""
    from app.cli import main

    outside = fake_running_run(tmp_path / "outside" / "fake-run")
    before = outside.read_bytes()
    (workspace.runs / "zzz-linked").symlink_to(outside.parent, target_is_directory=True)
    inner = fake_running_run(workspace.runs / "zzz-inner")
    (inner.parent / "metrics.jsonl").symlink_to(tmp_path / "outside" / "metrics.jsonl")
    manager = RunManager(workspace)
    with caplog.at_level(logging.WARNING, logger="forgellm"):
        assert manager.list() == []
        assert main(["--workspace", str(workspace.root), "runs"]) == 0
    assert outside.read_bytes() == before and not (outside.parent / "metrics.jsonl").exists()
    assert not (tmp_path / "outside" / "metrics.jsonl").exists()
    assert json.loads(inner.read_text())["status"] == "running"  # not refreshed through the link either
    assert sum("not listed" in r.getMessage() for r in caplog.records) == 4  # once each per manager (ours, the CLI's)
    for run_id in ("zzz-linked", "zzz-inner", "../../outside/fake-run"):
        with pytest.raises(ConfigError):
            manager.folder(run_id)
        with pytest.raises(ConfigError):
            manager.set_label(run_id, "x")
    assert outside.read_bytes() == before


def test_a_plain_run_folder_is_still_listed(workspace: Workspace):
    run_json = fake_running_run(workspace.runs / "plain")
    os.symlink(workspace.datasets, workspace.runs / "plain" / "data-link")  # a link inside the workspace is fine
    (info,) = RunManager(workspace).list()
    assert info["status"] == "interrupted" and json.loads(run_json.read_text())["status"] == "interrupted"


# -- S1 on the Datasets page -----------------------------------------------------------------------------------

@pytest.fixture
def services(workspace, tmp_path, monkeypatch):
    from app.composition import build_services

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))
    s = build_services(workspace)
    yield s
    s.close()


@pytest.mark.parametrize(("client", "base", "field"), [
    (("127.0.0.1", 5000), "http://localhost", True),  # a browser on this machine
    (("10.213.0.2", 5000), "http://10.213.0.1:8080", False),  # another device
    (("127.0.0.1", 5000), "http://attacker.example", False),  # a foreign name on loopback is not this machine
])
async def test_datasets_page_offers_server_paths_only_to_this_machine(services, client, base, field):
    import httpx
    from nicegui import core
    from nicegui.testing import user_simulation
    from uihelpers import els

    from pages.shell import make_root

    async with user_simulation(make_root(services)) as user:
        user.http_client = httpx.AsyncClient(transport=httpx.ASGITransport(core.app, client=client), base_url=base)
        await user.open("/datasets")
        await user.should_see(marker="dataset-path-note")
        assert bool(els(user, "dataset-path")) is field and bool(els(user, "dataset-import-path")) is field
        if not field:
            await user.should_see("upload your file instead")
            await user.should_see(marker="dataset-upload")


def test_rotating_the_lan_token_signs_every_other_device_out_at_once(workspace: Workspace):
    """Settings → LAN access → Rotate: the gate reads the token of its LanAccess on every request."""
    from app.lan import LanAccess, lan_token

    access = LanAccess(workspace, 8080)
    old = access.token
    assert old == lan_token(workspace) and all(f"token={old}" in u for u in access.urls())
    c = remote(gated(token=access))
    assert c.get(f"/?token={old}", follow_redirects=False).status_code == 307 and c.get("/").text == "the app"
    new = access.rotate()
    assert new != old and lan_token(workspace) == new
    assert (workspace.root / ".forgellm" / "token").stat().st_mode & 0o777 == 0o600
    assert c.get("/").status_code == 401  # the signed-in session is out, without a restart
    assert c.get(f"/?token={old}").status_code == 401
    assert c.get(f"/?token={new}", follow_redirects=False).status_code == 307
    (workspace.root / ".forgellm" / "token").write_text("from-another-process\n")  # e.g. a second app instance
    assert access.token == "from-another-process"


@pytest.mark.parametrize(("client", "base", "shown"), [
    (("127.0.0.1", 5000), "http://localhost", True),  # a browser on this machine sees links and may rotate
    (("10.213.0.2", 5000), "http://10.213.0.1:8080", False),  # another device sees neither
])
async def test_the_settings_lan_card_shows_links_and_rotates_only_for_this_machine(services, client, base, shown):
    import httpx
    from nicegui import core
    from nicegui.testing import user_simulation
    from uihelpers import els

    from app.lan import LanAccess
    from pages.shell import make_root

    services.lan = LanAccess(services.workspace, 8080)
    old = services.lan.token
    async with user_simulation(make_root(services)) as user:
        user.http_client = httpx.AsyncClient(transport=httpx.ASGITransport(core.app, client=client), base_url=base)
        await user.open("/settings")
        await user.should_see(marker="lan-state")
        assert bool(els(user, "lan-rotate")) is shown
        if shown:
            assert any(old in el.text for el in els(user, "lan-url"))
            user.find(marker="lan-rotate").click()
            user.find(marker="lan-rotate-confirm").click()
            await user.should_see("New access token")
            assert services.lan.token != old
            assert any(services.lan.token in el.text for el in els(user, "lan-url"))


async def test_the_settings_page_says_lan_access_is_off_and_shows_the_workspace(services):
    from nicegui.testing import user_simulation

    from pages.shell import make_root

    async with user_simulation(make_root(services)) as user:
        await user.open("/settings")
        await user.should_see("Off: this app answers only on this machine")
        await user.should_see(str(services.workspace.root), marker="workspace-path")
        await user.should_see(marker="workspace-contents")
