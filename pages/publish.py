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

from pages.common import fmt_loss, page_column
from services.publishing.jobs import PublishJobs
from services.publishing.rules import (
    GGUF_MODEL_TYPES,
    GROUP_SIZES,
    PublishError,
    check_options,
    choose_checkpoint,
    published_folder,
    published_path,
    split_front_matter,
)
from services.units import human_bytes
from services.workspace import Workspace, read_json

if TYPE_CHECKING:
    from app.composition import Services

POLL_SECONDS = 0.5
MARKDOWN_EXTRAS = ["fenced-code-blocks", "tables", "code-friendly"]
QUANTIZE = {0: "none (float)", 4: "4-bit", 8: "8-bit"}
PHASE_TEXT = {"starting": "Starting", "loading": "Loading", "fusing": "Fusing", "quantizing": "Quantizing",
              "saving": "Saving", "parity": "Parity check", "card": "Model card", "done": "Done"}
CHECK_COLUMNS: list[dict[str, Any]] = [
    {"name": "check", "label": "Check", "field": "check", "align": "left"},
    {"name": "result", "label": "Result", "field": "result", "align": "left"},
    {"name": "detail", "label": "Detail", "field": "detail", "align": "left"},
]


# ----------------------------------------------------------------------------------------- pure helpers


def jobs_of(services: Services) -> PublishJobs:
    """The app's publish jobs (made on first use when the services were built without them)."""
    if getattr(services, "publisher_jobs", None) is None:
        services.publisher_jobs = PublishJobs(services.workspace)
    return services.publisher_jobs  # type: ignore[return-value]


def suggest_name(run_name: str, iteration: int) -> str:
    """A valid default folder name from the run's name and the checkpoint."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", run_name).strip("-._")[:80] or "model"
    return f"{stem}-{iteration}"


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
        _build_publish(services, run_id, iteration)


def _build_publish(services: Services, run_id: str, iteration: str | None) -> None:
    manager, ws, jobs = services.manager, services.workspace, jobs_of(services)
    with ui.row().classes("w-full items-center gap-3"):
        ui.button(icon="arrow_back", on_click=lambda: ui.navigate.to(f"/runs/{run_id}")).props("flat round") \
            .tooltip("Back to the run").mark("back-to-run")
        ui.label("Publish a checkpoint").classes("text-2xl font-semibold")
    try:
        folder = manager.folder(run_id)
        info = manager.get(run_id)
        cfg = folder.config()
    except (ValueError, OSError) as e:
        ui.label(f"Run {run_id}: {e}").classes("text-negative").mark("run-missing")
        return
    its = folder.checkpoint_iterations()
    run_name = info.get("name") or run_id
    with ui.row().classes("items-center gap-2 text-sm"):
        ui.label("Run").classes("text-grey-7")
        ui.link(f"{run_name} ({run_id})", f"/runs/{run_id}").mark("publish-run")
        ui.label(f"· base model {Path(cfg.get('model', '?')).name} · {info.get('status')}").classes("text-grey-7")
    if not its:
        ui.label("This run has no checkpoint yet: publish one once the run has saved a checkpoint.") \
            .classes("text-grey-7").mark("no-checkpoints")
        return
    base = Path(cfg.get("model", ""))
    base_cfg = read_json(base / "config.json", {}) or {}
    model_type = base_cfg.get("model_type") or "?"
    base_quantized = bool(base_cfg.get("quantization"))

    requested: int | None = None
    if iteration not in (None, ""):
        if str(iteration).isdigit() and int(iteration) in its:
            requested = int(iteration)
        else:
            ui.label(f"Run {run_id} has no checkpoint {iteration}; showing the best instead.") \
                .classes("text-sm text-warning").mark("bad-iteration")
    first, _ = choose_checkpoint(folder, requested)

    # -- the form ----------------------------------------------------------------------------------
    with ui.card().classes("w-full gap-3").props("flat bordered").mark("publish-form"):
        with ui.row().classes("w-full items-start gap-4"):
            ckpt = ui.select(checkpoint_options(info, its), value=first, label="Checkpoint",
                             on_change=lambda: checkpoint_changed()).props("dense outlined").classes("w-80") \
                .mark("publish-checkpoint")
            with ui.column().classes("gap-0 grow"):
                ui.label("Why this checkpoint").classes("text-xs text-grey-7")
                why = ui.label("").classes("text-sm").mark("checkpoint-why")
        with ui.row().classes("w-full items-start gap-4"):
            name = ui.input("Name", value=suggest_name(run_name, first)).props("dense outlined bottom-slots") \
                .classes("w-96").mark("publish-name")
            name.tooltip(f"Folder name under {ws.published}: letters, digits, '.', '_' and '-'")
            overwrite = ui.checkbox("Replace an existing model of this name", on_change=lambda: name.validate()) \
                .mark("publish-overwrite")
            name.validation = lambda v: name_problem(ws, v, bool(overwrite.value))
            license_ = ui.input("Licence", placeholder="default: the base model's").props("dense outlined") \
                .classes("w-56").mark("publish-license")
        with ui.row().classes("w-full items-center gap-6"):
            with ui.column().classes("gap-0"):
                ui.label("Quantize").classes("text-xs text-grey-7")
                quantize = ui.toggle(QUANTIZE, value=0, on_change=lambda: options_changed()) \
                    .props("dense no-caps").mark("publish-quantize")
            with ui.column().classes("gap-0"):
                ui.label("Group size").classes("text-xs text-grey-7")
                group = ui.toggle(list(GROUP_SIZES), value=64, on_change=lambda: options_changed()) \
                    .props("dense no-caps").mark("publish-group-size")
            dequantize = ui.checkbox("Dequantize", on_change=lambda: options_changed()).mark("publish-dequantize")
            dequantize.tooltip("Write float weights from a quantized base model (needed to re-quantize or for GGUF)")
            gguf = ui.checkbox("Also write GGUF", on_change=lambda: options_changed()).mark("publish-gguf")
        ui.label(f"Base model {base.name}: {model_type}" + (", quantized" if base_quantized else ", float weights")
                 + f". GGUF (for llama.cpp / Ollama) is written by mlx-lm only for {', '.join(GGUF_MODEL_TYPES)} "
                 "models with float weights; quantize = none. Group size applies to 4/8-bit quantization.") \
            .classes("text-xs text-grey-7").mark("publish-hint")
        options_error = ui.label("").classes("text-sm text-negative").mark("options-error")
        with ui.row().classes("items-center gap-3"):
            go_btn = ui.button("Publish", icon="publish", on_click=lambda: start()).mark("publish-go")
            ui.label("Fuses the checkpoint into a standalone model, checks it against base + checkpoint and "
                     "writes a model card.").classes("text-xs text-grey-7")

    # -- progress and result -------------------------------------------------------------------------
    with ui.card().classes("w-full gap-2").props("flat bordered").mark("publish-progress") as progress_card:
        with ui.row().classes("w-full items-center gap-3"):
            phase = ui.label("").classes("font-medium").mark("publish-phase")
            message = ui.label("").classes("text-sm text-grey-7 grow").mark("publish-message")
            cancel_btn = ui.button("Cancel", icon="close", on_click=lambda: cancel()).props("flat dense") \
                .mark("publish-cancel")
        bar = ui.linear_progress(value=0, show_value=False).props("rounded size=10px instant-feedback") \
            .mark("publish-bar")
        error = ui.label("").classes("text-negative whitespace-pre-line").mark("publish-error")
        with ui.expansion("Log", icon="article").classes("w-full text-sm").props("dense") as log_box:
            log = ui.code("", language="text").classes("w-full max-h-64 overflow-auto text-xs").mark("publish-log")
    progress_card.set_visibility(False)
    result_box = ui.column().classes("w-full gap-3").mark("publish-result")

    state: dict[str, Any] = {"job": None, "seen": -1, "suggested": name.value, "shown": None}

    def current_options() -> dict[str, Any]:
        return {"dequantize": bool(dequantize.value), "quantize_bits": quantize.value or None,
                "group_size": int(group.value), "gguf": bool(gguf.value),
                "license": (license_.value or "").strip() or None, "overwrite": bool(overwrite.value)}

    def options_problem() -> str | None:
        o = current_options()
        try:
            check_options(base, base_cfg, dequantize=o["dequantize"], quantize_bits=o["quantize_bits"],
                          group_size=o["group_size"], gguf=o["gguf"])
        except PublishError as e:
            return str(e)
        return None

    def options_changed() -> None:
        group.set_enabled(bool(quantize.value))
        options_error.set_text(options_problem() or "")

    def checkpoint_changed() -> None:
        it = ckpt.value
        default, reason = choose_checkpoint(folder, None)
        if it != default:
            reason = choose_checkpoint(folder, it)[1]
            reason = reason.removeprefix("requested (").removesuffix(")")
        why.set_text(reason[0].upper() + reason[1:])
        if (name.value or "") == state["suggested"]:
            state["suggested"] = suggest_name(run_name, it)
            name.set_value(state["suggested"])

    def start() -> None:
        if not name.validate():
            return
        problem = options_problem()
        if problem:
            options_error.set_text(problem)
            return
        it = ckpt.value if ckpt.value != choose_checkpoint(folder, None)[0] else None  # None: "the best", said so
        try:
            state["job"] = jobs.start(run_id, it, (name.value or "").strip(), current_options())
        except PublishError as e:
            ui.notify(str(e), type="negative", multi_line=True)
            return
        state["seen"], state["shown"] = -1, None
        result_box.clear()
        poll()

    def cancel() -> None:
        if state["job"]:
            jobs.cancel(state["job"])

    def poll() -> None:
        if state["job"] is None or jobs.version == state["seen"]:
            return
        state["seen"] = jobs.version
        job = jobs.get(state["job"])
        if job is None:
            return
        running = job["status"] == "running"
        progress_card.set_visibility(True)
        go_btn.set_enabled(not running)
        cancel_btn.set_visibility(running)
        phase.set_text(PHASE_TEXT.get(job["phase"], job["phase"]) if job["status"] != "failed" else "Failed")
        message.set_text(f"{job['name']}: {job['message']}" if running else
                         (f"published {job['name']}" if job["status"] == "done" else ""))
        bar.set_value(job["fraction"])
        bar.props(f"color={'negative' if job['status'] == 'failed' else 'primary'}")
        error.set_text(job["error"] or "")
        error.set_visibility(bool(job["error"]))
        log.set_content("\n".join(job["log"][-60:]))
        if job["status"] == "failed":
            log_box.open()
        if job["status"] == "done" and state["shown"] != job["id"]:
            state["shown"] = job["id"]
            show_result(job["result"] or {})

    def show_result(result: dict[str, Any]) -> None:
        result_box.clear()
        with result_box:
            _result_view(ws, result)

    running = jobs.running()
    if running and running["run_id"] == run_id:  # a publish of this run is under way: follow it
        state["job"] = running["id"]
    checkpoint_changed()
    options_changed()
    poll()
    ui.timer(POLL_SECONDS, poll)


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
