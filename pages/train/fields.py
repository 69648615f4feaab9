"""The Train form's cards, the learning-rate preview and the YAML files of the form.

Every field is a widget marked ``field-KEY`` (KEY as in :data:`pages.train.form.FORM_DEFAULTS`) with its tooltip
from :data:`pages.train.form.TIPS`; :class:`TrainForm` reads and fills them as one form dict.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from nicegui import events, ui
from nicegui.elements.mixins.value_element import ValueElement

from pages.common import METHODS, MODES, ROUNDED_TOOLTIP
from pages.train.form import (
    SCHEDULE_KINDS,
    TIPS,
    form_field,
    form_to_config,
    load_upload,
    schedule_choices,
)
from services.config import MAX_YAML_BYTES, OPTIMIZERS, ConfigError, check_yaml_size, dump_yaml
from services.training.preference import LOSS_TYPES

Form = dict[str, Any]


def fit(el: ValueElement, value: Any) -> Any:
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


class FieldMaker:
    """Makes the form's widgets (marked ``field-KEY``, with their tooltip, calling ``on_change`` on a change) and
    keeps them by form key, so that the whole form can be read and filled."""

    def __init__(self, on_change: Callable[[], None]) -> None:
        self.on_change = on_change
        self.widgets: dict[str, ValueElement] = {}

    def _changed(self, _: Any = None) -> None:
        self.on_change()

    def _add(self, key: str, el: Any) -> Any:
        el.tooltip(TIPS.get(key, ""))
        self.widgets[key] = el.mark(f"field-{key}")
        return el

    def number(self, key: str, label: str, **kw: Any) -> ui.number:
        # no min/max: ui.number would clamp silently on blur; the engine's validation explains instead
        return self._add(key, ui.number(label, on_change=self._changed, **kw).props("dense outlined").classes("w-40"))

    def toggle(self, key: str, options: dict[str, str]) -> ui.toggle:
        return self._add(key, ui.toggle(options, on_change=self._changed).props("dense no-caps"))

    def switch(self, key: str, label: str) -> ui.switch:
        return self._add(key, ui.switch(label, on_change=self._changed))

    def select(self, key: str, options: dict[str, str] | list[str], label: str, width: str, **kw: Any) -> ui.select:
        el = ui.select(options, label=label, on_change=self._changed, **kw).props("dense outlined").classes(width)
        return self._add(key, el)

    def text(self, key: str, label: str) -> ui.input:
        return self._add(key, ui.input(label, on_change=self._changed).props("dense outlined").classes("w-56"))

    def lines(self, key: str, label: str, placeholder: str = "") -> ui.textarea:
        el = ui.textarea(label, placeholder=placeholder, on_change=self._changed)
        return self._add(key, el.props("dense outlined autogrow").classes("w-96"))


def card(title: str) -> ui.card:
    """A full-width card headed by ``title``."""
    box = ui.card().classes("w-full")
    with box:
        ui.label(title).classes("text-sm font-semibold text-grey-7")
    return box


class ModelDataCard:
    """Preset, run name, model, dataset, mode and fine-tuning method."""

    def __init__(self, make: FieldMaker, presets: list[str], models: dict[str, str], datasets: dict[str, str],
                 on_preset: Callable[[str | None], None]) -> None:
        with card("Model and data"), ui.row().classes("w-full items-end gap-3"):
            self.preset = ui.select(presets, label="Preset", on_change=lambda e: on_preset(e.value)) \
                .props("dense outlined clearable").classes("w-48").mark("preset")
            self.preset.tooltip(TIPS["preset"])
            self.name = make.text("name", "Run name")
            self.model = make.select("model", models, "Model", "w-96", with_input=True, new_value_mode="add-unique")
            self.data = make.select("data", datasets, "Dataset", "w-96", with_input=True,
                                    new_value_mode="add-unique")
            self.model_note = ui.label("").classes("w-full text-sm text-warning").mark("model-quantized-note")
            self.model_note.visible = False
            with ui.row().classes("w-full items-center gap-3"):
                ui.label("Mode").classes("text-sm text-grey-7")
                self.mode = make.toggle("mode", MODES)
                ui.label("Fine-tuning").classes("text-sm text-grey-7 ml-4")
                self.fine_tune_type = make.toggle("fine_tune_type", METHODS)


class LengthCard:
    """Run length, batch, optimizer, learning rate and its schedule."""

    def __init__(self, make: FieldMaker) -> None:
        with card("Length and optimisation"):
            with ui.row().classes("w-full items-end gap-3"):
                self.length_mode = make.toggle("length_mode", {"iters": "iterations", "epochs": "epochs"})
                self.iters = make.number("iters", "Iterations")
                self.epochs = make.number("epochs", "Epochs")
                self.batch_size = make.number("batch_size", "Batch size")
                self.grad_accumulation_steps = make.number("grad_accumulation_steps", "Grad accumulation")
                self.optimizer = make.select("optimizer", list(OPTIMIZERS), "Optimizer", "w-32")
            with ui.row().classes("w-full items-end gap-3"):
                self.learning_rate = make.number("learning_rate", "Learning rate", step=1e-5)
                self.schedule = make.toggle("schedule", dict(SCHEDULE_KINDS))
                self.warmup = make.number("warmup", "Warm-up iterations")
                self.final_lr = make.number("final_lr", "Final learning rate", step=1e-6)
                self.schedule_steps = make.number("schedule_steps", "Schedule length")


class WeightsCard:
    """Which weights train: layers, LoRA settings, embeddings, gradient checkpointing."""

    def __init__(self, make: FieldMaker) -> None:
        with card("Trainable weights"), ui.row().classes("w-full items-end gap-3"):
            self.num_layers = make.number("num_layers", "Layers (-1 = all)")
            self.rank = make.number("rank", "LoRA rank")
            self.scale = make.number("scale", "LoRA scale")
            self.dropout = make.number("dropout", "LoRA dropout", step=0.05)
            self.train_embeddings = make.switch("train_embeddings", "Train embeddings and head")
            self.grad_checkpoint = make.switch("grad_checkpoint", "Gradient checkpointing")


class DataHandlingCard:
    """Sequence length, validation split, seed, packing and turn masking."""

    def __init__(self, make: FieldMaker) -> None:
        with card("Data handling"), ui.row().classes("w-full items-end gap-3"):
            self.max_seq_length = make.number("max_seq_length", "Max sequence length")
            self.valid_fraction = make.number("valid_fraction", "Validation fraction", step=0.05)
            self.seed = make.number("seed", "Seed")
            self.packing = make.switch("packing", "Pack documents")
            self.mask_all_turns = make.switch("mask_all_turns", "Loss on all assistant turns")
            self.pack_samples = make.switch("pack_samples", "Pack samples")


class PreferenceCard:
    """DPO/ORPO settings: beta (ORPO's lambda), the DPO loss, label smoothing, the best checkpoint, compat mode."""

    def __init__(self, make: FieldMaker) -> None:
        self.box = card("Preference tuning")
        with self.box, ui.row().classes("w-full items-end gap-3"):
            self.beta = make.number("beta", "Beta (ORPO: lambda)", step=0.05)
            self.loss_type = make.toggle("loss_type", {k: k for k in LOSS_TYPES})
            self.label_smoothing = make.number("label_smoothing", "Label smoothing", step=0.05)
            self.best_by = make.toggle("best_by", {"val_loss": "best by val loss", "accuracy": "best by accuracy"})
            self.compat = make.switch("compat", "mlx-lm-lora compatible")


class EvaluationCard:
    """Reports, evaluations, checkpoints and early stopping."""

    def __init__(self, make: FieldMaker) -> None:
        with card("Evaluation and checkpoints"):
            with ui.row().classes("w-full items-end gap-3"):
                self.steps_per_report = make.number("steps_per_report", "Report every")
                self.steps_per_eval = make.number("steps_per_eval", "Evaluate every")
                self.save_every = make.number("save_every", "Checkpoint every")
                self.val_batches = make.number("val_batches", "Validation batches (-1 = all)")
                self.keep_checkpoints = make.number("keep_checkpoints", "Keep checkpoints")
            with ui.row().classes("w-full items-end gap-3"):
                self.early_stopping = make.switch("early_stopping", "Early stopping")
                self.patience = make.number("patience", "Patience")
                self.min_delta = make.number("min_delta", "Min delta", step=0.001)
                self.overfit_threshold = make.number("overfit_threshold", "Overfit threshold", step=0.05)


class MachinesCard:
    """Where the run trains: processes on this machine, or several hosts; "Check machines" checks each one
    (reachable over ssh, same versions, model and data at the same paths) and shows a line per host."""

    def __init__(self, make: FieldMaker, check: Callable[[], Any]) -> None:
        with card("Machines"):
            with ui.row().classes("w-full items-start gap-3"):
                self.processes = make.number("processes", "Processes")
                self.hosts = make.lines("hosts", "Hosts (rank 0 first)", "mac-studio.local 10.0.0.1\n10.0.0.2")
                self.backend = make.toggle("backend", {"ring": "ring", "jaccl": "jaccl", "mpi": "mpi"})
                self.check = ui.button("Check machines", icon="lan", on_click=check).props("outline") \
                    .mark("check-machines")
            self.result = ui.column().classes("w-full gap-1").mark("machines")
        self.checked: Any = None  # what the lines shown were checked for

    def checking(self, what: Any) -> None:
        self.checked = what
        self.result.clear()
        with self.result:
            ui.label("checking every host…").classes("text-sm text-grey-7").mark("machine-check")

    def forget_unless(self, what: Any) -> None:
        """Clear the lines when the form no longer asks for what they were checked for."""
        if self.checked is not None and what != self.checked:
            self.checked = None
            self.result.clear()

    def show(self, checks: list[dict[str, Any]]) -> None:
        """One line per host: ready, or each problem found (what to do about it)."""
        self.result.clear()
        with self.result:
            for c in checks:
                where = "this machine" if c["local"] else "over ssh"
                text = f"rank {c['rank']} · {c['host']} · {where} · " + (
                    "ready" if c["ok"] else "; ".join(c["problems"]))
                with ui.row().classes("items-center gap-2 no-wrap"):
                    ui.icon("check_circle" if c["ok"] else "error", color="positive" if c["ok"] else "negative")
                    ui.label(text).classes("text-sm" + ("" if c["ok"] else " text-negative")).mark("machine-check")


class TrainForm:
    """The form's cards in one column, read and filled as the form dict of :mod:`pages.train.form`.

    ``on_change()`` runs on every change a person makes (not while :meth:`fill` writes the widgets).
    """

    def __init__(self, presets: list[str], models: dict[str, str], datasets: dict[str, str],
                 on_preset: Callable[[str | None], None], on_change: Callable[[], None],
                 check_machines: Callable[[], Any] = lambda: None) -> None:
        self.on_change = on_change
        self.filling = False
        # form keys without a widget: a schedule the form cannot edit and config keys it has no field for
        self.custom_schedule: dict[str, Any] | None = None
        self.extra: dict[str, Any] = {}
        self.extra_lora: dict[str, Any] = {}
        make = FieldMaker(self._changed)
        with ui.column().classes("grow gap-3 min-w-0"):
            self.model_data = ModelDataCard(make, presets, models, datasets, on_preset)
            self.length = LengthCard(make)
            self.weights = WeightsCard(make)
            self.data_handling = DataHandlingCard(make)
            self.preference = PreferenceCard(make)
            self.evaluation = EvaluationCard(make)
            self.machines = MachinesCard(make, check_machines)
        self.widgets = make.widgets
        for el in self.widgets.values():
            if hasattr(el, "without_auto_validation"):
                el.without_auto_validation()  # errors are set by show_errors(), not cleared by the widget itself

    def _changed(self) -> None:
        if not self.filling:
            self.on_change()

    def read(self) -> Form:
        """The form dict of the widgets' values."""
        return {**{k: el.value for k, el in self.widgets.items()}, "custom_schedule": self.custom_schedule,
                "extra": self.extra, "extra_lora": self.extra_lora}

    def fill(self, form: Form) -> None:
        """Write ``form`` into the widgets (choices they lack are added) without calling ``on_change``."""
        self.filling = True
        try:
            self.custom_schedule = form.get("custom_schedule")
            self.extra, self.extra_lora = form.get("extra") or {}, form.get("extra_lora") or {}
            self.length.schedule.set_options(schedule_choices(form))
            for key, select in (("model", self.model_data.model), ("data", self.model_data.data)):
                value = form.get(key)
                if value and value not in select.options:
                    select.set_options({**select.options, value: value})
            if form.get("optimizer") not in OPTIMIZERS:
                self.length.optimizer.set_options(list(dict.fromkeys([*OPTIMIZERS, form.get("optimizer")])))
            for key, el in self.widgets.items():
                if key in form:
                    el.value = fit(el, form[key])
        finally:
            self.filling = False

    def set_values(self, changes: Form) -> None:
        """Set some fields as a person would (each change calls ``on_change``)."""
        for key, value in changes.items():
            if key in self.widgets:
                self.widgets[key].value = fit(self.widgets[key], value)

    def show(self, visible: dict[str, bool], errors: list[ConfigError]) -> None:
        """Show the fields that apply, each with the first problem found for it."""
        for key, shown in visible.items():
            self.widgets[key].set_visibility(shown)
        self.preference.box.set_visibility(visible["beta"])
        by_field: dict[str, str] = {}
        for e in errors:
            by_field.setdefault(form_field(e.field), e.reason)
        for key, el in self.widgets.items():
            if hasattr(el, "error"):
                el.error = by_field.get(key)


def _chart_options() -> dict[str, Any]:
    return {"animation": False, "grid": {"left": 60, "right": 16, "top": 24, "bottom": 36},
            "tooltip": dict(ROUNDED_TOOLTIP),
            "xAxis": {"type": "value", "name": "iteration", "nameLocation": "middle", "nameGap": 22, "min": 0},
            "yAxis": {"type": "value", "name": "learning rate", "scale": False},
            "series": [{"type": "line", "showSymbol": False, "data": [], "name": "lr"}]}


class SchedulePreview:
    """The learning rate over the run as the form sets it, with a note under the chart."""

    def __init__(self) -> None:
        with ui.card().classes("w-full"):
            ui.label("Learning-rate schedule").classes("text-sm font-semibold text-grey-7")
            self.chart = ui.echart(_chart_options()).classes("w-full h-56").mark("lr-chart")
            self.note = ui.label("").classes("text-xs text-grey-7")
        self._curve: list[tuple[int, float]] | None = None

    def show(self, curve: list[tuple[int, float]], note: str) -> None:
        self.note.set_text(note)
        if curve != self._curve:
            self._curve = curve
            self.chart.options["series"][0]["data"] = curve


class YamlFiles:
    """The form's config as a YAML download, and a YAML upload into the form (through ``fill(form)``) once
    ``prepare`` (the run manager's ``prepare_config``) finds nothing but model or data paths to fix."""

    def __init__(self, form: TrainForm, fill: Callable[[Form], None],
                 prepare: Callable[[dict[str, Any]], Any]) -> None:
        self.form, self.fill, self.prepare = form, fill, prepare
        self.problems: ui.label | None = None

    def download(self) -> None:
        cfg = form_to_config(self.form.read())
        name = (cfg.get("name") or "forgellm-config").replace("/", "-")
        ui.download.content(dump_yaml(cfg).encode(), f"{name}.yaml", "application/x-yaml")

    async def upload(self, e: events.UploadEventArguments) -> None:
        name = e.file.name
        try:
            check_yaml_size(e.file.size(), name)  # the browser's limit can be bypassed
        except ConfigError as err:
            self.refuse(name, [err])
            return
        form, problems = load_upload(await e.file.read(), name, self.prepare)
        if form is None:
            self.refuse(name, problems)
            return
        self.show_problems("")
        self.fill(form)
        ui.notify(f"Loaded {name}" + (f"; choose {' and '.join(p.field for p in problems)}" if problems else ""))

    def refuse(self, name: str, problems: list[ConfigError]) -> None:
        """Say why ``name`` was not loaded, problem by problem (the form keeps what it had)."""
        self.show_problems(f"{name} was not loaded; fix it and upload it again:\n"
                           + "\n".join(f"• {p}" for p in problems))
        ui.notify(f"{name} was not loaded: {len(problems)} problem(s)", type="negative")

    def show_problems(self, text: str) -> None:
        if self.problems is not None:
            self.problems.set_text(text)

    def upload_widget(self) -> ui.upload:
        """The upload field (YAML files up to :data:`services.config.MAX_YAML_BYTES`) and its problems."""
        widget = ui.upload(label="Upload YAML config", auto_upload=True, max_file_size=MAX_YAML_BYTES,
                           on_upload=self.upload).props("accept=.yaml,.yml flat bordered dense") \
            .classes("w-full").mark("upload")
        self.problems = ui.label("").classes("whitespace-pre-line text-negative text-sm").mark("upload-problems")
        return widget
