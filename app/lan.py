"""The gate in front of the app (Host, Origin, the LAN access token, throttled and logged failures), the persisted
secrets and the LAN links (with a QR code).

A browser on this machine passes; any other client must open a link with ``?token=…`` once (remembered in its
signed session).
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import secrets
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import segno
from nicegui import app
from starlette.responses import JSONResponse, PlainTextResponse, RedirectResponse

from services.system import host_name, is_local_request, is_loopback, lan_addresses
from services.workspace import Workspace, write_atomic

log = logging.getLogger("forgellm.lan")


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


class Throttle:
    """Failed token attempts per client address: the first ``free`` pass, then each further one bars the address
    for an exponentially growing delay (``base`` · 2^k s, at most ``cap``); forgotten after ``forget`` s of quiet.
    Every failure is logged with the address; tries refused while barred are counted and summed up in one line."""

    def __init__(self, free: int = 5, base: float = 1.0, cap: float = 300.0, forget: float = 900.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.free, self.base, self.cap, self.forget, self.clock = free, base, cap, forget, clock
        self._state: dict[str, list[float]] = {}  # address → [failures, barred until, refused while barred, last]
        self._lock = threading.Lock()

    def wait(self, address: str) -> float:
        """Seconds ``address`` must still wait before its next token is checked (0: check it now)."""
        with self._lock:
            now = self.clock()
            st = self._state.get(address)
            if st is None:
                return 0.0
            if now - st[3] > self.forget:
                del self._state[address]
                return 0.0
            if now < st[1]:
                st[2] += 1
                return st[1] - now
            if st[2]:
                log.warning("%s: %d token tries refused while throttled", address, int(st[2]))
                st[2] = 0
            return 0.0

    def failed(self, address: str) -> None:
        """Count (and log) a wrong token from ``address``; bar it once past the free tries."""
        with self._lock:
            now = self.clock()
            if len(self._state) > 10_000:  # bounded: drop the quiet ones
                for a in [a for a, st in self._state.items() if now - st[3] > self.forget]:
                    del self._state[a]
            st = self._state.setdefault(address, [0, 0.0, 0, now])
            st[0], st[3] = st[0] + 1, now
            log.warning("wrong access token from %s (%d in a row)", address, int(st[0]))
            if st[0] >= self.free:
                delay = min(self.cap, self.base * 2 ** (st[0] - self.free))
                st[1] = now + delay
                log.warning("throttling %s: its next token is checked in %.0f s (%d wrong tokens)",
                            address, delay, int(st[0]))

    def succeeded(self, address: str) -> None:
        with self._lock:
            self._state.pop(address, None)


class HostNames:
    """The names this app answers to: loopback names, this machine's addresses and host name, and the owner's
    ``allowed_hosts``. Addresses are looked up again (at most every few seconds) when an unknown one comes."""

    def __init__(self, extra: tuple[str, ...] = (), clock: Callable[[], float] = time.monotonic) -> None:
        self.extra, self.clock = {h.lower() for h in extra}, clock
        self._names: set[str] = set()
        self._looked = -1e9
        self._lookup()

    def _lookup(self) -> None:
        import socket  # noqa: PLC0415

        import psutil  # noqa: PLC0415

        names = {a.address.split("%")[0].lower() for addrs in psutil.net_if_addrs().values() for a in addrs
                 if a.family in (socket.AF_INET, socket.AF_INET6)}
        host = socket.gethostname().lower()
        self._names = names | {host, f"{host}.local"} | self.extra
        self._looked = self.clock()

    def __contains__(self, name: str) -> bool:
        if is_loopback(name) or name in self._names:
            return True
        if self.clock() - self._looked > 5.0:  # a new address (DHCP, a new interface) since the last look
            self._lookup()
            return name in self._names
        return False


def token_mark(token: str) -> str:
    """What a session stores once its token was right: replacing the token file signs every session out."""
    return hashlib.sha256(b"forgellm-lan:" + token.encode()).hexdigest()[:32]


def _header(scope: dict, name: bytes) -> str | None:
    for k, v in scope.get("headers") or ():
        if k == name:
            return v.decode("latin-1")
    return None


def _origin_ok(origin: str | None, host: str) -> bool:
    """No ``Origin`` (not a browser's cross-site request), or one whose host and port are the request's ``Host``."""
    if origin is None:
        return True
    parts = urlsplit(origin)
    return parts.scheme in ("http", "https") and parts.netloc.lower() == host.lower()


class Gate:
    """A pure ASGI gate over every HTTP request and websocket (NiceGUI's socket.io under ``/_nicegui_ws`` too):

    - ``Host`` must be a name this app answers to (:class:`HostNames`) and ``Origin``, when sent, that same host:
      a foreign page resolved to 127.0.0.1 (DNS rebinding) or another site's websocket gets nothing;
    - with a ``token`` (serving beyond loopback), a browser on this machine (loopback address *and* loopback
      ``Host``) passes; any other must open ``?token=…`` once (its signed session remembers it); wrong tokens are
      throttled per address (:class:`Throttle`) and logged.
    """

    def __init__(self, app: Callable, hosts: HostNames, token: str | LanAccess | None = None,
                 throttle: Throttle | None = None) -> None:
        self.app, self.hosts, self.access = app, hosts, token
        self.throttle = throttle or Throttle()

    @property
    def token(self) -> str | None:
        """The token now (a :class:`LanAccess` is read on every request: a rotation applies at once)."""
        return self.access.token if isinstance(self.access, LanAccess) else self.access

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        host = _header(scope, b"host") or ""
        if host_name(host) not in self.hosts:
            return await self.refuse(scope, receive, send, 421, f"421: this app does not answer to the host "
                                     f"{host_name(host)!r}; the owner can add it to allowed_hosts")
        if not _origin_ok(_header(scope, b"origin"), host):
            return await self.refuse(scope, receive, send, 403, "403: cross-origin request refused")
        client = (scope.get("client") or ("", 0))[0]
        session = scope.get("session")
        token = self.token  # once per request: each read looks at the token file
        if (token is None or is_local_request(client, host)
                or (session is not None and session.get("lan") == token_mark(token))):
            return await self.app(scope, receive, send)
        given = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("token", [""])[0]
        if not given:
            return await self.refuse(scope, receive, send, 401, TOKEN_NEEDED)
        wait = self.throttle.wait(client)
        if wait > 0:
            return await self.refuse(scope, receive, send, 429, f"429: too many wrong tokens; try again in "
                                     f"{wait:.0f} s", {"retry-after": str(max(1, round(wait)))})
        if not secrets.compare_digest(given.encode(), token.encode()):
            self.throttle.failed(client)
            return await self.refuse(scope, receive, send, 401, TOKEN_NEEDED)
        self.throttle.succeeded(client)
        if session is not None:  # NiceGUI's signed session cookie (always there under run_app)
            session["lan"] = token_mark(token)
        if scope["type"] == "websocket":
            return await self.app(scope, receive, send)
        return await RedirectResponse(scope.get("path") or "/")(scope, receive, send)

    @staticmethod
    async def refuse(scope: dict, receive: Callable, send: Callable, status: int, text: str,
                     headers: dict[str, str] | None = None) -> None:
        if scope["type"] == "websocket":  # closed before accept: the handshake gets HTTP 403
            await send({"type": "websocket.close", "code": 1008, "reason": text[:120]})
            return
        await PlainTextResponse(text, status_code=status, headers=headers)(scope, receive, send)


TOKEN_NEEDED = "401: open the link with ?token=… that `forgellm start --lan` printed"


def add_gate(token: str | LanAccess | None, allowed_hosts: tuple[str, ...] = ()) -> None:
    """Put :class:`Gate` in front of every route of the app (before ``ui.run``, so it sits inside NiceGUI's
    session middleware); ``token`` None when serving loopback only (then only Host and Origin are checked)."""
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    app.add_middleware(Gate, hosts=HostNames(allowed_hosts), token=token)


def lan_qr(url: str) -> str:
    """A QR code of ``url`` drawn with text blocks, for a phone's camera to read off the terminal."""
    buf = io.StringIO()
    segno.make(url, error="m").terminal(out=buf, compact=True)
    return buf.getvalue()


def lan_urls(port: int, token: str) -> list[str]:
    return [f"http://{a}:{port}/?token={token}" for a in lan_addresses()]


def lan_token(workspace: Workspace) -> str:
    """The LAN access token (``.forgellm/token``, made once): for the app's links and the API's bearer token."""
    return persisted_secret(token_path(workspace), nbytes=16)


def token_path(workspace: Workspace) -> Path:
    return workspace.root / ".forgellm" / "token"


class LanAccess:
    """The app's LAN access while it serves beyond loopback: the token (read back when its file changes) and the
    links that carry it; :meth:`rotate` replaces the token, which signs every other device out at once."""

    def __init__(self, workspace: Workspace, port: int) -> None:
        self.workspace, self.port = workspace, port
        self._lock = threading.Lock()
        self._token, self._stamp = lan_token(workspace), self._mtime()

    def _mtime(self) -> int | None:
        try:
            return token_path(self.workspace).stat().st_mtime_ns
        except OSError:
            return None

    @property
    def token(self) -> str:
        stamp = self._mtime()
        if stamp != self._stamp:  # rotated by another process of this workspace (or the file was replaced)
            with self._lock:
                self._token, self._stamp = lan_token(self.workspace), self._mtime()
        return self._token

    def rotate(self) -> str:
        """A new token in place of the old one (mode 0600, replaced atomically); returns it."""
        value = secrets.token_urlsafe(16)
        write_atomic(token_path(self.workspace), value + "\n")  # its temporary file is made 0600 (mkstemp)
        with self._lock:
            self._token, self._stamp = value, self._mtime()
        log.info("LAN access token rotated: every other device must open the new link")
        return value

    def urls(self) -> list[str]:
        """The links other devices open (one per address of this machine), the token included."""
        token = self.token
        return lan_urls(self.port, token) or [f"http://<this machine>:{self.port}/?token={token}"]


class ApiGate:
    """The gate of the OpenAI-compatible endpoint (:mod:`services.serving`): ``Host`` and ``Origin`` as
    :class:`Gate` checks them; with a ``token`` (on the LAN), a client that is not on this machine must send
    ``Authorization: Bearer TOKEN`` (wrong tokens throttled per address and logged). Refusals are OpenAI-style
    JSON errors."""

    def __init__(self, app: Callable, hosts: HostNames, token: Callable[[], str] | None = None,
                 throttle: Throttle | None = None) -> None:
        self.app, self.hosts, self.token = app, hosts, token  # token: read on every request (rotation applies)
        self.throttle = throttle or Throttle()

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        host = _header(scope, b"host") or ""
        if host_name(host) not in self.hosts:
            return await self.refuse(scope, receive, send, 421, f"this endpoint does not answer to the host "
                                     f"{host_name(host)!r}; the owner can add it to allowed_hosts", "host")
        if not _origin_ok(_header(scope, b"origin"), host):
            return await self.refuse(scope, receive, send, 403, "cross-origin request refused", "origin")
        client = (scope.get("client") or ("", 0))[0]
        if self.token is None or is_local_request(client, host):
            return await self.app(scope, receive, send)
        token = self.token()
        auth = _header(scope, b"authorization") or ""
        given = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
        wait = self.throttle.wait(client)
        if wait > 0:
            return await self.refuse(scope, receive, send, 429, f"too many wrong API keys; try again in {wait:.0f} s",
                                     "rate_limited", {"retry-after": str(max(1, round(wait)))})
        if not given or not secrets.compare_digest(given.encode(), token.encode()):
            if given:
                self.throttle.failed(client)
            return await self.refuse(scope, receive, send, 401, API_KEY_NEEDED, "invalid_api_key")
        self.throttle.succeeded(client)
        return await self.app(scope, receive, send)

    @staticmethod
    async def refuse(scope: dict, receive: Callable, send: Callable, status: int, text: str, code: str,
                     headers: dict[str, str] | None = None) -> None:
        from services.serving.protocol import error_body  # noqa: PLC0415

        kind = "authentication_error" if status == 401 else "invalid_request_error"
        await JSONResponse(error_body(text, None, kind, code), status_code=status, headers=headers)(
            scope, receive, send)


API_KEY_NEEDED = ("this endpoint is on the LAN: send the access token as the API key (Authorization: Bearer "
                  "TOKEN); it is in the workspace's .forgellm/token and on the Settings page")


def api_guard(workspace: Workspace) -> Callable[[Callable, Callable[[], str] | None], Callable]:
    """What :class:`services.serving.server.ServingServer` puts in front of the API: :class:`ApiGate` over the
    host names of this workspace's settings, with the LAN token's source when serving on the LAN."""
    from services.settings import load_settings  # noqa: PLC0415

    def guard(api: Callable, token: Callable[[], str] | None) -> Callable:
        return ApiGate(api, HostNames(load_settings(workspace).allowed_hosts), token)

    return guard
