"""The Playground's Compare tab: one prompt answered by the base model and checkpoints side by side, with a
blind A/B mode whose ratings are saved as preference pairs (prompt, chosen, rejected) for DPO/ORPO: one dataset
per session, and "Train on these ratings" opens the Train page on DPO from the rated checkpoint."""

from __future__ import annotations

import collections
import random
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from nicegui import ui

from pages.common import recall, remember
from pages.playground.chat import TICK, AnswerBody, stats_text
from pages.playground.selection import Selection
from services.errors import ForgeError
from services.inference.requests import adapter_label
from services.inference.service import CancelHandle
from services.library.datasets import (
    VERDICTS,
    rated_checkpoint,
    rating_tally,
    ratings,
    record_rating,
    session_dataset_name,
)
from services.training.index import adapters_for, checkpoint_ref

if TYPE_CHECKING:
    from app.composition import Services



COMPARE_KEY = "playground_compare"  # this browser's last comparison (a blind one once it is revealed)


class ComparePanel:
    """Prompt, targets (base and/or checkpoints), one column per answer, and the blind A/B pick. The last
    comparison is kept for this browser: it survives leaving the page and a reload."""

    def __init__(self, services: Services, selection: Selection, on_done: Callable[[], None]) -> None:
        """``on_done`` is called after each comparison (the page redraws the model status)."""
        self.models, self.manager, self.workspace = services.models, services.manager, services.workspace
        self.selection, self.on_done = selection, on_done
        self.comparing = False
        self.cancel = CancelHandle()
        self.pending: collections.deque[dict[str, Any]] = collections.deque()
        self.bodies: dict[int, ui.column] = {}
        self.titles: dict[int, ui.label] = {}
        self.filled: set[int] = set()
        self.ab: dict[str, Any] | None = None
        self.ticker = ui.timer(TICK, self.drain, active=False)
        ui.label("One prompt, answered by the base model and checkpoints trained on it: one copy of the base "
                 "stays in memory and only the adapter weights are swapped. Sampling, system prompt and format "
                 "come from the Chat settings; temperature 0 or a fixed seed keeps the comparison fair.") \
            .classes("text-sm opacity-70")
        self.prompt = ui.textarea("Prompt").props("outlined dense autogrow").classes("w-full").mark("compare-prompt")
        with ui.row().classes("w-full items-center gap-3"):
            self.base = ui.switch("Base model", value=True).mark("compare-base")
            self.targets = ui.select({}, multiple=True, label="Checkpoints", with_input=True, value=[]) \
                .props("dense outlined use-chips").classes("grow min-w-[20rem]").mark("compare-targets")
            self.targets.on("popup-show", lambda: self.refresh_targets(self.selection.model_path()))
        with ui.row().classes("w-full items-center gap-3"):
            self.blind = ui.switch("Blind A/B", on_change=lambda: self.pref_name.set_visibility(self.blind.value)) \
                .mark("blind")
            self.blind.tooltip("Two answers shown as A and B in random order; your pick is saved as a preference "
                               "pair (prompt, chosen, rejected) for DPO/ORPO")
            self.pref_name = ui.input("Save ratings to dataset", value=session_dataset_name(),
                                      on_change=lambda: self.show_tally()).props("dense outlined") \
                .classes("w-56").mark("preference-dataset")
            self.pref_name.set_visibility(False)
            self.run_btn = ui.button("Compare", icon="compare_arrows", on_click=self.compare).mark("compare")
            self.stop_btn = ui.button("Stop", icon="stop", on_click=lambda: self.cancel.cancel()) \
                .props("outline color=negative").mark("compare-stop")
            self.stop_btn.tooltip("Stops this comparison (the answers so far stay)")
            self.stop_btn.disable()
        self.note = ui.label("").classes("text-sm").mark("compare-note")
        self.columns = ui.row().classes("w-full gap-3 no-wrap items-stretch overflow-x-auto p-1") \
            .mark("compare-columns")
        with ui.row().classes("items-center gap-3") as self.ab_row:
            ui.label("Which answer is better?").classes("font-medium")
            for verdict, text in VERDICTS.items():
                ui.button(text, on_click=lambda v=verdict: self.pick(v)) \
                    .props("" if verdict in "AB" else "outline").mark(f"pick-{verdict}")
            ui.button("Skip", on_click=lambda: self.pick(None)).props("flat").mark("pick-skip")
        self.ab_row.set_visibility(False)
        with ui.row().classes("items-center gap-3") as self.tally_row:
            self.tally = ui.label("").classes("text-sm").mark("rating-tally")
            self.train_btn = ui.button("Train on these ratings", icon="model_training", on_click=self.train_on) \
                .props("outline").mark("train-on-ratings")
            self.train_btn.tooltip("Open the Train page on DPO with this session's pairs, starting from the rated "
                                   "checkpoint")
        self.show_tally()
        self.show_kept(recall(COMPARE_KEY))

    def keep(self, prompt: str, titles: list[str], results: dict[int, dict[str, Any]], order: list[int]) -> None:
        """Keep the comparison for this browser: its prompt and each column's title, answer and statistics."""
        columns = [{"title": titles[pos], "text": results.get(index, {}).get("text", ""),
                    "stats": {k: v for k, v in results.get(index, {}).items() if k not in ("text", "tokens", "index")}}
                   for pos, index in enumerate(order)]
        remember(COMPARE_KEY, {"prompt": prompt, "columns": columns})

    def show_kept(self, kept: Any) -> None:
        """Show a kept comparison (what :meth:`keep` wrote); anything else is ignored."""
        if not isinstance(kept, dict) or not isinstance(kept.get("columns"), list):
            return
        self.prompt.set_value(str(kept.get("prompt") or ""))
        self.columns.clear()
        with self.columns:
            for col in kept["columns"]:
                if not isinstance(col, dict):
                    continue
                with ui.card().classes("flex-1 min-w-[16rem] gap-1").mark("compare-column"):
                    ui.label(str(col.get("title", ""))).classes("text-base font-semibold").mark("compare-title")
                    AnswerBody(str(col.get("text", "")))
                    ui.label(stats_text(col.get("stats") or {})).classes("text-xs opacity-70").mark("compare-stats")

    def refresh_targets(self, model: str | None) -> None:
        """The LoRA runs and checkpoints of ``model`` (full fine-tunes cannot share the base)."""
        targets = adapters_for(self.manager, model, lora_only=True)
        self.targets.set_options(targets, value=[v for v in self.targets.value or [] if v in targets])

    def chosen_targets(self) -> list[str | None] | None:
        """The targets to compare (None: the base), or None with a warning when the choice cannot run."""
        targets: list[str | None] = ([None] if self.base.value else []) + list(self.targets.value or [])
        if not targets:
            ui.notify("Pick the base model and/or checkpoints to compare", type="warning")
            return None
        if self.blind.value and len(targets) != 2:
            ui.notify("Blind A/B needs exactly two answers: the base and one checkpoint, or two checkpoints",
                      type="warning")
            return None
        return targets

    async def compare(self) -> None:
        prompt = (self.prompt.value or "").strip()
        if self.comparing:
            return
        if not prompt:
            ui.notify("Write a prompt first", type="warning")
            return
        targets = self.chosen_targets()
        if targets is None:
            return
        model = self.selection.model_path()
        if not model:
            ui.notify("Pick a model first", type="warning")
            return
        self.set_running(True)
        try:
            await self.run(model, prompt, targets, bool(self.blind.value))
        except ForgeError as e:
            self.note.set_text(f"error: {e}")
            ui.notify(str(e), type="negative", multi_line=True)
        finally:
            self.set_running(False)
            self.on_done()

    def set_running(self, running: bool) -> None:
        self.comparing = running
        self.ticker.active = running
        self.run_btn.set_enabled(not running)
        self.stop_btn.set_enabled(running)
        if running:
            self.cancel = CancelHandle()  # Stop while the base loads still stops this compare
            self.ab, self.pending = None, collections.deque()
            self.ab_row.set_visibility(False)

    async def run(self, model: str, prompt: str, targets: list[str | None], blind: bool) -> None:
        if self.models.status.get("model") != model:  # compare runs on the loaded base: load it first
            self.note.set_text(f"loading {Path(model).name}…")
            await self.models.aload(model, None)
        request = self.selection.request(prompt=prompt)
        del request["prompt"]
        order = list(range(len(targets)))
        if blind:
            random.shuffle(order)
        self.show_columns(targets, order, blind)
        self.note.set_text(f"generating {len(targets)} answers one after the other…")
        results = await self.models.acompare(prompt, targets, request, on_result=self.pending.append,
                                             cancel=self.cancel)
        self.pending.extend(results)
        self.drain()
        cancelled = len(results) < len(targets)
        self.note.set_text("stopped" if cancelled else "")
        by_index = {r["index"]: r for r in results if "index" in r}
        if not blind:
            self.keep(prompt, [self.target_title(targets[i]) for i in order], by_index, order)
        if blind and not cancelled:
            texts = {r["index"]: r.get("text", "") for r in results}
            self.ab = {"prompt": self.selection.settings.prompt(prompt), "order": order, "texts": texts,
                       "targets": targets, "model": model, "sampling": request, "raw_prompt": prompt,
                       "results": by_index}
            self.ab_row.set_visibility(True)

    def target_title(self, target: str | None) -> str:
        if target is None:
            return "base"
        return self.targets.options.get(target) or adapter_label(target)

    def show_columns(self, targets: list[str | None], order: list[int], blind: bool) -> None:
        self.columns.clear()
        self.bodies, self.titles, self.filled = {}, {}, set()
        with self.columns:
            for pos, index in enumerate(order):
                with ui.card().classes("flex-1 min-w-[16rem] gap-1").mark("compare-column"):
                    title = "AB"[pos] if blind else self.target_title(targets[index])
                    self.titles[index] = ui.label(title).classes("text-base font-semibold").mark("compare-title")
                    with ui.column().classes("w-full gap-1") as body:
                        with ui.row().classes("items-center gap-2 text-sm opacity-70"):
                            ui.spinner(size="sm")
                            ui.label("waiting…")
                    self.bodies[index] = body

    def drain(self) -> None:
        """Show every compare result that arrived (called by the 0.1 s ticker and at the end)."""
        while self.pending:
            item = self.pending.popleft()
            index = item.get("index", -1)
            body = self.bodies.get(index)
            if body is None or index in self.filled:
                continue
            self.filled.add(index)
            body.clear()
            with body:
                AnswerBody(item.get("text", ""))
                ui.label(stats_text(item)).classes("text-xs opacity-70").mark("compare-stats")

    def pick(self, verdict: str | None) -> None:
        """Record the blind rating (``None``: skip) and reveal which answer came from where."""
        ab = self.ab
        if ab is None:
            return
        self.ab = None
        self.ab_row.set_visibility(False)
        order, texts, targets = ab["order"], ab["texts"], ab["targets"]
        titles = [f"{'AB'[pos]} = {self.target_title(targets[index])}" for pos, index in enumerate(order)]
        for pos, index in enumerate(order):
            self.titles[index].set_text(titles[pos])
        self.keep(ab["raw_prompt"], titles, ab["results"], order)  # revealed: now it may be kept
        if verdict is None:
            return
        shown = {"AB"[pos]: {"target": targets[index], "label": self.target_title(targets[index]),
                             "text": texts[index]} for pos, index in enumerate(order)}
        try:
            folder = record_rating(self.workspace, self.pref_name.value or "", ab["prompt"], shown, verdict,
                                   ab["model"], ab["sampling"])
        except (ForgeError, OSError) as e:  # OSError: the dataset file could not be written
            ui.notify(f"Not saved: {e}", type="negative", multi_line=True)
            return
        root = self.workspace.root
        rel = folder.relative_to(root) if folder.is_relative_to(root) else folder
        what = f"your pick ({shown[verdict]['label']})" if verdict in shown else f"a {VERDICTS[verdict]} (counted, " \
            "not trained on)"
        ui.notify(f"Saved {what} to {rel}", type="positive")
        self.note.set_text(f"saved to {rel}")
        self.show_tally()

    def show_tally(self) -> None:
        """The session dataset's tally; "Train on these ratings" once it holds a pair."""
        t = rating_tally(ratings(self.workspace, self.pref_name.value or ""))
        self.tally.set_text(f"{self.pref_name.value}: {t['pairs']} pair(s) to train on · {t['ties']} tie(s) · "
                            f"{t['both_bad']} both bad (left out)")
        self.tally_row.set_visibility(t["ratings"] > 0)
        self.train_btn.set_visibility(t["pairs"] > 0)

    def train_on(self) -> None:
        """The Train page on DPO with this session's pairs, forked from the checkpoint they rated."""
        name = (self.pref_name.value or "").strip()
        start = checkpoint_ref(self.manager, rated_checkpoint(ratings(self.workspace, name)))
        ui.navigate.to(f"/train?preference={quote(name)}" + (f"&start={quote(start)}" if start else ""))
