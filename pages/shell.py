"""The SPA shell every page sits in: header with navigation, LAN link dialog, dark mode and the status strip.

``make_root(services)`` is what ``ui.run`` serves; the pages themselves are ``ui.sub_pages`` of it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import segno
from nicegui import app, ui

from pages.common import LIVE_SECONDS, is_local_client, on_change
from pages.compare import compare_page
from pages.datasets import datasets_page
from pages.models import models_page
from pages.monitor import monitor_page
from pages.playground.page import playground_page
from pages.publish import publish_page, published_page
from pages.run_detail import run_detail_page
from pages.runs import runs_page
from pages.settings import settings_page
from pages.train.page import train_page

if TYPE_CHECKING:
    from app.composition import Services

NAV = (("Train", "/train"), ("Monitor", "/monitor"), ("Playground", "/playground"), ("Runs", "/runs"),
       ("Models", "/models"), ("Datasets", "/datasets"), ("Settings", "/settings"))


def status_texts(status: dict[str, Any]) -> tuple[str, str | None, str]:
    """(run text, run link or None, machine text) for the status strip."""
    run, sysd = status.get("active"), status.get("system") or {}
    if run:
        it, total = run.get("iteration") or 0, run.get("iters")
        pct = f" ({it / total:.0%})" if total else ""
        run_text = f"▶ {run.get('name') or run.get('id')} · {run.get('status')} · {it}/{total or '?'}{pct}"
        link = f"/monitor/{run['id']}"
    else:
        run_text, link = "no run active", None
    if status.get("waiting"):
        run_text += f" · {status['waiting']} waiting"
        link = link or "/runs"
    parts = [f"CPU {sysd.get('cpu_percent', 0):.0f}%",
             f"RAM {sysd.get('ram_used_gb', 0):.1f}/{sysd.get('ram_total_gb', 0):.1f} GB"]
    if sysd.get("swap_used_gb"):
        parts.append(f"swap {sysd['swap_used_gb']:.1f} GB")
    if sysd.get("mlx"):
        parts.append(f"MLX {sysd['mlx']['active_gb']:.1f} GB")
    parts.append(f"BLAS {sysd.get('blas', '?')}")
    if sysd.get("disk_free_gb") is not None:
        parts.append(f"disk {sysd['disk_free_gb']:.0f} GB free")
    return run_text, link, " · ".join(parts)




THEMES = (None, True, False)  # follow the system, dark, light
THEME_ICONS = {None: ("brightness_auto", "theme: as the system (click: dark)"),
               True: ("dark_mode", "theme: dark (click: light)"), False: ("light_mode", "theme: light (click: as the "
                                                                              "system)")}


class ThemeToggle:
    """Dark mode: as the operating system says until the person picks dark or light (remembered per browser)."""

    def __init__(self) -> None:
        try:
            saved = app.storage.user.get("dark_mode")
        except RuntimeError:  # no storage secret (never the case under run_app or the test simulation)
            saved = None
        self.dark = ui.dark_mode(saved if saved in THEMES else None)
        self.button = ui.button(on_click=self.next).props("flat round color=white").mark("dark-toggle")
        self.show()

    def next(self) -> None:
        value = THEMES[(THEMES.index(self.dark.value) + 1) % len(THEMES)]
        self.dark.set_value(value)
        try:
            app.storage.user["dark_mode"] = value
        except RuntimeError:
            pass
        self.show()

    def show(self) -> None:
        icon, tip = THEME_ICONS[self.dark.value]
        self.button.props(f"icon={icon}")
        self.button.tooltip(tip)


class Header:
    """The header: the pages as buttons on a wide screen, behind a menu button on a phone; LAN links; theme."""

    def __init__(self, services: Services):
        with ui.header().classes("items-center gap-1 py-1 px-3 no-wrap"):
            with ui.button(icon="menu").props("flat round color=white").classes("sm:hidden").mark("nav-menu"):
                with ui.menu():
                    for label, path in NAV:
                        ui.menu_item(label, on_click=lambda p=path: ui.navigate.to(p)).mark(f"menu-{label.lower()}")
            ui.label("ForgeLLM").classes("text-lg font-bold mr-4")
            for label, path in NAV:
                ui.button(label, on_click=lambda p=path: ui.navigate.to(p)).props("flat color=white no-caps") \
                    .classes("max-sm:hidden").mark(f"nav-{label.lower()}")
            ui.space()
            if services.lan and is_local_client():
                self.lan_button(services.lan.urls())
            ThemeToggle()

    @staticmethod
    def lan_button(urls: list[str]) -> None:
        with ui.dialog() as lan_dialog, ui.card():
            ui.label("Open ForgeLLM on another device").classes("text-lg font-semibold")
            ui.label("These links carry the access token; anyone with one can use this app.") \
                .classes("text-sm text-grey-7")
            for url in urls:
                ui.image(segno.make(url, error="m").svg_data_uri(scale=4)).classes("w-48 self-center")
                ui.link(url, url).classes("font-mono text-sm break-all")
            ui.button("Close", on_click=lan_dialog.close).props("flat")
        ui.button(icon="wifi", on_click=lan_dialog.open).props("flat round color=white") \
            .tooltip("LAN access").mark("lan-access")


class StatusStrip:
    """The active run and the machine, under the header of every page (the run's own watcher: as the Monitor)."""

    def __init__(self, services: Services):
        self.services = services
        with ui.row().classes("w-full items-center gap-x-4 gap-y-0 px-3 py-1 text-xs border-b border-grey-5") \
                .mark("status-strip"):
            self.run_link = ui.link("no run active", "/monitor").classes("font-medium").mark("status-run")
            self.machine = ui.label("").classes("opacity-80").mark("status-machine")
        self.update()
        ui.timer(LIVE_SECONDS, self.update)

    def update(self) -> None:
        run_text, link, machine_text = status_texts(self.services.status.snapshot())
        self.run_link.set_text(run_text)
        if self.run_link.props.get("href") != (link or "/monitor"):
            self.run_link.props["href"] = link or "/monitor"
        self.machine.set_text(machine_text)


class Toasts:
    """A toast on this page for every run event (a run ended, a new best checkpoint) seen after it opened."""

    KINDS = {"completed": "positive", "best": "info", "early-stopped": "positive", "stopped": "warning",
             "failed": "negative", "interrupted": "warning", "queue-empty": "info"}

    def __init__(self, services: Services):
        self.events = services.events
        self.seen = self.events.version
        on_change(lambda: self.events.version, self.show, LIVE_SECONDS)

    def show(self) -> None:
        self.seen, new = self.events.since(self.seen)
        for event in new:
            ui.notify(event["text"], type=self.KINDS.get(event["event"], "info"), position="top-right",
                      multi_line=True, close_button=event["event"] in ("failed", "interrupted"))


PAGES = {"/": train_page, "/train": train_page, "/monitor": monitor_page, "/monitor/{run_id}": monitor_page,
         "/playground": playground_page, "/playground/{run}": playground_page,
         "/playground/{run}/{iteration}": playground_page, "/runs": runs_page, "/runs/{run_id}": run_detail_page,
         "/compare": compare_page, "/runs/{run_id}/publish": publish_page, "/published/{name}": published_page,
         "/models": models_page, "/datasets": datasets_page, "/settings": settings_page}


def make_root(services: Services):
    """The SPA shell: header, status strip and the sub pages (each page takes the whole width)."""

    def root() -> None:
        Header(services)
        StatusStrip(services)
        Toasts(services)
        with ui.column().classes("w-full p-3 max-sm:p-1"):
            ui.sub_pages(PAGES, data={"services": services}).classes("w-full")

    return root
