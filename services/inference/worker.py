"""Model worker process: ``python -m services.inference.worker``, driven by
:class:`services.inference.service.ModelService`.

It owns one model. Commands arrive as JSON lines on stdin, replies leave as JSON lines on the
original stdout (anything else that prints goes to stderr). Every command carries an ``id``; replies
echo it and end with one ``done`` or ``error`` message. ``cancel`` is handled at once by the reader
thread, so a running generation stops after the token step in progress.

Commands::

    {"cmd": "load", "model": DIR, "adapter": DIR | null}
    {"cmd": "generate", "request": {...}}                     -> token* done
    {"cmd": "compare", "targets": [DIR | null, ...], "request": {...}}   -> item* done
    {"cmd": "perplexity", "path": FILE, "max_seq_length": N, "batch_size": N, "mask_prompt": bool}
    {"cmd": "evaluate", "targets": [DIR | null, ...], "suites": [...], "tasks": {...} | null}  -> progress* record* done
    {"cmd": "cancel", "ids": [id, ...] | null}                 (null: whatever is running)
    {"cmd": "exit"}

One copy of the base weights serves every LoRA/DoRA adapter: LoRA layers are installed once (from the
first adapter's config) and switching swaps only their tensors; "base" sets the LoRA scale to 0.
"""

from __future__ import annotations

import gc
import json
import math
import os
import queue
import signal
import sys
import threading
import time
import traceback
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
import psutil
from mlx.utils import tree_flatten
from mlx_lm.generate import batch_generate, stream_generate
from mlx_lm.sample_utils import make_logits_processors, make_sampler
from mlx_lm.tuner.datasets import CacheDataset, create_dataset
from mlx_lm.tuner.trainer import default_loss, evaluate
from mlx_lm.tuner.utils import linear_to_lora_layers
from mlx_lm.utils import load as mlx_load

from services import blas
from services.errors import ForgeError, json_problem
from services.inference.requests import RequestError, adapter_files, adapter_label
from services.library.models import LibraryError, check_model_folder, context_limit

GB = 1e9
Emit = Callable[[dict[str, Any]], None]


class WorkerError(ForgeError, RuntimeError):
    """A command failed for a reason the user can act on; the message says what and where."""


class Cancel:
    """A cancel flag that remembers when it was raised."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.at: float | None = None

    def set(self) -> None:
        if not self.event.is_set():
            self.at = time.perf_counter()
            self.event.set()

    def is_set(self) -> bool:
        return self.event.is_set()


@dataclass
class Adapter:
    """One adapter's tensors, kept in memory so switching to it needs no disk read."""

    path: str
    label: str
    kind: str  # lora | dora | full
    config: dict[str, Any]
    tensors: dict[str, mx.array]
    mtime: float
    scale: float = 0.0
    nbytes: int = field(init=False)

    def __post_init__(self) -> None:
        self.nbytes = sum(v.nbytes for v in self.tensors.values())

    def layout(self) -> tuple:
        """What must match for two adapters to share the installed LoRA layers."""
        lp = self.config.get("lora_parameters") or {}
        shapes = tuple(sorted((k, tuple(v.shape)) for k, v in self.tensors.items()))
        return self.kind, self.config.get("num_layers"), tuple(lp.get("keys") or ()), lp.get("rank"), shapes


def memory() -> dict[str, float]:
    return {"rss_gb": psutil.Process().memory_info().rss / GB, "mlx_active_gb": mx.get_active_memory() / GB,
            "mlx_peak_gb": mx.get_peak_memory() / GB, "mlx_cache_gb": mx.get_cache_memory() / GB}


# ----------------------------------------------------------------------------------------- the engine


class Engine:
    """A base model, its installed LoRA layers and the adapters it can switch between."""

    def __init__(self) -> None:
        self.model: Any = None
        self.tokenizer: Any = None
        self.model_path: str | None = None
        self.model_config: dict[str, Any] = {}
        self.layout: tuple | None = None  # the installed LoRA layers' layout
        self.lora_modules: list[Any] = []
        self.base_m: dict[str, mx.array] = {}  # DoRA magnitudes of the base weights, for "base"
        self.dirty = False  # full fine-tune weights were written over the base
        self.adapters: dict[str, Adapter] = {}
        self.active: Adapter | None = None

    # -- loading ----------------------------------------------------------------------------------

    def reset(self) -> None:
        self.model = self.tokenizer = self.model_path = self.layout = self.active = None
        self.model_config, self.lora_modules, self.base_m, self.adapters, self.dirty = {}, [], {}, {}, False
        gc.collect()
        mx.clear_cache()

    def load_base(self, model_path: str) -> None:
        path = check_model_folder(model_path)
        self.reset()
        try:
            self.model, self.tokenizer, self.model_config = mlx_load(str(path), return_config=True)
        except Exception as e:  # noqa: BLE001 (any reader error means a broken model folder)
            self.reset()
            raise WorkerError(f"could not load the model in {path}: {type(e).__name__}: {e}") from e
        self.model.eval()
        self.model_path = str(path)
        mx.clear_cache()

    def read_adapter(self, path: str) -> Adapter:
        """An adapter from the cache, or read from disk (read-only) and checked against the base."""
        weights, _, config = adapter_files(path)
        key, mtime = str(weights.parent), weights.stat().st_mtime
        cached = self.adapters.get(key)
        if cached is not None and cached.mtime == mtime:
            return cached
        try:
            tensors = mx.load(str(weights))
            mx.eval(list(tensors.values()))
        except Exception as e:  # noqa: BLE001
            raise WorkerError(f"could not read adapter weights {weights}: {type(e).__name__}: {e}") from e
        kind = config.get("fine_tune_type", "lora")
        scale = float((config.get("lora_parameters") or {}).get("scale", 20.0)) if kind != "full" else 0.0
        adapter = Adapter(key, adapter_label(key), kind, config, tensors, mtime, scale)
        self.adapters[key] = adapter
        return adapter

    def install(self, adapter: Adapter) -> None:
        """Wrap the base's linear layers in LoRA/DoRA layers shaped after ``adapter`` (once per base)."""
        cfg = adapter.config
        n_layers = len(self.model.layers)
        if cfg.get("num_layers", n_layers) > n_layers:
            raise WorkerError(f"adapter {adapter.path} was trained on {cfg['num_layers']} layers; "
                              f"the model {self.model_path} has {n_layers}")
        linear_to_lora_layers(self.model, cfg["num_layers"], cfg["lora_parameters"], use_dora=adapter.kind == "dora")
        self.model.eval()
        self.lora_modules = [m for _, m in self.model.named_modules() if hasattr(m, "lora_a")]
        params = dict(tree_flatten(self.model.parameters()))
        self.base_m = {k: v for k, v in params.items()
                       if k.endswith(".m") and k.rsplit(".", 1)[0] + ".lora_a" in params}
        self._check_names(adapter, params)
        self.layout = adapter.layout()

    def _check_names(self, adapter: Adapter, params: dict[str, mx.array]) -> None:
        bad = [f"{k} {tuple(v.shape)}" for k, v in adapter.tensors.items()
               if k not in params or params[k].shape != v.shape]
        if bad:
            raise WorkerError(f"adapter {adapter.path} does not fit the model {self.model_path}: "
                              f"{len(bad)} tensor(s) without a matching parameter, e.g. {bad[0]}")

    def fits(self, adapter: Adapter) -> bool:
        return self.layout is not None and not self.dirty and adapter.layout() == self.layout

    def activate(self, adapter: Adapter | None) -> None:
        """Switch to ``adapter`` (None: the base) by swapping tensors; never reloads the base."""
        if adapter is None:
            for m in self.lora_modules:
                m.scale = 0.0
            if self.base_m:
                self.model.load_weights(list(self.base_m.items()), strict=False)
        else:
            self.model.load_weights(list(adapter.tensors.items()), strict=False)
            for m in self.lora_modules:
                m.scale = adapter.scale
        self.active = adapter

    def load(self, model_path: str, adapter_path: str | None) -> dict[str, Any]:
        """Make ``model_path`` + ``adapter_path`` the active model, reusing the loaded base when possible."""
        resolved = str(check_model_folder(model_path))
        reloaded = False
        if self.model is None or self.model_path != resolved or self.dirty:
            self.load_base(resolved)
            reloaded = True
        adapter = self.read_adapter(adapter_path) if adapter_path else None
        if adapter is not None and adapter.kind == "full":
            if not reloaded and (self.layout is not None or self.active is not None):
                self.load_base(resolved)
            params = dict(tree_flatten(self.model.parameters()))
            self._check_names(adapter, params)
            self.model.load_weights(list(adapter.tensors.items()), strict=False)
            self.dirty, self.active = True, adapter
        elif adapter is not None:
            if not self.fits(adapter):
                if self.layout is not None:  # other LoRA layers are installed: start from a clean base
                    self.load_base(resolved)
                self.install(adapter)
            self.activate(adapter)
        elif self.layout is not None or self.active is not None:
            self.activate(None)
        self.adapters = {a.path: a for a in [self.active] if a is not None}  # keep only what is in use
        gc.collect()
        mx.clear_cache()
        return self.describe()

    def describe(self) -> dict[str, Any]:
        tok = self.tokenizer
        return {"model": self.model_path, "adapter": self.active.path if self.active else None,
                "adapter_label": adapter_label(self.active.path if self.active else None),
                "fine_tune_type": self.active.kind if self.active else None,
                "has_chat_template": bool(tok.has_chat_template), "context_max": context_limit(self.model_config),
                "adapter_bytes": sum(a.nbytes for a in self.adapters.values()), "memory": memory()}

    def require(self) -> None:
        if self.model is None:
            raise WorkerError("no model is loaded")

    # -- generation -------------------------------------------------------------------------------

    def prompt_tokens(self, req: dict[str, Any]) -> tuple[list[int], str]:
        """Token ids for a request: the chat template (messages + system) or the raw completion text."""
        tok, fmt = self.tokenizer, req["format"]
        if fmt == "auto":
            fmt = "chat" if tok.has_chat_template else "completion"
        messages = req["messages"] or [{"role": "user", "content": req["prompt"] or ""}]
        if fmt == "chat":
            if not tok.has_chat_template:
                raise RequestError(f"format 'chat': the tokenizer of {self.model_path} has no chat template; "
                                   "use format 'completion'")
            if req["system"] and messages[0]["role"] != "system":
                messages = [{"role": "system", "content": req["system"]}, *messages]
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            tokens = tok.encode(text, add_special_tokens=False)
        else:
            text = req["prompt"] if req["prompt"] is not None else "\n".join(m["content"] for m in messages)
            if req["system"]:
                text = f"{req['system']}\n\n{text}"
            bos = tok.bos_token
            tokens = tok.encode(text, add_special_tokens=bos is None or not text.startswith(bos))
        if not tokens:
            raise RequestError("the prompt is empty: it encodes to no tokens")
        return tokens, fmt

    def generate(self, req: dict[str, Any], cancel: Cancel, on_token: Emit | None) -> dict[str, Any]:
        """Run one generation with the active adapter; ``on_token`` gets each text chunk."""
        self.require()
        tokens, fmt = self.prompt_tokens(req)
        sampler = make_sampler(req["temperature"], top_p=req["top_p"], min_p=req["min_p"], top_k=req["top_k"])
        rp = req["repetition_penalty"]
        processors = make_logits_processors(repetition_penalty=rp if rp != 1.0 else None,
                                            repetition_context_size=req["repetition_context_size"])
        if req["seed"] is not None:
            mx.random.seed(req["seed"])
        tok = self.tokenizer
        eos = tok.eos_token_ids
        if req["ignore_eos"]:
            tok.eos_token_ids = set()
        text, out_tokens, last, after = [], [], None, 0
        t0 = time.perf_counter()
        gen = stream_generate(self.model, tok, mx.array(tokens), max_tokens=req["max_tokens"], sampler=sampler,
                              logits_processors=processors or None, max_kv_size=req["max_kv_size"])
        try:
            for resp in gen:
                if cancel.is_set():
                    after += 1  # the step that was running when the cancel came is dropped
                    break
                last = resp
                token = None if resp.finish_reason == "stop" else resp.token
                if token is not None:
                    out_tokens.append(token)
                text.append(resp.text)
                if on_token is not None and (resp.text or token is not None):
                    on_token({"text": resp.text, "token": token})
        finally:
            gen.close()
            tok.eos_token_ids = eos
        stopped = time.perf_counter()
        return self._summary(req, fmt, len(tokens), out_tokens, "".join(text), last, cancel, after, stopped - t0,
                             stopped)

    @staticmethod
    def batchable(req: dict[str, Any]) -> bool:
        """Whether a request can join a batch: greedy, no logits processors, no rotating cache, EOS honoured."""
        return (req["temperature"] == 0 and req["repetition_penalty"] == 1.0 and req["max_kv_size"] is None
                and not req["ignore_eos"])

    def generate_batch(self, reqs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Greedy generations of several :meth:`batchable` requests at once, with mlx-lm's ``batch_generate``
        (what its lm-eval model class uses for generate-until): ``text`` and ``tokens`` per request."""
        self.require()
        prompts = [self.prompt_tokens(r)[0] for r in reqs]
        out = batch_generate(self.model, self.tokenizer, prompts, max_tokens=[r["max_tokens"] for r in reqs],
                             return_token_ids=True, prefill_batch_size=len(reqs), completion_batch_size=len(reqs))
        return [{"text": text, "tokens": ids} for text, ids in zip(out.texts, out.token_ids, strict=True)]

    def _summary(self, req: dict[str, Any], fmt: str, n_prompt: int, out_tokens: list[int], text: str, last: Any,
                 cancel: Cancel, after: int, elapsed: float, stopped: float) -> dict[str, Any]:
        cancelled = cancel.is_set()
        n_gen = last.generation_tokens if last is not None else 0
        return {"text": text, "tokens": out_tokens, "format": fmt, "prompt_tokens": n_prompt,
                "generation_tokens": n_gen,
                "prompt_tps": last.prompt_tps if last is not None else None,
                "generation_tps": last.generation_tps if last is not None else None,
                "finish_reason": "cancelled" if cancelled else (last.finish_reason if last is not None else None),
                "context_used": n_prompt + n_gen, "context_max": context_limit(self.model_config),
                "max_kv_size": req["max_kv_size"], "elapsed_s": elapsed,
                "tokens_after_cancel": after if cancelled else None,
                "cancel_latency_s": (stopped - cancel.at) if cancelled and cancel.at else None,
                "adapter": self.active.path if self.active else None,
                "adapter_label": adapter_label(self.active.path if self.active else None), "memory": memory()}

    # -- compare ----------------------------------------------------------------------------------

    def prepare_compare(self, targets: list[str | None]) -> list[Adapter | None]:
        """Read every target and make sure they can all share this one base; raise before generating."""
        self.require()
        adapters = [None if t is None else self.read_adapter(t) for t in targets]
        full = [a.path for a in adapters if a is not None and a.kind == "full"]
        if full:
            raise WorkerError(f"cannot compare full fine-tune checkpoint(s) {full}: their weights replace the base "
                              "model's layers, so they cannot share one copy of the base; load each on its own")
        lora = [a for a in adapters if a is not None]
        odd = [a.path for a in lora if a.layout() != lora[0].layout()]
        if odd:
            raise WorkerError(f"adapters {odd} have a different LoRA layout (type, layers, keys or rank) than "
                              f"{lora[0].path}; one base can only switch between adapters of the same layout")
        if self.dirty or (lora and self.layout is not None and not self.fits(lora[0])):
            self.load_base(self.model_path)  # full fine-tune weights or other LoRA layers: back to a clean base
        if lora and self.layout is None:
            self.install(lora[0])
        return adapters

    def compare(self, targets: list[str | None], req: dict[str, Any], cancel: Cancel, emit: Emit) -> dict[str, Any]:
        """Generate for each target in turn (same prompt, sampling and seed), swapping only adapter tensors."""
        previous = self.active
        adapters = self.prepare_compare(targets)
        results = []
        try:
            for i, adapter in enumerate(adapters):
                if cancel.is_set():
                    break
                self.activate(adapter)
                result = self.generate(req, cancel, None)
                result.update(index=i, target=targets[i])
                results.append(result)
                emit({"type": "item", **result})
        finally:
            self.activate(previous if previous is not None and self.fits(previous) else None)
        self.adapters = {a.path: a for a in [*adapters, self.active] if a is not None}
        mx.clear_cache()
        return {"results": results, "cancelled": cancel.is_set(), **self.describe()}

    # -- perplexity -------------------------------------------------------------------------------

    def perplexity(self, path: str, max_seq_length: int, batch_size: int, mask_prompt: bool) -> dict[str, Any]:
        """exp(mlx-lm validation loss) of the active model on a jsonl file (mlx-lm's format detection)."""
        self.require()
        rows = _read_rows(Path(path))
        try:
            dataset = create_dataset(rows, self.tokenizer, types.SimpleNamespace(mask_prompt=mask_prompt))
        except ValueError as e:
            raise WorkerError(f"{path}: {e}") from e
        fmt = type(dataset).__name__.replace("Dataset", "").lower()
        dataset = CacheDataset(dataset)
        batch_size = min(batch_size, len(dataset))
        counts: list[mx.array] = []

        def loss(model: Any, batch: mx.array, lengths: mx.array) -> tuple[mx.array, mx.array]:
            ce, ntoks = default_loss(model, batch, lengths)
            counts.append(ntoks)
            return ce, ntoks

        np.random.seed(0)  # evaluate() draws the batch order from numpy's global generator
        value = evaluate(model=self.model, dataset=dataset, batch_size=batch_size, num_batches=-1,
                         max_seq_length=max_seq_length, loss=loss)
        mx.clear_cache()
        return {"loss": value, "perplexity": math.exp(value) if value < 700 else math.inf, "format": fmt,
                "rows": len(dataset), "rows_used": len(counts) * batch_size, "batch_size": batch_size,
                "batches": len(counts), "tokens": int(sum(c.item() for c in counts)), "path": str(path),
                "adapter": self.active.path if self.active else None, "memory": memory()}


def _read_rows(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise WorkerError(f"dataset file {path} does not exist")
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise WorkerError(f"{path}:{n}: {json_problem(e)}") from e
    if not rows:
        raise WorkerError(f"dataset file {path} has no rows")
    return rows


# ----------------------------------------------------------------------------------------- the process


class Server:
    """Reads commands, runs them one at a time on the main thread, writes replies."""

    def __init__(self, out: Any):
        self.out = out
        self.write_lock = threading.Lock()
        self.commands: queue.Queue[dict[str, Any]] = queue.Queue()
        self.state_lock = threading.Lock()
        self.cancelled: set[int] = set()
        self.current: int | None = None
        self.cancel = Cancel()
        self.engine = Engine()

    def send(self, msg: dict[str, Any]) -> None:
        line = json.dumps(msg, default=str) + "\n"
        with self.write_lock:
            self.out.write(line)
            self.out.flush()

    def read(self, stream: Any) -> None:
        """Reader thread: cancels take effect at once; everything else is queued for the main thread."""
        for raw in stream:
            try:
                msg = json.loads(raw)
            except json.JSONDecodeError:
                self.send({"type": "log", "message": f"ignored a line that is not JSON: {raw[:80]!r}"})
                continue
            if msg.get("cmd") == "cancel":
                self.on_cancel(msg.get("ids"))
            else:
                self.commands.put(msg)
        self.commands.put({"cmd": "exit"})  # the app went away

    def on_cancel(self, ids: list[int] | None) -> None:
        with self.state_lock:
            if ids is None:
                if self.current is not None:
                    self.cancel.set()
                return
            self.cancelled.update(ids)
            if self.current in self.cancelled:
                self.cancel.set()

    def serve(self) -> None:
        self.send({"type": "hello", "pid": os.getpid(), "blas": blas.active(), "mlx": mx.__version__})
        while True:
            msg = self.commands.get()
            if msg.get("cmd") == "exit":
                return
            self.run(msg)

    def run(self, msg: dict[str, Any]) -> None:
        rid = msg.get("id")
        with self.state_lock:
            self.current, self.cancel = rid, Cancel()
            if rid in self.cancelled:
                self.cancel.set()
        try:
            result = self.dispatch(msg, rid)
            self.send({"id": rid, "type": "done", **result})
        except (WorkerError, RequestError, LibraryError, ForgeError) as e:
            self.send({"id": rid, "type": "error", "message": str(e)})
        except Exception as e:  # noqa: BLE001 (report, keep serving)
            traceback.print_exc()
            self.send({"id": rid, "type": "error", "message": f"{msg.get('cmd')} failed: {type(e).__name__}: {e}"})
        finally:
            with self.state_lock:
                self.current = None
                self.cancelled.discard(rid)

    def dispatch(self, msg: dict[str, Any], rid: Any) -> dict[str, Any]:
        cmd, engine = msg.get("cmd"), self.engine
        if cmd in ("generate", "compare", "perplexity", "evaluate"):
            blas.fit_threads()  # a run may have started or ended since the last request: share the cores anew
        if cmd == "load":
            try:
                return engine.load(msg["model"], msg.get("adapter"))
            except BaseException:
                engine.reset()  # a failed load leaves nothing half-loaded
                raise
        if cmd == "generate":
            return engine.generate(msg["request"], self.cancel,
                                   lambda chunk: self.send({"id": rid, "type": "token", **chunk}))
        if cmd == "compare":
            return engine.compare(msg["targets"], msg["request"], self.cancel, lambda m: self.send({"id": rid, **m}))
        if cmd == "perplexity":
            return engine.perplexity(msg["path"], int(msg["max_seq_length"]), int(msg["batch_size"]),
                                     bool(msg.get("mask_prompt", False)))
        if cmd == "evaluate":  # services.evaluation.runner: suites and lm-eval tasks, adapters swapped
            from services.evaluation.runner import evaluate_targets

            return evaluate_targets(engine, msg["targets"], msg.get("suites") or [], msg.get("tasks"), self.cancel,
                                    lambda m: self.send({"id": rid, **m}))
        if cmd == "info":
            return engine.describe() if engine.model is not None else {"memory": memory()}
        raise WorkerError(f"unknown command {cmd!r}")


def main() -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C belongs to the app, which cancels or unloads
    out = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1, encoding="utf-8")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # stray prints (mlx-lm warnings) go to stderr
    sys.stdout = sys.stderr
    server = Server(out)
    threading.Thread(target=server.read, args=(sys.stdin,), daemon=True, name="commands").start()
    server.serve()
    out.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
