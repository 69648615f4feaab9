"""LAN access over a real non-loopback connection: a network namespace joined to this one by a veth pair.

Only addresses inside the namespace pair this test creates are contacted; requests are few and bounded.
"""

from __future__ import annotations

import json
import os
import random
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


@pytest.fixture
def netns():
    """A namespace ``ns`` at 10.231.N.2 reaching this host at 10.231.N.1 over a veth pair."""
    n = random.randint(1, 250)
    name, host_if, ns_if = f"fltest{os.getpid()}", f"flh{os.getpid() % 100000}", f"fln{os.getpid() % 100000}"
    host_ip, ns_ip = f"10.231.{n}.1", f"10.231.{n}.2"
    cmds = [
        ["ip", "netns", "add", name],
        ["ip", "link", "add", host_if, "type", "veth", "peer", "name", ns_if],
        ["ip", "link", "set", ns_if, "netns", name],
        ["ip", "addr", "add", f"{host_ip}/24", "dev", host_if],
        ["ip", "link", "set", host_if, "up"],
        ["ip", "netns", "exec", name, "ip", "addr", "add", f"{ns_ip}/24", "dev", ns_if],
        ["ip", "netns", "exec", name, "ip", "link", "set", ns_if, "up"],
    ]
    try:
        for c in cmds:
            subprocess.run(c, check=True, capture_output=True)
        yield name, host_ip
    finally:
        subprocess.run(["ip", "link", "del", host_if], capture_output=True)
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


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
