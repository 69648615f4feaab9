"""Train page: pick model, data and preset, set every hyperparameter, see problems inline, start a run.

Form values live in the widgets; :mod:`pages.train.form` turns them into the engine config. Validation is
``services.config`` (through ``RunManager.prepare_config``), run on every change; nothing starts while
it reports a problem.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

import yaml
from nicegui import events, run, ui

from pages.common import MODES
from pages.train.form import (
    SCHEDULE_KINDS,
    config_to_form,
    default_form,
    form_field,
    form_problems,
    form_to_config,
    list_presets,
    lr_curve,
    suggested_dataset,
)
from services.config import OPTIMIZERS, ConfigError, ConfigProblems, dump_yaml, parse_yaml
from services.library.datasets import list_datasets
from services.library.models import list_models
from services.training import preflight
from services.training.data import DataError
from services.training.folder import WAITING
from services.training.index import without_defaults
from services.units import duration, gigabytes

if TYPE_CHECKING:
    from app.composition import Services

MAX_UPLOAD_BYTES = 1_000_000

TIPS = {
    "name": "Run name shown in the run list; also used in the run folder's name.",
    "model": "An mlx-lm model folder (with config.json) from the workspace's models/ or published/, or a path.",
    "data": "A dataset from the workspace's datasets/, or a path. CPT: text documents; IFT: chat, "
            "prompt/completion or text rows (train.jsonl + valid.jsonl, or one file that is split).",
    "mode": "CPT: continued pre-training on raw text. IFT: instruction fine-tuning on chats. "
            "Plain mlx-lm: exactly mlx_lm.lora's behaviour.",
    "fine_tune_type": "LoRA: low-rank adapters. DoRA: weight-decomposed LoRA. Full: train the weights themselves "
                      "(most memory).",
    "preset": "Fill every field from a preset in configs/.",
    "length_mode": "Train a fixed number of iterations, or a number of passes over the training set.",
    "iters": "Optimizer iterations (batches) to train.",
    "epochs": "Passes over the training set; the iteration count follows from the data size.",
    "batch_size": "Sequences per iteration.",
    "grad_accumulation_steps": "Batches whose gradients are summed before one optimizer update "
                               "(effective batch = batch size × this).",
    "learning_rate": "Peak learning rate (typical: 1e-5 full, 1e-4 to 2e-4 LoRA).",
    "schedule": "How the learning rate changes over the run (after warm-up).",
    "warmup": "Iterations of linear warm-up from 0 to the peak learning rate.",
    "final_lr": "Learning rate at the end of the decay.",
    "schedule_steps": "Total length of the schedule in iterations (warm-up + decay). Blank: the run's iterations.",
    "optimizer": "mlx optimizer: adam, adamw (decoupled weight decay), muon, sgd, adafactor.",
    "num_layers": "How many of the last transformer blocks get adapters / are trained (-1: all).",
    "rank": "LoRA rank: size of the low-rank update (higher: more capacity, more memory).",
    "scale": "LoRA scale (mlx-lm's name for alpha / rank): how strongly the adapter update is applied.",
    "dropout": "Dropout on the adapter input, in [0, 1).",
    "train_embeddings": "Full fine-tuning: also train the embeddings, final norm and output head.",
    "max_seq_length": "Longest sequence in tokens; longer samples are cut (CPT packs documents into windows "
                      "of this length).",
    "packing": "CPT: join documents with EOS and cut the stream into full windows (no padding).",
    "mask_all_turns": "IFT: loss on every assistant turn (off: only the last, like mlx-lm's mask_prompt).",
    "valid_fraction": "Share of documents/rows held out for validation when the data has no valid split.",
    "seed": "Random seed for data order, dropout and initialisation.",
    "steps_per_report": "Iterations between training-loss reports.",
    "steps_per_eval": "Iterations between validation runs.",
    "save_every": "Iterations between checkpoints.",
    "val_batches": "Validation batches per evaluation (-1: the whole validation set).",
    "keep_checkpoints": "Keep only the last K checkpoints plus the best one (blank: keep all).",
    "early_stopping": "Stop when the validation loss stops improving or rises (overfitting).",
    "patience": "Evaluations without improvement before stopping.",
    "min_delta": "Smallest drop of validation loss that counts as improvement.",
    "overfit_threshold": "Stop when validation loss is this fraction above the best (0.2 = 20%); blank: off.",
    "grad_checkpoint": "Recompute activations in the backward pass: less memory, about 30% slower.",
}


def _chart_options() -> dict[str, Any]:
    return {"animation": False, "grid": {"left": 60, "right": 16, "top": 24, "bottom": 36},
            "tooltip": {"trigger": "axis"},
            "xAxis": {"type": "value", "name": "iteration", "nameLocation": "middle", "nameGap": 22, "min": 0},
            "yAxis": {"type": "value", "name": "learning rate", "scale": False},
            "series": [{"type": "line", "showSymbol": False, "data": [], "name": "lr"}]}


def _fit(el: Any, value: Any) -> Any:
    """``value`` made acceptable to the widget: unknown choices are added, non-numbers in number fields dropped."""
    if isinstance(el, ui.number):
        return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None
    if isinstance(el, (ui.select, ui.toggle)) and value is not None and value not in el._values:  # noqa: SLF001
        opts = el.options
        el.set_options({**opts, value: str(value)} if isinstance(opts, dict) else [*opts, value])
    if isinstance(el, ui.switch):
        return bool(value)
    if isinstance(el, ui.input):
        return "" if value is None else str(value)
    return value


def train_page(services: Services) -> None:
    """Build the Train page for one client."""
    manager, ws = services.manager, services.workspace
    presets = list_presets(services.configs_dir)
    models = {m["key"]: m["label"] for m in list_models(ws)}
    dataset_list = list_datasets(ws)
    datasets = {d["key"]: d["label"] for d in dataset_list}
    w: dict[str, Any] = {}
    hidden: dict[str, Any] = {"custom_schedule": None, "extra": {}, "extra_lora": {}}
    state = {"filling": False, "errors": [], "cfg": {}, "curve": None}

    def changed(_: Any = None) -> None:
        if not state["filling"]:
            refresh()

    def number(key: str, label: str, **kw: Any) -> ui.number:
        # no min/max: ui.number would clamp silently on blur; the engine's validation explains instead
        el = ui.number(label, on_change=changed, **kw).props("dense outlined").classes("w-40")
        el.tooltip(TIPS.get(key, ""))
        w[key] = el.mark(f"field-{key}")
        return el

    def toggle(key: str, options: dict[str, str]) -> ui.toggle:
        el = ui.toggle(options, on_change=changed).props("dense no-caps")
        el.tooltip(TIPS.get(key, ""))
        w[key] = el.mark(f"field-{key}")
        return el

    def switch(key: str, label: str) -> ui.switch:
        el = ui.switch(label, on_change=changed)
        el.tooltip(TIPS.get(key, ""))
        w[key] = el.mark(f"field-{key}")
        return el

    def section(title: str):
        card = ui.card().classes("w-full")
        with card:
            ui.label(title).classes("text-sm font-semibold text-grey-7")
        return card

    ui.label("Train").classes("text-2xl font-semibold")
    with ui.row().classes("w-full items-start gap-4 no-wrap max-lg:flex-wrap"):
        with ui.column().classes("grow gap-3 min-w-0"):
            with section("Model and data"), ui.row().classes("w-full items-end gap-3"):
                preset = ui.select(list(presets), label="Preset", on_change=lambda e: apply_preset(e.value)) \
                    .props("dense outlined clearable").classes("w-48").mark("preset")
                preset.tooltip(TIPS["preset"])
                el = ui.input("Run name", on_change=changed).props("dense outlined").classes("w-56")
                w["name"] = el.mark("field-name")
                el.tooltip(TIPS["name"])
                el = ui.select(models, label="Model", with_input=True, new_value_mode="add-unique",
                               on_change=changed).props("dense outlined").classes("w-96")
                w["model"] = el.mark("field-model")
                el.tooltip(TIPS["model"])
                el = ui.select(datasets, label="Dataset", with_input=True, new_value_mode="add-unique",
                               on_change=changed).props("dense outlined").classes("w-96")
                w["data"] = el.mark("field-data")
                el.tooltip(TIPS["data"])
                with ui.row().classes("w-full items-center gap-3"):
                    ui.label("Mode").classes("text-sm text-grey-7")
                    toggle("mode", MODES)
                    ui.label("Fine-tuning").classes("text-sm text-grey-7 ml-4")
                    toggle("fine_tune_type", {"lora": "LoRA", "dora": "DoRA", "full": "Full"})
            with section("Length and optimisation"):
                with ui.row().classes("w-full items-end gap-3"):
                    toggle("length_mode", {"iters": "iterations", "epochs": "epochs"})
                    number("iters", "Iterations")
                    number("epochs", "Epochs")
                    number("batch_size", "Batch size")
                    number("grad_accumulation_steps", "Grad accumulation")
                    el = ui.select(list(OPTIMIZERS), label="Optimizer", on_change=changed) \
                        .props("dense outlined").classes("w-32")
                    w["optimizer"] = el.mark("field-optimizer")
                    el.tooltip(TIPS["optimizer"])
                with ui.row().classes("w-full items-end gap-3"):
                    number("learning_rate", "Learning rate", step=1e-5)
                    toggle("schedule", dict(SCHEDULE_KINDS))
                    number("warmup", "Warm-up iterations")
                    number("final_lr", "Final learning rate", step=1e-6)
                    number("schedule_steps", "Schedule length")
            with section("Trainable weights"), ui.row().classes("w-full items-end gap-3"):
                number("num_layers", "Layers (-1 = all)")
                number("rank", "LoRA rank")
                number("scale", "LoRA scale")
                number("dropout", "LoRA dropout", step=0.05)
                switch("train_embeddings", "Train embeddings and head")
                switch("grad_checkpoint", "Gradient checkpointing")
            with section("Data handling"), ui.row().classes("w-full items-end gap-3"):
                number("max_seq_length", "Max sequence length")
                number("valid_fraction", "Validation fraction", step=0.05)
                number("seed", "Seed")
                switch("packing", "Pack documents")
                switch("mask_all_turns", "Loss on all assistant turns")
            with section("Evaluation and checkpoints"):
                with ui.row().classes("w-full items-end gap-3"):
                    number("steps_per_report", "Report every")
                    number("steps_per_eval", "Evaluate every")
                    number("save_every", "Checkpoint every")
                    number("val_batches", "Validation batches (-1 = all)")
                    number("keep_checkpoints", "Keep checkpoints")
                with ui.row().classes("w-full items-end gap-3"):
                    switch("early_stopping", "Early stopping")
                    number("patience", "Patience")
                    number("min_delta", "Min delta", step=0.001)
                    number("overfit_threshold", "Overfit threshold", step=0.05)

        with ui.column().classes("w-[420px] max-lg:w-full gap-3 shrink-0"):
            with ui.card().classes("w-full"):
                ui.label("Learning-rate schedule").classes("text-sm font-semibold text-grey-7")
                chart = ui.echart(_chart_options()).classes("w-full h-56").mark("lr-chart")
                chart_note = ui.label("").classes("text-xs text-grey-7")
            with ui.card().classes("w-full"):
                problems = ui.label("").classes("whitespace-pre-line text-negative text-sm").mark("problems")
                ok = ui.label("Config is valid.").classes("text-positive text-sm").mark("valid")
                with ui.row().classes("gap-2"):
                    start_btn = ui.button("Start training", icon="play_arrow", on_click=lambda: start()) \
                        .mark("start")
                    queue_btn = ui.button("Queue", icon="queue", on_click=lambda: start(queue=True)) \
                        .props("outline").mark("queue")
                    queue_btn.tooltip("Start when no other run is training; queued runs start one after another, "
                                      "even with the app closed")
                    ui.button("Download YAML", icon="download", on_click=lambda: download()) \
                        .props("outline").mark("download")
                with ui.dialog() as busy_dialog, ui.card().mark("busy-dialog"):
                    busy_text = ui.label("").classes("text-sm")
                    with ui.row().classes("gap-2"):
                        ui.button("Queue it", icon="queue", on_click=lambda: start(queue=True)).mark("busy-queue")
                        ui.button("Start anyway", on_click=lambda: start(side_by_side=True)) \
                            .props("outline").mark("busy-start")
                        ui.button("Cancel", on_click=lambda: busy_dialog.close()).props("flat")
                ui.upload(label="Upload YAML config", auto_upload=True, max_file_size=MAX_UPLOAD_BYTES,
                          on_upload=lambda e: upload(e)).props("accept=.yaml,.yml flat bordered dense") \
                    .classes("w-full").mark("upload")
            preflight_panel(services, lambda: check(read_form()), lambda changes: apply_changes(changes))

    # -- behaviour --------------------------------------------------------------------------------

    for el in w.values():
        if hasattr(el, "without_auto_validation"):
            el.without_auto_validation()  # errors are set by refresh(), not cleared by the widget itself

    def read_form() -> dict[str, Any]:
        return {**{k: el.value for k, el in w.items()}, **hidden}

    def fill(form: dict[str, Any]) -> None:
        state["filling"] = True
        try:
            hidden.update(custom_schedule=form.get("custom_schedule"), extra=form.get("extra") or {},
                          extra_lora=form.get("extra_lora") or {})
            kinds = dict(SCHEDULE_KINDS)
            if form.get("schedule") == "custom":
                kinds["custom"] = f"custom ({(form.get('custom_schedule') or {}).get('name', '?')})"
            w["schedule"].set_options(kinds)
            for key, opts_of in (("model", models), ("data", datasets)):
                value = form.get(key)
                if value and value not in opts_of:
                    opts_of[value] = value
                    w[key].set_options(opts_of)
            if form.get("optimizer") not in OPTIMIZERS:
                w["optimizer"].set_options(list(dict.fromkeys([*OPTIMIZERS, form.get("optimizer")])))
            for key, el in w.items():
                if key in form:
                    el.value = _fit(el, form[key])
        finally:
            state["filling"] = False
        refresh()

    def apply_preset(name: str | None) -> None:
        if not name or name not in presets:
            return
        try:
            cfg = parse_yaml(presets[name].read_text(), str(presets[name]))
        except ConfigError as e:
            ui.notify(str(e), type="negative")
            return
        fill(config_to_form(cfg))
        ui.notify(f"preset {name} applied")

    def check(form: dict[str, Any]) -> tuple[dict[str, Any], list[ConfigError]]:
        """The engine config and every problem found (form blanks, schema, model and data paths)."""
        errors = form_problems(form)
        cfg = form_to_config(form)
        try:
            manager.prepare_config(cfg)  # schema and paths, every problem at once
        except ConfigProblems as e:
            errors += e.errors
        except ConfigError as e:
            errors.append(e)
        seen, unique = set(), []
        for e in errors:
            f = form_field(e.field)
            if f not in seen:
                seen.add(f)
                unique.append(e)
        return cfg, unique

    def refresh() -> None:
        form = read_form()
        lora = form.get("fine_tune_type") in ("lora", "dora")
        decaying = form.get("schedule") in ("linear", "cosine")
        visible = {
            "iters": form.get("length_mode") != "epochs", "epochs": form.get("length_mode") == "epochs",
            "rank": lora, "scale": lora, "dropout": lora, "train_embeddings": form.get("fine_tune_type") == "full",
            "packing": form.get("mode") == "cpt", "mask_all_turns": form.get("mode") == "ift",
            "warmup": form.get("schedule") != "custom", "final_lr": decaying, "schedule_steps": decaying,
            "patience": bool(form.get("early_stopping")), "min_delta": bool(form.get("early_stopping")),
            "overfit_threshold": bool(form.get("early_stopping")),
        }
        for key, v in visible.items():
            w[key].set_visibility(v)
        cfg, errors = check(form)
        state["cfg"], state["errors"] = cfg, errors
        by_field: dict[str, str] = {}
        for e in errors:
            by_field.setdefault(form_field(e.field), e.reason)
        for key, el in w.items():
            if hasattr(el, "error"):
                el.error = by_field.get(key)
        problems.set_text("\n".join(f"• {e}" for e in errors))
        problems.set_visibility(bool(errors))
        ok.set_visibility(not errors)
        update_chart(form, cfg)

    def update_chart(form: dict[str, Any], cfg: dict[str, Any]) -> None:
        lr = cfg.get("learning_rate")
        iters = cfg.get("iters") if form.get("length_mode") != "epochs" else form.get("schedule_steps")
        note = ""
        if form.get("length_mode") == "epochs" and not iters:
            iters, note = 100, "Training by epochs: the iteration count follows from the data (first 100 shown)."
        if not isinstance(lr, (int, float)) or not isinstance(iters, (int, float)) or iters < 1:
            curve, note = [], "Set a learning rate and a length to see the schedule."
        else:
            curve = lr_curve(cfg.get("lr_schedule"), lr, int(iters), int(cfg.get("grad_accumulation_steps") or 1))
        chart_note.set_text(note)
        if curve != state["curve"]:
            state["curve"] = curve
            chart.options["series"][0]["data"] = curve

    def start(queue: bool = False, side_by_side: bool = False) -> None:
        cfg, errors = check(read_form())
        if errors:
            refresh()
            ui.notify(f"Fix {len(errors)} problem(s) before starting", type="warning")
            return
        busy = [] if queue or side_by_side else manager.active()
        if busy:  # two runs at once share the CPU/GPU and memory: ask first
            busy_text.set_text(f"{busy[0].get('name') or busy[0]['id']} is training. Two runs at once share the "
                               "processor and memory and both slow down.")
            busy_dialog.open()
            return
        busy_dialog.close()
        start_btn.disable()
        queue_btn.disable()
        try:
            if queue:
                folder = manager.enqueue(cfg)
            else:
                folder = manager.create(cfg)
                manager.start(folder.id)
        except (ConfigError, ConfigProblems) as e:
            ui.notify(f"Could not start: {e}", type="negative", multi_line=True)
            return
        finally:
            start_btn.enable()
            queue_btn.enable()
        if queue and folder.info().get("status") == WAITING:
            ahead = len(manager.waiting()) - 1
            ui.notify(f"Run {folder.id} queued: it starts after the active run"
                      + (f" and {ahead} waiting before it" if ahead else ""), type="positive")
            return
        ui.notify(f"Run {folder.id} started", type="positive")
        ui.navigate.to(f"/monitor/{folder.id}")

    def apply_changes(changes: dict[str, Any]) -> None:
        for key, value in changes.items():
            if key in w:
                w[key].value = _fit(w[key], value)
        refresh()

    def download() -> None:
        cfg = form_to_config(read_form())
        name = (cfg.get("name") or "forgellm-config").replace("/", "-")
        ui.download.content(dump_yaml(cfg).encode(), f"{name}.yaml", "application/x-yaml")

    async def upload(e: events.UploadEventArguments) -> None:
        try:
            if e.file.size() > MAX_UPLOAD_BYTES:
                raise ConfigError("config", e.file.name, "file is larger than 1 MB")
            cfg = parse_yaml(await e.file.text(), e.file.name)
        except (ConfigError, UnicodeDecodeError) as err:
            ui.notify(f"Could not read {e.file.name}: {err}", type="negative", multi_line=True)
            return
        fill(config_to_form(cfg))
        ui.notify(f"Loaded {e.file.name}")

    def clone_run(run_id: str) -> None:
        """Fill the form with a run's config (``/train?from=RUN``, the Runs page's "clone config")."""
        try:
            cfg = manager.folder(run_id).config()
        except (ValueError, OSError, yaml.YAMLError) as err:
            ui.notify(f"Could not load the config of run {run_id}: {err}", type="negative")
            return
        form = config_to_form(cfg)
        form["extra"] = without_defaults(form["extra"])  # the resolved config's untouched defaults stay implicit
        fill(form)
        ui.notify(f"Config of run {run_id} loaded")

    def follow_mode(mode: str) -> None:
        """A dataset the page picked (not the user) follows the mode: documents for CPT, chats for IFT."""
        if not state["filling"] and w["data"].value == state.get("picked_data"):
            state["picked_data"] = suggested_dataset(dataset_list, mode) or w["data"].value
            w["data"].value = state["picked_data"]

    w["mode"].on_value_change(lambda e: follow_mode(e.value))
    source = parse_qs(urlsplit(ui.context.client.sub_pages_router.current_path).query).get("from")
    form = default_form()
    if not source:  # a fresh form starts on the first model and a dataset that fits the mode
        state["picked_data"] = suggested_dataset(dataset_list, form["mode"])
        form.update(model=next(iter(models), None), data=state["picked_data"])
    fill(form)
    if source:
        clone_run(source[0])


# ------------------------------------------------------------------------------------------ preflight






def preflight_lines(est: dict[str, Any]) -> list[str]:
    """The estimate in a few lines of text."""
    parts = " · ".join(f"{k} {gigabytes(v)}" for k, v in est["parts_gb"].items() if v >= 0.00005)
    verdict = "fits" if est["fits"] else "DOES NOT FIT"
    data = est["data"]
    lines = [f"Peak memory ≈ {gigabytes(est['peak_gb'])} (MLX), {gigabytes(est['process_gb'])} with the runtime; "
             f"{gigabytes(est['free_gb'])} free: {verdict}",
             parts,
             f"Trainable {est['trainable']:,} of {est['parameters']:,} parameters "
             f"({est['trained_layers']} of {est['layers']} layers); widest batch {est['batch_size']} × {est['seq']}",
             f"Data: {data['samples']:,} training samples ({data['format']}) → {est['steps_per_epoch']:,} steps/epoch; "
             f"{est['iters']:,} iterations",
             f"Time ≈ {duration(est['seconds'])} at ~{est['tokens_per_second']:,.0f} tok/s "
             "(rough; the probe measures it)"]
    if est.get("warning"):
        lines.append(f"⚠ {est['warning']}")
    if data.get("bad_lines"):
        lines.append(f"⚠ {data['bad_lines']} bad line(s) in the data: see the Datasets page")
    return lines


def preflight_panel(services: Services, current, apply) -> None:
    """Estimate peak memory and time for the form's config; optionally probe a few real steps.

    ``current()`` gives ``(config, problems)`` of the form, ``apply(changes)`` writes suggested values into it.
    """
    st: dict[str, Any] = {"est": None, "probe": None, "suggestion": None, "version": -1}
    with ui.card().classes("w-full").mark("preflight"):
        ui.label("Preflight").classes("text-sm font-semibold text-grey-7")
        with ui.row().classes("gap-2"):
            est_btn = ui.button("Estimate memory and time", icon="speed", on_click=lambda: run_estimate()) \
                .props("outline dense no-caps").mark("preflight-estimate")
            probe_btn = ui.button("Probe 3 steps", icon="science", on_click=lambda: run_probe()) \
                .props("outline dense no-caps").mark("preflight-probe")
            probe_btn.tooltip("Run three real training steps in a temporary folder and measure tokens/s and memory")
        text = ui.label("").classes("whitespace-pre-line text-xs").mark("preflight-text")
        probe_text = ui.label("").classes("whitespace-pre-line text-xs").mark("preflight-probe-text")
        with ui.row().classes("items-center gap-2") as advice_row:
            advice = ui.label("").classes("text-xs text-warning").mark("preflight-suggestion")
            ui.button("Apply", on_click=lambda: apply_suggestion()).props("flat dense no-caps") \
                .mark("preflight-apply")
    advice_row.set_visibility(False)

    def resolved() -> dict[str, Any] | None:
        cfg, errors = current()
        if errors:
            ui.notify("Fix the config's problems first", type="warning")
            return None
        try:
            return services.manager.prepare_config(cfg)
        except (ConfigError, ConfigProblems) as e:
            ui.notify(str(e), type="negative", multi_line=True)
            return None

    def show_suggestion(sugg: dict[str, Any] | None) -> None:
        st["suggestion"] = sugg
        advice.set_text(f"Suggestion: {sugg['text']}" if sugg else "")
        advice_row.set_visibility(bool(sugg))

    def apply_suggestion() -> None:
        if st["suggestion"]:
            apply({k: v for k, v in st["suggestion"].items() if k != "text"})
            show_suggestion(None)

    async def run_estimate() -> dict[str, Any] | None:
        cfg = resolved()
        if cfg is None:
            return None
        est_btn.props("loading")
        try:
            est = await run.io_bound(preflight.estimate, cfg)
        except (preflight.PreflightError, DataError, ValueError, OSError) as e:
            text.set_text(f"Cannot estimate: {e}")
            text.classes(replace="whitespace-pre-line text-xs text-negative")
            return None
        finally:
            est_btn.props(remove="loading")
        st["est"] = est
        text.set_text("\n".join(preflight_lines(est)))
        text.classes(replace="whitespace-pre-line text-xs" + ("" if est["fits"] else " text-negative"))
        show_suggestion(est["suggestion"])
        return est

    async def run_probe() -> None:
        probe = st["probe"]
        if probe is not None and probe.state == "running":
            probe.cancel()
            return
        est = await run_estimate()
        cfg = resolved() if est is not None else None
        if cfg is None:
            return
        st["probe"] = preflight.Probe(cfg, root=services.workspace.root / ".forgellm" / "probes").start()
        probe_btn.set_text("Cancel probe")

    def poll() -> None:
        probe = st["probe"]
        if probe is None or probe.version == st["version"]:
            return
        st["version"] = probe.version
        if probe.state == "running":
            probe_text.set_text(probe.message)
            return
        probe_btn.set_text("Probe 3 steps")
        if probe.state != "done" or not probe.result:
            probe_text.set_text(probe.message)
            return
        r = probe.result
        lines = [f"Probe: {r['tokens_per_second'] or 0:,.0f} tok/s, MLX peak {gigabytes(r['peak_gb'])}, "
                 f"RSS {gigabytes(r['rss_gb'])}"]
        est = st["est"]
        if est:
            adv = preflight.probe_advice(r, est)
            if adv["estimate_error"] is not None:
                lines.append(f"The estimate was {gigabytes(est['peak_gb'])} ({adv['estimate_error']:+.0%} of the "
                             "measured peak)")
            if adv.get("seconds") is not None:
                lines.append(f"Time at the measured speed ≈ {duration(adv['seconds'])}")
            if adv["suggestion"]:
                show_suggestion(adv["suggestion"] if "batch_size" in adv["suggestion"] else None)
                if "batch_size" not in adv["suggestion"]:
                    lines.append(adv["suggestion"]["text"])
        probe_text.set_text("\n".join(lines))

    ui.timer(0.5, poll)
