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

from pages.common import recall, remember
from pages.train.fields import SchedulePreview, TrainForm, YamlFiles
from pages.train.form import (
    check_form,
    config_to_form,
    default_form,
    form_problems,
    form_to_config,
    lr_preview,
    visible_fields,
)
from pages.train.preflight import PreflightPanel
from services.config import ConfigError, ConfigProblems, list_presets, load_yaml
from services.library.datasets import list_datasets, suggested_dataset
from services.library.imports import quantized_model_warning
from services.library.models import list_models
from services.settings import SettingsError, load_settings
from services.system import mlx_backend
from services.training import defaults, preflight
from services.training.distributed import preflight as preflight_hosts
from services.training.folder import WAITING
from services.training.index import default_fork_iters, without_defaults
from services.training.manager import parse_ref
from services.units import duration

if TYPE_CHECKING:
    from app.composition import Services


class StartCard:
    """The form's problems (or "Config is valid."), Start / Queue / Download YAML, the busy dialog, the upload."""

    def __init__(self, start: Callable[..., Any], files: YamlFiles, fit: Callable[[], Any],
                 reset: Callable[[], Any]) -> None:
        self._go: Callable[[], Any] = lambda: None
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
            self.estimate = ui.label("").classes("text-sm").mark("estimate")
            self.cut = ui.label("").classes("text-sm text-warning").mark("cut-warning")
            self.proposal = ui.label("").classes("text-xs text-grey-7 whitespace-pre-line").mark("proposal")
            with ui.row().classes("gap-2"):
                self.fit = ui.button("Fit to data and machine", icon="auto_fix_high", on_click=fit) \
                    .props("flat dense no-caps").mark("fit")
                self.fit.tooltip("Propose max_seq_length, batch size, length and validation for this dataset, "
                                 "model and machine")
                ui.button("Reset form", icon="restart_alt", on_click=reset).props("flat dense no-caps") \
                    .mark("reset-form").tooltip("Forget this browser's draft and start from fitted defaults")
            with ui.dialog() as self.long_dialog, ui.card().mark("long-dialog"):
                self.long_text = ui.label("").classes("text-sm").mark("long-text")
                with ui.row().classes("gap-2"):
                    ui.button("Start anyway", icon="play_arrow", on_click=lambda: self._go()).mark("long-start")
                    ui.button("Cancel", on_click=self.long_dialog.close).props("flat").mark("long-cancel")
            with ui.dialog() as self.busy_dialog, ui.card().mark("busy-dialog"):
                self.busy_text = ui.label("").classes("text-sm")
                with ui.row().classes("gap-2"):
                    ui.button("Queue it", icon="queue", on_click=lambda: start(queue=True, confirmed=True)) \
                        .mark("busy-queue")
                    ui.button("Start anyway", on_click=lambda: start(side_by_side=True, confirmed=True)) \
                        .props("outline").mark("busy-start")
                    ui.button("Cancel", on_click=self.busy_dialog.close).props("flat")
            files.upload_widget()

    def show(self, errors: list[ConfigError]) -> None:
        self.problems.set_text("\n".join(f"• {e}" for e in errors))
        self.problems.set_visibility(bool(errors))
        self.valid.set_visibility(not errors)

    def show_estimate(self, est: dict[str, Any] | None, problem: str = "") -> None:
        """The estimated duration beside Start and the samples that will be cut (``None``: not known yet)."""
        self.estimate.classes(remove="opacity-50")
        if est is None:
            self.estimate.set_text(problem)
            self.cut.set_text("")
            return
        self.estimate.set_text(f"Estimated ≈ {duration(est['total_seconds'])} on this machine "
                               f"({est['iters']:,} iterations; validation ≈ {duration(est['eval_seconds'])})")
        data = est["data"]
        cut = data.get("truncated") or 0
        self.cut.set_text(f"⚠ {cut:,} of {data['samples']:,} training samples are longer than max_seq_length "
                          f"{est['seq'] + 1:,} and will be cut" if cut and data.get("fmt") != "documents" else "")

    def ask_long(self, seconds: float, minutes: float, go: Callable[[], Any]) -> None:
        """Ask before starting a run estimated at ``seconds``, beyond the Settings page's ``minutes``."""
        self.long_text.set_text(f"This run is estimated at ≈ {duration(seconds)} on this machine, longer than "
                                f"the {minutes:g} min set on the Settings page. Start it anyway?")
        self._go = go
        self.long_dialog.open()

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


DRAFT_KEY = "train_draft"


class TrainPage:
    """The form on the left; the schedule preview, the start card and the preflight panel on the right.

    A fresh form starts from the mode's preset fitted to the data and machine (:mod:`services.training.defaults`);
    the form is kept as this browser's draft on every change; the estimate beside Start follows the form."""

    def __init__(self, services: Services) -> None:
        self.services = services
        self.manager = services.manager
        self.presets = list_presets(services.configs_dir)
        self.datasets = list_datasets(services.workspace)
        self.model_entries = {m["key"]: m for m in list_models(services.workspace)}
        models = {k: m["label"] for k, m in self.model_entries.items()}
        self.picked_data: str | None = None  # the dataset the page chose (not the person): it follows the mode
        self.fork_from: tuple[str, int] | None = None  # (run, checkpoint) a preference run starts from
        self.touched = False  # a person changed the form since it was filled (a late automatic fit keeps off)
        self.follow_schedule = False  # the schedule length follows the run length (until a person sets it)
        self.keep = False  # the form is this browser's draft (once the page has filled it)
        self._dirty, self._estimating = True, False
        ui.label("Train").classes("text-2xl font-semibold")
        with ui.row().classes("w-full items-start gap-4 no-wrap max-lg:flex-wrap"):
            self.form = TrainForm(list(self.presets), models, {d["key"]: d["label"] for d in self.datasets},
                                  on_preset=self.apply_preset, on_change=self.changed,
                                  check_machines=self.check_machines)
            with ui.column().classes("w-[420px] max-lg:w-full gap-3 shrink-0"):
                self.preview = SchedulePreview()
                self.actions = StartCard(self.start, YamlFiles(self.form, self.fill, self.manager.prepare_config),
                                         self.fit, self.reset)
                self.preflight = PreflightPanel(services, self.current, self.apply_changes, self.suggest,
                                                self.apply_proposal)
        self.form.model_data.mode.on_value_change(lambda e: self.follow_mode(e.value))
        self.form.model_data.model.on_value_change(lambda e: self.note_weights(e.value))
        self.form.length.schedule_steps.on_value_change(self.schedule_edited)
        ui.timer(1.0, self.live_estimate)

    def note_weights(self, model: str | None) -> None:
        """Say what the picked model's quantized weights cost on this machine's backend (and what to do)."""
        entry = self.model_entries.get(model or "")
        text = quantized_model_warning(entry, mlx_backend()) if entry else None
        self.form.model_data.model_note.set_text(text or "")
        self.form.model_data.model_note.visible = bool(text)

    def open(self, source: str | None) -> None:
        """Fill the form: this browser's draft, else a fresh one (the first model, a dataset that fits the mode,
        the mode's preset fitted to them), or a run's config."""
        self.keep = True
        if source is not None:
            self.fill(default_form())
            self.clone_run(source)
            return
        draft = recall(DRAFT_KEY)
        if isinstance(draft, dict) and draft:
            self.fill(draft, follow=bool(draft.get("follow_schedule")))
            self.actions.proposal.set_text("Your draft, as you left it (Reset form starts afresh).")
            return
        self.fresh()

    def fresh(self) -> None:
        """A fresh form: the mode's preset (``cpt-lora``) on the first model and a dataset that fits the mode,
        then (off the event loop) fitted to the data and this machine."""
        form = default_form()
        preset = self.presets.get(f"{form['mode']}-lora")
        if preset is not None:
            try:
                form = {**form, **config_to_form(load_yaml(preset)), "name": ""}
            except ConfigError:
                pass  # a broken preset file: mlx-lm's defaults, then the fit
        self.picked_data = suggested_dataset(self.datasets, form["mode"])
        form.update(model=next(iter(self.form.model_data.model.options), None), data=self.picked_data)
        self.touched = False
        self.fill(form, follow=True)
        ui.timer(0.05, lambda: self.fit(auto=True), once=True)

    def reset(self) -> None:
        """Forget this browser's draft and start from a fresh, fitted form."""
        remember(DRAFT_KEY, None)
        self.fresh()

    def budget(self) -> float:
        """The time a proposal aims at: the default budget, within the Settings page's threshold."""
        minutes = self.confirm_minutes()
        return min(defaults.DEFAULT_BUDGET_SECONDS, 0.8 * 60 * minutes) if minutes else \
            defaults.DEFAULT_BUDGET_SECONDS

    def confirm_minutes(self) -> float | None:
        try:
            return load_settings(self.services.workspace).confirm_minutes
        except SettingsError:
            return None

    def prepared(self, form: dict[str, Any] | None = None) -> dict[str, Any] | None:
        """The resolved config of the form (or ``form``), or ``None`` while it has problems."""
        form = self.form.read() if form is None else form
        if form_problems(form):
            return None
        try:  # resolved once: it reads the model's and the data's files
            return self.manager.prepare_config(form_to_config(form))
        except (ConfigError, ConfigProblems):
            return None

    async def suggest(self, tokens_per_second: float | None = None) -> dict[str, Any] | None:
        """A proposal for the form's model and data (at a measured speed when given), or ``None`` (said why)."""
        cfg = self.prepared(self.length_probe_form())
        if cfg is None:
            self.actions.proposal.set_text("Fix the config's problems, then fit it to the data and machine.")
            return None
        self.actions.proposal.set_text("Fitting max_seq_length, batch, length and validation to the data and "
                                       "this machine…")
        self._estimating = True  # the live estimate waits: both read the same data
        try:
            return await run.io_bound(defaults.propose, cfg, budget_seconds=self.budget(),
                                      tokens_per_second=tokens_per_second)
        except (ValueError, OSError) as e:  # PreflightError, DataError
            self.actions.proposal.set_text(f"Cannot fit the defaults: {e}")
            return None
        finally:
            self._estimating = False
            self._dirty = True

    async def fit(self, auto: bool = False) -> None:
        """Apply a proposal to the form (``auto``: a fresh form's, unless a person has changed it meanwhile)."""
        proposal = await self.suggest()
        if proposal is None:
            return
        if auto and self.touched:
            self.actions.proposal.set_text("")
            return
        self.apply_proposal(proposal)

    def apply_proposal(self, proposal: dict[str, Any]) -> None:
        """Write a proposal into the form (length in iterations, the schedule following it) and say why."""
        form = self.form.read()
        form.update(proposal["changes"], length_mode="iters", schedule_steps=None)
        self.fill(form, follow=True)
        self.actions.proposal.set_text("Fitted to the data and this machine:\n"
                                       + "\n".join(f"• {r}" for r in proposal["reasons"]))

    def schedule_edited(self, _: Any = None) -> None:
        if not self.form.filling:
            self.follow_schedule = False

    def length_probe_form(self) -> dict[str, Any]:
        """The form, with a placeholder schedule length while it follows an epoch count not yet counted."""
        form = self.form.read()
        if self.follow_schedule and form.get("length_mode") == "epochs" and not form.get("schedule_steps"):
            form["schedule_steps"] = 1
        return form

    async def live_estimate(self) -> None:
        """The estimate beside Start, again after each change (and the schedule length it follows)."""
        if not self._dirty or self._estimating:
            return
        self._dirty = False
        cfg = self.prepared(self.length_probe_form())
        if cfg is None:
            self.actions.show_estimate(None)
            return
        self._estimating = True
        try:
            est = await run.io_bound(preflight.estimate, cfg)
        except (ValueError, OSError) as e:
            self.actions.show_estimate(None, f"No estimate: {e}")
            return
        finally:
            self._estimating = False
        self.actions.show_estimate(est)
        self.follow_length(est)

    def follow_length(self, est: dict[str, Any]) -> None:
        """A decaying schedule that follows the run: its length is the run's iterations (counted from the
        data when training by epochs), not what a preset said."""
        form = self.form.read()
        if not self.follow_schedule or form.get("schedule") not in ("linear", "cosine"):
            return
        want = est["iters"] if form.get("length_mode") == "epochs" else None
        if form.get("schedule_steps") != want:
            self.fill({**form, "schedule_steps": want}, follow=True)

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

    def changed(self) -> None:
        """A person changed the form."""
        self.touched = True
        self.refresh()

    def refresh(self) -> None:
        form = self.form.read()
        cfg, errors = check_form(form, self.manager.prepare_config)
        self.form.show(visible_fields(form), errors)
        self.form.machines.forget_unless(machines_of(cfg))
        self.actions.show(errors)
        self.preview.show(*lr_preview(form, cfg))
        self._dirty = True
        self.actions.estimate.classes(add="opacity-50")  # stale until the next estimate
        if self.keep:
            remember(DRAFT_KEY, {**form, "follow_schedule": self.follow_schedule})

    def fill(self, form: dict[str, Any], follow: bool = False) -> None:
        """Write ``form`` into the widgets; ``follow``: its decaying schedule's length follows the run's length
        (a preset, a fresh or fitted form), else it stays as written (an upload, a clone, a draft)."""
        self.follow_schedule = follow
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
        self.fill(config_to_form(cfg), follow=True)
        ui.notify(f"preset {name} applied")

    def follow_mode(self, mode: str) -> None:
        """A dataset the page picked (not the person) follows the mode: documents for CPT, chats for IFT."""
        data = self.form.model_data.data
        if not self.form.filling and data.value == self.picked_data:
            self.picked_data = suggested_dataset(self.datasets, mode) or data.value
            data.value = self.picked_data

    async def too_long(self, cfg: dict[str, Any], go: Callable[[], Any]) -> bool:
        """Whether the run is estimated beyond the Settings page's threshold (then the page asks, ``go`` on yes)."""
        minutes = self.confirm_minutes()
        prepared = self.manager.prepare_config(cfg) if minutes else None
        if not prepared:
            return False
        try:
            est = await run.io_bound(preflight.estimate, prepared)
        except (ValueError, OSError):
            return False  # no estimate: nothing to ask about
        if est["total_seconds"] <= minutes * 60:
            return False
        self.actions.ask_long(est["total_seconds"], minutes, go)
        return True

    async def start(self, queue: bool = False, side_by_side: bool = False, confirmed: bool = False) -> None:
        cfg, errors = self.current()
        if errors:
            self.refresh()
            ui.notify(f"Fix {len(errors)} problem(s) before starting", type="warning")
            return
        if self.fork_from and cfg.get("iters") is not None and cfg["iters"] <= self.fork_from[1]:
            ui.notify(f"A fork counts on from its checkpoint: set more than {self.fork_from[1]} iterations",
                      type="warning")
            return
        if not confirmed and await self.too_long(cfg, lambda: self.start(queue, side_by_side, confirmed=True)):
            return
        busy = [] if queue or side_by_side else self.manager.active()
        if busy:  # two runs at once share the CPU/GPU and memory: ask first
            self.actions.ask(busy[0])
            return
        self.actions.busy_dialog.close()
        self.actions.long_dialog.close()
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
