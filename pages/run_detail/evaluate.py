"""The run detail's Evaluate tab: run suites on the base and every checkpoint, the checkpoint × metric table with a
chart per metric, each case's outputs side by side (pass/fail, diff against the base), and a small suite editor.

Everything shown is read from the run's ``evals.jsonl`` (:mod:`services.evaluation.results`); the evaluation
itself runs in the model worker through :class:`services.evaluation.service.Evaluations`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from nicegui import events, ui

from pages.common import EvalProgress, case_grid_view, line_chart, on_change
from services.errors import ForgeError
from services.evaluation import results
from services.evaluation.suites import (
    CHECKS,
    TEXT_CHECKS,
    Suite,
    check_default,
    check_field,
    check_from_field,
    from_dict,
    load_suite,
    parse_case,
)
from services.workspace import files_stamp

if TYPE_CHECKING:
    from app.composition import Services
    from services.training.folder import RunFolder

# the editor's own fields; other suite settings are kept as they are
EDITOR_KEYS = {"name", "kind", "min_pass_rate", "batch_size", "cases"}


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
            self.progress = EvalProgress(services.evals, run_id)
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
        self.progress.show(state)


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
        if self.suite.value:
            case_grid_view(results.case_grid(self.records, self.suite.value))


def _text_label(kind: str) -> str:
    return "Pattern" if kind == "regex" else "Expected"


def _new_case() -> dict[str, Any]:
    return {"id": None, "prompt": "", "system": "", "messages": None, "checks": [_new_check()]}


def _new_check(kind: str = "contains") -> dict[str, Any]:
    return {"kind": kind, "value": check_default(kind)}


class SuiteEditor:
    """Write a suite: cases with one or more checks each (every kind with its own argument field), "try on the
    base model", open a saved suite, save into workspace/evals, import, export. Settings the editor has no field
    for (sampling, format, ids, chat messages) are kept as they are."""

    def __init__(self, services: Services, base_model: str, on_saved: Any, owner: str):
        """``owner`` names the editor's "try" jobs in :attr:`Evaluations.state` (progress and cancel here)."""
        self.services, self.base_model, self.on_saved, self.owner = services, base_model, on_saved, owner
        self.trying = False
        self.rows: list[dict[str, Any]] = [_new_case()]
        self.extra: dict[str, Any] = {}
        self.tried: dict[str, dict[str, Any]] = {}
        with ui.card().classes("w-full").props("flat bordered").mark("suite-editor"):
            with ui.row().classes("w-full items-center gap-2"):
                ui.label("Suite editor").classes("text-sm font-semibold text-grey-7")
                self.name = ui.input("Suite name", value="my-suite").props("dense outlined").mark("suite-name")
                self.mpr = ui.number("Min pass rate", value=None, min=0, max=1, step=0.05) \
                    .props("dense outlined").classes("w-36").mark("suite-min-pass")
                self.batch = ui.number("Cases at once", value=1, min=1, max=64, step=1, format="%.0f") \
                    .props("dense outlined").classes("w-32").mark("suite-batch") \
                    .tooltip("Greedy cases generated together (mlx-lm's batch_generate): several times faster, but a "
                             "batch may flip a near-tie token, so an output can differ from the Playground's")
                self.open_pick = ui.select({}, label="Open a saved suite", on_change=self.open_saved) \
                    .props("dense outlined").classes("min-w-48").mark("suite-open")
                self.open_pick.on("popup-show", self.refresh_saved)
            self.cases()
            with ui.row().classes("items-center gap-2"):
                ui.button("Add case", icon="add", on_click=self.add).props("outline dense").mark("suite-add-case")
                ui.button("Try on the base model", icon="play_arrow", on_click=self.try_base) \
                    .props("outline dense").mark("suite-try")
                ui.button("Save", icon="save", on_click=self.save).props("unelevated dense").mark("suite-save")
                ui.button("Export", icon="download", on_click=self.export).props("flat dense").mark("suite-export")
                ui.upload(label="Import suite", auto_upload=True, max_file_size=1_000_000, on_upload=self.upload) \
                    .props("accept=.yaml,.yml,.jsonl flat bordered dense").classes("w-56").mark("suite-import")
            self.progress = EvalProgress(services.evals, owner, mark="try")
        self.refresh_saved()

    @ui.refreshable_method
    def cases(self) -> None:
        for i, row in enumerate(self.rows):
            with ui.card().classes("w-full gap-1 p-2").props("flat bordered").mark(f"suite-case-{i}"):
                with ui.row().classes("w-full items-center gap-2 no-wrap"):
                    if row["messages"] is None:
                        ui.input("Prompt").bind_value(row, "prompt").props("dense outlined").classes("grow") \
                            .mark(f"case-prompt-{i}")
                    else:
                        ui.label(f"{len(row['messages'])} chat message(s), kept as they are") \
                            .classes("grow text-sm text-grey-7").mark(f"case-messages-{i}")
                    ui.input("System prompt").bind_value(row, "system").props("dense outlined").classes("w-56") \
                        .mark(f"case-system-{i}")
                    ui.button(icon="delete", on_click=lambda i=i: self.remove(i)).props("flat round dense") \
                        .mark(f"case-remove-{i}").tooltip("Remove this case")
                    self._tried(i, row)
                for j, check in enumerate(row["checks"]):
                    self._check(i, j, row, check)
                ui.button("Add check", icon="add", on_click=lambda i=i: self.add_check(i)) \
                    .props("flat dense no-caps size=sm").mark(f"case-add-check-{i}")

    def _tried(self, i: int, row: dict[str, Any]) -> None:
        tried = self.tried.get(row["id"] or "")
        if tried is not None:
            ui.badge("pass" if tried["passed"] else "fail",
                     color="positive" if tried["passed"] else "negative").mark(f"case-tried-{i}")
            ui.label(tried["output"]).classes("text-xs font-mono max-w-64 truncate")

    def _check(self, i: int, j: int, row: dict[str, Any], check: dict[str, Any]) -> None:
        """One check: its kind and the argument field of that kind, and a remove button (not for the last one)."""
        with ui.row().classes("w-full items-start gap-2 no-wrap pl-4").mark(f"suite-check-{i}-{j}"):
            kind = ui.select(list(CHECKS), label="Check", value=check["kind"]).props("dense outlined") \
                .classes("w-36").mark(f"case-check-{i}-{j}")
            box = ui.row().classes("grow gap-0 no-wrap")
            with box:
                field = [self._field(i, j, check)]  # the current one: a kind change may replace it
            kind.on_value_change(lambda e: self.set_kind(check, e.value, box, field, i, j))
            ui.button(icon="close", on_click=lambda: self.remove_check(i, j)) \
                .props("flat round dense size=sm").mark(f"case-remove-check-{i}-{j}") \
                .set_enabled(len(row["checks"]) > 1)

    @staticmethod
    def _field(i: int, j: int, check: dict[str, Any]) -> ui.element:
        """The argument field of the check's kind, bound to ``check["value"]``."""
        kind, marker = check["kind"], f"case-value-{i}-{j}"
        if kind in TEXT_CHECKS:
            return ui.input(_text_label(kind)).bind_value(check, "value").props("dense outlined") \
                .classes("grow").mark(marker)
        if kind == "max_tokens":
            return ui.number("At most tokens", min=1, step=1, format="%.0f").bind_value(check, "value") \
                .props("dense outlined").classes("w-40").mark(marker)
        if kind == "choice":
            return ui.input_chips("Answers (Enter after each)", new_value_mode="add-unique") \
                .bind_value(check, "value").props("dense outlined").classes("grow").mark(marker)
        return ui.textarea("JSON schema (blank: any valid JSON)").bind_value(check, "value") \
            .props("dense outlined autogrow").classes("grow font-mono").mark(marker)

    def set_kind(self, check: dict[str, Any], kind: str, box: ui.row, field: list[ui.element], i: int, j: int) -> None:
        """Another kind for a check: a text field stays (relabelled) between kinds that take a text; any other
        change redraws only this check's field, at once (typing elsewhere is never lost to a redraw)."""
        old, check["kind"] = check["kind"], kind
        if old in TEXT_CHECKS and kind in TEXT_CHECKS:
            field[0].props(f'label="{_text_label(kind)}"')
            return
        check["value"] = check_default(kind)
        box.clear()
        with box:
            field[0] = self._field(i, j, check)

    def add(self) -> None:
        self.rows.append(_new_case())
        self.cases.refresh()

    def remove(self, i: int) -> None:
        del self.rows[i]
        self.cases.refresh()

    def add_check(self, i: int) -> None:
        self.rows[i]["checks"].append(_new_check())
        self.cases.refresh()

    def remove_check(self, i: int, j: int) -> None:
        if len(self.rows[i]["checks"]) > 1:  # a case needs at least one check
            del self.rows[i]["checks"][j]
            self.cases.refresh()

    def data(self) -> dict[str, Any] | None:
        """The suite as plain data, checked; None after telling the person what is wrong (case and check named)."""
        try:
            used = {r["id"] for r in self.rows if r["id"]}
            cases = []
            for i, r in enumerate(self.rows):
                if not r["id"]:  # a new case: the first free case-N
                    r["id"] = next(f"case-{n}" for n in range(i + 1, i + 2 + len(self.rows))
                                   if f"case-{n}" not in used)
                    used.add(r["id"])
                case: dict[str, Any] = {"id": r["id"]}
                case.update({"prompt": r["prompt"]} if r["messages"] is None else {"messages": r["messages"]})
                if r["system"]:
                    case["system"] = r["system"]
                case["checks"] = [check_from_field(c["kind"], c["value"], f"case {i + 1} ({r['id']}), check {j + 1}")
                                  for j, c in enumerate(r["checks"])]
                parse_case(case, f"case {i + 1} ({r['id']})", i)
                cases.append(case)
            data = {**self.extra, "name": self.name.value or "suite", "cases": cases,
                    **({"min_pass_rate": float(self.mpr.value)} if self.mpr.value is not None else {}),
                    **({"batch_size": int(self.batch.value)} if (self.batch.value or 1) > 1 else {})}
            from_dict(data, where=self.name.value or "suite")
        except ForgeError as e:
            ui.notify(str(e), type="negative", multi_line=True)
            return None
        return data

    def fill(self, suite: Suite) -> bool:
        """Show ``suite`` in the editor (False, with a warning, for a perplexity suite: it has no cases)."""
        if suite.kind != "cases":
            ui.notify(f"{suite.name} is a {suite.kind} suite: it has no cases to edit", type="warning")
            return False
        self.name.value = suite.name
        self.mpr.value = suite.min_pass_rate
        self.batch.value = suite.batch_size
        self.extra = {k: v for k, v in suite.to_dict().items() if k not in EDITOR_KEYS}
        self.rows = [{"id": c.id, "prompt": c.prompt or "", "system": c.system or "", "messages": c.messages,
                      "checks": [dict(zip(("kind", "value"), check_field(ch), strict=True)) for ch in c.checks]}
                     for c in suite.cases]
        self.tried = {}
        self.cases.refresh()
        return True

    def refresh_saved(self) -> None:
        self.open_pick.set_options({str(p): p.stem for p in self.services.evals.suite_files()})

    def open_saved(self) -> None:
        path = self.open_pick.value
        if not path:
            return
        try:
            self.fill(load_suite(path))
        except ForgeError as e:
            ui.notify(str(e), type="negative", multi_line=True)

    def try_base(self) -> None:
        """The cases on the base model alone, as the app's evaluation job (progress, cancel); nothing is recorded."""
        data = self.data()
        if data is None:
            return
        evals = self.services.evals
        try:
            evals.start(evals.on_model(self.base_model, [None]), [from_dict(data)], owner=self.owner)
        except ForgeError as e:
            ui.notify(str(e), type="negative", multi_line=True)
            return
        self.trying = True

    def show(self, state: dict[str, Any]) -> None:
        """Follow the try: progress, then each case's verdict (those done before a cancel, too)."""
        self.progress.show(state)
        if not self.trying or state.get("owner") != self.owner or state["state"] == "running":
            return
        self.trying = False
        if state["state"] == "error":
            ui.notify(state["message"], type="negative", multi_line=True)
        recs = state["records"]
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
        self.refresh_saved()
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
        self.fill(load_suite(path))
        ui.notify(f"Imported {Path(e.file.name).name} into {path}", type="positive")
        self.refresh_saved()
        self.on_saved()


class EvaluateTab:
    """The Evaluate tab of one run."""

    def __init__(self, services: Services, run_id: str, folder: RunFolder, base_model: str):
        self.services, self.folder = services, folder
        self.card = RunEvalCard(services, run_id)
        self.results = EvalResults(folder)
        self.stamp: Any = None
        self.editor = SuiteEditor(services, base_model, on_saved=self.card.refresh_suites, owner=f"{run_id}:try")
        on_change(self.version, self.update, 1.0)

    def version(self) -> tuple:
        return self.services.evals.version, files_stamp(results.evals_path(self.folder))

    def update(self) -> None:
        state = self.services.evals.state
        self.card.show(state)
        self.editor.show(state)
        stamp = files_stamp(results.evals_path(self.folder))
        if stamp != self.stamp:  # progress alone redraws no table or chart
            self.stamp = stamp
            self.results.show()
