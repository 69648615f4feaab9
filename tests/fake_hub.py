"""A local stand-in for the Hugging Face Hub's HTTP API, enough for ``huggingface_hub.snapshot_download``.

It serves one model folder as ``ORG/NAME`` at revision ``main``: the repo info and tree listings, and
``resolve`` HEAD/GET with ETag, commit and size headers and ``Range`` support, so downloads, progress and
resuming go through the real client code. ``throttle`` (bytes/s per response) makes a download slow enough to
cancel; ``served`` counts the body bytes sent and ``gets`` lists the files whose download started.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

COMMIT = "0123456789abcdef0123456789abcdef01234567"
CHUNK = 16 * 1024


class FakeHub:
    def __init__(self, repo: str, folder: Path, throttle: float | None = None):
        self.repo, self.folder, self.throttle = repo, Path(folder), throttle
        self.files = {p.relative_to(self.folder).as_posix(): p for p in sorted(self.folder.rglob("*")) if p.is_file()}
        self.served = 0
        self.gets: list[str] = []
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> FakeHub:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _etag(self, name: str) -> str:
        return hashlib.sha256(self.files[name].read_bytes()).hexdigest()

    def _info(self) -> dict:
        return {"id": self.repo, "modelId": self.repo, "sha": COMMIT, "private": False, "gated": False,
                "disabled": False, "tags": [], "lastModified": "2026-01-01T00:00:00.000Z",
                "siblings": [{"rfilename": n, "size": p.stat().st_size} for n, p in self.files.items()]}

    def _tree(self) -> list[dict]:
        return [{"type": "file", "path": n, "size": p.stat().st_size, "oid": self._etag(n)}
                for n, p in self.files.items()]

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _json(self, obj: object, status: int = 200, error_code: str | None = None) -> None:
                body = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                if error_code:
                    self.send_header("X-Error-Code", error_code)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _file(self, name: str) -> None:
                if name not in hub.files:
                    self.send_response(404)
                    self.send_header("X-Error-Code", "EntryNotFound")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                data = hub.files[name].read_bytes()
                rng = self.headers.get("Range")
                start = int(rng.removeprefix("bytes=").split("-")[0]) if rng else 0
                if self.command == "GET":
                    with hub.lock:
                        hub.gets.append(name)
                body = data[start:]
                self.send_response(206 if rng else 200)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("ETag", f'"{hub._etag(name)}"')
                self.send_header("X-Repo-Commit", COMMIT)
                if rng:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.end_headers()
                if self.command == "HEAD":
                    return
                for i in range(0, len(body), CHUNK):
                    piece = body[i:i + CHUNK]
                    try:
                        self.wfile.write(piece)
                    except (BrokenPipeError, ConnectionResetError):
                        return
                    with hub.lock:
                        hub.served += len(piece)
                    if hub.throttle:
                        time.sleep(len(piece) / hub.throttle)

            def _route(self) -> None:
                path = unquote(urlparse(self.path).path)
                api = f"/api/models/{hub.repo}"
                if path == "/api/models":
                    return self._json([])
                if path in (api, f"{api}/revision/main"):
                    return self._json(hub._info())
                if path.startswith(f"{api}/tree/"):
                    return self._json(hub._tree())
                prefix = f"/{hub.repo}/resolve/"
                if path.startswith(prefix):
                    _, _, name = path[len(prefix):].partition("/")
                    return self._file(name)
                if path.startswith("/api/models/"):
                    return self._json({"error": "Repository not found"}, 404, "RepoNotFound")
                return self._json({"error": f"unknown path {path}"}, 404)

            do_GET = do_HEAD = _route

        return Handler
