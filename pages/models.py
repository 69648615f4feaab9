"""Models page: the catalogue (workspace, published, HF cache), imports with progress and cancel, deletion
(workspace only, confirmed), and the system panel.

Everything it shows comes from :mod:`services.library` and :mod:`services.system`; imports run in a child
process (:class:`services.library.imports.ImportJob`) kept on ``services.model_imports`` so they go on while
the person browses elsewhere. One ``ui.timer`` polls the job and the machine status.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from nicegui import events, run, ui

from services.library.imports import ImportJob, hub_offline_reason, source_kind
from services.library.models import LibraryError, delete_model, hub_cached_models, list_models
from services.system import mlx_device, mlx_processes
from services.units import human_bytes, human_count

if TYPE_CHECKING:
    from app.composition import Services

SOURCES = {"hub": "Hugging Face Hub", "folder": "Local folder", "gguf": "GGUF file"}
SOURCE_HINTS = {"hub": "repo id, e.g. HuggingFaceTB/SmolLM2-135M-Instruct",
                "folder": "path of a model folder with config.json and .safetensors",
                "gguf": "path of a llama .gguf file"}
SOURCE_FIELDS = {"hub": "Repo id", "folder": "Folder", "gguf": "GGUF file"}
SOURCE_LABELS = {"workspace": "workspace", "published": "published", "hf-cache": "HF cache"}
COLUMNS: list[dict[str, Any]] = [
    {"name": "name", "label": "Model", "field": "name", "sortable": True, "align": "left"},
    {"name": "source", "label": "Source", "field": "source_text", "sortable": True, "align": "left"},
    {"name": "arch", "label": "Architecture", "field": "arch", "sortable": True, "align": "left"},
    {"name": "params", "label": "Parameters", "field": "params_text", "sortable": True},
    {"name": "dtype", "label": "Dtype / quantization", "field": "dtype", "sortable": True, "align": "left"},
    {"name": "size", "label": "On disk", "field": "size_text", "sortable": True},
    {"name": "context", "label": "Context", "field": "context", "sortable": True},
    {"name": "chat", "label": "Chat template", "field": "chat_text", "align": "center"},
    {"name": "actions", "label": "", "field": "key", "align": "right"},
]
SLOTS = {
    "body-cell-actions": '<q-td :props="props" auto-width><q-btn v-if="props.row.deletable" flat dense round '
                         'size="sm" icon="delete" @click.stop="$parent.$emit(\'delete_model\', props.row.key)">'
                         '<q-tooltip>Delete from the workspace</q-tooltip></q-btn></q-td>',
}


def model_rows(models: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Table rows for :func:`services.library.models.list_models` entries."""
    return [{**m, "source_text": SOURCE_LABELS.get(m["source"], m["source"]), "params_text": human_count(m["params"]),
             "size_text": human_bytes(m["disk_bytes"]), "chat_text": "yes" if m["chat_template"] else "no",
             "context": m["context"] or "?"} for m in models]


def system_lines(services: Services) -> list[tuple[str, str]]:
    """(label, value) pairs of the system panel; MLX figures only from processes that have MLX."""
    status = services.status.snapshot()
    sysd, active = status.get("system") or {}, status.get("active")
    lines = [("CPU", f"{sysd.get('cpu_percent', 0):.0f}% of {sysd.get('cpu_count') or '?'} cores"),
             ("RAM", f"{sysd.get('ram_used_gb', 0):.1f} of {sysd.get('ram_total_gb', 0):.1f} GB used"),
             ("Swap", f"{sysd.get('swap_used_gb', 0):.1f} of {sysd.get('swap_total_gb', 0):.1f} GB used")]
    procs = mlx_processes(services.workspace, active, services.models.status)
    for p in procs:
        parts = [f"peak {p['peak_gb']:.2f} GB" if p.get("peak_gb") is not None else None,
                 f"active {p['active_gb']:.2f} GB" if p.get("active_gb") is not None else None,
                 f"RSS {p['rss_gb']:.2f} GB" if p.get("rss_gb") is not None else None]
        lines.append((f"MLX · {p['source']}", " · ".join(x for x in parts if x) or "no figures yet"))
    if not procs:
        lines.append(("MLX", "no training run or loaded model"))
    lines += [("BLAS", f"{sysd.get('blas', '?')} ({sysd.get('blas_source', '?')})"),
              ("Device", mlx_device(services.workspace, active))]
    if sysd.get("disk_free_gb") is not None:
        lines.append(("Disk", f"{sysd['disk_free_gb']:.1f} GB free in the workspace"))
    return lines


def system_card(services: Services) -> None:
    """A small card with CPU, RAM, swap, MLX memory, BLAS, device and free disk, refreshed every 2 s."""
    with ui.card().classes("w-full").mark("system-panel"):
        ui.label("System").classes("text-sm font-semibold text-grey-7")
        grid = ui.grid(columns="auto 1fr").classes("gap-x-3 gap-y-1 text-sm")

        def update() -> None:
            grid.clear()
            with grid:
                for label, value in system_lines(services):
                    ui.label(label).classes("text-grey-7")
                    ui.label(value)

        update()
        ui.timer(2.0, update)


def models_page(services: Services) -> None:
    """Build the Models page for one client."""
    ws = services.workspace
    state: dict[str, Any] = {"job_version": -1, "pending": None}

    ui.label("Models").classes("text-2xl font-semibold")
    with ui.row().classes("w-full items-start gap-4 no-wrap max-lg:flex-wrap"):
        with ui.column().classes("grow gap-3 min-w-0"):
            with ui.card().classes("w-full"):
                with ui.row().classes("w-full items-center"):
                    ui.label("Local models").classes("text-sm font-semibold text-grey-7")
                    ui.space()
                    ui.button(icon="refresh", on_click=lambda: refresh()).props("flat round dense") \
                        .tooltip("scan again").mark("models-refresh")
                table = ui.table(columns=COLUMNS, rows=[], row_key="key", pagination=15) \
                    .props("dense flat").classes("w-full").mark("models-table")
                for name, template in SLOTS.items():
                    table.add_slot(name, template)
                empty = ui.label("No models yet: import one below, or run `forgellm demo`.") \
                    .classes("text-sm text-grey-7").mark("models-empty")
            with ui.card().classes("w-full").mark("import-card"):
                ui.label("Import a model").classes("text-sm font-semibold text-grey-7")
                with ui.row().classes("w-full items-end gap-3"):
                    kind = ui.toggle(SOURCES, value="hub", on_change=lambda: update_kind()) \
                        .props("dense no-caps").mark("import-kind")
                with ui.row().classes("w-full items-end gap-3"):
                    source = ui.input("Repo id", placeholder=SOURCE_HINTS["hub"]).props("dense outlined") \
                        .classes("w-[28rem]").mark("import-source")
                    name = ui.input("Name in models/ (optional)").props("dense outlined").classes("w-64") \
                        .mark("import-name")
                    link = ui.switch("Link instead of copy").mark("import-link")
                    dequantize = ui.switch("Dequantize to float32").mark("import-dequantize")
                    dequantize.tooltip("Write float32 weights: larger on disk, about 3x faster on the CPU backend")
                    start_btn = ui.button("Import", icon="download", on_click=lambda: start()).mark("import-start")
                with ui.row().classes("w-full items-center gap-3") as progress_row:
                    bar = ui.linear_progress(value=0, show_value=False).classes("w-96").mark("import-progress")
                    job_text = ui.label("").classes("text-sm").mark("import-message")
                    cancel_btn = ui.button("Cancel", icon="close", on_click=lambda: cancel()) \
                        .props("flat dense").mark("import-cancel")
        with ui.column().classes("w-[360px] max-lg:w-full gap-3 shrink-0"):
            system_card(services)

    with ui.dialog() as delete_dialog, ui.card().classes("w-[28rem]"):
        delete_text = ui.label("").classes("text-sm")
        with ui.row().classes("w-full justify-end"):
            ui.button("Cancel", on_click=delete_dialog.close).props("flat").mark("model-delete-cancel")
            ui.button("Delete", color="negative", on_click=lambda: do_delete()).mark("model-delete-confirm")

    # -- behaviour --------------------------------------------------------------------------------

    async def refresh() -> None:
        models = await run.io_bound(list_models, ws)
        table.rows = model_rows(models or [])
        empty.set_visibility(not models)

    def update_kind() -> None:
        k = kind.value
        source.props["label"] = SOURCE_FIELDS[k]
        source.props["placeholder"] = SOURCE_HINTS[k]
        link.set_visibility(k == "folder")
        dequantize.set_visibility(k == "gguf")

    def current_job() -> ImportJob | None:
        return services.model_imports[-1] if services.model_imports else None

    async def start() -> None:
        text = (source.value or "").strip()
        if not text:
            ui.notify("Enter a repo id, folder or GGUF file first", type="warning")
            return
        job = current_job()
        if job is not None and job.state == "running":
            ui.notify("An import is already running", type="warning")
            return
        try:
            kind_found = source_kind(text)
            if kind_found != kind.value:
                raise LibraryError(f"{text}: looks like a {SOURCES[kind_found]} source, not a {SOURCES[kind.value]}")
            if kind_found == "hub":  # fail fast and clearly when offline (the cache is tried in the job)
                reason = await run.io_bound(hub_offline_reason)
                if reason and not any(r == text for r, _ in hub_cached_models()):
                    raise LibraryError(f"cannot download {text} from the Hugging Face Hub: {reason}. Import a local "
                                       "folder or GGUF file instead, or retry when online.")
            job = ImportJob(ws, text, (name.value or "").strip() or None, link=bool(link.value),
                            dequantize=bool(dequantize.value)).start()
        except LibraryError as e:
            job_text.set_text(str(e))
            job_text.classes(replace="text-sm text-negative")
            progress_row.set_visibility(True)
            bar.set_visibility(False)
            cancel_btn.set_visibility(False)
            return
        services.model_imports.append(job)
        poll()

    def cancel() -> None:
        job = current_job()
        if job is not None:
            job.cancel()

    def poll() -> None:
        job = current_job()
        if job is None or job.version == state["job_version"]:
            return
        state["job_version"] = job.version
        progress_row.set_visibility(True)
        running = job.state == "running"
        bar.set_visibility(running or job.state == "done")
        if job.fraction is None and running:
            bar.props("indeterminate")
        else:
            bar.props(remove="indeterminate")
        bar.set_value(job.fraction or 0)
        cancel_btn.set_visibility(running)
        start_btn.set_enabled(not running)
        color = {"failed": "text-negative", "done": "text-positive"}.get(job.state, "")
        job_text.classes(replace=f"text-sm {color}")
        job_text.set_text(f"{job.source} → models/{job.name}: {job.message}")
        if job.state != "running" and state.get("refreshed") != id(job):
            state["refreshed"] = id(job)
            if job.state == "done":
                ui.notify(f"Imported models/{job.name}", type="positive")
            ui.timer(0.01, refresh, once=True)

    def ask_delete(e: events.GenericEventArguments) -> None:
        key = e.args
        row = next((r for r in table.rows if r["key"] == key), None)
        if row is None or not row["deletable"]:
            ui.notify("Only models inside the workspace can be deleted", type="warning")
            return
        users = [r["id"] for r in services.manager.active()
                 if r.get("model") and Path(r["model"]).resolve() == Path(row["path"]).resolve()]
        if users:
            ui.notify(f"{key} is used by the running run {users[0]}; stop it first", type="warning")
            return
        state["pending"] = key
        what = "the link (the linked folder stays)" if row["linked"] else f"{human_bytes(row['disk_bytes'])} on disk"
        delete_text.set_text(f"Delete {'published/' if row['source'] == 'published' else 'models/'}"
                             f"{row['name'].removeprefix('published/')}? This removes {what}.")
        delete_dialog.open()

    async def do_delete() -> None:
        key = state["pending"]
        delete_dialog.close()
        try:
            path = await run.io_bound(delete_model, ws, key)
        except (LibraryError, ValueError, OSError) as e:
            ui.notify(f"Could not delete {key}: {e}", type="negative", multi_line=True)
            return
        ui.notify(f"Deleted {path}")
        await refresh()

    table.on("delete_model", ask_delete)
    update_kind()
    progress_row.set_visibility(False)
    state["job_version"] = -1
    poll()
    ui.timer(0.5, poll)
    ui.timer(0.01, refresh, once=True)  # the HF cache scan happens after the page is built
