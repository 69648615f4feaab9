"""Models page: the catalogue (workspace, published, HF cache), imports with progress and cancel, deletion
(workspace only, confirmed), and the system panel.

Everything it shows comes from :mod:`services.library` and :mod:`services.system`; imports run in a child
process admitted by ``services.model_imports`` (:class:`services.library.imports.ImportJobs`), so they go on
while the person browses elsewhere. The page is three components: :class:`ModelTable`, :class:`ImportCard` and
:class:`SystemCard`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nicegui import background_tasks, events, run, ui

from pages.common import entered, is_local_client
from services.jobs import DONE, FAILED
from services.library.imports import SOURCE_KINDS, ImportBusy, ImportJob, quantized_gguf_warning
from services.library.models import LibraryError, check_deletable, delete_model, list_models
from services.system import mlx_backend, mlx_device, mlx_processes
from services.units import human_bytes, human_count

if TYPE_CHECKING:
    from app.composition import Services

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


class SystemCard:
    """CPU, RAM, swap, MLX memory, BLAS, device and free disk, refreshed every 2 s in place."""

    def __init__(self, services: Services) -> None:
        self.services = services
        self.rows: list[tuple[ui.label, ui.label]] = []
        with ui.card().classes("w-full").mark("system-panel"):
            ui.label("System").classes("text-sm font-semibold text-grey-7")
            self.grid = ui.grid(columns="auto 1fr").classes("gap-x-3 gap-y-1 text-sm")
        self.update()
        ui.timer(2.0, self.update)

    def update(self) -> None:
        lines = system_lines(self.services)
        if len(lines) != len(self.rows):  # an MLX process came or went: lay the grid out again
            self.grid.clear()
            with self.grid:
                self.rows = [(ui.label().classes("text-grey-7"), ui.label()) for _ in lines]
        for (label_el, value_el), (label, value) in zip(self.rows, lines, strict=True):
            label_el.set_text(label)
            value_el.set_text(value)


class ModelTable:
    """The catalogue table with a rescan button, and deletion behind a confirmation dialog."""

    def __init__(self, services: Services) -> None:
        self.services = services
        self.pending: str | None = None
        with ui.card().classes("w-full"):
            with ui.row().classes("w-full items-center"):
                ui.label("Local models").classes("text-sm font-semibold text-grey-7")
                ui.space()
                ui.button(icon="refresh", on_click=self.refresh).props("flat round dense") \
                    .tooltip("scan again").mark("models-refresh")
            self.table = ui.table(columns=COLUMNS, rows=[], row_key="key", pagination=15) \
                .props("dense flat").classes("w-full").mark("models-table")
            for name, template in SLOTS.items():
                self.table.add_slot(name, template)
            self.empty = ui.label("No models yet: import one below, or run `forgellm demo`.") \
                .classes("text-sm text-grey-7").mark("models-empty")
        with ui.dialog() as self.dialog, ui.card().classes("w-[28rem]"):
            self.delete_text = ui.label("").classes("text-sm")
            with ui.row().classes("w-full justify-end"):
                ui.button("Cancel", on_click=self.dialog.close).props("flat").mark("model-delete-cancel")
                ui.button("Delete", color="negative", on_click=self.delete).mark("model-delete-confirm")
        self.table.on("delete_model", self.ask_delete)

    async def refresh(self) -> None:
        models = await run.io_bound(list_models, self.services.workspace)
        self.table.rows = model_rows(models or [])
        self.empty.set_visibility(not models)

    def ask_delete(self, e: events.GenericEventArguments) -> None:
        key = e.args
        row = next((r for r in self.table.rows if r["key"] == key), None)
        if row is None or not row["deletable"]:
            ui.notify("Only models inside the workspace can be deleted", type="warning")
            return
        try:
            check_deletable(self.services.workspace, key, self.services.manager.active())
        except LibraryError as err:
            ui.notify(str(err), type="warning")
            return
        self.pending = key
        what = "the link (the linked folder stays)" if row["linked"] else f"{human_bytes(row['disk_bytes'])} on disk"
        self.delete_text.set_text(f"Delete {'published/' if row['source'] == 'published' else 'models/'}"
                                  f"{row['name'].removeprefix('published/')}? This removes {what}.")
        self.dialog.open()

    async def delete(self) -> None:
        key = self.pending
        self.dialog.close()
        if key is None:
            return
        try:
            path = await run.io_bound(delete_model, self.services.workspace, key, self.services.manager.active())
        except (LibraryError, ValueError, OSError) as e:
            ui.notify(f"Could not delete {key}: {e}", type="negative", multi_line=True)
            return
        ui.notify(f"Deleted {path}")
        await self.refresh()


class ImportCard:
    """The import form (Hub repo, folder or GGUF file) and the current import's progress, message and Cancel."""

    def __init__(self, services: Services, on_imported: Callable[[], Awaitable[None]]) -> None:
        self.services, self.on_imported = services, on_imported
        self.imports = services.model_imports
        self.local = is_local_client()  # a browser on this machine may import its folders and files
        self.seen: tuple[int, int] | None = None  # (id, version) of the job last shown
        self.refreshed: int | None = None  # id of the ended job the table was rescanned for
        with ui.card().classes("w-full").mark("import-card"):
            ui.label("Import a model").classes("text-sm font-semibold text-grey-7")
            with ui.row().classes("w-full items-end gap-3"):
                self.kind = ui.toggle(SOURCE_KINDS, value="hub", on_change=self.update_kind) \
                    .props("dense no-caps").mark("import-kind")
            with ui.row().classes("w-full items-end gap-3"):
                self.source = ui.input("Repo id", placeholder=SOURCE_HINTS["hub"]).props("dense outlined") \
                    .classes("w-[28rem]").mark("import-source")
                self.name = ui.input("Name in models/ (optional)").props("dense outlined").classes("w-64") \
                    .mark("import-name")
                self.link = ui.switch("Link instead of copy").mark("import-link")
                self.dequantize = ui.switch("Dequantize to float32").mark("import-dequantize")
                self.dequantize.tooltip("Write float32 weights: larger on disk, about 3x faster on the CPU backend")
                self.start_btn = ui.button("Import", icon="download", on_click=self.start).mark("import-start")
            with ui.row().classes("w-full items-center gap-3") as self.quant_row:
                ui.icon("warning", color="warning")
                self.quant_warning = ui.label("").classes("text-sm max-w-[56rem]").mark("import-quantized-warning")
                ui.button("Import float weights", icon="speed", on_click=lambda: self.dequantize.set_value(True)) \
                    .props("outline dense no-caps").mark("import-use-float")
            with ui.row().classes("w-full items-center gap-3") as self.progress_row:
                self.bar = ui.linear_progress(value=0, show_value=False).classes("w-96").mark("import-progress")
                self.message = ui.label("").classes("text-sm").mark("import-message")
                self.cancel_btn = ui.button("Cancel", icon="close", on_click=self.cancel) \
                    .props("flat dense").mark("import-cancel")
        self.bar.bind_value_from(self.imports, "current", backward=lambda job: (job.fraction or 0) if job else 0)
        self.source.on_value_change(self.update_warning)
        self.dequantize.on_value_change(self.update_warning)
        self.update_kind()
        self.progress_row.set_visibility(False)
        self.poll()
        ui.timer(0.5, self.poll)

    def update_kind(self) -> None:
        k = self.kind.value
        self.source.props["label"] = SOURCE_FIELDS[k]
        self.source.props["placeholder"] = SOURCE_HINTS[k]
        self.link.set_visibility(k == "folder")
        self.dequantize.set_visibility(k == "gguf")
        background_tasks.create(self.update_warning(), name="gguf import warning")

    async def update_warning(self) -> None:
        """Say what a quantized GGUF's weights cost on this machine's MLX backend, and offer float weights."""
        text = None
        path = Path(str(self.source.value or "").strip()).expanduser()
        if self.kind.value == "gguf" and self.local and not self.dequantize.value and path.suffix.lower() == ".gguf" \
                and path.is_file():
            try:
                text = await run.io_bound(quantized_gguf_warning, path, mlx_backend())
            except LibraryError as e:
                text = str(e)
        self.quant_warning.set_text(text or "")
        self.quant_row.set_visibility(bool(text))

    async def start(self) -> None:
        text = entered(self.source, "Enter a repo id, folder or GGUF file first")
        if text is None:
            return
        try:
            await run.io_bound(partial(self.imports.start, local=self.local), self.services.workspace, text,
                               (self.name.value or "").strip() or None, kind=self.kind.value,
                               link=bool(self.link.value), dequantize=bool(self.dequantize.value))
        except ImportBusy as e:
            ui.notify(str(e), type="warning")
            return
        except LibraryError as e:
            self.show_refusal(str(e))
            return
        self.poll()

    def show_refusal(self, text: str) -> None:
        self.seen = None
        self.message.set_text(text)
        self.message.classes(replace="text-sm text-negative")
        self.progress_row.set_visibility(True)
        self.bar.set_visibility(False)
        self.cancel_btn.set_visibility(False)

    def cancel(self) -> None:
        job = self.imports.current
        if job is not None:
            job.cancel()

    def poll(self) -> None:
        job = self.imports.current
        if job is None or self.seen == (id(job), job.version):
            return
        self.seen = (id(job), job.version)
        self.show(job)
        if not job.running and self.refreshed != id(job):
            self.refreshed = id(job)
            if job.state == DONE:
                ui.notify(f"Imported models/{job.name}", type="positive")
            ui.timer(0.01, self.on_imported, once=True)

    def show(self, job: ImportJob) -> None:
        running = job.running
        self.progress_row.set_visibility(True)
        self.bar.set_visibility(running or job.state == DONE)
        if job.fraction is None and running:
            self.bar.props("indeterminate")
        else:
            self.bar.props(remove="indeterminate")
        self.cancel_btn.set_visibility(running)
        self.start_btn.set_enabled(not running)
        color = {FAILED: "text-negative", DONE: "text-positive"}.get(job.state, "")
        self.message.classes(replace=f"text-sm {color}")
        self.message.set_text(f"{job.source} → models/{job.name}: {job.message}")


class ModelsPage:
    """The catalogue and the import card on the left, the system panel on the right."""

    def __init__(self, services: Services) -> None:
        ui.label("Models").classes("text-2xl font-semibold")
        with ui.row().classes("w-full items-start gap-4 no-wrap max-lg:flex-wrap"):
            with ui.column().classes("grow gap-3 min-w-0"):
                self.table = ModelTable(services)
                self.imports = ImportCard(services, on_imported=self.table.refresh)
            with ui.column().classes("w-[360px] max-lg:w-full gap-3 shrink-0"):
                self.system = SystemCard(services)
        ui.timer(0.01, self.table.refresh, once=True)  # the HF cache scan happens after the page is built


def models_page(services: Services) -> None:
    """Build the Models page for one client."""
    ModelsPage(services)
