"""The SPA shell every page sits in: header with navigation, LAN link dialog, dark mode and the status strip.

``make_root(services)`` is what ``ui.run`` serves; the pages themselves are ``ui.sub_pages`` of it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import segno
from nicegui import app, ui

from pages.common import LIVE_SECONDS, is_local_client
from pages.compare import compare_page
from pages.datasets import datasets_page
from pages.models import models_page
from pages.monitor import monitor_page
from pages.playground.page import playground_page
from pages.publish import publish_page, published_page
from pages.run_detail import run_detail_page
from pages.runs import runs_page
from pages.train.page import train_page

if TYPE_CHECKING:
    from app.composition import Services

NAV = (("Train", "/train"), ("Monitor", "/monitor"), ("Playground", "/playground"), ("Runs", "/runs"),
       ("Models", "/models"), ("Datasets", "/datasets"))


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




def make_root(services: Services):
    """The SPA shell: header with navigation, status strip and dark-mode toggle, and the sub pages."""

    def root() -> None:
        dark = ui.dark_mode()
        try:
            dark.bind_value(app.storage.user, "dark_mode")
        except RuntimeError:  # no storage secret (never the case under run_app or the test simulation)
            pass
        with ui.header().classes("items-center gap-1 py-1 px-3"):
            ui.label("ForgeLLM").classes("text-lg font-bold mr-4")
            for label, path in NAV:
                ui.button(label, on_click=lambda p=path: ui.navigate.to(p)).props("flat color=white no-caps") \
                    .mark(f"nav-{label.lower()}")
            ui.space()
            if services.lan_urls and is_local_client():
                with ui.dialog() as lan_dialog, ui.card():
                    ui.label("Open ForgeLLM on another device").classes("text-lg font-semibold")
                    ui.label("These links carry the access token; anyone with one can use this app.") \
                        .classes("text-sm text-grey-7")
                    for url in services.lan_urls:
                        ui.image(segno.make(url, error="m").svg_data_uri(scale=4)).classes("w-48 self-center")
                        ui.link(url, url).classes("font-mono text-sm")
                    ui.button("Close", on_click=lan_dialog.close).props("flat")
                ui.button(icon="wifi", on_click=lan_dialog.open).props("flat round color=white") \
                    .tooltip("LAN access").mark("lan-access")
            ui.button(icon="dark_mode", on_click=lambda: dark.set_value(not dark.value)) \
                .props("flat round color=white").tooltip("dark mode").mark("dark-toggle")
        with ui.row().classes("w-full items-center gap-4 px-3 py-1 text-xs border-b border-grey-5") \
                .mark("status-strip"):
            run_link = ui.link("no run active", "/monitor").classes("font-medium").mark("status-run")
            machine = ui.label("").classes("opacity-80").mark("status-machine")

        def update_strip() -> None:
            run_text, link, machine_text = status_texts(services.status.snapshot())
            run_link.set_text(run_text)
            if run_link.props.get("href") != (link or "/monitor"):
                run_link.props["href"] = link or "/monitor"
            machine.set_text(machine_text)

        update_strip()
        ui.timer(LIVE_SECONDS, update_strip)
        with ui.column().classes("w-full p-3"):
            ui.sub_pages({"/": train_page, "/train": train_page, "/monitor": monitor_page,
                          "/monitor/{run_id}": monitor_page, "/playground": playground_page,
                          "/playground/{run}": playground_page, "/playground/{run}/{iteration}": playground_page,
                          "/runs": runs_page, "/runs/{run_id}": run_detail_page, "/compare": compare_page,
                          "/runs/{run_id}/publish": publish_page, "/published/{name}": published_page,
                          "/models": models_page, "/datasets": datasets_page},
                         data={"services": services}).classes("w-full")  # pages take the whole width

    return root
