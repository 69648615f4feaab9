"""The run detail's Evaluate tab: run suites on the base and every checkpoint, the checkpoint × metric table with a
chart per metric, each case's outputs side by side (pass/fail, diff against the base), and a small suite editor.

Everything shown is read from the run's ``evals.jsonl`` (:mod:`services.evaluation.results`); the evaluation
itself runs in the model worker through :class:`services.evaluation.service.Evaluations`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from nicegui import events, run, ui

from pages.common import line_chart, on_change
from services.errors import ForgeError
from services.evaluation import results
from services.evaluation.suites import CHECKS, check_from_text, from_dict, load_suite
from services.workspace import files_stamp

if TYPE_CHECKING:
    from app.composition import Services
    from services.training.folder import RunFolder

OUTPUT_BOX = "whitespace-pre-wrap break-all font-mono max-h-40 overflow-auto"  # long outputs scroll, not stretch
DIFF_CLASSES = {"same": "", "added": "bg-green-2 text-green-10", "removed": "bg-red-2 text-red-10 line-through"}


class RunEvalCard:
    """Pick saved suites and evaluate the run's base and checkpoints; progress and cancel."""

    def __init__(self, services: Services, run_id: str):
        self.services, self.run_id = services, run_id
        with ui.card().classes("w-full").props("flat bordered"):
            ui.label("Evaluate this run").classes("text-sm font-semibold text-grey-7")
            with ui.row().classes("w-full items-center gap-2"):
                self.pick = ui.select({}, multiple=True, label="Suites (workspace/evals)").props("dense outlined") \
                    .classes("min-w-64 grow").mark("eval-suites")
                ui.button("Evaluate base + checkpoints", icon="fact_check", on_click=self.start) \
                    .props("unelevated").mark("eval-run")
                self.cancel = ui.button("Cancel", icon="stop", on_click=services.evals.cancel).props("outline") \
                    .mark("eval-cancel")
            self.bar = ui.linear_progress(value=0, show_value=False).classes("w-full").mark("eval-bar")
            self.message = ui.label("").classes("text-sm text-grey-7").mark("eval-progress")
        self.refresh_suites()

    def refresh_suites(self) -> None:
        self.pick.options = {str(p): p.stem for p in self.services.evals.suite_files()}
        self.pick.update()

    def start(self) -> None:
        chosen = list(self.pick.value or [])
        if not chosen:
            ui.notify("Pick one or more suites (write one below and save it)", type="warning")
            return
        try:
            self.services.evals.start(self.run_id, [load_suite(p) for p in chosen])
        except ForgeError as e:
            ui.notify(str(e), type="negative", multi_line=True)

    def show(self, state: dict[str, Any]) -> None:
        mine = state.get("run") == self.run_id
        running = mine and state["state"] == "running"
        self.bar.set_visibility(running)
        self.bar.value = state.get("fraction") or 0
        self.cancel.set_visibility(running)
        self.message.set_text(f"{state['state']}: {state['message']}" if mine else "")


class EvalResults:
    """The checkpoint × metric table, a chart per metric over iterations and the per-case comparison."""

    def __init__(self, folder: RunFolder):
        self.folder = folder
        self.records: list[dict[str, Any]] = []
        with ui.card().classes("w-full").props("flat bordered"):
            ui.label("Results").classes("text-sm font-semibold text-grey-7")
            self.none = ui.label("No evaluations yet.").classes("text-sm text-grey-7").mark("eval-none")
            self.table = ui.table(columns=[], rows=[], row_key="label").props("flat dense").classes("w-full") \
                .mark("eval-table")
            self.charts = ui.grid().classes("w-full gap-3 grid-cols-1 xl:grid-cols-2").mark("eval-charts")
        with ui.card().classes("w-full").props("flat bordered"):
            with ui.row().classes("w-full items-center gap-2"):
                ui.label("Outputs per case").classes("text-sm font-semibold text-grey-7")
                self.suite = ui.select([], label="Suite", on_change=lambda: self.cases.refresh()) \
                    .props("dense outlined").classes("min-w-48").mark("eval-case-suite")
            self.cases()

    def show(self) -> None:
        self.records = results.read(self.folder)
        names = results.metric_names(self.records)
        self.none.set_visibility(not self.records)
        self.table.set_visibility(bool(self.records))
        self.table.columns = [{"name": "label", "label": "checkpoint", "field": "label", "align": "left"}] + [
            {"name": n, "label": n, "field": n, "align": "right"} for n in names]
        self.table.rows = [{k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in row.items()}
                           for row in results.table(self.records)]
        self.charts.clear()
        with self.charts:
            for n in names:
                opts = line_chart(n, [(n, n)], "value")
                opts["series"][0].update(data=results.series(self.records, n), showSymbol=True)
                ui.echart(opts).classes("w-full h-56").mark(f"eval-chart-{n}")
        suites = [n for n in names if any(r["name"] == n and r.get("cases") for r in self.records)]
        self.suite.options = suites
        if self.suite.value not in suites:
            self.suite.value = suites[0] if suites else None
        self.suite.update()
        self.cases.refresh()

    @ui.refreshable_method
    def cases(self) -> None:
        if not self.suite.value:
            return
        for row in results.case_grid(self.records, self.suite.value):
            with ui.card().classes("w-full").props("flat bordered").mark(f"eval-case-{row['id']}"):
                ui.label(row["id"]).classes("text-sm font-semibold")
                with ui.row().classes("w-full gap-2 no-wrap overflow-x-auto"):
                    for t in row["targets"]:
                        self._output(t)

    @staticmethod
    def _output(t: dict[str, Any]) -> None:
        with ui.column().classes("min-w-48 basis-0 grow gap-1").mark("eval-output"):
            with ui.row().classes("items-center gap-1"):
                ui.label(t["label"]).classes("text-xs text-grey-7")
                ui.badge("pass" if t["passed"] else "fail", color="positive" if t["passed"] else "negative")
            if t["diff"] is None:
                ui.label(_visible(t["output"]) or "(empty)").classes(f"text-sm {OUTPUT_BOX}")
            else:
                with ui.element("div").classes(f"text-sm {OUTPUT_BOX}").mark("eval-diff"):
                    for op, text in t["diff"]:
                        ui.label(_visible(text) + " ").classes(f"inline {DIFF_CLASSES[op]}")
            for why in t["why"]:
                ui.label(why).classes("text-xs text-negative")


class SuiteEditor:
    """Write a suite: cases with one check each, "try on the base model", save into workspace/evals, import, export."""

    def __init__(self, services: Services, base_model: str, on_saved: Any):
        self.services, self.base_model, self.on_saved = services, base_model, on_saved
        self.rows: list[dict[str, Any]] = [{"prompt": "", "check": "contains", "value": ""}]
        self.tried: dict[str, dict[str, Any]] = {}
        with ui.card().classes("w-full").props("flat bordered").mark("suite-editor"):
            with ui.row().classes("w-full items-center gap-2"):
                ui.label("Suite editor").classes("text-sm font-semibold text-grey-7")
                self.name = ui.input("Suite name", value="my-suite").props("dense outlined").mark("suite-name")
                self.mpr = ui.number("Min pass rate", value=None, min=0, max=1, step=0.05) \
                    .props("dense outlined").classes("w-36").mark("suite-min-pass")
            self.cases()
            with ui.row().classes("items-center gap-2"):
                ui.button("Add case", icon="add", on_click=self.add).props("outline dense").mark("suite-add-case")
                ui.button("Try on the base model", icon="play_arrow", on_click=self.try_base) \
                    .props("outline dense").mark("suite-try")
                ui.button("Save", icon="save", on_click=self.save).props("unelevated dense").mark("suite-save")
                ui.button("Export", icon="download", on_click=self.export).props("flat dense").mark("suite-export")
                ui.upload(label="Import suite", auto_upload=True, max_file_size=1_000_000, on_upload=self.upload) \
                    .props("accept=.yaml,.yml,.jsonl flat bordered dense").classes("w-56").mark("suite-import")

    @ui.refreshable_method
    def cases(self) -> None:
        for i, row in enumerate(self.rows):
            with ui.row().classes("w-full items-center gap-2 no-wrap").mark(f"suite-case-{i}"):
                ui.input("Prompt").bind_value(row, "prompt").props("dense outlined").classes("grow") \
                    .mark(f"case-prompt-{i}")
                ui.select(list(CHECKS), label="Check").bind_value(row, "check").props("dense outlined") \
                    .classes("w-36").mark(f"case-check-{i}")
                ui.input("Expected").bind_value(row, "value").props("dense outlined").classes("w-56") \
                    .mark(f"case-value-{i}")
                ui.button(icon="delete", on_click=lambda i=i: self.remove(i)).props("flat round dense") \
                    .mark(f"case-remove-{i}")
                tried = self.tried.get(f"case-{i + 1}")
                if tried is not None:
                    ui.badge("pass" if tried["passed"] else "fail",
                             color="positive" if tried["passed"] else "negative").mark(f"case-tried-{i}")
                    ui.label(tried["output"]).classes("text-xs font-mono max-w-64 truncate")

    def add(self) -> None:
        self.rows.append({"prompt": "", "check": "contains", "value": ""})
        self.cases.refresh()

    def remove(self, i: int) -> None:
        del self.rows[i]
        self.tried = {}
        self.cases.refresh()

    def data(self) -> dict[str, Any] | None:
        """The suite as plain data, checked; None after telling the person what is wrong."""
        try:
            cases = [{"id": f"case-{i + 1}", "prompt": r["prompt"],
                      "checks": [check_from_text(r["check"], r["value"] or "", f"case {i + 1}")]}
                     for i, r in enumerate(self.rows)]
            data = {"name": self.name.value or "suite", "cases": cases,
                    **({"min_pass_rate": float(self.mpr.value)} if self.mpr.value is not None else {})}
            from_dict(data, where=self.name.value or "suite")
        except ForgeError as e:
            ui.notify(str(e), type="negative", multi_line=True)
            return None
        return data

    async def try_base(self) -> None:
        data = self.data()
        if data is None:
            return
        ui.notify("Running the cases on the base model…")
        try:
            recs = await run.io_bound(self.services.evals.try_on_base, self.base_model, from_dict(data))
        except ForgeError as e:
            ui.notify(str(e), type="negative", multi_line=True)
            return
        self.tried = {c["id"]: c for c in recs[0]["cases"]} if recs else {}
        self.cases.refresh()

    def save(self) -> None:
        data = self.data()
        if data is None:
            return
        try:
            path = self.services.evals.save_suite(data, self.name.value or "suite")
        except ForgeError as e:
            ui.notify(str(e), type="negative", multi_line=True)
            return
        ui.notify(f"Saved {path}", type="positive")
        self.on_saved()

    def export(self) -> None:
        data = self.data()
        if data is not None:
            ui.download.content(from_dict(data).to_yaml().encode(), f"{self.name.value or 'suite'}.yaml",
                                "application/x-yaml")

    async def upload(self, e: events.UploadEventArguments) -> None:
        try:
            path = self.services.evals.import_suite(e.file.name, await e.file.read())
        except ForgeError as err:
            ui.notify(f"Could not import {e.file.name}: {err}", type="negative", multi_line=True)
            return
        suite = load_suite(path)
        self.name.value = suite.name
        self.mpr.value = suite.min_pass_rate
        self.rows = [{"prompt": c.prompt or "", "check": next(iter(c.checks[0])),
                      "value": _value_text(next(iter(c.checks[0].values())))} for c in suite.cases]
        self.cases.refresh()
        ui.notify(f"Imported {Path(e.file.name).name} into {path}", type="positive")
        self.on_saved()


def _visible(text: str) -> str:
    """Line breaks shown as ↵ (a model that answers with blank lines would otherwise look like no answer)."""
    return text.replace("\n", "↵\n")


def _value_text(value: Any) -> str:
    return ", ".join(value) if isinstance(value, list) else "true" if value is True else str(value)


class EvaluateTab:
    """The Evaluate tab of one run."""

    def __init__(self, services: Services, run_id: str, folder: RunFolder, base_model: str):
        self.services, self.folder = services, folder
        self.card = RunEvalCard(services, run_id)
        self.results = EvalResults(folder)
        SuiteEditor(services, base_model, on_saved=self.card.refresh_suites)
        on_change(self.version, self.update, 1.0)

    def version(self) -> tuple:
        return self.services.evals.version, files_stamp(results.evals_path(self.folder))

    def update(self) -> None:
        self.card.show(self.services.evals.state)
        self.results.show()
