"""Settings page: the workspace, LAN access (links, QR codes, token rotation), where run events go (webhooks:
generic JSON, ntfy, Slack, Discord), with a test message, and the OpenAI-compatible endpoint for other tools
(start/stop, port, LAN, the base URL to paste).

The settings live in the workspace (``.forgellm/settings.json``, :mod:`services.settings`); a training worker
reads them as it sends its events, so what is saved here applies to the runs that are training now too; an
endpoint left on starts again with the app.
"""

from __future__ import annotations

import shutil
from typing import TYPE_CHECKING

import segno
from nicegui import run, ui

from pages.common import is_local_client, on_change, page_column
from services.errors import ForgeError
from services.notify import deliver, run_event
from services.settings import (
    WEBHOOK_FORMATS,
    Serving,
    SettingsError,
    Webhook,
    check_port,
    check_webhook,
    load_settings,
    set_confirm_minutes,
    set_serving,
    set_webhooks,
)

if TYPE_CHECKING:
    from app.composition import Services

FORMAT_LABELS = {"json": "JSON (any receiver)", "ntfy": "ntfy", "slack": "Slack", "discord": "Discord"}
TEST_EVENT = {"id": "test", "name": "ForgeLLM test message", "status": "completed", "iteration": 0}


class WebhookRow:
    """One webhook: its URL, its format, a test button and a remove button."""

    def __init__(self, hook: Webhook, on_remove) -> None:
        with ui.row().classes("w-full items-center gap-2") as self.row:
            self.url = ui.input("URL", value=hook.url, placeholder="https://ntfy.sh/my-runs") \
                .props("dense outlined").classes("grow min-w-[16rem]").mark("webhook-url")
            self.format = ui.select(FORMAT_LABELS, value=hook.format, label="Format").props("dense outlined") \
                .classes("w-48").mark("webhook-format")
            ui.button(icon="send", on_click=self.test).props("flat round").tooltip("Send a test message") \
                .mark("webhook-test")
            ui.button(icon="delete", on_click=lambda: on_remove(self)).props("flat round color=negative") \
                .tooltip("Remove").mark("webhook-remove")

    def hook(self, where: str) -> Webhook:
        return check_webhook(self.url.value or "", self.format.value or "json", where)

    async def test(self) -> None:
        try:
            hook = self.hook("webhook")
        except SettingsError as e:
            ui.notify(str(e), type="negative")
            return
        problem = await run.io_bound(deliver, hook, run_event("completed", TEST_EVENT), 5.0, 1)
        ui.notify(f"Not delivered: {problem}" if problem else f"Delivered to {hook.url}",
                  type="negative" if problem else "positive")


class NotificationsCard:
    """The webhooks that run events are POSTed to: a run that ends, a new best checkpoint, an empty queue."""

    def __init__(self, services: Services):
        self.ws = services.workspace
        self.rows: list[WebhookRow] = []
        with ui.card().classes("w-full max-w-4xl"):
            ui.label("Notifications").classes("text-lg font-semibold")
            ui.label("A run that completes, fails, stops early or is interrupted, a new best checkpoint and an "
                     "empty training queue are sent to these addresses by the training worker itself, so you "
                     "hear of an overnight run even with the app closed. Open pages show them as toasts.") \
                .classes("text-sm text-grey-7")
            self.list = ui.column().classes("w-full gap-1")
            with ui.row().classes("gap-2"):
                ui.button("Add webhook", icon="add", on_click=lambda: self.add(Webhook(""))).props("outline") \
                    .mark("webhook-add")
                ui.button("Save", icon="save", on_click=self.save).mark("webhooks-save")
        try:
            for hook in load_settings(self.ws).webhooks:
                self.add(hook)
        except SettingsError as e:
            ui.label(str(e)).classes("text-negative").mark("settings-error")

    def add(self, hook: Webhook) -> None:
        with self.list:
            self.rows.append(WebhookRow(hook, self.remove))

    def remove(self, row: WebhookRow) -> None:
        self.rows.remove(row)
        self.list.remove(row.row)

    def save(self) -> None:
        try:
            hooks = [row.hook(f"webhook {i + 1}") for i, row in enumerate(self.rows)]
            set_webhooks(self.ws, hooks)
        except SettingsError as e:
            ui.notify(str(e), type="negative", multi_line=True)
            return
        ui.notify(f"Saved {len(hooks)} webhook(s)", type="positive")


class ServingCard:
    """The OpenAI-compatible endpoint: start/stop, its port, LAN access, and the base URL with a copy button."""

    def __init__(self, services: Services):
        self.ws, self.server = services.workspace, services.serving
        try:
            saved = load_settings(self.ws).serving
        except SettingsError:  # the Notifications card shows the problem
            saved = Serving()
        running = self.server.running
        with ui.card().classes("w-full max-w-4xl"):
            ui.label("Serve to other tools").classes("text-lg font-semibold")
            ui.label("An OpenAI-compatible API (/v1/models, /v1/chat/completions, /v1/completions, streaming) on its "
                     "own port, for Open WebUI, Continue or any OpenAI client. It serves every base model, every "
                     "run checkpoint as RUN@ITER (RUN alone is its best checkpoint) and every published model; "
                     "checkpoints of one base share one copy of it in memory.").classes("text-sm text-grey-7")
            with ui.row().classes("items-center gap-4"):
                self.port = ui.number("Port", value=self.server.port if running else saved.port, min=1024,
                                      max=65535, step=1, format="%d").props("dense outlined").classes("w-32") \
                    .mark("serve-port")
                self.lan = ui.checkbox("Also on the LAN (other devices send the access token as the API key)",
                                       value=self.server.lan if running else saved.lan).mark("serve-lan")
                self.toggle = ui.button(on_click=self.switch).mark("serve-toggle")
            self.details = ui.column().classes("w-full gap-1")
        on_change(lambda: self.server.version, self.redraw, 1.0)

    def redraw(self) -> None:
        running = self.server.running
        self.toggle.text = "Stop serving" if running else "Start serving"
        self.toggle.props(f"icon={'stop' if running else 'play_arrow'} color={'negative' if running else 'primary'}")
        self.port.enabled = self.lan.enabled = not running
        self.details.clear()
        with self.details:
            if not running:
                ui.label("Not serving.").classes("text-sm text-grey-7").mark("serve-state")
                return
            ui.label("Serving. Paste this base URL into Open WebUI (Admin settings → Connections → OpenAI API) or "
                     "Continue (provider openai, apiBase):").classes("text-sm").mark("serve-state")
            for url in self.server.urls():
                self.copy_row(url, "serve-url")
            if self.server.api_key:
                ui.label("API key for other devices (this machine needs none):").classes("text-sm")
                self.copy_row(self.server.api_key, "serve-key")
            ui.label(f"Try it: curl {self.server.base_url}/models").classes("text-xs font-mono text-grey-7") \
                .mark("serve-curl")

    @staticmethod
    def copy_row(text: str, marker: str) -> None:
        with ui.row().classes("items-center gap-1"):
            ui.label(text).classes("font-mono text-sm").mark(marker)
            ui.button(icon="content_copy", on_click=lambda: (ui.clipboard.write(text), ui.notify("Copied"))) \
                .props("flat round dense").tooltip("Copy").mark(f"{marker}-copy")

    async def switch(self) -> None:
        try:
            port = check_port(int(self.port.value) if self.port.value is not None else None, "port")
            if self.server.running:
                await run.io_bound(self.server.stop)
                set_serving(self.ws, False, port, bool(self.lan.value))
                ui.notify("Stopped serving")
            else:
                url = await run.io_bound(self.server.start, port, bool(self.lan.value))
                set_serving(self.ws, True, port, bool(self.lan.value))
                ui.notify(f"Serving at {url}", type="positive")
        except ForgeError as e:
            ui.notify(str(e), type="negative", multi_line=True)
        self.redraw()


class WorkspaceCard:
    """Where everything lives: the workspace folder, what it holds and the free disk under it."""

    def __init__(self, services: Services):
        ws = services.workspace
        counts = {name: sum(1 for p in folder.iterdir() if p.is_dir()) if folder.exists() else 0
                  for name, folder in (("runs", ws.runs), ("models", ws.models), ("datasets", ws.datasets))}
        free = shutil.disk_usage(ws.root).free
        with ui.card().classes("w-full max-w-4xl"):
            ui.label("Workspace").classes("text-lg font-semibold")
            ui.label(str(ws.root)).classes("font-mono text-sm break-all").mark("workspace-path")
            ui.label(", ".join(f"{n} {k}" for k, n in counts.items()) + f" · {free / 1e9:.1f} GB free on its disk") \
                .classes("text-sm").mark("workspace-contents")
            ui.label("Another workspace: start with `forgellm --workspace DIR start` (every run, model and dataset "
                     "lives in its folder).").classes("text-xs text-grey-7")


class LanCard:
    """LAN access: whether other devices can reach this app, the links (with QR codes) that carry the access
    token, and rotating the token (signs every other device out). Links and rotation only for this machine."""

    def __init__(self, services: Services):
        self.lan, self.server = services.lan, services.serving
        with ui.card().classes("w-full max-w-4xl"):
            ui.label("LAN access").classes("text-lg font-semibold")
            self.body = ui.column().classes("w-full gap-1")
        self.redraw()

    def redraw(self) -> None:
        self.body.clear()
        with self.body:
            if self.lan is None:
                ui.label("Off: this app answers only on this machine. To use it from a phone or another computer "
                         "on your network, start it with `forgellm start --lan` (other devices then need the access "
                         "token once).").classes("text-sm").mark("lan-state")
                return
            if not is_local_client():
                ui.label("On. The links and the token are shown on the machine that runs ForgeLLM.") \
                    .classes("text-sm").mark("lan-state")
                return
            ui.label("On. Other devices open one of these links once (it carries the access token):") \
                .classes("text-sm").mark("lan-state")
            for url in self.lan.urls():
                with ui.row().classes("items-center gap-3"):
                    ui.image(segno.make(url, error="m").svg_data_uri(scale=3)).classes("w-28")
                    ui.label(url).classes("font-mono text-sm break-all").mark("lan-url")
            ui.button("Rotate the token", icon="autorenew", on_click=self.confirm).props("outline") \
                .mark("lan-rotate")

    def confirm(self) -> None:
        with ui.dialog() as dialog, ui.card():
            ui.label("Rotate the access token?").classes("text-lg font-semibold")
            ui.label("Every other device (and API client on the LAN) is signed out and needs the new link or key.") \
                .classes("text-sm")
            async def rotate() -> None:
                dialog.close()
                await self.rotate()

            with ui.row():
                ui.button("Rotate", on_click=rotate).props("color=negative").mark("lan-rotate-confirm")
                ui.button("Cancel", on_click=dialog.close).props("flat")
        dialog.open()

    async def rotate(self) -> None:
        self.lan.rotate()  # the endpoint's gate reads the token on every request: its key changes with it
        ui.notify("New access token: other devices must open the new link", type="positive")
        self.redraw()


class LongRunCard:
    """The time threshold of the Train page: a run estimated longer than this asks before it starts."""

    def __init__(self, services: Services):
        self.ws = services.workspace
        try:
            minutes = load_settings(self.ws).confirm_minutes
        except SettingsError:
            minutes = None  # the notifications card shows the file's problem
        with ui.card().classes("w-full max-w-4xl"):
            ui.label("Long runs").classes("text-lg font-semibold")
            ui.label("Start training asks first when the estimate (validation included) is longer than this. "
                     "Blank: never ask.").classes("text-sm text-grey-7")
            with ui.row().classes("items-center gap-2"):
                self.minutes = ui.number("Ask above (minutes)", value=minutes, min=1, step=5) \
                    .props("dense outlined").classes("w-48").mark("confirm-minutes")
                ui.button("Save", icon="save", on_click=self.save).mark("confirm-save")

    def save(self) -> None:
        try:
            set_confirm_minutes(self.ws, self.minutes.value)
        except SettingsError as e:
            ui.notify(str(e), type="negative")
            return
        ui.notify("Runs are started without asking" if self.minutes.value is None
                  else f"Runs estimated above {self.minutes.value:g} min ask first", type="positive")


def settings_page(services: Services) -> None:
    """Build the Settings page for one client."""
    with page_column():
        ui.label("Settings").classes("text-2xl font-semibold")
        WorkspaceCard(services)
        LanCard(services)
        NotificationsCard(services)
        ui.label(f"Webhook formats: {', '.join(FORMAT_LABELS[f] for f in WEBHOOK_FORMATS)}.") \
            .classes("text-xs text-grey-7")
        LongRunCard(services)
        ServingCard(services)
        ui.label(f"Settings are stored in {services.workspace.root / '.forgellm' / 'settings.json'}.") \
            .classes("text-xs text-grey-7")
