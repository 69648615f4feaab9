"""Train page: pick model, data and preset, set every hyperparameter, see problems inline, start a run.

Form values live in the widgets (:mod:`pages.train.fields`); :mod:`pages.train.form` turns them into the engine
config. Validation is ``services.config`` (through ``RunManager.prepare_config``), run on every change; nothing
starts while it reports a problem.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

import yaml
from nicegui import run, ui

from pages.train.fields import SchedulePreview, TrainForm, YamlFiles
from pages.train.form import check_form, config_to_form, default_form, lr_preview, visible_fields
from pages.train.preflight import PreflightPanel
from services.config import ConfigError, ConfigProblems, list_presets, load_yaml
from services.library.datasets import list_datasets, suggested_dataset
from services.library.models import list_models
from services.training.distributed import preflight as preflight_hosts
from services.training.folder import WAITING
from services.training.index import default_fork_iters, without_defaults
from services.training.manager import parse_ref

if TYPE_CHECKING:
    from app.composition import Services


class StartCard:
    """The form's problems (or "Config is valid."), Start / Queue / Download YAML, the busy dialog, the upload."""

    def __init__(self, start: Callable[..., None], files: YamlFiles) -> None:
        with ui.card().classes("w-full"):
            self.fork = ui.label("").classes("text-sm").mark("fork-start")
            self.fork.set_visibility(False)
            self.problems = ui.label("").classes("whitespace-pre-line text-negative text-sm").mark("problems")
            self.valid = ui.label("Config is valid.").classes("text-positive text-sm").mark("valid")
            with ui.row().classes("gap-2"):
                self.start = ui.button("Start training", icon="play_arrow", on_click=lambda: start()).mark("start")
                self.queue = ui.button("Queue", icon="queue", on_click=lambda: start(queue=True)) \
                    .props("outline").mark("queue")
                self.queue.tooltip("Start when no other run is training; queued runs start one after another, "
                                   "even with the app closed")
                ui.button("Download YAML", icon="download", on_click=files.download) \
                    .props("outline").mark("download")
            with ui.dialog() as self.busy_dialog, ui.card().mark("busy-dialog"):
                self.busy_text = ui.label("").classes("text-sm")
                with ui.row().classes("gap-2"):
                    ui.button("Queue it", icon="queue", on_click=lambda: start(queue=True)).mark("busy-queue")
                    ui.button("Start anyway", on_click=lambda: start(side_by_side=True)) \
                        .props("outline").mark("busy-start")
                    ui.button("Cancel", on_click=self.busy_dialog.close).props("flat")
            files.upload_widget()

    def show(self, errors: list[ConfigError]) -> None:
        self.problems.set_text("\n".join(f"• {e}" for e in errors))
        self.problems.set_visibility(bool(errors))
        self.valid.set_visibility(not errors)

    def ask(self, run: dict[str, Any]) -> None:
        """Ask before starting beside ``run``, which is training."""
        self.busy_text.set_text(f"{run.get('name') or run['id']} is training. Two runs at once share the "
                                "processor and memory and both slow down.")
        self.busy_dialog.open()

    def enable(self, on: bool) -> None:
        for button in (self.start, self.queue):
            button.set_enabled(on)

    def show_fork(self, ref: str | None) -> None:
        """Say that the run starts from checkpoint ``ref`` (a fork starts at once: it has no queue)."""
        it = ref.rpartition("@")[2] if ref else ""
        self.fork.set_text(f"Starts from checkpoint {ref} (a fork of that run: iterations count on from {it})"
                           if ref else "")
        self.fork.set_visibility(bool(ref))
        self.queue.set_visibility(not ref)


class TrainPage:
    """The form on the left; the schedule preview, the start card and the preflight panel on the right."""

    def __init__(self, services: Services) -> None:
        self.manager = services.manager
        self.presets = list_presets(services.configs_dir)
        self.datasets = list_datasets(services.workspace)
        models = {m["key"]: m["label"] for m in list_models(services.workspace)}
        self.picked_data: str | None = None  # the dataset the page chose (not the person): it follows the mode
        self.fork_from: tuple[str, int] | None = None  # (run, checkpoint) a preference run starts from
        ui.label("Train").classes("text-2xl font-semibold")
        with ui.row().classes("w-full items-start gap-4 no-wrap max-lg:flex-wrap"):
            self.form = TrainForm(list(self.presets), models, {d["key"]: d["label"] for d in self.datasets},
                                  on_preset=self.apply_preset, on_change=self.refresh,
                                  check_machines=self.check_machines)
            with ui.column().classes("w-[420px] max-lg:w-full gap-3 shrink-0"):
                self.preview = SchedulePreview()
                self.actions = StartCard(self.start, YamlFiles(self.form, self.fill, self.manager.prepare_config))
                self.preflight = PreflightPanel(services, self.current, self.apply_changes)
        self.form.model_data.mode.on_value_change(lambda e: self.follow_mode(e.value))

    def open(self, source: str | None) -> None:
        """Fill the form: a fresh one on the first model and a dataset that fits the mode, or a run's config."""
        form = default_form()
        if source is None:
            self.picked_data = suggested_dataset(self.datasets, form["mode"])
            form.update(model=next(iter(self.form.model_data.model.options), None), data=self.picked_data)
        self.fill(form)
        if source is not None:
            self.clone_run(source)

    def open_preference(self, dataset: str, start: str | None) -> None:
        """DPO on ``dataset`` (rated pairs), forked from checkpoint ``start`` (``RUN@ITER``) with its settings:
        the Playground's "Train on these ratings"."""
        form = default_form()
        if start:
            try:
                run_id, it = parse_ref(start)
                folder = self.manager.folder(run_id)
                if it not in folder.checkpoint_iterations():
                    raise ConfigError("start", start, f"run {run_id} has checkpoints {folder.checkpoint_iterations()}")
                parent = folder.config()
                form = config_to_form(parent)
                form["extra"] = without_defaults(form["extra"])
                form["iters"] = default_fork_iters(parent, it)  # a fork counts on from its checkpoint
                self.fork_from = (run_id, it)
                form["name"] = f"{folder.info().get('name') or run_id}-dpo"
            except (ConfigError, OSError, ValueError, yaml.YAMLError) as err:
                ui.notify(f"Cannot start from {start}: {err}", type="negative")
        else:
            form["model"] = next(iter(self.form.model_data.model.options), None)
        form.update(mode="dpo", data=dataset)
        self.fill(form)
        self.actions.show_fork(start if self.fork_from else None)

    def current(self) -> tuple[dict[str, Any], list[ConfigError]]:
        """The engine config of the form and every problem found (form blanks, schema, model and data paths)."""
        return check_form(self.form.read(), self.manager.prepare_config)

    def refresh(self) -> None:
        form = self.form.read()
        cfg, errors = check_form(form, self.manager.prepare_config)
        self.form.show(visible_fields(form), errors)
        self.form.machines.forget_unless(machines_of(cfg))
        self.actions.show(errors)
        self.preview.show(*lr_preview(form, cfg))

    def fill(self, form: dict[str, Any]) -> None:
        self.form.fill(form)
        self.refresh()

    def apply_changes(self, changes: dict[str, Any]) -> None:
        self.form.set_values(changes)
        self.refresh()

    def apply_preset(self, name: str | None) -> None:
        if not name or name not in self.presets:
            return
        try:
            cfg = load_yaml(self.presets[name])
        except ConfigError as e:
            ui.notify(str(e), type="negative")
            return
        self.fill(config_to_form(cfg))
        ui.notify(f"preset {name} applied")

    def follow_mode(self, mode: str) -> None:
        """A dataset the page picked (not the person) follows the mode: documents for CPT, chats for IFT."""
        data = self.form.model_data.data
        if not self.form.filling and data.value == self.picked_data:
            self.picked_data = suggested_dataset(self.datasets, mode) or data.value
            data.value = self.picked_data

    def start(self, queue: bool = False, side_by_side: bool = False) -> None:
        cfg, errors = self.current()
        if errors:
            self.refresh()
            ui.notify(f"Fix {len(errors)} problem(s) before starting", type="warning")
            return
        if self.fork_from and cfg.get("iters") is not None and cfg["iters"] <= self.fork_from[1]:
            ui.notify(f"A fork counts on from its checkpoint: set more than {self.fork_from[1]} iterations",
                      type="warning")
            return
        busy = [] if queue or side_by_side else self.manager.active()
        if busy:  # two runs at once share the CPU/GPU and memory: ask first
            self.actions.ask(busy[0])
            return
        self.actions.busy_dialog.close()
        self.actions.enable(False)
        try:
            if self.fork_from:
                folder = self.manager.fork(*self.fork_from, cfg)
            elif queue:
                folder = self.manager.enqueue(cfg)
            else:
                folder = self.manager.create(cfg)
                self.manager.start(folder.id)
        except (ConfigError, ConfigProblems) as e:
            ui.notify(f"Could not start: {e}", type="negative", multi_line=True)
            return
        finally:
            self.actions.enable(True)
        if queue and folder.info().get("status") == WAITING:
            ahead = len(self.manager.waiting()) - 1
            ui.notify(f"Run {folder.id} queued: it starts after the active run"
                      + (f" and {ahead} waiting before it" if ahead else ""), type="positive")
            return
        ui.notify(f"Run {folder.id} started", type="positive")
        ui.navigate.to(f"/monitor/{folder.id}")

    async def check_machines(self) -> None:
        """Preflight every host of the form's config (ssh for remote ones) off the event loop."""
        cfg, _ = self.current()
        try:
            prepared = self.manager.prepare_config(cfg)
        except (ConfigError, ConfigProblems) as e:
            ui.notify(f"Fix the config first: {e}", type="warning", multi_line=True)
            return
        self.form.machines.checking(machines_of(cfg))
        checks = await run.io_bound(preflight_hosts, prepared)
        if self.form.machines.checked == machines_of(cfg):  # the form did not change meanwhile
            self.form.machines.show(checks)

    def clone_run(self, run_id: str) -> None:
        """Fill the form with a run's config (``/train?from=RUN``, the Runs page's "clone config")."""
        try:
            cfg = self.manager.folder(run_id).config()
        except (ValueError, OSError, yaml.YAMLError) as err:
            ui.notify(f"Could not load the config of run {run_id}: {err}", type="negative")
            return
        form = config_to_form(cfg)
        form["extra"] = without_defaults(form["extra"])  # the resolved config's untouched defaults stay implicit
        self.fill(form)
        ui.notify(f"Config of run {run_id} loaded")


def machines_of(cfg: dict[str, Any]) -> tuple[Any, ...]:
    """What a machines check depends on: the hosts or processes, and the model and data paths to find there."""
    return cfg.get("distributed"), cfg.get("model"), cfg.get("data")


def train_page(services: Services) -> None:
    """Build the Train page for one client (``/train?from=RUN`` starts from a run's config;
    ``/train?preference=DATASET&start=RUN@ITER`` is DPO on rated pairs from a checkpoint)."""
    query = parse_qs(urlsplit(ui.context.client.sub_pages_router.current_path).query)
    page = TrainPage(services)
    if query.get("preference"):
        page.open_preference(query["preference"][0], (query.get("start") or [None])[0])
    else:
        page.open((query.get("from") or [None])[0])
