"""Playground page: load a model (optionally a run or checkpoint adapter), chat or continue text, compare
checkpoints side by side (blind A/B preferences included) and measure perplexity on a dataset.

The model lives in the shared :class:`services.inference.service.ModelService` worker process; the page only
awaits its async APIs (or runs its blocking ones in a thread), so the event loop never waits on the model.
Tokens arrive through the stream's async iterator into a per-page buffer that a 0.1 s timer moves into the
current answer bubble: one update per tick, never one element per token. The model status is polled every
0.5 s and redrawn only when ``ModelService.version`` changed.

Routes: ``/playground``, ``/playground?run=RUN&iteration=N`` (or ``run=RUN@N``), ``/playground/RUN`` and
``/playground/RUN/N``: the last three preselect that run's base model and adapter and load them.
"""

from __future__ import annotations

import asyncio
import collections
import json
import math
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil
from nicegui import events, ui

from services.config import ConfigError
from services.inference.requests import ROLES, SAMPLING_DEFAULTS, adapter_label
from services.inference.service import CancelHandle, GenerationStream, ModelError, save_preference
from services.library.datasets import list_datasets
from services.library.models import list_models, model_size_bytes
from services.training.manager import RunManager, parse_ref
from services.units import human_bytes

if TYPE_CHECKING:
    from app.composition import Services

NO_ADAPTER = "none"
TICK = 0.1  # seconds between answer-bubble updates while tokens stream
STATUS_TICK = 0.5
MAX_CHAT_BYTES = 2_000_000
PREFERENCES = "preferences"
CHAT_KIND = "forgellm-chat"
STATE_COLORS = {"idle": "grey", "loading": "orange", "ready": "positive", "generating": "primary",
                "error": "negative"}
# key, label, int or float, step, tooltip
SAMPLING_FIELDS: tuple[tuple[str, str, type, float, str], ...] = (
    ("temperature", "Temperature", float, 0.1, "0 = greedy (always the most likely token); higher = more random."),
    ("top_p", "Top-p", float, 0.05, "Sample only from the smallest set of tokens whose probability adds up to this."),
    ("top_k", "Top-k (0 = off)", int, 1, "Sample only from the k most likely tokens."),
    ("min_p", "Min-p", float, 0.01, "Drop tokens less likely than this fraction of the most likely one."),
    ("repetition_penalty", "Repetition penalty", float, 0.05, "Above 1 discourages repeating recent tokens."),
    ("max_tokens", "Max tokens", int, 16, "Longest answer in tokens."),
    ("seed", "Seed", int, 1, "Fix the random generator for repeatable sampling (blank: random)."),
    ("max_kv_size", "Max KV size", int, 256,
     "Keep at most this many tokens in the attention cache, a rotating window that saves memory on long chats "
     "(blank: all)."),
)
OPTIONAL = ("seed", "max_kv_size")


# ----------------------------------------------------------------------------------------- pure helpers


MARKDOWN_EXTRAS = ["fenced-code-blocks", "tables", "code-friendly"]  # code-friendly: snake_case stays as is
USER_BUBBLE = "bg-color=blue-1 text-color=black"
MODEL_BUBBLE = "bg-color=grey-3 text-color=black"


def fmt_gb(value: float | None) -> str:
    return "–" if value is None else human_bytes(value * 1e9)


def split_think(text: str) -> tuple[str, str, bool]:
    """(thinking, answer, thinking still open) of a model's output with ``<think>…</think>`` blocks.

    A ``</think>`` without an opening tag (the chat template opened it) closes everything before it.
    """
    thoughts, answer, still_open = [], [], False
    rest = text
    close = rest.find("</think>")
    if close >= 0 and (rest.find("<think>") < 0 or close < rest.find("<think>")):
        thoughts.append(rest[:close])
        rest = rest[close + len("</think>"):]
    while "<think>" in rest:
        before, _, after = rest.partition("<think>")
        answer.append(before)
        inner, closed, rest = after.partition("</think>")
        thoughts.append(inner)
        if not closed:
            still_open, rest = True, ""
    answer.append(rest)
    return "\n\n".join(t.strip() for t in thoughts if t.strip()), "".join(answer).strip(), still_open


def stats_text(stats: dict[str, Any] | None) -> str:
    """One line of token counts, speed and context use for an answer's ``done`` statistics."""
    if not stats:
        return ""
    if stats.get("error"):
        return f"error: {stats['error']}"
    parts = [f"{stats.get('prompt_tokens', '?')} prompt + {stats.get('generation_tokens', '?')} generated tokens"]
    tps = stats.get("generation_tps")
    if isinstance(tps, (int, float)) and math.isfinite(tps):
        parts.append(f"{tps:,.0f} tokens/s")
    if stats.get("context_used") is not None:
        limit = stats.get("max_kv_size") or stats.get("context_max")
        parts.append(f"context {stats['context_used']:,}" + (f" / {limit:,}" if limit else ""))
    reason = stats.get("finish_reason")
    parts.append({"cancelled": "stopped", "length": "max tokens reached", "stop": "finished"}.get(reason, reason or ""))
    return " · ".join(p for p in parts if p)


def model_choices(services: Services) -> dict[str, str]:
    """Model folders of the workspace (``models/`` and ``published/``): resolved path → label."""
    return {str(Path(m["path"]).resolve()): m["label"] for m in list_models(services.workspace)}


def adapter_choices(manager: RunManager, model: str | None, lora_only: bool = False) -> dict[str, str]:
    """Runs and checkpoints (of ``model`` when given): resolved folder → ``RUN (latest)`` / ``RUN @ N ★ best``."""
    out: dict[str, str] = {}
    for info in manager.list():
        if model and info.get("model") and str(Path(info["model"]).resolve()) != model:
            continue
        if lora_only and info.get("fine_tune_type") == "full":
            continue
        try:
            folder = manager.folder(info["id"])
        except ConfigError:
            continue
        best = (info.get("best") or {}).get("iteration")
        if (folder.path / "adapters.safetensors").is_file():
            out[str(folder.path.resolve())] = f"{folder.id} (latest)"
        for it in reversed(folder.checkpoint_iterations()):
            out[str(folder.checkpoint_dir(it).resolve())] = f"{folder.id} @ {it}" + (" ★ best" if it == best else "")
    return out


def perplexity_datasets(services: Services) -> dict[str, str]:
    """Datasets with a validation split (a folder with ``valid.jsonl``) or single ``.jsonl`` files."""
    out = {}
    for d in list_datasets(services.workspace):
        p = Path(d["path"])
        if (p.is_dir() and (p / "valid.jsonl").is_file()) or (p.is_file() and p.suffix == ".jsonl"):
            out[str(p.resolve())] = d["label"]
    return out


def ram_hint(model: str, adapter: str | None, headroom: float) -> tuple[str, bool]:
    """(text, short of RAM) for loading ``model`` + ``adapter``, before loading it."""
    try:
        size = model_size_bytes(model)
        if adapter:
            size += (Path(adapter) / "adapters.safetensors").stat().st_size
    except OSError:
        return "", False
    free = psutil.virtual_memory().available
    short = free < size * headroom
    text = f"needs about {fmt_gb(size / 1e9)} of RAM; {fmt_gb(free / 1e9)} free"
    return (text + " — loading may swap or fail" if short else text), short


def chat_json(messages: list[dict[str, Any]], system: str, settings: dict[str, Any],
              status: dict[str, Any]) -> bytes:
    """A saved chat: messages (with their statistics), system prompt, settings and the model it ran on."""
    doc = {"kind": CHAT_KIND, "version": 1, "saved": time.strftime("%Y-%m-%dT%H:%M:%S"),
           "model": status.get("model"), "adapter": status.get("adapter"), "system": system,
           "settings": settings, "messages": messages}
    return json.dumps(doc, indent=2, ensure_ascii=False).encode()


def parse_chat(raw: bytes) -> dict[str, Any]:
    """``{"messages", "system", "settings"}`` from a saved chat (or a plain list of messages); raises ValueError."""
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"not a JSON file ({e})") from None
    if isinstance(doc, list):
        doc = {"messages": doc}
    if not isinstance(doc, dict) or not isinstance(doc.get("messages"), list):
        raise ValueError("expected {\"messages\": [{\"role\", \"content\"}, ...]} or a list of messages")
    messages, system = [], doc.get("system") or ""
    for i, m in enumerate(doc["messages"]):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ValueError(f"messages[{i}]: expected {{'role': one of {list(ROLES)}, 'content': text}}")
        if m["role"] == "system":
            system = system or m["content"]
            continue
        stats = m.get("stats") if isinstance(m.get("stats"), dict) else None
        messages.append({"role": m["role"], "content": m["content"], **({"stats": stats} if stats else {})})
    if not isinstance(system, str):
        raise ValueError("system: expected text")
    settings = doc.get("settings") if isinstance(doc.get("settings"), dict) else {}
    return {"messages": messages, "system": system, "settings": settings}


# ----------------------------------------------------------------------------------------- the page


class Playground:
    """One client's Playground: model bar, Chat, Compare and Perplexity tabs."""

    def __init__(self, services: Services):
        self.services, self.models, self.manager = services, services.models, services.manager
        self.messages: list[dict[str, Any]] = []
        self.editing: int | None = None
        self.stream: GenerationStream | None = None
        self.buffer: list[str] = []
        self.live_text = ""
        self.live_tokens = 0
        self.live_show: Callable[[str], None] | None = None
        self.seen_version = -1
        self.mode = "chat"
        self.comparing = False
        self.cmp_cancel = CancelHandle()
        self.cmp_pending: collections.deque[dict[str, Any]] = collections.deque()
        self.cmp_cols: dict[int, ui.column] = {}
        self.cmp_titles: dict[int, ui.label] = {}
        self.ab: dict[str, Any] | None = None
        self.cmp_filled: set[int] = set()
        self.sampling: dict[str, ui.number] = {}
        self.cmp_targets: ui.select | None = None
        self.ticker = ui.timer(TICK, self.tick, active=False)

    # -- model bar --------------------------------------------------------------------------------

    def build_model_bar(self) -> None:
        status = self.models.status
        models = model_choices(self.services)
        current = status.get("model")
        if current and current not in models:
            models[current] = Path(current).name
        with ui.card().classes("w-full gap-2"):
            with ui.row().classes("w-full items-end gap-3"):
                self.model_select = ui.select(models, label="Model", with_input=True, new_value_mode="add-unique",
                                              value=current or next(iter(models), None),
                                              on_change=lambda: self.model_changed()) \
                    .props("dense outlined").classes("w-96").mark("model")
                self.model_select.tooltip("A model folder from the workspace's models/ or published/, or a path")
                self.adapter_select = ui.select({NO_ADAPTER: "none (base model)"}, label="Adapter",
                                                with_input=True, value=NO_ADAPTER,
                                                on_change=lambda: self.update_hint()) \
                    .props("dense outlined").classes("w-96").mark("adapter")
                self.adapter_select.on("popup-show", lambda: self.refresh_adapters())  # runs finished meanwhile
                self.adapter_select.tooltip("A run (its latest weights) or one of its checkpoints, trained on "
                                            "this model")
                self.load_btn = ui.button("Load", icon="memory", on_click=self.load).mark("load")
                ui.button("Unload", icon="eject", on_click=self.unload).props("outline").mark("unload") \
                    .tooltip("Stop the model worker: its memory goes back to the system")
            with ui.row().classes("w-full items-center gap-3 text-sm"):
                self.state_badge = ui.badge("idle", color="grey").classes("text-sm").mark("model-state")
                self.loaded_label = ui.label("").classes("font-medium").mark("loaded")
                self.memory_label = ui.label("").classes("opacity-70").mark("memory")
                self.message_label = ui.label("").classes("opacity-70").mark("model-message")
                ui.space()
                self.hint_label = ui.label("").classes("text-xs opacity-70").mark("ram-hint")
            self.warning_label = ui.label("").classes("text-sm text-warning").mark("model-warning")
        self.refresh_adapters(keep=status.get("adapter"))

    def model_path(self) -> str | None:
        """The picked model as a resolved path (a typed name is looked up under ``models/``)."""
        value = self.model_select.value
        if not value:
            return None
        try:
            return str(self.manager.resolve_path(str(value), "models", "model"))
        except ConfigError:
            return str(value)  # loading reports what is wrong with it

    def adapter_path(self) -> str | None:
        value = self.adapter_select.value
        return None if not value or value == NO_ADAPTER else str(value)

    def refresh_adapters(self, keep: str | None = None) -> None:
        options = {NO_ADAPTER: "none (base model)", **adapter_choices(self.manager, self.model_path())}
        value = keep if keep in options else (self.adapter_select.value if self.adapter_select.value in options
                                             else NO_ADAPTER)
        self.adapter_select.set_options(options, value=value)
        if self.cmp_targets is not None:
            targets = adapter_choices(self.manager, self.model_path(), lora_only=True)
            self.cmp_targets.set_options(targets, value=[v for v in self.cmp_targets.value or [] if v in targets])
        self.update_hint()

    def model_changed(self) -> None:
        self.refresh_adapters()

    def update_hint(self) -> None:
        model = self.model_path()
        text, short = ram_hint(model, self.adapter_path(), self.models.ram_headroom) if model else ("", False)
        self.hint_label.set_text(f"{Path(model).name}: {text}" if text else "")
        self.hint_label.classes(replace="text-xs " + ("text-warning" if short else "opacity-70"))

    async def load(self) -> bool:
        """Load the picked model and adapter (in a thread); True when it worked."""
        model = self.model_path()
        if not model:
            ui.notify("Pick a model first", type="warning")
            return False
        adapter = self.adapter_path()
        self.load_btn.disable()
        try:
            await self.models.aload(model, adapter)
        except (ModelError, OSError, ValueError) as e:
            ui.notify(f"Could not load: {e}", type="negative", multi_line=True)
            return False
        finally:
            self.load_btn.enable()
            self.poll()
        ui.notify(f"Loaded {Path(model).name}" + (f" + {adapter_label(adapter)}" if adapter else ""), type="positive")
        return True

    async def unload(self) -> None:
        if self.stream is not None:
            self.stream.cancel()
        await asyncio.to_thread(self.models.unload)
        self.poll()

    @staticmethod
    def loaded_name(status: dict[str, Any]) -> str:
        if not status.get("model"):
            return "no model loaded"
        return Path(status["model"]).name + (f" + {status['adapter_label']}" if status.get("adapter") else "")

    def poll(self) -> None:
        """Redraw the model status when the service's version moved."""
        if self.models.version == self.seen_version:
            return
        self.seen_version = self.models.version
        st = self.models.status
        state = st["state"]
        self.state_badge.set_text(state)
        self.state_badge.props["color"] = STATE_COLORS.get(state, "grey")
        self.loaded_label.set_text(self.loaded_name(st) + ("" if st.get("adapter") or not st.get("model")
                                                           else " (no adapter)"))
        mem = st.get("memory") or {}
        self.memory_label.set_text(f"worker {fmt_gb(mem.get('rss_gb'))} · weights {fmt_gb(mem.get('model_gb'))}"
                                   if st.get("pid") else "")
        self.message_label.set_text(st.get("message") or "")
        self.message_label.classes(replace="text-negative" if state == "error" else "opacity-70")
        self.warning_label.set_text(f"⚠ {st['warning']}" if st.get("warning") else "")
        self.warning_label.set_visibility(bool(st.get("warning")))
        self.update_mode(st)

    # -- chat: layout -----------------------------------------------------------------------------

    def build_chat(self) -> None:
        with ui.row().classes("w-full items-start gap-4 no-wrap max-lg:flex-wrap"):
            with ui.column().classes("grow min-w-0 gap-2"):
                with ui.column().classes("w-full gap-2") as self.chat_box:
                    with ui.card().props("flat bordered").classes("w-full p-0"):
                        self.scroll = ui.scroll_area().classes("w-full h-[calc(100vh-31rem)] min-h-64")
                        with self.scroll:
                            self.thread = ui.column().classes("w-full gap-1 pr-2").mark("thread")
                    with ui.row().classes("w-full items-center gap-2 text-sm") as self.edit_banner:
                        ui.icon("edit_note")
                        self.edit_text = ui.label("").mark("edit-banner")
                        ui.button("Cancel edit", on_click=lambda: self.set_editing(None)).props("flat dense no-caps")
                    self.edit_banner.set_visibility(False)
                    with ui.row().classes("w-full items-end gap-2 no-wrap"):
                        self.input = ui.textarea(placeholder="Message (Ctrl+Enter sends)") \
                            .props("outlined dense autogrow").classes("grow").mark("chat-input")
                        self.input.on("keydown.ctrl.enter", self.send)
                        self.send_btn = ui.button("Send", icon="send", on_click=self.send).mark("send")
                        self.regen_btn = ui.button("Regenerate", icon="refresh", on_click=self.regenerate) \
                            .props("outline").mark("regenerate").tooltip("Answer the last message again")
                        self.stop_btn = ui.button("Stop", icon="stop", on_click=self.stop) \
                            .props("outline color=negative").mark("stop")
                with ui.column().classes("w-full gap-2") as self.completion_box:
                    ui.label("Completion: the model continues the text (for base models without a chat "
                             "template).").classes("text-sm opacity-70")
                    self.doc = ui.textarea("Text").props("outlined autogrow").classes("w-full font-mono") \
                        .mark("completion-text")
                    with ui.row().classes("gap-2"):
                        self.continue_btn = ui.button("Continue", icon="play_arrow", on_click=self.complete) \
                            .mark("continue")
                        self.stop_completion_btn = ui.button("Stop", icon="stop", on_click=self.stop) \
                            .props("outline color=negative").mark("stop-completion")
                self.stats_label = ui.label("").classes("text-xs opacity-70").mark("chat-stats")
            with ui.card().classes("w-80 max-lg:w-full shrink-0 gap-2"):
                ui.label("Settings").classes("text-sm font-semibold opacity-70")
                self.format = ui.toggle({"auto": "auto", "chat": "chat", "completion": "completion"}, value="auto",
                                        on_change=lambda: self.update_mode()).props("dense no-caps").mark("format")
                self.format.tooltip("auto: the chat template when the model has one, else plain completion")
                self.history = ui.switch("Send the chat history", value=True).mark("history")
                self.history.tooltip("Off: each message is answered on its own")
                self.system = ui.textarea("System prompt").props("outlined dense autogrow").classes("w-full") \
                    .mark("system")
                with ui.grid(columns=2).classes("w-full gap-2"):
                    for key, label, kind, step, tip in SAMPLING_FIELDS:
                        el = ui.number(label, value=SAMPLING_DEFAULTS[key], step=step,
                                       placeholder={"seed": "random", "max_kv_size": "all"}.get(key),
                                       format="%.0f" if kind is int else None).props("dense outlined")
                        el.tooltip(tip)
                        self.sampling[key] = el.mark(f"sampling-{key}")
                with ui.row().classes("gap-2"):
                    ui.button("Save", icon="download", on_click=self.save_chat).props("outline dense") \
                        .mark("save-chat").tooltip("Download the chat and its settings as JSON")
                    ui.button("Open", icon="upload", on_click=lambda: self.upload_dialog.open()) \
                        .props("outline dense").mark("load-chat").tooltip("Continue a chat saved as JSON")
                    ui.button("Clear", icon="delete_sweep", on_click=self.clear_chat).props("outline dense") \
                        .mark("clear-chat")
        with ui.dialog() as self.upload_dialog, ui.card():
            ui.label("Load a chat saved as JSON").classes("font-semibold")
            ui.upload(label="Chat JSON", auto_upload=True, max_file_size=MAX_CHAT_BYTES, on_upload=self.load_chat) \
                .props("accept=.json flat bordered").mark("chat-upload")
            ui.button("Close", on_click=self.upload_dialog.close).props("flat")
        self.set_busy(False)
        self.render()

    def update_mode(self, status: dict[str, Any] | None = None) -> None:
        """Chat or completion view: the format choice, or (auto) whether the model has a chat template."""
        fmt = self.format.value
        has_template = (status or self.models.status).get("has_chat_template")
        self.mode = "completion" if fmt == "completion" or (fmt == "auto" and has_template is False) else "chat"
        self.chat_box.set_visibility(self.mode == "chat")
        self.completion_box.set_visibility(self.mode == "completion")

    def set_busy(self, busy: bool) -> None:
        for b in (self.send_btn, self.regen_btn, self.continue_btn):
            b.set_enabled(not busy)
        for b in (self.stop_btn, self.stop_completion_btn):
            b.set_enabled(busy)
        self.doc.props(add="readonly") if busy else self.doc.props(remove="readonly")
        self.ticker.active = busy or self.comparing

    def set_editing(self, index: int | None) -> None:
        self.editing = index
        if index is None:
            self.edit_banner.set_visibility(False)
            self.input.set_value("")
        else:
            after = len(self.messages) - index - 1
            turn = sum(m["role"] == "user" for m in self.messages[:index + 1])
            self.edit_text.set_text(f"Editing your message {turn}: sending replaces it"
                                    + (f" and drops the {after} message(s) after it." if after else "."))
            self.edit_banner.set_visibility(True)
            self.input.set_value(self.messages[index]["content"])
        self.render()

    # -- chat: rendering --------------------------------------------------------------------------

    def answer_body(self, text: str, live: bool = False) -> tuple[ui.expansion, ui.markdown, ui.markdown]:
        """A collapsible thinking block (hidden when there is none) and the answer as sanitised Markdown."""
        thinking, answer, still = split_think(text)
        exp = ui.expansion("Thinking", icon="psychology", value=live or still).classes("w-full text-sm") \
            .props("dense").mark("thinking")
        with exp:
            think_md = ui.markdown(thinking, extras=MARKDOWN_EXTRAS).classes("text-sm opacity-80")
        exp.set_visibility(bool(thinking))
        empty = "…" if live else ("*(whitespace only)*" if text else "*(empty answer)*")
        md = ui.markdown(answer or empty, extras=MARKDOWN_EXTRAS).classes("min-w-0").mark("answer-text")
        return exp, think_md, md

    def render(self) -> None:
        """Rebuild the thread (only on structural changes: a message added, edited, dropped or loaded)."""
        self.thread.clear()
        with self.thread:
            if not self.messages:
                ui.label("Load a model, then say something.").classes("text-sm opacity-60 p-2").mark("empty-chat")
            for i, m in enumerate(self.messages):
                if m["role"] == "user":
                    ring = " ring-2 ring-warning" if i == self.editing else ""
                    with ui.chat_message(name="You", sent=True).props(USER_BUBBLE).classes("w-full" + ring) \
                            .mark("msg-user"), ui.row().classes("items-start gap-1 no-wrap"):
                        ui.label(m["content"]).classes("whitespace-pre-wrap").mark("user-text")
                        ui.button(icon="edit", on_click=lambda i=i: self.start_edit(i)) \
                            .props("flat round dense size=sm").mark("edit").tooltip("Edit and continue from here")
                else:
                    stats = m.get("stats") or {}
                    with ui.chat_message(name=stats.get("model_label") or "model", sent=False) \
                            .props(MODEL_BUBBLE).classes("w-full").mark("msg-assistant"), \
                            ui.column().classes("gap-1 min-w-0"):
                        self.answer_body(m["content"])
                        ui.label(stats_text(stats)).classes("text-xs opacity-70").mark("answer-stats")
        self.scroll.scroll_to(percent=1.0)

    def start_edit(self, index: int) -> None:
        if self.stream is not None:
            ui.notify("Stop the answer first", type="warning")
            return
        self.set_editing(index)

    def drain(self) -> None:
        """Move the buffered tokens into the live view (runs every 0.1 s while generating)."""
        if not self.buffer or self.live_show is None:
            return
        self.live_text += "".join(self.buffer)
        self.buffer.clear()
        self.live_show(self.live_text)

    # -- chat: generation -------------------------------------------------------------------------

    def request(self, **content: Any) -> dict[str, Any]:
        """A generation request from the settings (blank numbers: the defaults, or None where optional)."""
        req: dict[str, Any] = {"system": self.system.value or None, "format": self.format.value, **content}
        for key, _, kind, _, _ in SAMPLING_FIELDS:
            value = self.sampling[key].value
            if value is None or value == "":
                value = None if key in OPTIONAL else SAMPLING_DEFAULTS[key]
            elif kind is int and isinstance(value, float) and value.is_integer():
                value = int(value)
            req[key] = value
        return req

    def settings(self) -> dict[str, Any]:
        return {"format": self.format.value, "history": self.history.value,
                **{k: self.sampling[k].value for k in self.sampling}}

    async def consume(self, stream: GenerationStream, show: Callable[[str], None]) -> tuple[dict | None, str | None]:
        """Read a stream into the buffer until it ends; returns (done statistics, error message)."""
        self.stream, self.buffer, self.live_text, self.live_tokens, self.live_show = stream, [], "", 0, show
        self.set_busy(True)
        error = None
        try:
            async for chunk in stream:
                if self.ticker.is_deleted:  # the page is gone (navigated away, tab closed): leaving cancels
                    break
                if chunk["type"] == "token":
                    self.buffer.append(chunk["text"])
                    self.live_tokens += 1
        except ModelError as e:
            error = str(e)
        finally:
            self.drain()
            self.stream, self.live_show = None, None
            self.set_busy(False)
        return stream.result, error

    async def send(self) -> None:
        text = (self.input.value or "").strip()
        if self.stream is not None or not text:
            return
        if self.editing is not None:
            del self.messages[self.editing:]
            self.editing = None
            self.edit_banner.set_visibility(False)
        self.messages.append({"role": "user", "content": text})
        self.input.set_value("")
        self.render()
        await self.answer()

    async def regenerate(self) -> None:
        if self.stream is not None:
            return
        if self.editing is not None:
            self.set_editing(None)
        if self.messages and self.messages[-1]["role"] == "assistant":
            self.messages.pop()
        if not self.messages:
            ui.notify("Nothing to answer yet", type="warning")
            return
        self.render()
        await self.answer()

    async def answer(self) -> None:
        """Answer the conversation so far into a new bubble."""
        thread = self.messages  # replaced (not changed) when the chat is cleared or loaded meanwhile
        convo = [{"role": m["role"], "content": m["content"]} for m in thread]
        if not self.history.value:
            convo = convo[-1:]
        try:
            stream = self.models.generate(self.request(messages=convo))
        except ModelError as e:
            self.stats_label.set_text(f"error: {e}")
            ui.notify(str(e), type="negative", multi_line=True)
            return
        model_label = self.loaded_name(self.models.status)
        with self.thread, ui.chat_message(name=model_label, sent=False) \
                .props(MODEL_BUBBLE).classes("w-full").mark("msg-live"), ui.column().classes("gap-1 min-w-0"):
            exp, think_md, md = self.answer_body("", live=True)
            live_stats = ui.label("generating…").classes("text-xs opacity-70").mark("live-stats")
        self.stats_label.set_text("generating…")

        def show(text: str) -> None:
            thinking, answer, _ = split_think(text)
            exp.set_visibility(bool(thinking))
            think_md.set_content(thinking)
            md.set_content(answer or "…")
            live_stats.set_text(f"{self.live_tokens} tokens…")
            self.stats_label.set_text(f"generating… {self.live_tokens} tokens so far")
            self.scroll.scroll_to(percent=1.0)

        result, error = await self.consume(stream, show)
        text = (result or {}).get("text", self.live_text)
        stats = {k: v for k, v in (result or {}).items() if k not in ("text", "tokens", "memory", "type")}
        stats["model_label"] = model_label
        if error:
            stats["error"] = error
            ui.notify(error, type="negative", multi_line=True)
        if (text or result) and thread is self.messages:
            self.messages.append({"role": "assistant", "content": text, "stats": stats})
        self.stats_label.set_text(stats_text(stats))
        self.render()

    async def complete(self) -> None:
        """Completion mode: the model continues the text box."""
        prefix = self.doc.value or ""
        if self.stream is not None or not prefix.strip():
            return
        try:
            stream = self.models.generate(self.request(prompt=prefix, format="completion"))
        except ModelError as e:
            self.stats_label.set_text(f"error: {e}")
            ui.notify(str(e), type="negative", multi_line=True)
            return

        def show(text: str) -> None:
            self.doc.set_value(prefix + text)
            self.stats_label.set_text(f"generating… {self.live_tokens} tokens so far")

        result, error = await self.consume(stream, show)
        self.doc.set_value(prefix + (result or {}).get("text", self.live_text))
        self.stats_label.set_text(f"error: {error}" if error else stats_text(result))
        if error:
            ui.notify(error, type="negative", multi_line=True)

    def stop(self) -> None:
        if self.stream is not None:
            self.stream.cancel()

    # -- chat: files ------------------------------------------------------------------------------

    def save_chat(self) -> None:
        data = chat_json(self.messages, self.system.value or "", self.settings(), self.models.status)
        ui.download.content(data, f"chat-{time.strftime('%Y%m%d-%H%M%S')}.json", "application/json")

    async def load_chat(self, e: events.UploadEventArguments) -> None:
        try:
            if e.file.size() > MAX_CHAT_BYTES:
                raise ValueError("file is larger than 2 MB")
            chat = parse_chat(await e.file.read())
        except ValueError as err:
            ui.notify(f"Could not read {e.file.name}: {err}", type="negative", multi_line=True)
            return
        if self.stream is not None:
            self.stream.cancel()
        self.messages, self.editing = chat["messages"], None
        self.system.set_value(chat["system"])
        settings = chat["settings"]
        if settings.get("format") in ("auto", "chat", "completion"):
            self.format.set_value(settings["format"])
        if isinstance(settings.get("history"), bool):
            self.history.set_value(settings["history"])
        for key, el in self.sampling.items():
            value = settings.get(key)
            if (isinstance(value, (int, float)) and not isinstance(value, bool)) or (value is None and key in settings):
                el.set_value(value)
        self.edit_banner.set_visibility(False)
        self.upload_dialog.close()
        self.render()
        ui.notify(f"Loaded {len(self.messages)} messages from {e.file.name}")

    def clear_chat(self) -> None:
        if self.stream is not None:
            self.stream.cancel()
        self.messages, self.editing = [], None
        self.edit_banner.set_visibility(False)
        self.stats_label.set_text("")
        self.render()

    # -- compare ----------------------------------------------------------------------------------

    def build_compare(self) -> None:
        ui.label("One prompt, answered by the base model and checkpoints trained on it: one copy of the base "
                 "stays in memory and only the adapter weights are swapped. Sampling, system prompt and format "
                 "come from the Chat settings; temperature 0 or a fixed seed keeps the comparison fair.") \
            .classes("text-sm opacity-70")
        self.cmp_prompt = ui.textarea("Prompt").props("outlined dense autogrow").classes("w-full") \
            .mark("compare-prompt")
        with ui.row().classes("w-full items-center gap-3"):
            self.cmp_base = ui.switch("Base model", value=True).mark("compare-base")
            self.cmp_targets = ui.select({}, multiple=True, label="Checkpoints", with_input=True, value=[]) \
                .props("dense outlined use-chips").classes("grow min-w-[20rem]").mark("compare-targets")
            self.cmp_targets.on("popup-show", lambda: self.refresh_adapters())
        with ui.row().classes("w-full items-center gap-3"):
            self.blind = ui.switch("Blind A/B", on_change=lambda: self.pref_name.set_visibility(self.blind.value)) \
                .mark("blind")
            self.blind.tooltip("Two answers shown as A and B in random order; your pick is saved as a preference "
                               "pair (prompt, chosen, rejected) for DPO/ORPO")
            self.pref_name = ui.input("Save picks to dataset", value=PREFERENCES).props("dense outlined") \
                .classes("w-56").mark("preference-dataset")
            self.pref_name.set_visibility(False)
            self.cmp_btn = ui.button("Compare", icon="compare_arrows", on_click=self.compare).mark("compare")
            self.cmp_stop = ui.button("Stop", icon="stop", on_click=lambda: self.cmp_cancel.cancel()) \
                .props("outline color=negative").mark("compare-stop")
            self.cmp_stop.tooltip("Stops this comparison (the answers so far stay)")
            self.cmp_stop.disable()
        self.cmp_note = ui.label("").classes("text-sm").mark("compare-note")
        self.cmp_columns = ui.row().classes("w-full gap-3 no-wrap items-stretch overflow-x-auto p-1") \
            .mark("compare-columns")
        with ui.row().classes("items-center gap-3") as self.ab_row:
            ui.label("Which answer is better?").classes("font-medium")
            for letter in "AB":
                ui.button(f"{letter} is better", on_click=lambda x=letter: self.pick(x)).mark(f"pick-{letter}")
            ui.button("Skip", on_click=lambda: self.pick(None)).props("flat").mark("pick-skip")
        self.ab_row.set_visibility(False)

    async def compare(self) -> None:
        prompt = (self.cmp_prompt.value or "").strip()
        targets: list[str | None] = ([None] if self.cmp_base.value else []) + list(self.cmp_targets.value or [])
        if self.comparing:
            return
        if not prompt:
            ui.notify("Write a prompt first", type="warning")
            return
        if not targets:
            ui.notify("Pick the base model and/or checkpoints to compare", type="warning")
            return
        blind = bool(self.blind.value)
        if blind and len(targets) != 2:
            ui.notify("Blind A/B needs exactly two answers: the base and one checkpoint, or two checkpoints",
                      type="warning")
            return
        model = self.model_path()
        if not model:
            ui.notify("Pick a model first", type="warning")
            return
        self.comparing = True
        self.cmp_cancel = CancelHandle()  # Stop while the base loads still stops this compare
        self.cmp_btn.disable()
        self.cmp_stop.enable()
        self.ab, self.cmp_pending = None, collections.deque()
        self.ab_row.set_visibility(False)
        try:
            if self.models.status.get("model") != model:  # compare runs on the loaded base: load it first
                self.cmp_note.set_text(f"loading {Path(model).name}…")
                await self.models.aload(model, None)
            request = self.request(prompt=prompt)
            del request["prompt"]
            order = list(range(len(targets)))
            if blind:
                random.shuffle(order)
            self.show_columns(targets, order, blind)
            self.cmp_note.set_text(f"generating {len(targets)} answers one after the other…")
            self.ticker.active = True
            results = await self.models.acompare(prompt, targets, request, on_result=self.cmp_pending.append,
                                                 cancel=self.cmp_cancel)
            self.cmp_pending.extend(results)
            self.drain_compare()
            cancelled = len(results) < len(targets)
            self.cmp_note.set_text("stopped" if cancelled else "")
            if blind and not cancelled:
                texts = {r["index"]: r.get("text", "") for r in results}
                self.ab = {"prompt": self.preference_prompt(prompt), "order": order, "texts": texts,
                           "targets": targets}
                self.ab_row.set_visibility(True)
        except (ModelError, OSError, ValueError) as e:
            self.cmp_note.set_text(f"error: {e}")
            ui.notify(str(e), type="negative", multi_line=True)
        finally:
            self.comparing = False
            self.ticker.active = self.stream is not None
            self.cmp_btn.enable()
            self.cmp_stop.disable()
            self.poll()

    def preference_prompt(self, prompt: str) -> str | list[dict[str, str]]:
        system = self.system.value
        return [{"role": "system", "content": system}, {"role": "user", "content": prompt}] if system else prompt

    def target_title(self, target: str | None) -> str:
        if target is None:
            return "base"
        return self.cmp_targets.options.get(target) or adapter_label(target)

    def show_columns(self, targets: list[str | None], order: list[int], blind: bool) -> None:
        self.cmp_columns.clear()
        self.cmp_cols, self.cmp_titles, self.cmp_filled = {}, {}, set()
        with self.cmp_columns:
            for pos, index in enumerate(order):
                with ui.card().classes("flex-1 min-w-[16rem] gap-1").mark("compare-column"):
                    title = "AB"[pos] if blind else self.target_title(targets[index])
                    self.cmp_titles[index] = ui.label(title).classes("text-base font-semibold") \
                        .mark("compare-title")
                    with ui.column().classes("w-full gap-1") as body:
                        with ui.row().classes("items-center gap-2 text-sm opacity-70"):
                            ui.spinner(size="sm")
                            ui.label("waiting…")
                    self.cmp_cols[index] = body

    def drain_compare(self) -> None:
        """Show every compare result that arrived (called by the 0.1 s ticker and at the end)."""
        while self.cmp_pending:
            item = self.cmp_pending.popleft()
            index = item.get("index", -1)
            body = self.cmp_cols.get(index)
            if body is None or index in self.cmp_filled:
                continue
            self.cmp_filled.add(index)
            body.clear()
            with body:
                self.answer_body(item.get("text", ""))
                ui.label(stats_text(item)).classes("text-xs opacity-70").mark("compare-stats")

    def tick(self) -> None:
        self.drain()
        self.drain_compare()

    def pick(self, letter: str | None) -> None:
        """Save the blind pick as a preference pair and reveal which answer came from where."""
        ab = self.ab
        if ab is None:
            return
        self.ab = None
        self.ab_row.set_visibility(False)
        order, texts, targets = ab["order"], ab["texts"], ab["targets"]
        for pos, index in enumerate(order):
            self.cmp_titles[index].set_text(f"{'AB'[pos]} = {self.target_title(targets[index])}")
        if letter is None:
            return
        chosen = order["AB".index(letter)]
        rejected = order[1 - "AB".index(letter)]
        name = (self.pref_name.value or PREFERENCES).strip()
        try:
            path = save_preference(self.services.workspace, name, ab["prompt"], texts[chosen], texts[rejected])
        except (ValueError, OSError) as e:
            ui.notify(f"Not saved: {e}", type="negative", multi_line=True)
            return
        rel = path.relative_to(self.services.workspace.root) if path.is_relative_to(self.services.workspace.root) \
            else path
        ui.notify(f"Saved your pick ({self.target_title(targets[chosen])}) to {rel}", type="positive")
        self.cmp_note.set_text(f"saved to {rel}")

    # -- perplexity -------------------------------------------------------------------------------

    def build_perplexity(self) -> None:
        ui.label("Perplexity of the picked model and adapter on a dataset's validation split (valid.jsonl): "
                 "exp of mlx-lm's validation loss. Loads the picked model first.").classes("text-sm opacity-70")
        datasets = perplexity_datasets(self.services)
        with ui.row().classes("w-full items-end gap-3"):
            self.ppl_data = ui.select(datasets, label="Dataset", value=next(iter(datasets), None), with_input=True) \
                .props("dense outlined").classes("w-96").mark("ppl-dataset")
            self.ppl_len = ui.number("Max sequence length", value=512, step=64, format="%.0f") \
                .props("dense outlined").classes("w-44").mark("ppl-max-seq")
            self.ppl_batch = ui.number("Batch size", value=4, step=1, format="%.0f").props("dense outlined") \
                .classes("w-32").mark("ppl-batch")
            self.ppl_btn = ui.button("Compute", icon="functions", on_click=self.perplexity).mark("ppl-run")
        self.ppl_note = ui.label("").classes("text-sm").mark("ppl-result")
        columns = [{"name": k, "label": label, "field": k, "align": "left"} for k, label in
                   (("model", "model"), ("adapter", "adapter"), ("dataset", "dataset"), ("loss", "loss"),
                    ("perplexity", "perplexity"), ("tokens", "tokens"))]
        self.ppl_table = ui.table(columns=columns, rows=[], row_key="n").props("dense flat bordered") \
            .classes("w-full").mark("ppl-table")
        self.ppl_table.set_visibility(False)

    async def perplexity(self) -> None:
        model, dataset = self.model_path(), self.ppl_data.value
        if not model or not dataset:
            ui.notify("Pick a model and a dataset", type="warning")
            return
        adapter = self.adapter_path()
        self.ppl_btn.disable()
        self.ppl_note.set_text("computing…")
        try:
            res = await self.models.aperplexity(model, adapter, dataset, int(self.ppl_len.value or 512),
                                                int(self.ppl_batch.value or 4))
        except (ModelError, OSError, ValueError, TypeError) as e:
            self.ppl_note.set_text(f"error: {e}")
            ui.notify(str(e), type="negative", multi_line=True)
            return
        finally:
            self.ppl_btn.enable()
            self.poll()
        ppl = res["perplexity"]
        self.ppl_note.set_text(f"loss {res['loss']:.4f} · perplexity {ppl:,.2f} · {res['rows_used']} of "
                               f"{res['rows']} rows, {res['tokens']:,} tokens")
        row = {"n": len(self.ppl_table.rows), "model": Path(model).name, "adapter": adapter_label(adapter),
               "dataset": Path(dataset).name, "loss": f"{res['loss']:.4f}", "perplexity": f"{ppl:,.2f}",
               "tokens": res["tokens"]}
        self.ppl_table.add_row(row)
        self.ppl_table.set_visibility(True)

    # -- linking ----------------------------------------------------------------------------------

    def preselect(self, run: str, iteration: str | None) -> bool:
        """Pick a run's base model and its adapter (latest or checkpoint ``iteration``); False if invalid."""
        try:
            run_id, it = parse_ref(run)
            if iteration not in (None, ""):
                if not str(iteration).isdigit():
                    raise ConfigError("iteration", iteration, "expected a checkpoint number")
                it = int(iteration)
            folder = self.manager.folder(run_id)
            info = self.manager.get(run_id)
            if it is not None and it not in folder.checkpoint_iterations():
                raise ConfigError("iteration", it, f"run {run_id} has checkpoints {folder.checkpoint_iterations()}")
        except ConfigError as e:
            self.message_label.set_text(str(e))
            self.message_label.classes(replace="text-negative")
            ui.notify(str(e), type="negative")
            return False
        model = str(Path(info["model"]).resolve()) if info.get("model") else None
        if model:
            if model not in self.model_select.options:
                self.model_select.set_options({**self.model_select.options, model: Path(model).name})
            self.model_select.set_value(model)
        adapter = str((folder.checkpoint_dir(it) if it is not None else folder.path).resolve())
        self.refresh_adapters(keep=adapter)
        return self.adapter_select.value == adapter

    def preselect_model(self, value: str) -> bool:
        """Pick a model folder (relative to the workspace, e.g. ``published/NAME``) without adapter."""
        ws = self.services.workspace
        p = Path(value).expanduser()
        found = next((c.resolve() for c in ([p] if p.is_absolute() else [ws.root / p, ws.models / p])
                      if (c / "config.json").is_file()), None)
        if found is None:
            self.message_label.set_text(f"model {value!r}: no model folder with config.json in {ws.root}")
            self.message_label.classes(replace="text-negative")
            return False
        if str(found) not in self.model_select.options:
            self.model_select.set_options({**self.model_select.options, str(found): found.name})
        self.model_select.set_value(str(found))
        self.refresh_adapters(keep=NO_ADAPTER)
        return True


def playground_page(services: Services, run: str | None = None, iteration: str | None = None,
                    model: str | None = None) -> None:
    """Build the Playground page; ``run`` (``RUN`` or ``RUN@N``) and ``iteration`` preselect and load an adapter,
    ``model`` (``published/NAME``, a name under ``models/`` or a path) a model without adapter."""
    with ui.column().classes("w-full gap-3"):
        pg = Playground(services)
        ui.label("Playground").classes("text-2xl font-semibold")
        pg.build_model_bar()
        with ui.tabs().classes("w-full").props("align=left dense no-caps") as tabs:
            chat = ui.tab("Chat", icon="chat").mark("tab-chat")
            compare = ui.tab("Compare", icon="compare_arrows").mark("tab-compare")
            ppl = ui.tab("Perplexity", icon="functions").mark("tab-perplexity")
        with ui.tab_panels(tabs, value=chat).classes("w-full").props("animated=false"):
            with ui.tab_panel(chat).classes("px-1 pb-2 pt-2"):
                pg.build_chat()
            with ui.tab_panel(compare).classes("px-1 pb-2 pt-2 gap-3"):
                pg.build_compare()
            with ui.tab_panel(ppl).classes("px-1 pb-2 pt-2 gap-3"):
                pg.build_perplexity()
    pg.refresh_adapters(keep=services.models.status.get("adapter"))
    pg.poll()
    ui.timer(STATUS_TICK, pg.poll)
    if run:
        st = services.models.status
        if pg.preselect(run, iteration) and (st.get("model"), st.get("adapter")) != (pg.model_path(),
                                                                                     pg.adapter_path()):
            ui.timer(0.05, pg.load, once=True)
    elif model:
        st = services.models.status
        if pg.preselect_model(model) and (st.get("model"), st.get("adapter")) != (pg.model_path(), None):
            ui.timer(0.05, pg.load, once=True)
