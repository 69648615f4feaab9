"""The Playground's Evaluate tab: run a saved suite on what the Playground holds (the base and/or checkpoints of the
picked model, the loaded adapter picked at first) and read each model's pass rate and each case's outputs side by
side with pass/fail.

It starts the same job as the run's Evaluate tab (:meth:`services.evaluation.service.Evaluations.start`: one base in
the model worker, adapters swapped, never fused) and follows it by its ``version``: the event loop never waits on the
model, and the job can be cancelled. Nothing is written into a run's ``evals.jsonl`` from here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from nicegui import ui

from pages.common import EvalProgress, case_grid_view, on_change
from pages.playground.selection import Selection
from services.errors import ForgeError
from services.evaluation import results
from services.evaluation.suites import load_suite
from services.training.index import adapters_for

if TYPE_CHECKING:
    from app.composition import Services

OWNER = "playground"  # who started the app's one evaluation job (the run detail uses the run's id)
COLUMNS = [{"name": "label", "label": "model", "field": "label", "align": "left"},
           {"name": "suite", "label": "suite", "field": "suite", "align": "left"},
           {"name": "pass_rate", "label": "pass rate", "field": "pass_rate", "align": "right"},
           {"name": "passed", "label": "passed", "field": "passed", "align": "right"}]


def pass_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One table row per (model, suite) record: its pass rate and passed/total (cut short by a cancel: said so)."""
    rows = []
    for r in records:
        m = r.get("metrics") or {}
        rows.append({"label": r.get("label"), "suite": r["name"],
                     "pass_rate": "–" if r.get("score") is None else f"{r['score']:.2f}",
                     "passed": f"{m.get('passed', '–')}/{m.get('total', '–')}"
                               + (" (cancelled)" if r.get("partial") else "")})
    return rows


class EvalPanel:
    """Suite, targets (base and/or checkpoints), Run, progress and Cancel, the pass rates and the outputs."""

    def __init__(self, services: Services, selection: Selection) -> None:
        self.services, self.evals, self.selection = services, services.evals, selection
        self.drawn: tuple[Any, ...] = ()
        self.loaded: tuple[str | None, str | None] = (None, None)
        ui.label("Run a saved suite (workspace/evals; write one in a run's Evaluate tab) on the base model and/or "
                 "checkpoints of the picked model: one copy of the base stays loaded, only adapters are swapped, "
                 "and what is loaded stays loaded.").classes("text-sm opacity-70")
        with ui.row().classes("w-full items-center gap-3"):
            self.suite = ui.select({}, label="Suite").props("dense outlined").classes("min-w-56") \
                .mark("pg-eval-suite")
            self.suite.on("popup-show", self.refresh_suites)
            self.base = ui.switch("Base model", value=True).mark("pg-eval-base")
            self.targets = ui.select({}, multiple=True, label="Checkpoints", with_input=True, value=[]) \
                .props("dense outlined use-chips").classes("grow min-w-[20rem]").mark("pg-eval-targets")
            self.targets.on("popup-show", lambda: self.refresh_targets(self.selection.model_path()))
            self.run_btn = ui.button("Run suite", icon="fact_check", on_click=self.start).mark("pg-eval-run")
        self.progress = EvalProgress(self.evals, OWNER)
        self.table = ui.table(columns=COLUMNS, rows=[], row_key="key").props("dense flat bordered") \
            .classes("w-full").mark("pg-eval-table")
        self.table.set_visibility(False)
        self.outputs = ui.column().classes("w-full gap-2").mark("pg-eval-cases")
        self.refresh_suites()
        on_change(lambda: self.evals.version, self.update, 0.25)

    def refresh_suites(self) -> None:
        options = {str(p): p.stem for p in self.evals.suite_files()}
        self.suite.set_options(options, value=self.suite.value if self.suite.value in options
                               else next(iter(options), None))

    def refresh_targets(self, model: str | None) -> None:
        """The LoRA runs and checkpoints of ``model``; the loaded adapter is picked while nothing else is."""
        targets = adapters_for(self.services.manager, model, lora_only=True)
        value = [v for v in self.targets.value or [] if v in targets]
        loaded = self.services.models.status.get("adapter")
        if not value and loaded in targets:
            value = [loaded]
        self.targets.set_options(targets, value=value)

    def on_status(self, status: dict[str, Any]) -> None:
        """A model or adapter was loaded: offer it (picked when nothing else is)."""
        loaded = (status.get("model"), status.get("adapter"))
        if loaded != self.loaded:
            self.loaded = loaded
            self.refresh_targets(self.selection.model_path())

    def start(self) -> None:
        model = self.selection.model_path()
        if not model:
            ui.notify("Pick a model first", type="warning")
            return
        if not self.suite.value:
            ui.notify("Pick a saved suite (write one in a run's Evaluate tab and save it)", type="warning")
            return
        targets: list[str | None] = ([None] if self.base.value else []) + list(self.targets.value or [])
        try:
            self.evals.start(self.evals.on_model(model, targets), [load_suite(self.suite.value)], owner=OWNER)
        except ForgeError as e:
            ui.notify(str(e), type="negative", multi_line=True)

    def update(self) -> None:
        state = self.evals.state
        self.progress.show(state)
        self.run_btn.set_enabled(state["state"] != "running")
        if state.get("owner") != OWNER:
            return
        records = state["records"]
        drawn = (state["state"], len(records))
        if drawn == self.drawn:
            return
        self.drawn = drawn
        self.table.rows = [{**row, "key": i} for i, row in enumerate(pass_rows(records))]
        self.table.set_visibility(bool(records))
        self.table.update()
        self.outputs.clear()
        with self.outputs:
            for name in dict.fromkeys(r["name"] for r in records if r.get("cases")):
                ui.label(f"Outputs per case: {name}").classes("text-sm font-semibold text-grey-7")
                case_grid_view(results.case_grid(records, name))
