"""Publish page (``/runs/{run_id}/publish?iteration=N``) and a published model's card (``/published/{name}``).

The form is checked in this process with :mod:`services.publishing.rules` (no MLX here); the publish itself runs in
a child process through :class:`services.publishing.jobs.PublishJobs`, and one ``ui.timer`` per page redraws the
progress when the jobs' ``version`` moved. When it is done the page shows the parity verdict with its numbers
and the model card that was written into ``published/NAME/README.md``.
"""

from __future__ import annotations

import base64
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nicegui import ui

from pages.common import fmt_loss, is_local_client, page_column
from services.publishing.handoff import LMSTUDIO_DEFAULT
from services.publishing.rules import (
    GGUF_MODEL_TYPES,
    GGUF_TYPES,
    GROUP_SIZES,
    PublishError,
    base_model,
    check_options,
    choose_checkpoint,
    published_folder,
    published_path,
    split_front_matter,
    suggest_name,
)
from services.units import human_bytes
from services.workspace import Workspace, read_json

if TYPE_CHECKING:
    from app.composition import Services
    from services.publishing.jobs import PublishJobs
    from services.training.folder import RunFolder

POLL_SECONDS = 0.5
MARKDOWN_EXTRAS = ["fenced-code-blocks", "tables", "code-friendly"]
QUANTIZE = {0: "none (float)", 4: "4-bit", 8: "8-bit"}
GGUF_CHOICES = {"": "none", **{t: t for t in GGUF_TYPES}}
PHASE_TEXT = {"starting": "Starting", "loading": "Loading", "fusing": "Fusing", "quantizing": "Quantizing",
              "saving": "Saving", "parity": "Parity check", "card": "Model card", "done": "Done"}
CHECK_COLUMNS: list[dict[str, Any]] = [
    {"name": "check", "label": "Check", "field": "check", "align": "left"},
    {"name": "result", "label": "Result", "field": "result", "align": "left"},
    {"name": "detail", "label": "Detail", "field": "detail", "align": "left"},
]


# ----------------------------------------------------------------------------------------- pure helpers


def name_problem(workspace: Workspace, name: str | None, overwrite: bool = False) -> str | None:
    """Why ``name`` cannot be published to (None: it can)."""
    name = (name or "").strip()
    try:
        target = published_path(workspace, name, overwrite=True)
    except PublishError as e:
        return str(e)
    if target.exists() and not overwrite:
        return f"published/{name} already exists: choose another name, or tick “Replace” to overwrite it"
    return None


def inline_images(markdown: str, folder: Path) -> str:
    """Point the card's local SVG images (``![..](loss_curve.svg)``) at data URIs, so the browser can show them."""
    def repl(m: re.Match) -> str:
        f = folder / m.group(2)
        if "/" in m.group(2) or not f.is_file():
            return m.group(0)
        data = base64.b64encode(f.read_bytes()).decode()
        return f"![{m.group(1)}](data:image/svg+xml;base64,{data})"

    return re.sub(r"!\[([^\]]*)\]\(([\w.-]+\.svg)\)", repl, markdown)


def card_markdown(markdown: str, folder: Path) -> str:
    """The card's Markdown as the page renders it: local SVGs inlined, ``\\|`` (a GitHub pipe escape) outside
    code blocks written as an HTML entity (markdown2 leaves the backslash in)."""
    parts = re.split(r"(```.*?```)", inline_images(markdown, folder), flags=re.S)
    return "".join(p if i % 2 else p.replace("\\|", "&#124;") for i, p in enumerate(parts))


def checkpoint_options(info: dict[str, Any], its: list[int]) -> dict[int, str]:
    """Checkpoint iteration → ``iteration N · val loss X ★ best``, newest first."""
    vals = {c.get("iteration"): c.get("val_loss") for c in info.get("checkpoints") or []}
    best = (info.get("best") or {}).get("iteration")
    return {it: f"iteration {it} · val loss {fmt_loss(vals.get(it))}" + (" ★ best" if it == best else "")
            for it in reversed(its)}


def check_rows(parity: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"check": c.get("check"), "result": "ok" if c.get("ok") else "FAIL", "detail": c.get("detail", "")}
            for c in parity.get("checks") or []]


def playground_link(name: str) -> str:
    return f"/playground?model=published/{name}"


# ----------------------------------------------------------------------------------------- components


def verdict_badge(passed: bool | None) -> ui.badge:
    text, color = ("PASS", "positive") if passed is True else ("FAIL", "negative") if passed is False \
        else ("not checked", "grey")
    return ui.badge(text, color=color).classes("text-base px-3").mark("parity-verdict")


def model_card(folder: Path) -> None:
    """Show ``folder/README.md``: front matter as chips, the rest as Markdown (the loss curve inlined)."""
    readme = folder / "README.md"
    try:
        text = readme.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        ui.label(f"No model card: {e}").classes("text-sm text-negative").mark("model-card-missing")
        return
    front, body = split_front_matter(text)
    with ui.card().classes("w-full").props("flat bordered").mark("model-card"):
        with ui.row().classes("w-full items-center gap-2"):
            ui.label("Model card").classes("text-sm font-semibold text-grey-7")
            ui.label(str(readme)).classes("text-xs font-mono text-grey-7")
        if front:
            with ui.row().classes("items-center gap-1 text-sm"):
                for key in ("base_model", "license", "library_name", "pipeline_tag"):
                    if front.get(key):
                        ui.chip(f"{key.replace('_', ' ')}: {front[key]}").props("dense outline")
                for tag in front.get("tags") or []:
                    ui.chip(str(tag)).props("dense color=primary text-color=white")
        ui.markdown(card_markdown(body, folder), extras=MARKDOWN_EXTRAS).classes("w-full model-card-body") \
            .mark("model-card-text")


def _card_styles() -> None:
    ui.add_css("""
        .model-card-body table { border-collapse: collapse; margin: 0.5em 0; font-size: 0.85rem; }
        .model-card-body th, .model-card-body td { border: 1px solid rgba(128,128,128,.35); padding: 2px 8px; }
        .model-card-body h1 { font-size: 1.6rem; font-weight: 600; margin: 0.3em 0; }
        .model-card-body h2 { font-size: 1.2rem; font-weight: 600; margin: 0.8em 0 0.3em; }
        .model-card-body img { max-width: 640px; width: 100%; background: white; }
        .model-card-body pre { overflow-x: auto; }
        .model-card-body summary { display: list-item; cursor: pointer; font-weight: 500; margin: 0.5em 0;
                                   color: var(--q-primary); }
    """)


# ----------------------------------------------------------------------------------------- publish page


def publish_page(services: Services, run_id: str, iteration: str | None = None) -> None:
    """Build ``/runs/{run_id}/publish``; ``iteration`` preselects a checkpoint (default: the best)."""
    _card_styles()
    with page_column():
        PublishPage(services, run_id, iteration)


class PublishForm:
    """The publish form: checkpoint, name, licence and export options, checked with the publishing rules as they
    change. ``on_publish`` runs when the Publish button is pressed."""

    def __init__(self, ws: Workspace, folder: RunFolder, info: dict[str, Any], first: int, on_publish: Any):
        self.folder = folder
        self.run_name = info.get("name") or folder.id
        self.base, base_cfg = base_model(folder.config())
        self.base_cfg = base_cfg or {}
        self.suggested = suggest_name(self.run_name, first)
        model_type = self.base_cfg.get("model_type") or "?"
        base_quantized = bool(self.base_cfg.get("quantization"))
        with ui.card().classes("w-full gap-3").props("flat bordered").mark("publish-form"):
            with ui.row().classes("w-full items-start gap-4"):
                self.ckpt = ui.select(checkpoint_options(info, folder.checkpoint_iterations()), value=first,
                                      label="Checkpoint", on_change=self.checkpoint_changed) \
                    .props("dense outlined").classes("w-80").mark("publish-checkpoint")
                with ui.column().classes("gap-0 grow"):
                    ui.label("Why this checkpoint").classes("text-xs text-grey-7")
                    self.why = ui.label("").classes("text-sm").mark("checkpoint-why")
            with ui.row().classes("w-full items-start gap-4"):
                self.name = ui.input("Name", value=self.suggested).props("dense outlined bottom-slots") \
                    .classes("w-96").mark("publish-name")
                self.name.tooltip(f"Folder name under {ws.published}: letters, digits, '.', '_' and '-'")
                self.overwrite = ui.checkbox("Replace an existing model of this name",
                                             on_change=lambda: self.name.validate()).mark("publish-overwrite")
                self.name.validation = lambda v: name_problem(ws, v, bool(self.overwrite.value))
                self.license = ui.input("Licence", placeholder="default: the base model's") \
                    .props("dense outlined").classes("w-56").mark("publish-license")
            with ui.row().classes("w-full items-center gap-6"):
                with ui.column().classes("gap-0"):
                    ui.label("Quantize").classes("text-xs text-grey-7")
                    self.quantize = ui.toggle(QUANTIZE, value=0, on_change=self.options_changed) \
                        .props("dense no-caps").mark("publish-quantize")
                with ui.column().classes("gap-0"):
                    ui.label("Group size").classes("text-xs text-grey-7")
                    self.group = ui.toggle(list(GROUP_SIZES), value=64, on_change=self.options_changed) \
                        .props("dense no-caps").mark("publish-group-size")
                self.dequantize = ui.checkbox("Dequantize", on_change=self.options_changed) \
                    .mark("publish-dequantize")
                self.dequantize.tooltip("Write float weights from a quantized base model (needed to re-quantize "
                                        "or for GGUF)")
                with ui.column().classes("gap-0"):
                    ui.label("GGUF (llama.cpp, Ollama, LM Studio)").classes("text-xs text-grey-7")
                    self.gguf = ui.toggle(GGUF_CHOICES, value="", on_change=self.options_changed) \
                        .props("dense no-caps").mark("publish-gguf")
                self.lmstudio = ui.input("LM Studio models folder (optional)", placeholder=LMSTUDIO_DEFAULT,
                                         on_change=self.options_changed).props("dense outlined").classes("w-72") \
                    .mark("publish-lmstudio")
                self.lmstudio.tooltip("Place the GGUF there as forgellm/NAME, where LM Studio lists it")
                self.lmstudio.set_visibility(is_local_client())  # a path on this machine: not from another one
            ui.label(f"Base model {self.base.name}: {model_type}"
                     + (", quantized" if base_quantized else ", float weights")
                     + f". GGUF (f16 or q8_0, with an Ollama Modelfile) is written for {', '.join(GGUF_MODEL_TYPES)} "
                     "models with float weights; quantize = none. Group size applies to 4/8-bit quantization.") \
                .classes("text-xs text-grey-7").mark("publish-hint")
            self.options_error = ui.label("").classes("text-sm text-negative").mark("options-error")
            with ui.row().classes("items-center gap-3"):
                self.go = ui.button("Publish", icon="publish", on_click=on_publish).mark("publish-go")
                ui.label("Fuses the checkpoint into a standalone model, checks it against base + checkpoint and "
                         "writes a model card.").classes("text-xs text-grey-7")
        self.checkpoint_changed()
        self.options_changed()

    def options(self) -> dict[str, Any]:
        """The export options as :class:`~services.publishing.jobs.PublishJobs` takes them."""
        return {"dequantize": bool(self.dequantize.value), "quantize_bits": self.quantize.value or None,
                "group_size": int(self.group.value), "gguf": self.gguf.value or None,
                "lmstudio": (self.lmstudio.value or "").strip() or None,
                "license": (self.license.value or "").strip() or None, "overwrite": bool(self.overwrite.value)}

    def options_problem(self) -> str | None:
        """Why the options cannot be published from this run's base model (None: they can)."""
        try:
            check_options(self.options(), self.base, self.base_cfg)
        except PublishError as e:
            return str(e)
        return None

    def options_changed(self) -> None:
        """Enable the group size only for quantization; show the options' problem."""
        self.group.set_enabled(bool(self.quantize.value))
        self.options_error.set_text(self.options_problem() or "")

    def checkpoint_changed(self) -> None:
        """Say why the chosen checkpoint; follow it with the suggested name unless the name was edited."""
        default = choose_checkpoint(self.folder)
        choice = default if self.ckpt.value == default.iteration else choose_checkpoint(self.folder, self.ckpt.value)
        self.why.set_text(choice.reason[0].upper() + choice.reason[1:])
        if (self.name.value or "") == self.suggested:
            self.suggested = suggest_name(self.run_name, self.ckpt.value)
            self.name.set_value(self.suggested)

    def iteration(self) -> int | None:
        """The chosen checkpoint; None when it is the default, so the publish records it as "the best"."""
        return self.ckpt.value if self.ckpt.value != choose_checkpoint(self.folder).iteration else None

    def ready(self) -> bool:
        """Whether the name and the options can be published (else the problem is shown next to them)."""
        if not self.name.validate():
            return False
        problem = self.options_problem()
        self.options_error.set_text(problem or "")
        return problem is None


class PublishProgress:
    """The progress card of one publish job: phase, message, bar, error and log."""

    def __init__(self, on_cancel: Any):
        with ui.card().classes("w-full gap-2").props("flat bordered").mark("publish-progress") as self.card:
            with ui.row().classes("w-full items-center gap-3"):
                self.phase = ui.label("").classes("font-medium").mark("publish-phase")
                self.message = ui.label("").classes("text-sm text-grey-7 grow").mark("publish-message")
                self.cancel = ui.button("Cancel", icon="close", on_click=on_cancel).props("flat dense") \
                    .mark("publish-cancel")
            self.bar = ui.linear_progress(value=0, show_value=False).props("rounded size=10px instant-feedback") \
                .mark("publish-bar")
            self.error = ui.label("").classes("text-negative whitespace-pre-line").mark("publish-error")
            with ui.expansion("Log", icon="article").classes("w-full text-sm").props("dense") as self.log_box:
                self.log = ui.code("", language="text").classes("w-full max-h-64 overflow-auto text-xs") \
                    .mark("publish-log")
        self.card.set_visibility(False)

    def show(self, job: dict[str, Any]) -> None:
        """Show one state of a job (:meth:`PublishJobs.get`)."""
        status = job["status"]
        running = status == "running"
        self.card.set_visibility(True)
        self.cancel.set_visibility(running)
        self.phase.set_text(PHASE_TEXT.get(job["phase"], job["phase"]) if status != "failed" else "Failed")
        self.message.set_text(f"{job['name']}: {job['message']}" if running else
                              (f"published {job['name']}" if status == "done" else ""))
        self.bar.set_value(job["fraction"])
        self.bar.props(f"color={'negative' if status == 'failed' else 'primary'}")
        self.error.set_text(job["error"] or "")
        self.error.set_visibility(bool(job["error"]))
        self.log.set_content("\n".join(job["log"][-60:]))
        if status == "failed":
            self.log_box.open()


class PublishPage:
    """``/runs/{run_id}/publish``: the run, the form, the progress of its publish job and the result."""

    def __init__(self, services: Services, run_id: str, iteration: str | None):
        self.ws, self.run_id = services.workspace, run_id
        self.jobs: PublishJobs = services.publisher_jobs  # type: ignore[assignment]  # build_services makes it
        self.job: str | None = None
        self.seen, self.shown = -1, None
        with ui.row().classes("w-full items-center gap-3"):
            ui.button(icon="arrow_back", on_click=lambda: ui.navigate.to(f"/runs/{run_id}")).props("flat round") \
                .tooltip("Back to the run").mark("back-to-run")
            ui.label("Publish a checkpoint").classes("text-2xl font-semibold")
        try:
            folder = services.manager.folder(run_id)
            info = services.manager.get(run_id)
            cfg = folder.config()
        except (ValueError, OSError) as e:
            ui.label(f"Run {run_id}: {e}").classes("text-negative").mark("run-missing")
            return
        its = folder.checkpoint_iterations()
        with ui.row().classes("items-center gap-2 text-sm"):
            ui.label("Run").classes("text-grey-7")
            ui.link(f"{info.get('name') or run_id} ({run_id})", f"/runs/{run_id}").mark("publish-run")
            ui.label(f"· base model {Path(cfg.get('model', '?')).name} · {info.get('status')}") \
                .classes("text-grey-7")
        if not its:
            ui.label("This run has no checkpoint yet: publish one once the run has saved a checkpoint.") \
                .classes("text-grey-7").mark("no-checkpoints")
            return
        requested: int | None = None
        if iteration not in (None, ""):
            if str(iteration).isdigit() and int(iteration) in its:
                requested = int(iteration)
            else:
                ui.label(f"Run {run_id} has no checkpoint {iteration}; showing the best instead.") \
                    .classes("text-sm text-warning").mark("bad-iteration")
        self.form = PublishForm(self.ws, folder, info, choose_checkpoint(folder, requested).iteration, self.start)
        self.progress = PublishProgress(self.cancel)
        self.result_box = ui.column().classes("w-full gap-3").mark("publish-result")
        running = self.jobs.running()
        if running and running["run_id"] == run_id:  # a publish of this run is under way: follow it
            self.job = running["id"]
        self.poll()
        ui.timer(POLL_SECONDS, self.poll)

    def start(self) -> None:
        """Start a publish of the form's choice (a refusal is notified; nothing starts)."""
        if not self.form.ready():
            return
        try:
            self.job = self.jobs.start(self.run_id, self.form.iteration(), (self.form.name.value or "").strip(),
                                       self.form.options())
        except PublishError as e:
            ui.notify(str(e), type="negative", multi_line=True)
            return
        self.seen, self.shown = -1, None
        self.result_box.clear()
        self.poll()

    def cancel(self) -> None:
        """Cancel the followed publish."""
        if self.job:
            self.jobs.cancel(self.job)

    def poll(self) -> None:
        """Redraw the progress (and the result, once) when the jobs moved."""
        if self.job is None or self.jobs.version == self.seen:
            return
        self.seen = self.jobs.version
        job = self.jobs.get(self.job)
        if job is None:
            return
        self.progress.show(job)
        self.form.go.set_enabled(job["status"] != "running")
        if job["status"] == "done" and self.shown != job["id"]:
            self.shown = job["id"]
            self.result_box.clear()
            with self.result_box:
                _result_view(self.ws, job["result"] or {})


def _result_view(ws: Workspace, result: dict[str, Any]) -> None:
    parity = result.get("parity") or {}
    name = result.get("name", "")
    path = Path(result.get("path") or ws.published / name)
    with ui.card().classes("w-full gap-2").props("flat bordered").mark("parity-result"):
        with ui.row().classes("w-full items-center gap-3"):
            ui.label("Parity check").classes("text-lg font-semibold")
            verdict_badge(parity.get("passed"))
            ui.label(f"{parity.get('kind', '?')}, {parity.get('dtype', '?')}").classes("text-sm text-grey-7")
        _parity_numbers(parity, result.get("summary"))
        for w in result.get("warnings") or []:
            ui.label(f"⚠ {w}").classes("text-sm text-warning")
        with ui.row().classes("w-full items-center gap-3 text-sm"):
            ui.label(f"Checkpoint {result.get('iteration')} of {result.get('run_id')}: {result.get('reason')}") \
                .classes("text-grey-7")
        with ui.row().classes("w-full items-center gap-3"):
            ui.button("Chat with it", icon="chat", on_click=lambda: ui.navigate.to(playground_link(name))) \
                .mark("chat-with-it")
            ui.button("Open model card", icon="description",
                      on_click=lambda: ui.navigate.to(f"/published/{name}")).props("outline").mark("open-card")
            ui.label("Folder").classes("text-sm text-grey-7")
            ui.label(str(path)).classes("font-mono text-sm break-all").mark("published-path")
            ui.label(f"{human_bytes(result.get('size_bytes') or 0)} · {result.get('seconds', 0):.1f} s") \
                .classes("text-sm text-grey-7")
    if path.is_dir():
        model_card(path)


def _parity_numbers(parity: dict[str, Any], summary: str | None) -> None:
    loss = parity.get("loss") or {}
    if loss:
        with ui.row().classes("gap-6 text-sm").mark("parity-numbers"):
            for label, value in (("val loss, base + checkpoint", f"{loss.get('reference', float('nan')):.6f}"),
                                 ("val loss, published", f"{loss.get('published', float('nan')):.6f}"),
                                 ("relative delta", f"{loss.get('relative_delta', float('nan')):.2e}"),
                                 ("perplexity change", f"{loss.get('perplexity_increase', 0):+.3%}"),
                                 ("greedy identical", str(parity.get("greedy_identical", "?")))):
                with ui.column().classes("gap-0"):
                    ui.label(label).classes("text-xs text-grey-7")
                    ui.label(value).classes("font-mono")
    elif summary:
        ui.label(summary).classes("text-sm").mark("parity-numbers")
    if parity.get("checks"):
        ui.table(columns=CHECK_COLUMNS, rows=check_rows(parity), row_key="check").props("flat dense") \
            .classes("w-full").mark("parity-checks")


# ----------------------------------------------------------------------------------------- model card page


def published_page(services: Services, name: str) -> None:
    """Build ``/published/{name}``: a published model's verdict, links and model card."""
    _card_styles()
    with page_column():
        with ui.row().classes("w-full items-center gap-3"):
            ui.button(icon="arrow_back", on_click=ui.navigate.back).props("flat round").tooltip("Back")
            ui.label(name).classes("text-2xl font-semibold").mark("published-title")
        folder = published_folder(services.workspace, name)
        if folder is None:
            ui.label(f"No published model {name!r} in {services.workspace.published}.") \
                .classes("text-negative").mark("published-missing")
            return
        parity = read_json(folder / "parity.json", {}) or {}
        prov = read_json(folder / "forgellm.json", {}) or {}
        src = prov.get("source") or {}
        with ui.row().classes("w-full items-center gap-3"):
            ui.label("Parity check").classes("text-sm text-grey-7")
            verdict_badge(parity.get("passed") if "passed" in parity else None)
            if src.get("run"):
                ui.label("from").classes("text-sm text-grey-7")
                ui.link(f"{src['run']} @ {src.get('iteration')}", f"/runs/{src['run']}").mark("published-source")
            ui.button("Chat with it", icon="chat", on_click=lambda: ui.navigate.to(playground_link(name))) \
                .props("outline").mark("chat-with-it")
            ui.label(str(folder)).classes("font-mono text-sm text-grey-7 break-all").mark("published-path")
        model_card(folder)
