"""Compare page: overlay the loss and perplexity of two or more runs against iterations, epochs or trained tokens,
with a summary sorted by best validation loss and a table of the config keys that differ.

Everything is read from the run folders; a run whose metrics file grows (it is still training) is read again
every couple of seconds, so the charts and the summary follow it live. Series are bounded.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from nicegui import ui

from pages.common import METHODS, MODES, STATUS_COLORS, fmt_loss, line_chart, on_change, page_column
from services.evaluation import results as evals
from services.training import index as run_index
from services.training.folder import ACTIVE
from services.units import clock

if TYPE_CHECKING:
    from app.composition import Services
    from services.training.manager import RunManager

MAX_RUNS = 8
FOLLOW_SECONDS = 2.0
PALETTE = ("#5470c6", "#ee6666", "#91cc75", "#fac858", "#73c0de", "#9a60b4", "#fc8452", "#3ba272")
# chart marker → (title, train metric, val metric, y-axis type)
COMPARE_CHARTS = {"loss": ("Loss", "train_loss", "val_loss", "value"),
                  "perplexity": ("Perplexity", "perplexity", "val_perplexity", "log")}
SUMMARY_COLUMNS: list[dict[str, Any]] = [
    {"name": "rank", "label": "#", "field": "rank", "align": "left"},
    {"name": "name", "label": "Run", "field": "name", "align": "left"},
    {"name": "status", "label": "Status", "field": "status", "align": "left"},
    {"name": "mode", "label": "Mode", "field": "mode_text", "align": "left"},
    {"name": "method", "label": "Method", "field": "method_text", "align": "left"},
    {"name": "best", "label": "Best val loss", "field": "best_text"},
    {"name": "final", "label": "Final train loss", "field": "final_text"},
    {"name": "iterations", "label": "Iterations", "field": "iteration"},
    {"name": "tokens", "label": "Trained tokens", "field": "tokens_text"},
    {"name": "duration", "label": "Duration", "field": "duration_text"},
]


def parse_runs(runs: str | None) -> list[str]:
    """``A,B,C`` → unique run ids in order (at most :data:`MAX_RUNS`)."""
    ids = [r.strip() for r in (runs or "").split(",") if r.strip()]
    return list(dict.fromkeys(ids))[:MAX_RUNS]


def value_text(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, str):
        return v
    return json.dumps(v) if isinstance(v, (dict, list, bool)) else str(v)


def compare_page(services: Services, runs: str | None = None) -> None:
    """Build the Compare page for ``/compare?runs=A,B,...``."""
    with page_column():
        ComparePage(services, runs)


def load_run(manager: RunManager, run_id: str) -> dict[str, Any]:
    """What the page shows of one run: run.json, config, metrics stamp and the compared series."""
    folder = manager.folder(run_id)
    stamp = run_index.metrics_stamp(folder)  # before reading: a report that lands meanwhile is read next time
    info, cfg = manager.get(run_id), folder.config()
    records = run_index.run_records(folder)
    return {"id": run_id, "folder": folder, "info": info, "cfg": cfg, "stamp": stamp,
            "series": {m: run_index.metric_series(records, m) for _, train, val, _ in COMPARE_CHARTS.values()
                       for m in (train, val)}}


def display_names(loaded: list[dict[str, Any]]) -> dict[str, str]:
    """Run id → name in the legend; a name shared by two runs gets the run id to tell them apart."""
    names = [r["info"].get("name") or r["id"] for r in loaded]
    return {r["id"]: name if names.count(name) == 1 else f"{name} ({r['id']})" for r, name in zip(loaded, names,
                                                                                                   strict=True)}


def summary_rows(loaded: list[dict[str, Any]], names: dict[str, str]) -> list[dict[str, Any]]:
    """One summary row per run, best validation loss first, ranked."""
    rows = []
    for r in loaded:
        row = run_index.run_row(r["info"])
        train = r["series"]["train_loss"]
        tokens = train[-1].get("tokens") if train else None
        best = fmt_loss(row["best_val_loss"]) + (f" @ {row['best_iteration']}"
                                                 if row["best_val_loss"] is not None else "")
        rows.append({**row, "name": names[r["id"]], "best_text": best,
                     "final_text": fmt_loss(train[-1]["y"] if train else None),
                     "tokens_text": f"{tokens:,.0f}" if tokens is not None else "–",
                     "duration_text": clock(row["duration"]) if row["duration"] is not None else "–",
                     "mode_text": MODES.get(row["mode"], row["mode"]),
                     "method_text": METHODS.get(row["method"], row["method"]),
                     "status_color": STATUS_COLORS.get(row["status"], "grey")})
    rows = run_index.by_best_val_loss(rows)
    for i, row in enumerate(rows, 1):
        row["rank"] = i
    return rows


def diff_table(loaded: list[dict[str, Any]], names: dict[str, str]) -> None:
    """The config keys whose values differ between the runs, one column per run."""
    diff = run_index.config_diff({r["id"]: r["cfg"] for r in loaded})
    ui.label(f"Config differences ({len(diff)} key{'s' if len(diff) != 1 else ''})") \
        .classes("text-sm font-semibold text-grey-7 mt-2")
    columns = [{"name": "key", "label": "Key", "field": "key", "align": "left"}] + [
        {"name": f"run{i}", "label": names[r["id"]], "field": f"run{i}", "align": "left"} for i, r in enumerate(loaded)]
    rows = [{"key": d["key"], **{f"run{i}": value_text(d["values"][r["id"]]) for i, r in enumerate(loaded)}}
            for d in diff]
    ui.table(columns=columns, rows=rows, row_key="key").classes("w-full").props("flat bordered dense wrap-cells") \
        .mark("compare-diff")


class EvalCompare:
    """The runs side by side on one eval metric (a suite's pass rate, a task's score, a perplexity suite)."""

    def __init__(self, loaded: list[dict[str, Any]], names: dict[str, str]):
        self.names = names
        self.by_run = {r["id"]: evals.read(r["folder"]) for r in loaded}
        metrics = list(dict.fromkeys(n for recs in self.by_run.values() for n in evals.metric_names(recs)))
        if not metrics:
            return
        with ui.row().classes("w-full items-center gap-2 mt-2"):
            ui.label("By eval metric").classes("text-sm font-semibold text-grey-7")
            self.metric = ui.select(metrics, value=metrics[0], on_change=self.show).props("dense outlined") \
                .classes("min-w-48").mark("compare-eval-metric")
        lines = [(run_id, names[run_id]) for run_id in self.by_run]
        colors = [PALETTE[i % len(PALETTE)] for i in range(len(lines))]
        self.chart = ui.echart(line_chart("", lines, "value", colors)).classes("w-full h-72").mark("compare-eval")
        columns = [{"name": k, "label": label, "field": k, "align": "left" if k == "name" else "right"}
                   for k, label in (("rank", "#"), ("name", "Run"), ("best", "Best checkpoint"),
                                           ("base", "Base model"))]
        self.table = ui.table(columns=columns, rows=[], row_key="name").classes("w-full").props("flat bordered dense") \
            .mark("compare-eval-table")
        self.show()

    def show(self) -> None:
        name = self.metric.value
        for i, run_id in enumerate(self.by_run):
            self.chart.options["series"][i].update(data=evals.series(self.by_run[run_id], name), showSymbol=True)
        self.chart.options["title"]["text"] = name
        self.table.rows = [{"rank": i, "name": self.names[r["run"]],
                            "best": "–" if r["score"] is None else f"{r['score']:.4g} @ {r['iteration']}",
                            "base": "–" if r["base"] is None else f"{r['base']:.4g}"}
                           for i, r in enumerate(evals.rank_runs(self.by_run, name), 1)]
        self.chart.update()


class ComparePage:
    """The run picker, the overlaid charts, the summary and the config differences of two or more runs."""

    def __init__(self, services: Services, runs: str | None):
        self.manager = services.manager
        wanted = parse_runs(runs)
        options = {r["id"]: f"{r.get('name') or r['id']} · {r['id']}" for r in self.manager.list()}
        ui.label("Compare runs").classes("text-2xl font-semibold")
        with ui.row().classes("w-full items-end gap-3"):
            self.picker = ui.select(options, value=[r for r in wanted if r in options], label="Runs", multiple=True,
                                    with_input=True).props("dense outlined use-chips") \
                .classes("sm:min-w-[32rem] max-sm:w-full") \
                .mark("compare-runs")
            ui.button("Compare", icon="compare_arrows", on_click=self.go).props("outline").mark("compare-go")
            ui.space()
            self.axis = ui.toggle(dict(run_index.AXES), value="iteration", on_change=self.show_axis) \
                .props("dense no-caps").mark("compare-axis")
        self.loaded: list[dict[str, Any]] = []
        missing: list[str] = []
        for run_id in wanted:
            try:
                self.loaded.append(load_run(self.manager, run_id))
            except (ValueError, OSError):
                missing.append(run_id)
        if missing:
            ui.label(f"Not in the workspace: {', '.join(missing)}").classes("text-warning").mark("compare-missing")
        if len(self.loaded) < 2:
            ui.label("Pick two or more runs above (or select them on the Runs page) to compare them.") \
                .classes("text-grey-7").mark("compare-empty")
            self.axis.set_visibility(False)
            return
        self.names = display_names(self.loaded)
        self.charts: dict[str, ui.echart] = {}
        with ui.grid().classes("w-full gap-3 grid-cols-1 xl:grid-cols-2"):
            for key, (title, train, val, ytype) in COMPARE_CHARTS.items():
                lines = [line for r in self.loaded for line in ((train, f"{self.names[r['id']]} train"),
                                                                 (val, f"{self.names[r['id']]} val"))]
                colors = [PALETTE[i // 2 % len(PALETTE)] for i in range(len(lines))]
                self.charts[key] = ui.echart(line_chart(title, lines, ytype, colors)).classes("w-full h-80") \
                    .mark(f"compare-{key}")
        ui.label("Summary (best validation loss first)").classes("text-sm font-semibold text-grey-7 mt-2")
        self.summary = ui.table(columns=SUMMARY_COLUMNS, rows=[], row_key="id").classes("w-full") \
            .props("flat bordered dense").mark("compare-summary")
        self.summary.add_slot("body-cell-name", '<q-td :props="props"><a class="text-primary cursor-pointer" '
                              "@click=\"$parent.$emit('open_run', props.row.id)\">{{ props.value }}</a></q-td>")
        self.summary.add_slot("body-cell-status", '<q-td :props="props"><q-badge :color="props.row.status_color" '
                              ':label="props.value" /></q-td>')
        self.summary.on("open_run", lambda e: ui.navigate.to(f"/runs/{e.args}") if isinstance(e.args, str) else None)
        diff_table(self.loaded, self.names)
        EvalCompare(self.loaded, self.names)
        on_change(self.reread, self.show_axis, FOLLOW_SECONDS)
        on_change(lambda: summary_rows(self.loaded, self.names), self.show_summary, FOLLOW_SECONDS)

    def go(self) -> None:
        ids = list(self.picker.value or [])
        if len(ids) < 2:
            ui.notify("Pick two or more runs", type="warning")
            return
        ui.navigate.to("/compare?runs=" + ",".join(ids[:MAX_RUNS]))

    def reread(self) -> tuple[tuple[int, int], ...]:
        """Read again the runs that reported since (still training, or resumed meanwhile) and refresh the run.json
        of active ones (their duration ticks); return the metrics stamps."""
        for i, r in enumerate(self.loaded):
            try:
                if run_index.metrics_stamp(r["folder"]) != r["stamp"]:
                    self.loaded[i] = load_run(self.manager, r["id"])
                elif r["info"].get("status") in ACTIVE:
                    r["info"] = self.manager.get(r["id"])  # also notices a worker that died
            except (ValueError, OSError):
                continue  # deleted meanwhile: keep what is shown
        return tuple(r["stamp"] for r in self.loaded)

    def show_axis(self) -> None:
        name = self.axis.value
        for key, (_, train, val, _) in COMPARE_CHARTS.items():
            opts = self.charts[key].options
            opts["xAxis"]["name"] = run_index.AXES[name]
            for i, r in enumerate(self.loaded):
                opts["series"][2 * i]["data"] = run_index.align(r["series"][train], name)
                opts["series"][2 * i + 1]["data"] = run_index.align(r["series"][val], name)

    def show_summary(self) -> None:
        self.summary.rows = summary_rows(self.loaded, self.names)
