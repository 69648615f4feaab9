"""What the Playground's tabs share: the generation settings of the Chat tab and the :class:`Selection`.

:class:`Settings` is the settings card (format, history, system prompt, sampling numbers); :class:`Selection`
joins it with the model bar's model and adapter, for the Compare and Perplexity tabs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from nicegui import ui

from services.inference.requests import FORMATS, SAMPLING_DEFAULTS

if TYPE_CHECKING:
    from pages.playground.model_bar import ModelBar

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
PLACEHOLDERS = {"seed": "random", "max_kv_size": "all"}


class Settings:
    """Format, history, system prompt and sampling fields; builds a generation request from them."""

    def __init__(self, on_format: Callable[[], None]) -> None:
        ui.label("Settings").classes("text-sm font-semibold opacity-70")
        self.format = ui.toggle({f: f for f in FORMATS}, value="auto", on_change=on_format) \
            .props("dense no-caps").mark("format")
        self.format.tooltip("auto: the chat template when the model has one, else plain completion")
        self.history = ui.switch("Send the chat history", value=True).mark("history")
        self.history.tooltip("Off: each message is answered on its own")
        self.system = ui.textarea("System prompt").props("outlined dense autogrow").classes("w-full").mark("system")
        self.sampling: dict[str, ui.number] = {}
        with ui.grid(columns=2).classes("w-full gap-2"):
            for key, label, kind, step, tip in SAMPLING_FIELDS:
                el = ui.number(label, value=SAMPLING_DEFAULTS[key], step=step, placeholder=PLACEHOLDERS.get(key),
                               format="%.0f" if kind is int else None).props("dense outlined")
                el.tooltip(tip)
                self.sampling[key] = el.mark(f"sampling-{key}")

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

    def values(self) -> dict[str, Any]:
        """The settings as saved with a chat."""
        return {"format": self.format.value, "history": self.history.value,
                **{k: el.value for k, el in self.sampling.items()}}

    def apply(self, settings: dict[str, Any]) -> None:
        """Take over the settings of a loaded chat (values of the wrong type are left out)."""
        if settings.get("format") in FORMATS:
            self.format.set_value(settings["format"])
        if isinstance(settings.get("history"), bool):
            self.history.set_value(settings["history"])
        for key, el in self.sampling.items():
            value = settings.get(key)
            if (isinstance(value, (int, float)) and not isinstance(value, bool)) or (value is None and key in settings):
                el.set_value(value)

    def prompt(self, prompt: str) -> str | list[dict[str, str]]:
        """``prompt`` as a preference pair stores it: with the system prompt as messages when there is one."""
        system = self.system.value
        return [{"role": "system", "content": system}, {"role": "user", "content": prompt}] if system else prompt


class Selection:
    """The model and adapter picked in the model bar and the Chat tab's settings, as the other tabs use them."""

    def __init__(self, bar: ModelBar, settings: Settings) -> None:
        self.bar, self.settings = bar, settings

    def model_path(self) -> str | None:
        return self.bar.model_path()

    def adapter_path(self) -> str | None:
        return self.bar.adapter_path()

    def request(self, **content: Any) -> dict[str, Any]:
        return self.settings.request(**content)
