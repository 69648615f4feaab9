"""Serving beyond loopback: the persisted secrets, the access-token gate and the LAN links (with a QR code).

Loopback clients pass; any other client must open a link with ``?token=…`` once (remembered in its session).
"""

from __future__ import annotations

import io
import ipaddress
import os
import secrets
from pathlib import Path

import segno
from nicegui import app

from services.system import is_loopback


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


def add_token_gate(token: str) -> None:
    """Let loopback clients through; others must present ``?token=`` once (remembered in their session)."""
    from starlette.middleware.base import BaseHTTPMiddleware  # noqa: PLC0415
    from starlette.responses import PlainTextResponse, RedirectResponse  # noqa: PLC0415

    class TokenGate(BaseHTTPMiddleware):
        async def dispatch(self, request, call_next):
            client = request.client.host if request.client else ""
            if is_loopback(client) or app.storage.user.get("lan_ok"):
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
