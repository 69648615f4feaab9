"""The Playground's Chat tab: a chat thread (or plain completion) streamed from the model worker.

Tokens arrive through the stream's async iterator into a buffer that a 0.1 s timer moves into the current
answer bubble: one update per tick, never one element per token.
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable
from typing import Any

from nicegui import events, ui

from pages.common import recall, remember
from pages.playground.model_bar import loaded_name
from pages.playground.selection import Settings
from services.errors import ForgeError
from services.inference.chats import MAX_CHAT_BYTES, chat_json, parse_chat, split_think
from services.inference.service import GenerationStream, ModelService

TICK = 0.1  # seconds between answer-bubble updates while tokens stream
CHAT_KEY = "playground_chat"  # this browser's thread, kept across leaving the page and reloads
MARKDOWN_EXTRAS = ["fenced-code-blocks", "tables", "code-friendly"]  # code-friendly: snake_case stays as is
USER_BUBBLE = "bg-color=blue-1 text-color=black"
MODEL_BUBBLE = "bg-color=grey-3 text-color=black"


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


class AnswerBody:
    """A collapsible thinking block (hidden when there is none) and the answer as sanitised Markdown."""

    def __init__(self, text: str, live: bool = False) -> None:
        thinking, answer, still = split_think(text)
        self.thinking = ui.expansion("Thinking", icon="psychology", value=live or still) \
            .classes("w-full text-sm").props("dense").mark("thinking")
        with self.thinking:
            self.thinking_md = ui.markdown(thinking, extras=MARKDOWN_EXTRAS).classes("text-sm opacity-80")
        self.thinking.set_visibility(bool(thinking))
        empty = "…" if live else ("*(whitespace only)*" if text else "*(empty answer)*")
        self.answer_md = ui.markdown(answer or empty, extras=MARKDOWN_EXTRAS).classes("min-w-0").mark("answer-text")

    def show(self, text: str) -> None:
        """Show the text so far of a streaming answer."""
        thinking, answer, _ = split_think(text)
        self.thinking.set_visibility(bool(thinking))
        self.thinking_md.set_content(thinking)
        self.answer_md.set_content(answer or "…")


class ChatPanel:
    """The Chat tab: thread, input, completion box and the settings card (whose :class:`Settings` others share).

    The thread is kept for this browser (it survives leaving the page and a reload); ``ensure_loaded()`` loads
    the picked model when Send comes before Load."""

    def __init__(self, models: ModelService, ensure_loaded: Callable[[], Awaitable[bool]] | None = None) -> None:
        self.models, self.ensure_loaded = models, ensure_loaded
        kept = recall(CHAT_KEY)
        self.messages: list[dict[str, Any]] = [m for m in kept if isinstance(m, dict) and "role" in m
                                               and isinstance(m.get("content"), str)] \
            if isinstance(kept, list) else []
        self.editing: int | None = None
        self.stream: GenerationStream | None = None
        self.buffer: list[str] = []
        self.live_text = ""
        self.live_tokens = 0
        self.live_show: Callable[[str], None] | None = None
        self.mode = "chat"
        self.ticker = ui.timer(TICK, self.drain, active=False)
        with ui.row().classes("w-full items-start gap-4 no-wrap max-lg:flex-wrap"):
            with ui.column().classes("grow min-w-0 gap-2"):
                self.build_thread()
                self.build_completion()
                self.stats_label = ui.label("").classes("text-xs opacity-70").mark("chat-stats")
            with ui.card().classes("w-80 max-lg:w-full shrink-0 gap-2"):
                self.settings = Settings(on_format=lambda: self.update_mode())
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

    # -- layout ------------------------------------------------------------------------------------

    def build_thread(self) -> None:
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
            # on a phone the message box takes the whole width and the buttons go below it
            with ui.row().classes("w-full items-end gap-2 sm:flex-nowrap"):
                self.input = ui.textarea(placeholder="Message (Ctrl+Enter sends)") \
                    .props("outlined dense autogrow").classes("grow max-sm:w-full").mark("chat-input")
                self.input.on("keydown.ctrl.enter", self.send)
                self.send_btn = ui.button("Send", icon="send", on_click=self.send).mark("send")
                self.regen_btn = ui.button("Regenerate", icon="refresh", on_click=self.regenerate) \
                    .props("outline").mark("regenerate").tooltip("Answer the last message again")
                self.stop_btn = ui.button("Stop", icon="stop", on_click=self.stop) \
                    .props("outline color=negative").mark("stop")

    def build_completion(self) -> None:
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

    def update_mode(self, status: dict[str, Any] | None = None) -> None:
        """Chat or completion view: the format choice, or (auto) whether the model has a chat template."""
        fmt = self.settings.format.value
        has_template = (status or self.models.status).get("has_chat_template")
        self.mode = "completion" if fmt == "completion" or (fmt == "auto" and has_template is False) else "chat"
        self.chat_box.set_visibility(self.mode == "chat")
        self.completion_box.set_visibility(self.mode == "completion")
        if not self.messages and self.stream is None:
            self.render()  # the empty thread says whether a model is loaded

    def set_busy(self, busy: bool) -> None:
        for b in (self.send_btn, self.regen_btn, self.continue_btn):
            b.set_enabled(not busy)
        for b in (self.stop_btn, self.stop_completion_btn):
            b.set_enabled(busy)
        self.doc.props(add="readonly") if busy else self.doc.props(remove="readonly")
        self.ticker.active = busy

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

    # -- rendering ---------------------------------------------------------------------------------

    def render(self) -> None:
        """Rebuild the thread (only on structural changes: a message added, edited, dropped or loaded)."""
        self.thread.clear()
        remember(CHAT_KEY, self.messages or None)
        with self.thread:
            if not self.messages:
                status = self.models.status
                ui.label(f"{loaded_name(status)} is loaded: say something." if status.get("model") else
                         "Pick a model and say something (Send loads it), or Load it first.") \
                    .classes("text-sm opacity-60 p-2").mark("empty-chat")
            for i, m in enumerate(self.messages):
                if m["role"] == "user":
                    self.user_bubble(i, m["content"])
                else:
                    stats = m.get("stats") or {}
                    with ui.chat_message(name=stats.get("model_label") or "model", sent=False) \
                            .props(MODEL_BUBBLE).classes("w-full").mark("msg-assistant"), \
                            ui.column().classes("gap-1 min-w-0"):
                        AnswerBody(m["content"])
                        ui.label(stats_text(stats)).classes("text-xs opacity-70").mark("answer-stats")
        self.scroll.scroll_to(percent=1.0)

    def user_bubble(self, index: int, text: str) -> None:
        ring = " ring-2 ring-warning" if index == self.editing else ""
        with ui.chat_message(name="You", sent=True).props(USER_BUBBLE).classes("w-full" + ring) \
                .mark("msg-user"), ui.row().classes("items-start gap-1 no-wrap"):
            ui.label(text).classes("whitespace-pre-wrap").mark("user-text")
            ui.button(icon="edit", on_click=lambda: self.start_edit(index)) \
                .props("flat round dense size=sm").mark("edit").tooltip("Edit and continue from here")

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

    # -- generation --------------------------------------------------------------------------------

    def start(self, request: dict[str, Any]) -> GenerationStream | None:
        """Start a generation; None (with the error shown) when the service refuses it."""
        try:
            return self.models.generate(request)
        except ForgeError as e:
            self.stats_label.set_text(f"error: {e}")
            ui.notify(str(e), type="negative", multi_line=True)
            return None

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
        except ForgeError as e:  # the worker failed or went away mid-answer
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
        """Answer the conversation so far into a new bubble (loading the picked model first if none is)."""
        if not self.models.status.get("model") and self.ensure_loaded is not None:
            self.stats_label.set_text("loading the picked model…")
            if not await self.ensure_loaded():
                self.stats_label.set_text("no model loaded: pick one and Load it")
                return
        thread = self.messages  # replaced (not changed) when the chat is cleared or loaded meanwhile
        convo = [{"role": m["role"], "content": m["content"]} for m in thread]
        if not self.settings.history.value:
            convo = convo[-1:]
        stream = self.start(self.settings.request(messages=convo))
        if stream is None:
            return
        model_label = loaded_name(self.models.status)
        with self.thread, ui.chat_message(name=model_label, sent=False) \
                .props(MODEL_BUBBLE).classes("w-full").mark("msg-live"), ui.column().classes("gap-1 min-w-0"):
            body = AnswerBody("", live=True)
            live_stats = ui.label("generating…").classes("text-xs opacity-70").mark("live-stats")
        self.stats_label.set_text("generating…")

        def show(text: str) -> None:
            body.show(text)
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
        stream = self.start(self.settings.request(prompt=prefix, format="completion"))
        if stream is None:
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

    # -- files -------------------------------------------------------------------------------------

    def save_chat(self) -> None:
        data = chat_json(self.messages, self.settings.system.value or "", self.settings.values(), self.models.status)
        ui.download.content(data, f"chat-{time.strftime('%Y%m%d-%H%M%S')}.json", "application/json")

    async def load_chat(self, e: events.UploadEventArguments) -> None:
        try:
            chat = parse_chat(await e.file.read())
        except ForgeError as err:
            ui.notify(f"Could not read {e.file.name}: {err}", type="negative", multi_line=True)
            return
        self.stop()
        self.messages, self.editing = chat["messages"], None
        self.settings.system.set_value(chat["system"])
        self.settings.apply(chat["settings"])
        self.edit_banner.set_visibility(False)
        self.upload_dialog.close()
        self.render()
        ui.notify(f"Loaded {len(self.messages)} messages from {e.file.name}")

    def clear_chat(self) -> None:
        self.stop()
        self.messages, self.editing = [], None
        self.edit_banner.set_visibility(False)
        self.stats_label.set_text("")
        self.render()
