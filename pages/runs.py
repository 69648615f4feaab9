"""Runs page: every run of the workspace in one paginated, sortable table, with search, filters and row actions.

Rows come from :mod:`services.training.index`; the actions call
:class:`services.training.manager.RunManager` (label, delete, resume, fork) or navigate (open, clone into Train,
compare). The page reads the run list again when the runs folder changed or a run is active.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from nicegui import events, ui

from pages.common import METHODS, MODES, STATUS_COLORS, fmt_loss, on_change, page_column
from services.config import FINE_TUNE_TYPES
from services.training import index as run_index
from services.training.folder import ACTIVE
from services.units import clock

if TYPE_CHECKING:
    from app.composition import Services

POLL_SECONDS = 2.0
ACTIONS = (("open", "open_in_new", "Open"), ("label", "sell", "Edit label"), ("clone", "content_copy",
           "Clone config into Train"), ("resume", "play_arrow", "{{ props.row.status === 'waiting' ? "
           "'Start now (it is waiting in the queue)' : props.row.resume_refusal ? 'Cannot resume: ' + "
           "props.row.resume_refusal : 'Resume' }}"), ("fork", "call_split",
           "Fork from a checkpoint"), ("delete", "delete", "Delete"))
COLUMNS: list[dict[str, Any]] = [
    {"name": "name", "label": "Run", "field": "name", "sortable": True, "align": "left"},
    {"name": "status", "label": "Status", "field": "status", "sortable": True, "align": "left"},
    {"name": "mode", "label": "Mode", "field": "mode_text", "sortable": True, "align": "left"},
    {"name": "method", "label": "Method", "field": "method_text", "sortable": True, "align": "left"},
    {"name": "model", "label": "Base model", "field": "model", "sortable": True, "align": "left"},
    {"name": "dataset", "label": "Dataset", "field": "dataset", "sortable": True, "align": "left"},
    {"name": "world_size", "label": "Processes", "field": "world_size", "sortable": True},
    {"name": "best_val_loss", "label": "Best val loss", "field": "best_val_loss", "sortable": True},
    {"name": "duration", "label": "Duration", "field": "duration", "sortable": True},
    {"name": "date", "label": "Date", "field": "date", "sortable": True, "align": "left"},
    {"name": "label", "label": "Label", "field": "label", "sortable": True, "align": "left"},
    {"name": "actions", "label": "", "field": "id", "align": "right"},
]
_EMIT = "$parent.$emit('row_action', {{action: '{action}', id: props.row.id}})"
_DISABLED = {"resume": ':disable="!!props.row.resume_refusal"'}  # a completed run cannot be resumed: say why
_ACTION_BUTTONS = "".join(
    f'<q-btn flat dense round size="sm" icon="{icon}" {_DISABLED.get(action, "")} '
    f'@click.stop="{_EMIT.format(action=action)}">'
    f"<q-tooltip>{tip}</q-tooltip></q-btn>" for action, icon, tip in ACTIONS)
SLOTS = {
    "body-cell-name": '<q-td :props="props"><a class="cursor-pointer text-primary font-medium" '
                      f'@click.stop="{_EMIT.format(action="open")}">{{{{ props.value }}}}</a>'
                      '<div class="text-xs text-grey-7">{{ props.row.id }}'
                      '<span v-if="props.row.parent"> · fork of {{ props.row.parent }}</span></div></q-td>',
    "body-cell-status": '<q-td :props="props"><q-badge :color="props.row.status_color" :label="props.value">'
                        '<q-tooltip v-if="props.row.reason">{{ props.row.reason }}</q-tooltip></q-badge></q-td>',
    "body-cell-best_val_loss": '<q-td :props="props">{{ props.row.best_text }}</q-td>',
    "body-cell-duration": '<q-td :props="props">{{ props.row.duration_text }}</q-td>',
    "body-cell-date": '<q-td :props="props">{{ props.row.date_text }}</q-td>',
    "body-cell-label": '<q-td :props="props"><q-chip v-if="props.value" dense outline color="primary" '
                       ':label="props.value" /></q-td>',
    "body-cell-actions": f'<q-td :props="props" auto-width>{_ACTION_BUTTONS}</q-td>',
}


def table_row(row: dict[str, Any]) -> dict[str, Any]:
    """A :func:`services.training.index.run_row` with the texts the table shows."""
    best = fmt_loss(row["best_val_loss"])
    if row["best_val_loss"] is not None and row["best_iteration"] is not None:
        best += f" @ {row['best_iteration']}"
    return {**row, "status_color": STATUS_COLORS.get(row["status"], "grey"), "best_text": best,
            "duration_text": clock(row["duration"]) if row["duration"] is not None else "–",
            "mode_text": MODES.get(row["mode"], row["mode"]), "method_text": METHODS.get(row["method"], row["method"])}


def runs_page(services: Services) -> None:
    """Build the Runs page for one client."""
    with page_column():
        RunsPage(services)


class Filters:
    """Search and the status / mode / method filters above the table."""

    def __init__(self, on_change: Any):
        self.search = ui.input("Search", on_change=on_change).props("dense outlined clearable") \
            .classes("w-72").mark("runs-search")
        self.status = ui.select(list(STATUS_COLORS), label="Status", multiple=True, on_change=on_change) \
            .props("dense outlined clearable use-chips").classes("w-56").mark("runs-status")
        self.mode = ui.select(dict(MODES), label="Mode", multiple=True, on_change=on_change) \
            .props("dense outlined clearable use-chips").classes("w-48").mark("runs-mode")
        self.method = ui.select({m: METHODS[m] for m in FINE_TUNE_TYPES}, label="Method", multiple=True,
                                on_change=on_change).props("dense outlined clearable use-chips").classes("w-48") \
            .mark("runs-method")

    def apply(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return run_index.filter_rows(rows, self.search.value or "", self.status.value or None,
                                     self.mode.value or None, self.method.value or None)


class LabelDialog:
    """Edit a run's free-text label."""

    def __init__(self, services: Services, saved: Any):
        self.services, self.saved = services, saved
        self.run: dict[str, Any] = {}
        with ui.dialog() as self.dialog, ui.card().classes("w-96"):
            self.title = ui.label("").classes("font-semibold")
            self.input = ui.input("Label").props("dense outlined autofocus clearable").classes("w-full") \
                .mark("label-input")
            with ui.row().classes("w-full justify-end"):
                ui.button("Cancel", on_click=self.dialog.close).props("flat")
                ui.button("Save", on_click=self.save).mark("label-save")
        self.input.on("keydown.enter", self.save)

    def open(self, run: dict[str, Any]) -> None:
        self.run = run
        self.title.set_text(f"Label of {run['name']}")
        self.input.value = run["label"]
        self.dialog.open()

    def save(self) -> None:
        try:
            self.services.manager.set_label(self.run["id"], self.input.value)
        except ValueError as err:
            ui.notify(str(err), type="negative")
            return
        self.dialog.close()
        self.saved()


class DeleteDialog:
    """Confirm, then delete a run's folder."""

    def __init__(self, services: Services, deleted: Any):
        self.services, self.deleted = services, deleted
        self.run: dict[str, Any] = {}
        with ui.dialog() as self.dialog, ui.card().classes("w-[28rem]"):
            self.text = ui.label("").classes("whitespace-pre-line").mark("delete-text")
            with ui.row().classes("w-full justify-end"):
                ui.button("Cancel", on_click=self.dialog.close).props("flat").mark("delete-cancel")
                ui.button("Delete", icon="delete", on_click=self.delete).props("color=negative") \
                    .mark("delete-confirm")

    def open(self, run: dict[str, Any]) -> None:
        if run["status"] in ACTIVE:
            ui.notify(f"Cannot delete {run['name']}: it is {run['status']}; stop it first", type="negative")
            return
        self.run = run
        self.text.set_text(f"Delete run {run['name']} ({run['id']})?\nIts folder in the workspace (config, metrics, "
                           f"{run['checkpoints']} checkpoint(s)) is removed for good.")
        self.dialog.open()

    def delete(self) -> None:
        self.dialog.close()
        try:
            self.services.manager.delete(self.run["id"])
        except ValueError as err:
            ui.notify(f"Not deleted: {err}", type="negative")
            return
        self.services.watchers.drop(self.run["id"])
        ui.notify(f"Run {self.run['name']} deleted")
        self.deleted()


class ForkDialog:
    """Fork a run from one of its checkpoints with a new name, learning rate and length."""

    def __init__(self, services: Services):
        self.services = services
        self.run: dict[str, Any] = {}
        self.cfg: dict[str, Any] = {}
        with ui.dialog() as self.dialog, ui.card().classes("w-[30rem]"):
            self.title = ui.label("").classes("font-semibold")
            ui.label("The fork starts from the checkpoint's weights and optimizer state with the values below; "
                     "everything else is the parent's config.").classes("text-sm text-grey-7")
            self.checkpoint = ui.select({}, label="Checkpoint").props("dense outlined").classes("w-full") \
                .mark("fork-checkpoint")
            self.name = ui.input("Name").props("dense outlined").classes("w-full").mark("fork-name")
            with ui.row().classes("w-full gap-3 no-wrap"):
                self.lr = ui.number("Learning rate", step=1e-5).props("dense outlined").classes("grow") \
                    .mark("fork-learning_rate")
                self.iters = ui.number("Iterations").props("dense outlined").classes("grow").mark("fork-iters")
                self.epochs = ui.number("Epochs", step=0.5).props("dense outlined").classes("grow") \
                    .mark("fork-epochs")
            self.problems = ui.label("").classes("text-negative text-sm whitespace-pre-line").mark("fork-problems")
            with ui.row().classes("w-full justify-end"):
                ui.button("Cancel", on_click=self.dialog.close).props("flat")
                ui.button("Start fork", icon="call_split", on_click=self.fork).mark("fork-start")

    def open(self, run: dict[str, Any]) -> None:
        try:
            folder = self.services.manager.folder(run["id"])
            cfg, its = folder.config(), folder.checkpoint_iterations()
        except (ValueError, OSError) as err:
            ui.notify(f"Cannot fork: {err}", type="negative")
            return
        if not its:
            ui.notify(f"Cannot fork {run['name']}: it has no checkpoint", type="negative")
            return
        self.run, self.cfg = run, cfg
        best = run["best_iteration"] if run["best_iteration"] in its else its[-1]
        self.title.set_text(f"Fork {run['name']}")
        self.checkpoint.set_options({it: f"iteration {it}" + (" (best)" if it == run["best_iteration"] else "")
                                     for it in its}, value=best)
        self.name.value = f"{run['name']}-fork"
        self.lr.value = cfg.get("learning_rate")
        by_epochs = cfg.get("epochs") is not None
        self.iters.set_visibility(not by_epochs)
        self.epochs.set_visibility(by_epochs)
        self.iters.value = run_index.default_fork_iters(cfg, best)
        self.epochs.value = cfg.get("epochs")
        self.problems.set_text("")
        self.dialog.open()

    def fork(self) -> None:
        it = self.checkpoint.value
        overrides, problems = run_index.fork_overrides(
            self.cfg, it, {"name": self.name.value, "learning_rate": self.lr.value, "iters": self.iters.value,
                           "epochs": self.epochs.value})
        if problems:
            self.problems.set_text("\n".join(f"• {p}" for p in problems))
            return
        try:
            folder = self.services.manager.fork(self.run["id"], it, overrides)
        except ValueError as err:
            self.problems.set_text(f"• {err}")
            return
        self.dialog.close()
        ui.notify(f"Fork {folder.id} started", type="positive")
        ui.navigate.to(f"/monitor/{folder.id}")


class RunsPage:
    """The runs table with its filters, the Compare button and the row actions."""

    def __init__(self, services: Services):
        self.services = services
        self.rows: list[dict[str, Any]] = []
        self._stamp: tuple[tuple[str, int], ...] | None = None
        ui.label("Runs").classes("text-2xl font-semibold")
        with ui.row().classes("w-full items-end gap-3"):
            self.filters = Filters(self.show)
            ui.space()
            self.compare_btn = ui.button("Compare", icon="compare_arrows", on_click=self.compare) \
                .mark("runs-compare")
            self.compare_btn.tooltip("Select two or more runs to compare them")
        self.table = ui.table(columns=COLUMNS, rows=[], row_key="id", selection="multiple",
                              pagination={"rowsPerPage": 15, "sortBy": "date", "descending": True},
                              on_select=self.update_compare).classes("w-full").props("flat bordered dense") \
            .mark("runs-table")
        for slot, template in SLOTS.items():
            self.table.add_slot(slot, template)
        self.empty = ui.label("No runs yet: start one on the Train page.").classes("text-grey-7").mark("runs-empty")
        self.label_dialog = LabelDialog(services, self.refresh)
        self.delete_dialog = DeleteDialog(services, self.refresh)
        self.fork_dialog = ForkDialog(services)
        self.table.on("row_action", self.on_action)
        on_change(self.listing, self.show, POLL_SECONDS)

    def listing(self) -> list[dict[str, Any]]:
        """The rows, read again when the runs folder changed or a run is active (its duration, its end)."""
        stamp = run_index.listing_stamp(self.services.workspace.runs)
        if stamp != self._stamp or any(r["status"] in ACTIVE for r in self.rows):
            self.rows = [table_row(run_index.run_row(info)) for info in self.services.manager.list()]
            self._stamp = stamp
        return self.rows

    def show(self) -> None:
        rows = self.filters.apply(self.rows)
        if rows != self.table.rows:
            self.table.rows = rows
        ids = {r["id"] for r in rows}
        kept = [r for r in self.table.selected if r["id"] in ids]
        if len(kept) != len(self.table.selected):
            self.table.selected = kept
        self.empty.set_visibility(not self.rows)
        self.empty.set_text("No runs yet: start one on the Train page." if not self.rows else "")
        self.update_compare()

    def refresh(self) -> None:
        self._stamp = None
        self.listing()
        self.show()

    def update_compare(self) -> None:
        self.compare_btn.set_enabled(len(self.table.selected) >= 2)

    def compare(self) -> None:
        ids = [r["id"] for r in self.table.selected]
        if len(ids) < 2:
            ui.notify("Select two or more runs to compare", type="warning")
            return
        ui.navigate.to("/compare?runs=" + ",".join(ids))

    def on_action(self, e: events.GenericEventArguments) -> None:
        action, run_id = (e.args or {}).get("action"), (e.args or {}).get("id")
        run = next((r for r in self.rows if r["id"] == run_id), None)
        if run is None:
            ui.notify(f"Run {run_id} is no longer in the workspace", type="warning")
            return
        if action == "open":
            ui.navigate.to(f"/runs/{run_id}")
        elif action == "clone":
            ui.navigate.to(f"/train?from={run_id}")
        elif action == "label":
            self.label_dialog.open(run)
        elif action == "delete":
            self.delete_dialog.open(run)
        elif action == "resume":
            self.resume(run)
        elif action == "fork":
            self.fork_dialog.open(run)

    def resume(self, run: dict[str, Any]) -> None:
        try:
            folder = self.services.manager.resume(run["id"])
        except ValueError as err:
            ui.notify(f"Cannot resume: {err}", type="negative")
            return
        ui.notify(f"Resuming {folder.id}", type="positive")
        ui.navigate.to(f"/monitor/{folder.id}")
