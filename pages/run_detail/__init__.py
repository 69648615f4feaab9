"""Run detail page: status, lineage, loss and perplexity charts, checkpoints (chat / publish), config and data stats;
the Evaluate tab (:mod:`pages.run_detail.evaluate`).

Charts reuse the Monitor's chart options and checkpoint marks and read the shared
:class:`services.training.watch.RunWatcher`, so an active run keeps updating (redrawn when the watcher changes).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from nicegui import events, run, ui

from pages.common import (
    CHARTS,
    METHODS,
    MODES,
    STATUS_COLORS,
    checkpoint_marks,
    fmt_loss,
    line_chart,
    on_change,
    page_column,
)
from pages.run_detail.evaluate import EvaluateTab
from services.training import index as run_index
from services.training.dashboard import DashboardError, export_dashboard
from services.training.folder import ACTIVE
from services.units import clock, human_bytes

if TYPE_CHECKING:
    from app.composition import Services
    from services.training.folder import RunFolder
    from services.training.watch import RunWatcher

DETAIL_CHARTS = ("loss", "perplexity")
CKPT_COLUMNS: list[dict[str, Any]] = [
    {"name": "iteration", "label": "Iteration", "field": "iteration", "sortable": True, "align": "left"},
    {"name": "epoch", "label": "Epoch", "field": "epoch_text"},
    {"name": "train_loss", "label": "Train loss", "field": "train_text"},
    {"name": "val_loss", "label": "Val loss", "field": "val_text"},
    {"name": "perplexity", "label": "Val perplexity", "field": "ppl_text"},
    {"name": "tokens", "label": "Trained tokens", "field": "tokens_text"},
    {"name": "size", "label": "Size", "field": "size_text"},
    {"name": "best", "label": "Best", "field": "best_text", "align": "left"},
    {"name": "actions", "label": "", "field": "iteration", "align": "right"},
]
_CKPT_EMIT = "$parent.$emit('checkpoint_action', {{action: '{action}', iteration: props.row.iteration}})"
CKPT_SLOTS = {
    "body-cell-best": '<q-td :props="props"><q-badge v-if="props.row.best" color="amber-8" label="★ best" /></q-td>',
    "body-cell-actions": '<q-td :props="props" class="whitespace-nowrap">'
                         f'<q-btn flat dense no-caps size="sm" icon="chat" label="Chat" '
                         f'@click="{_CKPT_EMIT.format(action="chat")}">'
                         '<q-tooltip>Chat with this checkpoint in the Playground</q-tooltip></q-btn>'
                         f'<q-btn flat dense no-caps size="sm" icon="publish" label="Publish" '
                         f'@click="{_CKPT_EMIT.format(action="publish")}">'
                         '<q-tooltip>Publish this checkpoint</q-tooltip></q-btn></q-td>',
}


def checkpoint_table_rows(folder: RunFolder, info: dict[str, Any]) -> list[dict[str, Any]]:
    """:func:`services.training.index.checkpoint_rows` with the texts the table shows."""
    out = []
    for c in run_index.checkpoint_rows(folder, info):
        out.append({**c, "epoch_text": f"{c['epoch']:.2f}" if c["epoch"] is not None else "–",
                    "train_text": fmt_loss(c["train_loss"]), "val_text": fmt_loss(c["val_loss"]),
                    "ppl_text": f"{c['perplexity']:.2f}" if c["perplexity"] is not None else "–",
                    "tokens_text": f"{c['trained_tokens']:,}" if c["trained_tokens"] is not None else "–",
                    "size_text": human_bytes(c["bytes"]), "best_text": "★ best" if c["best"] else ""})
    return out


def stats_tables(stats: dict[str, Any]) -> tuple[list[tuple[str, str]], list[dict[str, Any]]]:
    """``dataset_stats.json`` as (scalar facts, one row per split) for display."""
    facts: list[tuple[str, str]] = []
    splits: list[dict[str, Any]] = []
    for key, value in stats.items():
        if isinstance(value, dict):
            splits.append({"split": key, **{k: (f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else v)
                                            for k, v in value.items() if not isinstance(v, (dict, list))}})
        elif isinstance(value, list):
            facts.append((key, f"{len(value)} item(s)"))
        else:
            facts.append((key, str(value)))
    return facts, splits


def _info_line(info: dict[str, Any]) -> str:
    row = run_index.run_row(info)
    parts = [row["id"], MODES.get(row["mode"], row["mode"]), METHODS.get(row["method"], row["method"]),
             f"model {row['model']}", f"data {row['dataset']}", row["date_text"]]
    if row["duration"] is not None:
        parts.append(f"trained {clock(row['duration'])}")
    return " · ".join(parts)


def run_detail_page(services: Services, run_id: str) -> None:
    """Build the detail page of one run."""
    with page_column():
        RunDetail(services, run_id)


class DetailHeader:
    """Back link, title, status, label and the run's actions (Monitor, clone into Train, export)."""

    def __init__(self, services: Services, run_id: str):
        self.services, self.run_id = services, run_id
        with ui.row().classes("w-full items-center gap-3"):
            ui.button(icon="arrow_back", on_click=lambda: ui.navigate.to("/runs")).props("flat round") \
                .tooltip("All runs").mark("back-to-runs")
            self.title = ui.label(run_id).classes("text-2xl font-semibold").mark("detail-title")
            self.status = ui.badge("", color="grey").classes("text-sm").mark("detail-status")
            self.label = ui.chip("", color="primary").props("outline dense").mark("detail-label")
            ui.space()
            self.actions = [
                ui.button("Open in Monitor", icon="monitor_heart",
                          on_click=lambda: ui.navigate.to(f"/monitor/{run_id}")).props("outline").mark("open-monitor"),
                ui.button("Clone config into Train", icon="content_copy",
                          on_click=lambda: ui.navigate.to(f"/train?from={run_id}")).props("outline")
                .mark("detail-clone"),
                ui.button("Export dashboard", icon="ios_share", on_click=self.export).props("outline")
                .tooltip("A self-contained HTML file (renders offline) and a PNG of the charts")
                .mark("export-dashboard")]

    def hide(self) -> None:
        for element in (*self.actions, self.status, self.label):
            element.set_visibility(False)

    def show(self, info: dict[str, Any]) -> None:
        st = info.get("status") or "?"
        self.title.set_text(info.get("name") or self.run_id)
        self.status.set_text(st)
        self.status.props["color"] = STATUS_COLORS.get(st, "grey")
        self.label.set_text(info.get("label") or "")
        self.label.set_visibility(bool(info.get("label")))

    async def export(self) -> None:
        folder = self.services.manager.folder(self.run_id)
        try:
            result = await run.io_bound(export_dashboard, folder, folder.path / "dashboard")
        except DashboardError as e:
            ui.notify(str(e), type="negative")
            return
        if result is None:  # cancelled: the app is shutting down
            return
        html_path, png_path = result
        ui.download.file(html_path)
        if png_path is not None:
            ui.download.file(png_path)
        ui.notify(f"Dashboard written to {html_path.parent}", type="positive")


class CheckpointTable:
    """The run's checkpoints on disk, each with Chat and Publish."""

    def __init__(self, folder: RunFolder, run_id: str):
        self.folder, self.run_id = folder, run_id
        with ui.card().classes("w-full").props("flat bordered"):
            ui.label("Checkpoints").classes("text-sm font-semibold text-grey-7")
            self.table = ui.table(columns=CKPT_COLUMNS, rows=[], row_key="iteration",
                                  pagination={"rowsPerPage": 10, "sortBy": "iteration", "descending": True}) \
                .classes("w-full").props("flat dense").mark("checkpoints")
            for slot, template in CKPT_SLOTS.items():
                self.table.add_slot(slot, template)
            self.none = ui.label("No checkpoints on disk.").classes("text-sm text-grey-7").mark("no-checkpoints")
        self.table.on("checkpoint_action", self.on_action)

    def show(self, info: dict[str, Any]) -> None:
        rows = checkpoint_table_rows(self.folder, info)
        self.table.rows = rows
        self.table.set_visibility(bool(rows))
        self.none.set_visibility(not rows)

    def on_action(self, e: events.GenericEventArguments) -> None:
        args = e.args or {}
        it = args.get("iteration")
        if not isinstance(it, int):
            return
        if args.get("action") == "chat":
            ui.navigate.to(f"/playground?run={self.run_id}&iteration={it}")
        elif args.get("action") == "publish":
            ui.navigate.to(f"/runs/{self.run_id}/publish?iteration={it}")


def config_and_stats(folder: RunFolder) -> None:
    """The run's config.yaml beside its dataset statistics."""
    with ui.row().classes("w-full items-start gap-3 no-wrap max-lg:flex-wrap"):
        with ui.card().classes("grow min-w-0 basis-1/2").props("flat bordered"):
            ui.label("Config").classes("text-sm font-semibold text-grey-7")
            try:
                text = folder.config_path.read_text()
            except OSError as e:
                text = f"# config.yaml could not be read: {e}"
            ui.code(text, language="yaml").classes("w-full max-h-[32rem] overflow-auto text-xs").mark("config")
        with ui.card().classes("grow min-w-0 basis-1/2").props("flat bordered").mark("dataset-stats"):
            ui.label("Dataset").classes("text-sm font-semibold text-grey-7")
            stats = run_index.dataset_stats(folder)
            if not stats:
                ui.label("No dataset statistics yet (written when the worker has prepared the data).") \
                    .classes("text-sm text-grey-7")
                return
            facts, splits = stats_tables(stats)
            with ui.grid(columns=2).classes("gap-x-4 gap-y-0 text-sm"):
                for key, value in facts:
                    ui.label(key).classes("text-grey-7")
                    ui.label(value).classes("break-all")
            if splits:
                keys = list(dict.fromkeys(k for s in splits for k in s))
                ui.table(columns=[{"name": k, "label": k.replace("_", " "), "field": k,
                                   "align": "left" if k == "split" else "right"} for k in keys],
                         rows=splits, row_key="split").props("flat dense").classes("w-full").mark("split-stats")


def parent_line(info: dict[str, Any]) -> None:
    """The "Forked from RUN @ iteration N" line of a fork."""
    parent = info.get("parent") or {}
    if not parent.get("run"):
        return
    with ui.row().classes("items-center gap-1 text-sm").mark("detail-parent"):
        ui.label("Forked from")
        ui.link(f"{parent['run']} @ iteration {parent.get('iteration')}", f"/runs/{parent['run']}") \
            .mark("parent-link")
        if parent.get("same_data_order") is False:
            ui.label("(with a fresh data order)").classes("text-grey-7")


class RunDetail:
    """One run: header, lineage, charts, checkpoints, config and data statistics, following its watcher."""

    def __init__(self, services: Services, run_id: str):
        self.header = DetailHeader(services, run_id)
        try:
            self.folder = services.manager.folder(run_id)
            self.info = services.manager.get(run_id)
            self.watcher: RunWatcher = services.watchers.get(run_id)
        except ValueError as e:
            ui.label(f"Run {run_id}: {e}").classes("text-negative").mark("run-missing")
            self.header.hide()
            return
        ui.label(_info_line(self.info)).classes("text-sm text-grey-7").mark("detail-info")
        self.reason = ui.label("").classes("text-sm").mark("detail-reason")
        parent_line(self.info)
        with ui.tabs().props("dense align=left").classes("w-full") as tabs:
            overview = ui.tab("Overview").mark("tab-overview")
            evaluate = ui.tab("Evaluate").mark("tab-evaluate")
        with ui.tab_panels(tabs, value=overview).classes("w-full").props("keep-alive"):
            with ui.tab_panel(overview).classes("p-0 gap-3"):
                self.charts: dict[str, ui.echart] = {}
                with ui.grid().classes("w-full gap-3 grid-cols-1 xl:grid-cols-2"):
                    for key in DETAIL_CHARTS:
                        self.charts[key] = ui.echart(line_chart(*CHARTS[key])).classes("w-full h-72") \
                            .mark(f"detail-{key}")
                self.checkpoints = CheckpointTable(self.folder, run_id)
                config_and_stats(self.folder)
            with ui.tab_panel(evaluate).classes("p-0 gap-3"):
                EvaluateTab(services, run_id, self.folder, self.info.get("model") or "")
        self.shown_info: dict[str, Any] | None = None
        self.watcher.poll(force=True)
        on_change(self.version, self.update, 1.0)

    def version(self) -> int:
        self.watcher.poll()
        return self.watcher.version

    def update(self) -> None:
        now = self.watcher.info() or self.info
        self.header.show(now)
        st = now.get("status") or "?"
        self.reason.set_text(now.get("reason") or ("running" if st in ACTIVE else ""))
        for key in DETAIL_CHARTS:
            opts = self.charts[key].options["series"]
            for i, (name, _) in enumerate(CHARTS[key][1]):
                points = self.watcher.series(name)
                if opts[i]["data"] != points:
                    opts[i]["data"] = points
        marks = checkpoint_marks(self.watcher.checkpoints(), self.watcher.series("train_loss"))
        loss = self.charts["loss"].options["series"][0]
        if loss.get("markPoint", {}).get("data") != marks:
            loss["markPoint"] = {"data": marks, "label": {"show": False}}
        if now != self.shown_info:
            self.shown_info = now
            self.checkpoints.show(now)
