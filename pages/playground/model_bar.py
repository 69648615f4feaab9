"""The Playground's model bar: pick a model and an adapter, load or unload them, and watch the worker's state."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nicegui import ui

from services.errors import ForgeError
from services.inference.requests import adapter_label
from services.library.models import find_model, list_models
from services.training.index import adapters_for, resolve_model, run_link
from services.units import human_bytes

if TYPE_CHECKING:
    from app.composition import Services

NO_ADAPTER = "none"
NO_ADAPTER_OPTION = {NO_ADAPTER: "none (base model)"}
STATE_COLORS = {"idle": "grey", "loading": "orange", "ready": "positive", "generating": "primary",
                "error": "negative"}


def fmt_gb(value: float | None) -> str:
    return "–" if value is None else human_bytes(value * 1e9)


def loaded_name(status: dict[str, Any]) -> str:
    """``MODEL`` or ``MODEL + ADAPTER`` of a model status, for labels and answer bubbles."""
    if not status.get("model"):
        return "no model loaded"
    return Path(status["model"]).name + (f" + {status['adapter_label']}" if status.get("adapter") else "")


class ModelBar:
    """Model and adapter pickers, Load/Unload, and the worker's state, memory and messages.

    Listeners: ``on_status`` get the status whenever it changed, ``on_adapters`` the picked model whenever the
    adapter list was refreshed, ``on_unload`` are called before the worker stops.
    """

    def __init__(self, services: Services) -> None:
        self.services, self.models, self.manager = services, services.models, services.manager
        self.seen_version = -1
        self.on_status: list[Callable[[dict[str, Any]], None]] = []
        self.on_adapters: list[Callable[[str | None], None]] = []
        self.on_unload: list[Callable[[], None]] = []
        status = self.models.status
        models = {str(Path(m["path"]).resolve()): m["label"] for m in list_models(services.workspace)}
        current = status.get("model")
        if current and current not in models:
            models[current] = Path(current).name
        with ui.card().classes("w-full gap-2"):
            with ui.row().classes("w-full items-end gap-3"):
                self.model_select = ui.select(models, label="Model", with_input=True, new_value_mode="add-unique",
                                              value=current or next(iter(models), None),
                                              on_change=lambda: self.refresh_adapters()) \
                    .props("dense outlined").classes("w-96").mark("model")
                self.model_select.tooltip("A model folder from the workspace's models/ or published/, or a path")
                self.adapter_select = ui.select(NO_ADAPTER_OPTION, label="Adapter", with_input=True, value=NO_ADAPTER,
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

    # -- the picks ---------------------------------------------------------------------------------

    def model_path(self) -> str | None:
        """The picked model as a resolved path (a typed name is looked up under ``models/``)."""
        value = self.model_select.value
        if not value:
            return None
        try:
            return str(resolve_model(self.manager, str(value)))
        except ForgeError:
            return str(value)  # loading reports what is wrong with it

    def adapter_path(self) -> str | None:
        value = self.adapter_select.value
        return None if not value or value == NO_ADAPTER else str(value)

    def refresh_adapters(self, keep: str | None = None) -> None:
        """The runs and checkpoints of the picked model (``keep``: the one to pick if it is there)."""
        model = self.model_path()
        options = {**NO_ADAPTER_OPTION, **adapters_for(self.manager, model)}
        value = keep if keep in options else (self.adapter_select.value if self.adapter_select.value in options
                                             else NO_ADAPTER)
        self.adapter_select.set_options(options, value=value)
        for listener in self.on_adapters:
            listener(model)
        self.update_hint()

    def update_hint(self) -> None:
        model = self.model_path()
        need = None
        if model:
            try:
                need = self.models.ram_need(model, self.adapter_path())
            except OSError:
                pass  # not a readable model folder: loading says why
        text = "" if need is None else \
            f"{Path(model).name}: needs about {human_bytes(need.size)} of RAM; {human_bytes(need.free)} free" \
            + (" — loading may swap or fail" if need.short else "")
        self.hint_label.set_text(text)
        self.hint_label.classes(replace="text-xs " + ("text-warning" if need and need.short else "opacity-70"))

    def pick_model(self, path: str) -> None:
        if path not in self.model_select.options:
            self.model_select.set_options({**self.model_select.options, path: Path(path).name})
        self.model_select.set_value(path)

    def show_error(self, message: str) -> None:
        self.message_label.set_text(message)
        self.message_label.classes(replace="text-negative")

    # -- load and unload ---------------------------------------------------------------------------

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
        except ForgeError as e:
            ui.notify(f"Could not load: {e}", type="negative", multi_line=True)
            return False
        finally:
            self.load_btn.enable()
            self.poll()
        ui.notify(f"Loaded {Path(model).name}" + (f" + {adapter_label(adapter)}" if adapter else ""), type="positive")
        return True

    async def unload(self) -> None:
        for listener in self.on_unload:
            listener()
        await asyncio.to_thread(self.models.unload)
        self.poll()

    def poll(self) -> None:
        """Redraw the model status when the service's version moved."""
        if self.models.version == self.seen_version:
            return
        self.seen_version = self.models.version
        st = self.models.status
        state = st["state"]
        self.state_badge.set_text(state)
        self.state_badge.props["color"] = STATE_COLORS.get(state, "grey")
        self.loaded_label.set_text(loaded_name(st) + ("" if st.get("adapter") or not st.get("model")
                                                      else " (no adapter)"))
        mem = st.get("memory") or {}
        self.memory_label.set_text(f"worker {fmt_gb(mem.get('rss_gb'))} · weights {fmt_gb(mem.get('model_gb'))}"
                                   if st.get("pid") else "")
        self.message_label.set_text(st.get("message") or "")
        self.message_label.classes(replace="text-negative" if state == "error" else "opacity-70")
        self.warning_label.set_text(f"⚠ {st['warning']}" if st.get("warning") else "")
        self.warning_label.set_visibility(bool(st.get("warning")))
        for listener in self.on_status:
            listener(st)

    def differs(self, model: str | None, adapter: str | None) -> bool:
        """Whether the worker holds something else than ``model`` + ``adapter`` (a link then loads them)."""
        st = self.models.status
        return (st.get("model"), st.get("adapter")) != (model, adapter)

    # -- links -------------------------------------------------------------------------------------

    def preselect(self, run: str, iteration: str | None) -> bool:
        """Pick a run's base model and its adapter (latest or checkpoint ``iteration``); False if invalid."""
        try:
            model, adapter = run_link(self.manager, run, iteration)
        except ForgeError as e:
            self.show_error(str(e))
            ui.notify(str(e), type="negative")
            return False
        if model is not None:
            self.pick_model(str(model))
        self.refresh_adapters(keep=str(adapter))
        return self.adapter_select.value == str(adapter)

    def preselect_model(self, value: str) -> bool:
        """Pick a model folder (``published/NAME``, a name under ``models/`` or a path) without adapter."""
        try:
            found = find_model(self.manager.workspace, value)
        except ForgeError as e:
            self.show_error(str(e))
            return False
        self.pick_model(str(found))
        self.refresh_adapters(keep=NO_ADAPTER)
        return True
