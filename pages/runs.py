"""Runs page: every run of the workspace in one paginated, sortable table, with search, filters and row actions.

Rows come from :mod:`services.training.index`; the actions call
:class:`services.training.manager.RunManager` (label, delete, resume, fork) or navigate (open, clone into Train,
compare). One ``ui.timer`` per page re-reads the run list when the runs folder changed or a run is active.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from nicegui import events, ui

from pages.common import METHODS, MODES, STATUS_COLORS, fmt_loss, page_column
from services.config import FINE_TUNE_TYPES
from services.training import index as run_index
from services.training.folder import ACTIVE
from services.units import clock

if TYPE_CHECKING:
    from app.composition import Services

POLL_SECONDS = 2.0
ACTIONS = (("open", "open_in_new", "Open"), ("label", "sell", "Edit label"), ("clone", "content_copy",
           "Clone config into Train"), ("resume", "play_arrow", "{{ props.row.status === 'waiting' ? "
           "'Start now (it is waiting in the queue)' : 'Resume' }}"), ("fork", "call_split",
           "Fork from a checkpoint"), ("delete", "delete", "Delete"))
COLUMNS: list[dict[str, Any]] = [
    {"name": "name", "label": "Run", "field": "name", "sortable": True, "align": "left"},
    {"name": "status", "label": "Status", "field": "status", "sortable": True, "align": "left"},
    {"name": "mode", "label": "Mode", "field": "mode_text", "sortable": True, "align": "left"},
    {"name": "method", "label": "Method", "field": "method_text", "sortable": True, "align": "left"},
    {"name": "model", "label": "Base model", "field": "model", "sortable": True, "align": "left"},
    {"name": "dataset", "label": "Dataset", "field": "dataset", "sortable": True, "align": "left"},
    {"name": "best_val_loss", "label": "Best val loss", "field": "best_val_loss", "sortable": True},
    {"name": "duration", "label": "Duration", "field": "duration", "sortable": True},
    {"name": "date", "label": "Date", "field": "date", "sortable": True, "align": "left"},
    {"name": "label", "label": "Label", "field": "label", "sortable": True, "align": "left"},
    {"name": "actions", "label": "", "field": "id", "align": "right"},
]
_EMIT = "$parent.$emit('row_action', {{action: '{action}', id: props.row.id}})"
_ACTION_BUTTONS = "".join(
    f'<q-btn flat dense round size="sm" icon="{icon}" @click.stop="{_EMIT.format(action=action)}">'
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
        _build_runs(services)


def _build_runs(services: Services) -> None:
    manager = services.manager
    state: dict[str, Any] = {"rows": [], "stamp": None, "target": None}

    ui.label("Runs").classes("text-2xl font-semibold")
    with ui.row().classes("w-full items-end gap-3"):
        search = ui.input("Search", on_change=lambda: show()).props("dense outlined clearable") \
            .classes("w-72").mark("runs-search")
        status = ui.select(list(STATUS_COLORS), label="Status", multiple=True, on_change=lambda: show()) \
            .props("dense outlined clearable use-chips").classes("w-56").mark("runs-status")
        mode = ui.select(dict(MODES), label="Mode", multiple=True, on_change=lambda: show()) \
            .props("dense outlined clearable use-chips").classes("w-48").mark("runs-mode")
        method = ui.select({m: METHODS[m] for m in FINE_TUNE_TYPES}, label="Method", multiple=True,
                           on_change=lambda: show()).props("dense outlined clearable use-chips").classes("w-48") \
            .mark("runs-method")
        ui.space()
        compare_btn = ui.button("Compare", icon="compare_arrows", on_click=lambda: compare()).mark("runs-compare")
        compare_btn.tooltip("Select two or more runs to compare them")
    table = ui.table(columns=COLUMNS, rows=[], row_key="id", selection="multiple",
                     pagination={"rowsPerPage": 15, "sortBy": "date", "descending": True},
                     on_select=lambda: update_compare()).classes("w-full").props("flat bordered dense") \
        .mark("runs-table")
    for slot, template in SLOTS.items():
        table.add_slot(slot, template)
    empty = ui.label("No runs yet: start one on the Train page.").classes("text-grey-7").mark("runs-empty")

    # -- dialogs (built once, filled on open) ------------------------------------------------------
    with ui.dialog() as label_dialog, ui.card().classes("w-96"):
        label_title = ui.label("").classes("font-semibold")
        label_input = ui.input("Label").props("dense outlined autofocus clearable").classes("w-full") \
            .mark("label-input")
        with ui.row().classes("w-full justify-end"):
            ui.button("Cancel", on_click=label_dialog.close).props("flat")
            ui.button("Save", on_click=lambda: save_label()).mark("label-save")
    label_input.on("keydown.enter", lambda: save_label())

    with ui.dialog() as delete_dialog, ui.card().classes("w-[28rem]"):
        delete_text = ui.label("").classes("whitespace-pre-line").mark("delete-text")
        with ui.row().classes("w-full justify-end"):
            ui.button("Cancel", on_click=delete_dialog.close).props("flat").mark("delete-cancel")
            ui.button("Delete", icon="delete", on_click=lambda: delete()).props("color=negative") \
                .mark("delete-confirm")

    with ui.dialog() as fork_dialog, ui.card().classes("w-[30rem]"):
        fork_title = ui.label("").classes("font-semibold")
        ui.label("The fork starts from the checkpoint's weights and optimizer state with the values below; "
                 "everything else is the parent's config.").classes("text-sm text-grey-7")
        fork_ckpt = ui.select({}, label="Checkpoint").props("dense outlined").classes("w-full").mark("fork-checkpoint")
        fork_name = ui.input("Name").props("dense outlined").classes("w-full").mark("fork-name")
        with ui.row().classes("w-full gap-3 no-wrap"):
            fork_lr = ui.number("Learning rate", step=1e-5).props("dense outlined").classes("grow") \
                .mark("fork-learning_rate")
            fork_iters = ui.number("Iterations").props("dense outlined").classes("grow").mark("fork-iters")
            fork_epochs = ui.number("Epochs", step=0.5).props("dense outlined").classes("grow").mark("fork-epochs")
        fork_problems = ui.label("").classes("text-negative text-sm whitespace-pre-line").mark("fork-problems")
        with ui.row().classes("w-full justify-end"):
            ui.button("Cancel", on_click=fork_dialog.close).props("flat")
            ui.button("Start fork", icon="call_split", on_click=lambda: fork()).mark("fork-start")

    # -- behaviour ---------------------------------------------------------------------------------

    def load() -> None:
        state["rows"] = [table_row(run_index.run_row(info)) for info in manager.list()]
        state["stamp"] = run_index.listing_stamp(services.workspace.runs)

    def show() -> None:
        rows = run_index.filter_rows(state["rows"], search.value or "", status.value or None, mode.value or None,
                                     method.value or None)
        if rows != table.rows:
            table.rows = rows
        ids = {r["id"] for r in rows}
        kept = [r for r in table.selected if r["id"] in ids]
        if len(kept) != len(table.selected):
            table.selected = kept
        empty.set_visibility(not state["rows"])
        empty.set_text("No runs yet: start one on the Train page." if not state["rows"] else "")
        update_compare()

    def poll() -> None:
        stamp = run_index.listing_stamp(services.workspace.runs)
        if stamp != state["stamp"] or any(r["status"] in ACTIVE for r in state["rows"]):
            previous = state["rows"]
            load()
            if state["rows"] != previous:
                show()

    def update_compare() -> None:
        compare_btn.set_enabled(len(table.selected) >= 2)

    def compare() -> None:
        ids = [r["id"] for r in table.selected]
        if len(ids) < 2:
            ui.notify("Select two or more runs to compare", type="warning")
            return
        ui.navigate.to("/compare?runs=" + ",".join(ids))

    def row(run_id: str) -> dict[str, Any] | None:
        return next((r for r in state["rows"] if r["id"] == run_id), None)

    def on_action(e: events.GenericEventArguments) -> None:
        action, run_id = (e.args or {}).get("action"), (e.args or {}).get("id")
        r = row(run_id) if isinstance(run_id, str) else None
        if r is None:
            ui.notify(f"Run {run_id} is no longer in the workspace", type="warning")
            return
        state["target"] = r
        if action == "open":
            ui.navigate.to(f"/runs/{run_id}")
        elif action == "clone":
            ui.navigate.to(f"/train?from={run_id}")
        elif action == "label":
            label_title.set_text(f"Label of {r['name']}")
            label_input.value = r["label"]
            label_dialog.open()
        elif action == "delete":
            ask_delete(r)
        elif action == "resume":
            resume(r)
        elif action == "fork":
            open_fork(r)

    def save_label() -> None:
        r = state["target"]
        try:
            manager.set_label(r["id"], label_input.value)
        except ValueError as err:
            ui.notify(str(err), type="negative")
            return
        label_dialog.close()
        refresh()

    def ask_delete(r: dict[str, Any]) -> None:
        if r["status"] in ACTIVE:
            ui.notify(f"Cannot delete {r['name']}: it is {r['status']}; stop it first", type="negative")
            return
        delete_text.set_text(f"Delete run {r['name']} ({r['id']})?\nIts folder in the workspace (config, metrics, "
                             f"{r['checkpoints']} checkpoint(s)) is removed for good.")
        delete_dialog.open()

    def delete() -> None:
        r = state["target"]
        delete_dialog.close()
        try:
            manager.delete(r["id"])
        except ValueError as err:
            ui.notify(f"Not deleted: {err}", type="negative")
            return
        services.watchers.drop(r["id"])
        ui.notify(f"Run {r['name']} deleted")
        refresh()

    def resume(r: dict[str, Any]) -> None:
        try:
            folder = manager.resume(r["id"])
        except ValueError as err:
            ui.notify(f"Cannot resume: {err}", type="negative")
            return
        ui.notify(f"Resuming {folder.id}", type="positive")
        ui.navigate.to(f"/monitor/{folder.id}")

    def open_fork(r: dict[str, Any]) -> None:
        try:
            folder = manager.folder(r["id"])
            cfg, its = folder.config(), folder.checkpoint_iterations()
        except (ValueError, OSError) as err:
            ui.notify(f"Cannot fork: {err}", type="negative")
            return
        if not its:
            ui.notify(f"Cannot fork {r['name']}: it has no checkpoint", type="negative")
            return
        best = r["best_iteration"] if r["best_iteration"] in its else its[-1]
        fork_title.set_text(f"Fork {r['name']}")
        fork_ckpt.set_options({it: f"iteration {it}" + (" (best)" if it == r["best_iteration"] else "")
                               for it in its}, value=best)
        fork_name.value = f"{r['name']}-fork"
        fork_lr.value = cfg.get("learning_rate")
        by_epochs = cfg.get("epochs") is not None
        fork_iters.set_visibility(not by_epochs)
        fork_epochs.set_visibility(by_epochs)
        fork_iters.value = run_index.default_fork_iters(cfg, best)
        fork_epochs.value = cfg.get("epochs")
        fork_problems.set_text("")
        state["fork_cfg"] = cfg
        fork_dialog.open()

    def fork() -> None:
        r, it = state["target"], fork_ckpt.value
        overrides, problems = run_index.fork_overrides(
            state["fork_cfg"], it, {"name": fork_name.value, "learning_rate": fork_lr.value, "iters": fork_iters.value,
                                    "epochs": fork_epochs.value})
        if problems:
            fork_problems.set_text("\n".join(f"• {p}" for p in problems))
            return
        try:
            folder = manager.fork(r["id"], it, overrides)
        except ValueError as err:
            fork_problems.set_text(f"• {err}")
            return
        fork_dialog.close()
        ui.notify(f"Fork {folder.id} started", type="positive")
        ui.navigate.to(f"/monitor/{folder.id}")

    def refresh() -> None:
        load()
        show()

    table.on("row_action", on_action)
    refresh()
    ui.timer(POLL_SECONDS, poll)
