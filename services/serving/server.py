"""The OpenAI-compatible endpoint: a Starlette app over :mod:`~services.serving.catalog` and
:mod:`~services.serving.pool`, served by its own uvicorn server on its own port (in a thread for the app's
Settings page, in the foreground for ``forgellm serve``), never inside the UI's app.

Generation goes through :class:`~services.inference.service.ModelService`, the path of the Playground and of
``forgellm generate``: greedy output is theirs, token for token.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from services.errors import ForgeError
from services.inference.service import GenerationStream, ModelError
from services.serving import protocol as p
from services.serving.catalog import Served, UnknownModel, find_served, served_models
from services.serving.pool import ModelPool
from services.system import lan_addresses
from services.training.manager import RunManager

Guard = Callable[[ASGIApp, "Callable[[], str] | None"], ASGIApp]  # (the API, where to read the LAN token, or None)
# -> the API behind the gate
LOOPBACK, ALL = "127.0.0.1", "0.0.0.0"


class ServeError(ForgeError):
    """The endpoint cannot start (port in use, already serving, no gate for the LAN); the message says why."""


def _error(e: p.ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


class _Held(StreamingResponse):
    """A stream that lets its base go (and stops its generation) however it ends, even unsent."""

    def __init__(self, content: AsyncIterator[bytes], done: Callable[[], None]) -> None:
        super().__init__(content, media_type="text/event-stream", headers={"cache-control": "no-cache"})
        self._done = done

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._done()


class Api:
    """The routes of ``/v1``; one per server run (its pool belongs to that server's event loop)."""

    def __init__(self, manager: RunManager, pool: ModelPool) -> None:
        self.manager, self.pool = manager, pool

    def app(self) -> Starlette:
        async def not_found(request: Request, exc: HTTPException) -> JSONResponse:
            return _error(p.ApiError(f"{request.method} {request.url.path}: {exc.detail}; this endpoint serves "
                                     "GET /v1/models, POST /v1/chat/completions and POST /v1/completions",
                                     status=exc.status_code, code="not_found" if exc.status_code == 404 else None))

        return Starlette(routes=[Route("/v1/models", self.models), Route("/v1/models/{name:path}", self.model),
                                 Route("/v1/chat/completions", self.chat, methods=["POST"]),
                                 Route("/v1/completions", self.completions, methods=["POST"])],
                         exception_handlers={404: not_found, 405: not_found})

    async def models(self, request: Request) -> JSONResponse:
        found = await asyncio.to_thread(served_models, self.manager)
        return JSONResponse({"object": "list", "data": [s.describe() for s in found]})

    async def model(self, request: Request) -> JSONResponse:
        try:
            return JSONResponse((await self._find(request.path_params["name"])).describe())
        except p.ApiError as e:
            return _error(e)

    async def _find(self, name: str) -> Served:
        try:
            return await asyncio.to_thread(find_served, self.manager, name)
        except UnknownModel as e:
            raise p.ApiError(str(e), "model", 404, code="model_not_found") from None

    async def chat(self, request: Request) -> Response:
        return await self._generate(request, chat=True)

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, chat=False)

    async def _generate(self, request: Request, chat: bool) -> Response:
        try:
            body = p.parse_json(await request.body())
            name, req, stops = p.model_name(body), p.to_request(body, chat), p.stops(body)
            served = await self._find(name)
        except p.ApiError as e:
            return _error(e)
        try:
            service = await self.pool.acquire(served)
        except ModelError as e:
            return _error(p.ApiError(f"model {name!r} could not be loaded: {e}", "model", 500, "server_error"))
        try:
            stream = service.generate(req)
            chunks = stream.__aiter__()
            first = await chunks.__anext__()  # a prompt the model refuses is still a JSON error, not a broken stream
        except ModelError as e:
            self.pool.release(served)
            return _error(p.ApiError(str(e), "messages" if chat else "prompt"))
        except BaseException:
            self.pool.release(served)
            raise
        gen = _Generation(chat, name, stream, chunks, first, p.StopScanner(stops))
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

            def done() -> None:
                stream.cancel()
                self.pool.release(served)

            return _Held(gen.events(include_usage), done)
        try:
            return JSONResponse(await gen.whole())
        except ModelError as e:
            return _error(p.ApiError(str(e), status=500, type="server_error"))
        finally:
            self.pool.release(served)


class _Generation:
    """One generation's chunks turned into OpenAI's reply, whole or as server-sent events."""

    def __init__(self, chat: bool, model: str, stream: GenerationStream, chunks: AsyncIterator[dict[str, Any]],
                 first: dict[str, Any], scanner: p.StopScanner) -> None:
        self.chat, self.model, self.stream, self.chunks, self.first = chat, model, stream, chunks, first
        self.scanner, self.id = scanner, p.new_id(chat)

    async def texts(self) -> AsyncIterator[str]:
        """The text pieces to send, cut at a stop sequence (the generation is then cancelled)."""
        chunk: dict[str, Any] | None = self.first
        while chunk is not None and chunk.get("type") == "token":
            text = self.scanner.feed(chunk["text"])
            if text:
                yield text
            if self.scanner.hit:
                self.stream.cancel()
                break
            chunk = await anext(self.chunks, None)
        async for _ in self.chunks:  # after a cancel: up to the final summary
            pass
        tail = self.scanner.flush()
        if tail:
            yield tail

    async def whole(self) -> dict[str, Any]:
        text = "".join([t async for t in self.texts()])
        return p.reply(self.chat, self.id, self.model, text, self.stream.result or {}, self.scanner.hit)

    async def events(self, include_usage: bool) -> AsyncIterator[bytes]:
        if self.chat:
            yield p.sse(p.chunk(True, self.id, self.model, "", first=True))
        async for text in self.texts():
            yield p.sse(p.chunk(self.chat, self.id, self.model, text))
        result = self.stream.result or {}
        yield p.sse(p.chunk(self.chat, self.id, self.model, None, p.finish_reason(result, self.scanner.hit)))
        if include_usage:
            yield p.sse({"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                         "created": int(time.time()), "model": self.model, "choices": [], "usage": p.usage(result)})
        yield p.sse("[DONE]")


def _bind(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ServeError(f"port {port}: cannot listen on {host}:{port} ({e.strerror or e}); choose another port "
                         "or stop what uses it") from None
    sock.listen(128)
    sock.set_inheritable(False)
    return sock


class ServingServer:
    """Start and stop the endpoint; ``guard`` (from ``app``) puts the access gate in front of it, ``lan_token``
    gives the LAN access token that clients on other devices send as their API key."""

    def __init__(self, manager: RunManager, guard: Guard | None = None, lan_token: Callable[[], str] | None = None,
                 max_bases: int = 2) -> None:
        self.manager, self.guard, self.lan_token, self.max_bases = manager, guard, lan_token, max_bases
        self._lock = threading.Lock()
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self.pool: ModelPool | None = None
        self.port: int | None = None
        self.lan = False
        self.version = 0  # grows on every start and stop

    def _prepare(self, port: int, lan: bool) -> tuple[uvicorn.Server, socket.socket]:
        if lan and (self.guard is None or self.lan_token is None):
            raise ServeError("serving on the LAN needs the access gate (bearer token); start it from the app or "
                             "`forgellm serve --lan`")
        sock = _bind(ALL if lan else LOOPBACK, port)
        self.pool = ModelPool(self.max_bases)
        api = Api(self.manager, self.pool).app()
        asgi = self.guard(api, self.lan_token if lan else None) if self.guard is not None else api
        config = uvicorn.Config(asgi, log_level="warning", lifespan="off", timeout_graceful_shutdown=5,
                                access_log=False)
        self.port, self.lan = port, lan
        return uvicorn.Server(config), sock

    def start(self, port: int, lan: bool = False, timeout: float = 30.0) -> str:
        """Serve in a background thread; returns the base URL. :class:`ServeError` when it cannot."""
        with self._lock:
            if self.running:
                raise ServeError(f"already serving at {self.base_url}; stop it first")
            server, sock = self._prepare(port, lan)
            self._server = server
            self._thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True,
                                            name=f"serving-{port}")
            self._thread.start()
            deadline = time.monotonic() + timeout
            while not server.started and self._thread.is_alive() and time.monotonic() < deadline:
                time.sleep(0.02)
            if not server.started:
                self._server = None
                raise ServeError(f"the endpoint on port {port} did not start within {timeout:.0f} s")
            self.version += 1
            return self.base_url

    def serve(self, port: int, lan: bool = False, ready: Callable[[ServingServer], None] | None = None) -> None:
        """Serve in this thread until Ctrl-C (``forgellm serve``); ``ready`` is called once the port is bound."""
        server, sock = self._prepare(port, lan)
        self._server = server
        if ready is not None:
            ready(self)
        try:
            server.run(sockets=[sock])
        finally:
            self._server = None
            self._close_pool()

    def stop(self, timeout: float = 15.0) -> None:
        """Stop serving: requests in flight get a few seconds, then every served model is unloaded."""
        with self._lock:
            server, thread, self._server, self._thread = self._server, self._thread, None, None
            if server is not None:
                server.should_exit = True
            if thread is not None:
                thread.join(timeout)
            self._close_pool()
            self.version += 1

    def _close_pool(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool = None

    @property
    def api_key(self) -> str | None:
        """The bearer token clients on the LAN send, as it is now (None: loopback only); the gate reads the same
        source on every request, so a rotation applies at once, across processes too."""
        return self.lan_token() if self.lan and self.lan_token is not None else None

    @property
    def running(self) -> bool:
        return self._server is not None and self._thread is not None and self._thread.is_alive()

    @property
    def base_url(self) -> str:
        """The URL to paste into Open WebUI or Continue (on this machine)."""
        return f"http://{LOOPBACK}:{self.port}/v1"

    def urls(self) -> list[str]:
        """The base URL on this machine, and on each LAN address when serving on the LAN."""
        extra = [f"http://{a}:{self.port}/v1" for a in lan_addresses()] if self.lan else []
        return [self.base_url, *extra]
