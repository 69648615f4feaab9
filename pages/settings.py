"""Settings page: where run events go (webhooks: generic JSON, ntfy, Slack, Discord), with a test message.

The settings live in the workspace (``.forgellm/settings.json``, :mod:`services.settings`); a training worker
reads them as it sends its events, so what is saved here applies to the runs that are training now too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from nicegui import run, ui

from pages.common import page_column
from services.notify import deliver, run_event
from services.settings import (
    WEBHOOK_FORMATS,
    SettingsError,
    Webhook,
    check_webhook,
    load_settings,
    set_confirm_minutes,
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
        NotificationsCard(services)
        LongRunCard(services)
        ui.label(f"Formats: {', '.join(FORMAT_LABELS[f] for f in WEBHOOK_FORMATS)}. Stored in "
                 f"{services.workspace.root / '.forgellm' / 'settings.json'}.").classes("text-xs text-grey-7")
