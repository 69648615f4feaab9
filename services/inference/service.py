"""The model service: a thread-safe facade over a model worker process, for the Playground and the CLI.

The model lives in its own process (:mod:`services.inference.worker`), so generation never blocks the UI's
event loop and a crash (out of memory, a bad file) never takes the app down: the service notices the
worker's exit, reports an ``error`` state, and starts a fresh worker on the next :meth:`ModelService.load`.
Nothing here imports MLX.

::

    svc = ModelService()
    svc.load("models/tiny", adapter="workspace/runs/RUN/checkpoints/0000020")   # or await svc.aload(...)
    stream = svc.generate({"prompt": "Hello", "max_tokens": 64})   # returns at once
    for chunk in stream:        # or: async for chunk in stream
        ...  # {"type": "token", "text", "token"} ..., then {"type": "done", ...stats}; stream.cancel() stops it
    svc.compare("Hello", [None, ckpt_a, ckpt_b], {"temperature": 0})   # blocking; acompare() for a loop
    svc.perplexity("models/tiny", run_dir, "datasets/chat", 512, 4)     # blocking; aperplexity()
    svc.unload()                # the worker exits: its memory is freed

``status`` is a plain dict (state idle/loading/ready/generating/error, model, adapter, message, warning,
memory, pid); ``version`` grows whenever it changes (poll it to refresh a view). Sampling fields and
prompt formats are described in :mod:`services.inference.requests`.
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import itertools
import json
import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import psutil

from services import blas
from services.errors import ForgeError
from services.inference.requests import RequestError, adapter_files, adapter_label, normalize_request
from services.jobs import REPO_ROOT, child_env
from services.library.datasets import validation_split
from services.library.models import LibraryError, check_model_folder, model_size_bytes

GB = 1e9
RAM_HEADROOM = 1.5  # warn when free RAM < model size x this
END = ("done", "error")


class ModelError(ForgeError, RuntimeError):
    """Loading or running the model failed; the message says what and where."""


class RamNeed(NamedTuple):
    """Bytes a model + adapter put in memory, bytes of RAM free, and whether that is short of the headroom."""

    size: int
    free: int
    short: bool


# ----------------------------------------------------------------------------------------- the worker


class _Worker:
    """One worker process: JSON lines over its stdin/stdout, replies routed to per-request sinks by id."""

    def __init__(self, python: str, on_exit: Callable[[_Worker, int, str], None]):
        env = child_env(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", TRANSFORMERS_NO_ADVISORY_WARNINGS="1",
                        **blas.SIDE)
        self.proc = subprocess.Popen([python, "-m", "services.inference.worker"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=str(REPO_ROOT),
                                     text=True, encoding="utf-8", bufsize=1)
        self.pid = self.proc.pid
        self.on_exit = on_exit
        self.stopping = False
        self.model: str | None = None  # the base model the worker holds (None: nothing loaded)
        self.hello: dict[str, Any] = {}
        self._ids = itertools.count(1)
        self._sinks: dict[int, Callable[[dict[str, Any]], None]] = {}
        self._lock = threading.Lock()
        self._stderr: collections.deque[str] = collections.deque(maxlen=40)
        threading.Thread(target=self._read_stdout, daemon=True, name=f"model-worker-{self.pid}").start()
        threading.Thread(target=self._read_stderr, daemon=True, name=f"model-worker-{self.pid}-err").start()
        atexit.register(self.stop, 2.0)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def request(self, cmd: dict[str, Any], sink: Callable[[dict[str, Any]], None]) -> int:
        """Send a command; ``sink`` gets every reply to it, the last being ``done`` or ``error``."""
        with self._lock:
            rid = next(self._ids)
            self._sinks[rid] = sink
        try:
            self._write({**cmd, "id": rid})
        except (BrokenPipeError, OSError, ValueError):
            with self._lock:
                self._sinks.pop(rid, None)
            raise ModelError(f"the model worker (pid {self.pid}) is not running") from None
        return rid

    def cancel(self, ids: list[int] | None) -> None:
        try:
            self._write({"cmd": "cancel", "ids": ids})
        except (BrokenPipeError, OSError, ValueError):
            pass

    def pending(self) -> list[int]:
        with self._lock:
            return list(self._sinks)

    def _write(self, msg: dict[str, Any]) -> None:
        with self._lock:
            self.proc.stdin.write(json.dumps(msg) + "\n")
            self.proc.stdin.flush()

    def _read_stdout(self) -> None:
        for line in self.proc.stdout:
            try:
                msg = json.loads(line)
            except json.JSONDecodeError:
                self._stderr.append(line.rstrip())
                continue
            if msg.get("type") == "hello":
                self.hello = msg
                continue
            rid = msg.get("id")
            with self._lock:
                sink = self._sinks.pop(rid, None) if msg.get("type") in END else self._sinks.get(rid)
            if sink is not None:
                sink(msg)
        code = self.proc.wait()
        why = self.stderr_tail()
        with self._lock:
            sinks, self._sinks = list(self._sinks.values()), {}
        message = (f"the model worker (pid {self.pid}) exited with code {code}{_signal_hint(code)}"
                   + (f": {why}" if why else "") if not self.stopping else "the model was unloaded")
        for sink in sinks:
            sink({"type": "error", "message": message})
        self.on_exit(self, code, message)

    def _read_stderr(self) -> None:
        for line in self.proc.stderr:
            if line.strip():
                self._stderr.append(line.rstrip())

    def stderr_tail(self, n: int = 3) -> str:
        lines = [ln for ln in list(self._stderr) if ln.strip()]
        return " | ".join(lines[-n:])

    def stop(self, timeout: float = 10.0) -> None:
        """Ask the worker to exit after its current command; kill it if it does not."""
        self.stopping = True
        if self.alive():
            try:
                self._write({"cmd": "exit"})
                self.proc.stdin.close()
            except (BrokenPipeError, OSError, ValueError):
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        atexit.unregister(self.stop)


def _signal_hint(code: int) -> str:
    if code >= 0:
        return ""
    try:
        name = signal.Signals(-code).name
    except ValueError:
        return ""
    return f" ({name}{': out of memory?' if name == 'SIGKILL' else ''})"


# ----------------------------------------------------------------------------------------- streams


class GenerationStream:
    """The chunks of one generation, as a blocking iterator or an async iterator (not both).

    Yields ``{"type": "token", "text", "token"}`` chunks, then one ``{"type": "done", ...}`` with the
    statistics (also kept in :attr:`result`). An error raises :class:`ModelError`. After :meth:`cancel`
    no more text is yielded; the ``done`` chunk then has ``finish_reason: "cancelled"``.
    """

    def __init__(self, cancel: Callable[[], None]):
        self._cancel_fn = cancel
        self._q: queue.Queue[dict[str, Any]] = queue.Queue()
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._aq: asyncio.Queue[dict[str, Any]] | None = None
        self.cancelled = False
        self.result: dict[str, Any] | None = None

    def _put(self, msg: dict[str, Any]) -> None:
        with self._lock:
            if self._aq is None:
                self._q.put(msg)
                return
            loop, aq = self._loop, self._aq
        try:
            loop.call_soon_threadsafe(aq.put_nowait, msg)
        except RuntimeError:  # the consumer's loop is closed: nobody is listening any more
            pass

    def cancel(self) -> None:
        """Stop the generation; the worker drops it within one token step."""
        if not self.cancelled and self.result is None:
            self.cancelled = True
            self._cancel_fn()

    def _handle(self, msg: dict[str, Any]) -> dict[str, Any] | None:
        """The chunk to yield for a worker message (None: skip); raises on error."""
        kind = msg.get("type")
        if kind == "error":
            raise ModelError(msg.get("message", "generation failed"))
        if kind == "done":
            self.result = {k: v for k, v in msg.items() if k != "id"}
            return self.result
        if kind == "token" and not self.cancelled:
            return {"type": "token", "text": msg.get("text", ""), "token": msg.get("token")}
        return None

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while self.result is None:
            chunk = self._handle(self._q.get())
            if chunk is not None:
                yield chunk

    async def __aiter__(self) -> AsyncIterator[dict[str, Any]]:
        with self._lock:
            self._loop, self._aq = asyncio.get_running_loop(), asyncio.Queue()
            while not self._q.empty():
                self._aq.put_nowait(self._q.get_nowait())
        try:
            while self.result is None:
                chunk = self._handle(await self._aq.get())
                if chunk is not None:
                    yield chunk
        finally:
            if self.result is None:
                self.cancel()  # the consumer went away (page closed, task cancelled)

    def text(self) -> str:
        """Consume the stream (blocking) and return the generated text."""
        return "".join(c["text"] for c in self if c["type"] == "token")


class CancelHandle:
    """Cancels the one request it is handed to (e.g. one Compare); raising it before the request starts also works."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._fn: Callable[[], None] | None = None
        self.cancelled = False

    def _bind(self, fn: Callable[[], None]) -> None:
        with self._lock:
            self._fn = fn
            now = self.cancelled
        if now:
            fn()

    def cancel(self) -> None:
        with self._lock:
            self.cancelled, fn = True, self._fn
        if fn is not None:
            fn()


class _Call:
    """A blocking request: collects intermediate messages and waits for the final one."""

    def __init__(self, on_message: Callable[[dict[str, Any]], None] | None = None):
        self.on_message = on_message
        self.done = threading.Event()
        self.reply: dict[str, Any] = {}

    def __call__(self, msg: dict[str, Any]) -> None:
        if msg.get("type") in END:
            self.reply = msg
            self.done.set()
        elif self.on_message is not None:
            self.on_message(msg)

    def wait(self, timeout: float | None = None) -> dict[str, Any]:
        if not self.done.wait(timeout):
            raise ModelError(f"the model worker did not answer within {timeout} s")
        if self.reply.get("type") == "error":
            raise ModelError(self.reply.get("message", "the model worker reported an error"))
        return {k: v for k, v in self.reply.items() if k not in ("id", "type")}


# ----------------------------------------------------------------------------------------- the service


class ModelService:
    """Load, switch, generate, compare and measure one model in a worker process. Thread-safe."""

    def __init__(self, python: str = sys.executable, ram_headroom: float = RAM_HEADROOM):
        self.python = python
        self.ram_headroom = ram_headroom  # warn when free RAM < model size x this
        self.version = 0
        self._lock = threading.RLock()
        self._load_lock = threading.Lock()
        self._worker: _Worker | None = None
        self._loaded: dict[str, Any] | None = None  # what the worker reported after the last good load
        self._error: str | None = None
        self._warning: str | None = None
        self._message = ""
        self._loading = 0
        self._busy: dict[int, str] = {}  # request id -> what it does (generate, compare, perplexity)

    # -- status -----------------------------------------------------------------------------------

    def _bump(self, message: str | None = None) -> None:
        with self._lock:
            if message is not None:
                self._message = message
            self.version += 1

    @property
    def state(self) -> str:
        with self._lock:
            if self._loading:
                return "loading"
            if self._busy:
                return "generating"
            if self._error:
                return "error"
            return "ready" if self._loaded else "idle"

    @property
    def status(self) -> dict[str, Any]:
        """Plain-dict snapshot: state, model, adapter, message, warning, memory, pid, version."""
        with self._lock:
            loaded, worker = dict(self._loaded or {}), self._worker
            out = {"state": self.state, "model": loaded.get("model"), "adapter": loaded.get("adapter"),
                   "adapter_label": loaded.get("adapter_label"), "fine_tune_type": loaded.get("fine_tune_type"),
                   "has_chat_template": loaded.get("has_chat_template"), "context_max": loaded.get("context_max"),
                   "message": self._error or self._message, "warning": self._warning,
                   "busy": sorted(set(self._busy.values())), "version": self.version}
        memory = dict(loaded.get("memory") or {})
        memory.pop("rss_gb", None)
        memory["model_gb"] = loaded.get("model_gb")
        memory["rss_gb"] = None
        if worker is not None and worker.alive():
            out["pid"] = worker.pid
            try:
                memory["rss_gb"] = psutil.Process(worker.pid).memory_info().rss / GB
            except psutil.Error:
                pass
        else:
            out["pid"] = None
        out["memory"] = memory
        return out

    @property
    def worker_pid(self) -> int | None:
        worker = self._worker
        return worker.pid if worker is not None and worker.alive() else None

    # -- worker lifecycle -------------------------------------------------------------------------

    def _on_exit(self, worker: _Worker, code: int, message: str) -> None:
        with self._lock:
            if self._worker is not worker:
                return
            self._worker, self._busy = None, {}
            if not worker.stopping:
                self._loaded, self._error = None, f"{message}; load a model to start a new worker"
            self.version += 1

    def _ensure_worker(self) -> _Worker:
        with self._lock:
            if self._worker is None or not self._worker.alive():
                self._worker = _Worker(self.python, self._on_exit)
            return self._worker

    def _stop_worker(self) -> None:
        with self._lock:
            worker, self._worker, self._loaded, self._busy = self._worker, None, None, {}
        if worker is not None:
            worker.stop()

    def unload(self) -> None:
        """Stop the worker process: its memory is returned to the system."""
        with self._load_lock:
            self.cancel()
            self._stop_worker()
            with self._lock:
                self._error = self._warning = None
            self._bump("unloaded")

    close = unload

    def __enter__(self) -> ModelService:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.unload()

    # -- loading ----------------------------------------------------------------------------------

    def _fail(self, message: str) -> ModelError:
        with self._lock:
            self._error = message
        self._bump()
        return ModelError(message)

    def _check_paths(self, model_path: str | os.PathLike, adapter: str | os.PathLike | None) -> tuple[str, str | None]:
        try:
            model = str(check_model_folder(model_path))
            adapter_dir = str(adapter_files(adapter)[0].parent) if adapter is not None else None
        except (RequestError, LibraryError) as e:
            raise self._fail(str(e)) from None
        return model, adapter_dir

    def ram_need(self, model: str | os.PathLike, adapter: str | os.PathLike | None = None) -> RamNeed:
        """What loading ``model`` + ``adapter`` needs against the free RAM (short: free < size x ``ram_headroom``).

        Raises ``OSError`` when a folder cannot be read.
        """
        size = model_size_bytes(model) + (Path(adapter, "adapters.safetensors").stat().st_size if adapter else 0)
        free = psutil.virtual_memory().available
        return RamNeed(size, free, free < size * self.ram_headroom)

    def _ram_warning(self, model: str, adapter: str | None) -> tuple[float, str | None]:
        size, free, short = self.ram_need(model, adapter)
        if short:
            return size / GB, (f"only {free / GB:.1f} GB of RAM is free for a {size / GB:.3g} GB model "
                               f"(recommended: {size * self.ram_headroom / GB:.3g} GB); loading may swap or fail")
        return size / GB, None

    def load(self, model_path: str | os.PathLike, adapter: str | os.PathLike | None = None, *,
             wait: bool = True) -> dict[str, Any]:
        """Load a model folder, optionally with a run, checkpoint or adapter folder (read only).

        The same base with another LoRA adapter is a tensor swap in the running worker; another base
        restarts the worker, so the old model's memory is really freed. Returns :attr:`status`.
        ``wait=False`` returns at once (state ``loading``); errors then show in :attr:`status`.
        Raises :class:`ModelError` for a missing or broken model (``wait=True``).
        """
        model, adapter_dir = self._check_paths(model_path, adapter)
        size_gb, warning = self._ram_warning(model, adapter_dir)
        with self._lock:
            self._loading += 1
            self._warning, self._error = warning, None
        self._bump(f"loading {Path(model).name}" + (f" + {adapter_label(adapter_dir)}" if adapter_dir else ""))
        if not wait:
            threading.Thread(target=self._load_quietly, args=(model, adapter_dir, size_gb), daemon=True).start()
            return self.status
        return self._load(model, adapter_dir, size_gb)

    async def aload(self, model_path: str | os.PathLike, adapter: str | os.PathLike | None = None) -> dict[str, Any]:
        """:meth:`load` for an event loop: waits in a thread, never blocks the loop."""
        return await asyncio.to_thread(self.load, model_path, adapter)

    def _load_quietly(self, model: str, adapter: str | None, size_gb: float) -> None:
        try:
            self._load(model, adapter, size_gb)
        except ModelError:
            pass  # reported in status

    def _load(self, model: str, adapter: str | None, size_gb: float) -> dict[str, Any]:
        try:
            with self._load_lock:
                with self._lock:
                    worker, loaded = self._worker, self._loaded or {}
                if (loaded.get("model"), loaded.get("adapter")) != (model, adapter):
                    self.cancel()  # switching: do not make the new model wait for an old generation
                if worker is not None and worker.model not in (None, model):
                    self._stop_worker()  # a different base: a fresh process frees the old one for real
                worker = self._ensure_worker()
                call = _Call()
                worker.request({"cmd": "load", "model": model, "adapter": adapter}, call)
                try:
                    info = call.wait()
                except ModelError as e:
                    worker.model = None  # the worker dropped everything
                    with self._lock:
                        self._loaded = None
                    raise self._fail(str(e)) from None
                worker.model = model
                with self._lock:
                    self._loaded = {**info, "model_gb": size_gb}
                    self._error = None
                    self._message = f"loaded {Path(model).name}" + (f" + {info['adapter_label']}" if adapter else "")
        finally:
            with self._lock:
                self._loading -= 1
            self._bump()
        return self.status

    # -- requests ---------------------------------------------------------------------------------

    def _worker_for_request(self) -> _Worker:
        with self._lock:
            if self._worker is None or (self._loaded is None and not self._loading):
                raise ModelError("no model is loaded; load one first" + (f" (last error: {self._error})"
                                                                         if self._error else ""))
            return self._worker

    def _submit(self, kind: str, cmd: dict[str, Any], sink: Callable[[dict[str, Any]], None]) -> tuple[_Worker, int]:
        worker = self._worker_for_request()
        holder: dict[str, int] = {}

        def tracked(msg: dict[str, Any]) -> None:
            if msg.get("type") in END:
                with self._lock:
                    self._busy.pop(holder.get("id", -1), None)
                    if msg.get("type") == "done" and self._loaded is not None and "model" in msg:
                        self._loaded.update({k: msg[k] for k in ("adapter", "adapter_label", "fine_tune_type",
                                                                  "memory") if k in msg})
                    elif "memory" in msg and self._loaded is not None:
                        self._loaded["memory"] = msg["memory"]
                self._bump(f"{kind} {'finished' if msg.get('type') == 'done' else 'failed'}")
            sink(msg)

        with self._lock:
            rid = worker.request(cmd, tracked)
            holder["id"] = rid
            if self._worker is worker and rid in worker.pending():
                self._busy[rid] = kind
        self._bump(f"{kind}…")
        return worker, rid

    def _normalize(self, request: dict[str, Any]) -> dict[str, Any]:
        try:
            return normalize_request(request)
        except RequestError as e:
            raise ModelError(str(e)) from None

    def generate(self, request: dict[str, Any]) -> GenerationStream:
        """Start a generation; returns a stream of chunks (see :class:`GenerationStream`)."""
        req = self._normalize(request)
        box: dict[str, Any] = {}
        stream = GenerationStream(lambda: box["worker"].cancel([box["id"]]))
        box["worker"], box["id"] = self._submit("generate", {"cmd": "generate", "request": req}, stream._put)
        return stream

    def cancel(self) -> None:
        """Cancel every running or queued generation, compare and perplexity request."""
        with self._lock:
            worker, ids = self._worker, list(self._busy)
        if worker is not None and ids:
            worker.cancel(ids)

    def compare(self, prompt: str | list[dict[str, str]], targets: list[str | os.PathLike | None],
                sampling: dict[str, Any] | None = None, *,
                on_result: Callable[[dict[str, Any]], None] | None = None,
                cancel: CancelHandle | None = None) -> list[dict[str, Any]]:
        """Generate for several adapters of the loaded base, one after the other, in one worker.

        ``targets``: ``None`` for the base, else run/checkpoint/adapter folders of the same LoRA layout.
        The base weights are shared; switching swaps only adapter tensors. Use greedy sampling or a
        ``seed`` so the outputs are comparable. ``on_result`` gets each target's result as it finishes.
        Full fine-tune checkpoints are refused (they cannot share the base). ``cancel`` stops this compare
        alone (the results so far are returned); other requests go on.
        """
        if not targets:
            raise ModelError("compare: give at least one target (None for the base model)")
        try:
            resolved = [None if t is None else str(adapter_files(t)[0].parent) for t in targets]
        except RequestError as e:
            raise ModelError(f"compare: {e}") from None
        request = {**(sampling or {}), **({"messages": prompt} if isinstance(prompt, list) else {"prompt": prompt})}
        req = self._normalize(request)
        call = _Call(on_message=lambda m: on_result(_item(m)) if on_result and m.get("type") == "item" else None)
        worker, rid = self._submit("compare", {"cmd": "compare", "targets": resolved, "request": req}, call)
        if cancel is not None:
            cancel._bind(lambda: worker.cancel([rid]))
        reply = call.wait()
        return [_item(r) for r in reply["results"]]

    async def acompare(self, prompt: str | list[dict[str, str]], targets: list[str | os.PathLike | None],
                       sampling: dict[str, Any] | None = None, *,
                       on_result: Callable[[dict[str, Any]], None] | None = None,
                       cancel: CancelHandle | None = None) -> list[dict[str, Any]]:
        """:meth:`compare` for an event loop (runs in a thread; ``on_result`` is called from that thread)."""
        return await asyncio.to_thread(self.compare, prompt, targets, sampling, on_result=on_result, cancel=cancel)

    def perplexity(self, model: str | os.PathLike, adapter: str | os.PathLike | None,
                   dataset_path: str | os.PathLike, max_seq_length: int = 2048, batch_size: int = 4,
                   mask_prompt: bool = False) -> dict[str, Any]:
        """exp(mlx-lm's validation loss) of ``model`` + ``adapter`` on a dataset's ``valid.jsonl`` (or a .jsonl file).

        Loads ``model`` + ``adapter`` first (a no-op when they are already loaded).
        """
        given = Path(dataset_path).expanduser()
        path = validation_split(given)
        if path is None:
            raise ModelError(f"dataset folder {given} has no valid.jsonl" if given.is_dir() else
                             f"dataset {given} is not a .jsonl file" if given.is_file() else
                             f"dataset {given} does not exist")
        if max_seq_length < 2 or batch_size < 1:
            raise ModelError(f"perplexity: max_seq_length ({max_seq_length}) must be >= 2, "
                             f"batch_size ({batch_size}) >= 1")
        self.load(model, adapter)
        call = _Call()
        self._submit("perplexity", {"cmd": "perplexity", "path": str(path.resolve()), "max_seq_length": max_seq_length,
                                    "batch_size": batch_size, "mask_prompt": mask_prompt}, call)
        return call.wait()

    def evaluate(self, model: str | os.PathLike, targets: list[str | os.PathLike | None], suites: list[dict[str, Any]],
                 tasks: dict[str, Any] | None = None, *, on_message: Callable[[dict[str, Any]], None] | None = None,
                 cancel: CancelHandle | None = None) -> dict[str, Any]:
        """Run eval suites (plain data, see :mod:`services.evaluation.suites`) and lm-eval tasks on ``model`` and
        each target (None: the base; else checkpoint/adapter folders of one LoRA layout), in this one worker.

        Loads ``model`` first (kept, with its adapter, if already loaded: the worker puts that adapter back after
        the evaluation); adapters are swapped, never fused. ``on_message`` gets each ``progress`` and ``record``
        message. Returns ``{"records": [...], "cancelled": bool, ...}``.
        """
        try:
            resolved = [None if t is None else str(adapter_files(t)[0].parent) for t in targets]
        except RequestError as e:
            raise ModelError(f"evaluate: {e}") from None
        if self.status.get("model") != self._check_paths(model, None)[0]:
            self.load(model)
        call = _Call(on_message=on_message)
        worker, rid = self._submit("evaluate", {"cmd": "evaluate", "targets": resolved, "suites": suites,
                                                "tasks": tasks}, call)
        if cancel is not None:
            cancel._bind(lambda: worker.cancel([rid]))
        return call.wait()

    async def aperplexity(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """:meth:`perplexity` for an event loop (runs in a thread)."""
        return await asyncio.to_thread(self.perplexity, *args, **kwargs)


def _item(msg: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in msg.items() if k not in ("id", "type")}
