"""LAN access over a real non-loopback connection: a network namespace joined to this one by a veth pair.

Only addresses inside the namespace pair this test creates are contacted; requests are few and bounded.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.e2e.conftest import AppProcess

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("ip") or not sys.platform.startswith("linux"),
    reason="needs root and iproute2 (Linux) to create a network namespace",
)

CLIENT = textwrap.dedent("""
    import json, sys, urllib.request, urllib.error, http.cookiejar
    url = sys.argv[1]
    jar = http.cookiejar.CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
    out = []
    for path in sys.argv[2:]:
        try:
            with opener.open(url + path, timeout=5) as r:
                out.append([r.status, r.url])
        except urllib.error.HTTPError as e:
            out.append([e.code, url + path])
        except OSError as e:
            out.append([0, type(e).__name__])
    print(json.dumps(out))
""")


def from_namespace(ns: str, url: str, *paths: str) -> list[list]:
    proc = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", CLIENT, url, *paths],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_lan_needs_the_token_and_the_default_is_not_reachable(netns, tmp_path, tiny_model):
    ns, host_ip = netns
    ws = tmp_path / "ws"
    lan = AppProcess(ws, tmp_path / "lan.log", extra=("--lan",))
    lan.start()
    try:
        token = (ws / ".forgellm" / "token").read_text().strip()
        assert oct((ws / ".forgellm" / "token").stat().st_mode & 0o777) == "0o600"
        url = f"http://{host_ip}:{lan.port}"
        assert from_namespace(ns, url, "/")[0][0] == 401
        assert from_namespace(ns, url, "/?token=wrong")[0][0] == 401
        ok = from_namespace(ns, url, f"/?token={token}", "/monitor")
        assert ok[0][0] == 200 and ok[0][1] == url + "/"  # redirected to the clean URL, now signed in
        assert ok[1][0] == 200  # the signed session cookie admits later requests
        log = Path(tmp_path / "lan.log").read_text()
        assert f"{host_ip}:{lan.port}/?token={token}" in log
        from app.lan import lan_qr

        first_url = next(line.strip() for line in log.splitlines() if "?token=" in line)
        assert lan_qr(first_url) in log  # the QR code of the first LAN link is printed for a phone to scan
    finally:
        lan.stop()
    local = AppProcess(ws, tmp_path / "local.log")
    local.start()
    try:
        status, error = from_namespace(ns, f"http://{host_ip}:{local.port}", "/")[0]
        assert status == 0 and error in ("ConnectionRefusedError", "URLError")  # not reachable at all
    finally:
        local.stop()


def test_the_app_shows_the_lan_links_to_a_local_browser(tmp_path):
    """The person at the machine finds the tokenised LAN links in the app (a header button and dialog)."""
    import urllib.request

    ws = tmp_path / "ws"
    lan = AppProcess(ws, tmp_path / "lan.log", extra=("--lan",))
    lan.start()
    try:
        token = (ws / ".forgellm" / "token").read_text().strip()
        with urllib.request.urlopen(lan.url + "/", timeout=10) as r:
            html = r.read().decode()
        assert "wifi" in html and token in html  # the LAN dialog with the tokenised links is on the page
    finally:
        lan.stop()


PROBE = textwrap.dedent("""
    import json, sys, time, urllib.request, urllib.error, http.cookiejar
    from websockets.sync.client import connect
    from websockets.exceptions import InvalidStatus
    url, token = sys.argv[1], sys.argv[2]
    jar = http.cookiejar.CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))

    def get(path, headers=None):
        req = urllib.request.Request(url + path, headers=headers or {})
        try:
            with opener.open(req, timeout=5) as r:
                return [r.status, r.read().decode(errors="replace"), dict(r.headers)]
        except urllib.error.HTTPError as e:
            return [e.code, e.read().decode(errors="replace"), dict(e.headers)]

    def socket(headers=None):
        cookie = "; ".join(f"{c.name}={c.value}" for c in jar)
        hdrs = {**({"Cookie": cookie} if cookie else {}), **(headers or {})}
        ws_url = url.replace("http", "ws", 1) + "/_nicegui_ws/socket.io/?EIO=4&transport=websocket"
        try:
            with connect(ws_url, additional_headers=hdrs, open_timeout=5) as ws:
                return [101, ws.recv(timeout=5)[:1]]  # engine.io's open packet starts with 0
        except InvalidStatus as e:
            return [e.response.status_code, ""]

    out = {"plain": get("/")[0], "socket_no_token": socket(), "foreign_host": get("/", {"Host": "attacker.example"})[0]}
    out["wrong"] = [get(f"/?token=wrong{i}")[0] for i in range(12)]
    right = get(f"/?token={token}")
    out["right_while_throttled"] = right[0]
    time.sleep(min(10, int(right[2].get("Retry-After", "1"))) + 0.5)
    out["right"] = get(f"/?token={token}")[0]
    out["socket_signed_in"] = socket()
    out["socket_foreign_origin"] = socket({"Origin": "http://attacker.example"})[0]
    out["datasets_html"] = get("/datasets")[1]
    print(json.dumps(out))
""")


def test_lan_security_from_another_machine(netns, tmp_path):
    """Issue 15 S1-S3, S5 over a real veth link: without the token the websocket is refused; a foreign Host or
    Origin is refused; brute force is throttled and logged; the Datasets page offers server paths only locally."""
    import urllib.request

    ns, host_ip = netns
    ns_ip = host_ip.rsplit(".", 1)[0] + ".2"
    ws = tmp_path / "ws"
    lan = AppProcess(ws, tmp_path / "lan.log", extra=("--lan",))
    lan.start()
    try:
        token = (ws / ".forgellm" / "token").read_text().strip()
        proc = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", PROBE,
                               f"http://{host_ip}:{lan.port}", token], capture_output=True, text=True, timeout=90)
        assert proc.returncode == 0, proc.stderr
        out = json.loads(proc.stdout)
        with urllib.request.urlopen(lan.url + "/datasets", timeout=10) as r:
            local_html = r.read().decode()
        foreign = urllib.request.Request(lan.url + "/", headers={"Host": f"attacker.example:{lan.port}"})
        with pytest.raises(urllib.error.HTTPError) as rebinding:
            urllib.request.urlopen(foreign, timeout=10)
    finally:
        lan.stop()
    assert out["plain"] == 401
    assert out["socket_no_token"][0] == 403  # S3: the websocket is behind the token too
    assert out["foreign_host"] == 421 and rebinding.value.code == 421  # S2, also on loopback (DNS rebinding)
    assert out["wrong"] == [401] * 5 + [429] * 7  # S5: slowed after 5 wrong tokens
    assert out["right_while_throttled"] == 429 and out["right"] == 200
    assert out["socket_signed_in"] == [101, "0"]  # signed in: the websocket opens
    assert out["socket_foreign_origin"] == 403  # S2: another site's page cannot use the session
    assert "upload your file instead" in out["datasets_html"]  # S1: no server-path import for this client
    assert "or from a file or folder on this machine" not in out["datasets_html"]
    assert "or from a file or folder on this machine" in local_html  # …but for the browser on this machine
    log = (tmp_path / "lan.log").read_text()
    assert log.count(f"wrong access token from {ns_ip}") == 5
    assert f"throttling {ns_ip}" in log and f"{ns_ip}: 8 token tries refused while throttled" in log
