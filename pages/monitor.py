"""Monitor page: one run's status, progress, metric cards, live charts, checkpoints and log tail.

Everything comes from the run folder through a shared :class:`services.training.watch.RunWatcher`, so a
reload, a second browser or an app restart shows the whole history. The page redraws when the watcher's
version changes and sends only what is new (chart series are extended in place and bounded).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from nicegui import ui

from pages.common import CHARTS, LIVE_SECONDS, PREFERENCE_CHARTS, STATUS_COLORS, checkpoint_marks, line_chart, on_change
from services.config import ConfigError, world_size
from services.training.distributed import HEARTBEAT_SECONDS, rank_states
from services.training.folder import ACTIVE, WAITING
from services.training.index import ending_note, resume_refusal
from services.training.prepared import progress_line
from services.units import clock

if TYPE_CHECKING:
    from app.composition import Services
    from services.training.watch import RunWatcher

WAITING_TEXT = "in the training queue: it starts when no run is training (runs queued before it go first)"
CARDS = (("train_loss", "train loss"), ("val_loss", "val loss"), ("best", "best checkpoint"),
         ("perplexity", "perplexity"), ("learning_rate", "learning rate"),
         ("tokens_per_second", "trained tokens/s"), ("padding_share", "padding"),
         ("trained_tokens", "trained tokens"), ("peak_memory_gb", "peak memory"), ("epoch", "epoch"))


def _fmt(v: Any, kind: str = "") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if kind == "learning_rate":
        return f"{v:.2e}"
    if kind in ("trained_tokens", "tokens_per_second"):
        return f"{v:,.0f}"
    if kind == "peak_memory_gb":
        return f"{v:.2f} GB"
    if kind == "epoch":
        return f"{v:.2f}"
    if kind == "padding_share":
        return f"{v:.1%}"
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def card_texts(latest: dict[str, Any]) -> dict[str, str]:
    """Text of every metric card for the watcher's latest values."""
    out = {k: _fmt(latest.get(k), k) for k, _ in CARDS if k != "best"}
    best = latest.get("best")
    out["best"] = f"{best['val_loss']:.4f} @ {best['iteration']}" if best and best.get("val_loss") is not None \
        else (f"@ {best['iteration']}" if best else "–")
    return out


def phase_text(phase: dict[str, Any] | None) -> str | None:
    """What the worker does between training reports: ``validating at iteration 10``, ``saving checkpoint 10``."""
    if not phase:
        return None
    it = phase.get("iteration")
    if phase.get("phase") == "validating":
        return "validating the initial weights" if it == 0 else f"validating at iteration {it}"
    if phase.get("phase") == "saving":
        return f"saving checkpoint {it}"
    return None


def progress_text(latest: dict[str, Any]) -> str:
    """``iteration 10 / 20 · epoch 1.50 · validating at iteration 10 · ETA 0:01:05`` (the ETA includes the
    validations and checkpoints still to come), or the data preparation's progress while the run prepares."""
    if latest.get("preparing"):
        return progress_line(latest["preparing"])
    it, total = latest.get("iteration") or 0, latest.get("iters")
    parts = [f"iteration {it} / {total or '?'}"]
    if latest.get("epoch") is not None:
        parts.append(f"epoch {latest['epoch']:.2f}")
    doing = phase_text(latest.get("phase"))
    if doing:
        parts.append(doing)
    if latest.get("status") in ACTIVE:
        parts.append(f"ETA {clock(latest.get('eta_seconds'))}")
    return " · ".join(parts)


class LiveView:
    """The per-client state of a Monitor page: what each chart and the log have already received."""

    def __init__(self, watcher: RunWatcher, charts: dict[str, ui.echart], log: ui.log):
        self.watcher, self.charts, self.log = watcher, charts, log
        self.sent: dict[str, tuple[int, int]] = {}
        self.log_seen = 0
        self.marks: list[dict[str, Any]] | None = None

    def push_series(self) -> None:
        for key in self.charts:
            series = CHARTS[key][1]
            opts = self.charts[key].options["series"]
            for i, (name, _) in enumerate(series):
                gen, length = self.sent.get(name, (-1, 0))
                gen, replace, points = self.watcher.series_since(name, gen, length)
                data = opts[i]["data"]
                if replace:
                    opts[i]["data"] = points
                    length = len(points)
                elif points:
                    data.extend(points)
                    length += len(points)
                self.sent[name] = (gen, length)
        marks = checkpoint_marks(self.watcher.checkpoints(), self.watcher.series("train_loss"))
        if marks != self.marks:
            self.marks = marks
            self.charts["loss"].options["series"][0]["markPoint"] = {"data": marks, "label": {"show": False}}

    def push_log(self) -> None:
        total, replace, lines = self.watcher.log_since(self.log_seen)
        self.log_seen = total
        if replace:
            self.log.clear()
        if lines:
            self.log.push("\n".join(lines))


RANK_COLORS = {"training": "positive", "starting": "grey", "silent": "warning", "dead": "negative", "ended": "grey"}


class RanksTable:
    """Each rank of a distributed run: host, pid, status, heartbeat age, tokens/s, MLX peak memory and the
    process's resident memory (hidden for a one-process run)."""

    COLUMNS = [{"name": k, "label": label, "field": k, "align": "left"} for k, label in (
        ("rank", "Rank"), ("host", "Host"), ("pid", "pid"), ("status", "Status"), ("heartbeat", "Heartbeat"),
        ("tokens_per_second", "Tokens/s"), ("peak_memory_gb", "MLX peak memory"), ("rss_gb", "Process memory"))]
    SLOTS = {"body-cell-status": '<q-td :props="props"><q-badge :color="props.row.color" :label="props.value" />'
                                 "</q-td>"}

    def __init__(self, watcher: RunWatcher) -> None:
        self.folder = watcher.folder
        try:
            self.cfg = self.folder.config()
        except (OSError, ValueError):
            self.cfg = {}
        self.shown = world_size(self.cfg) > 1
        with ui.column().classes("w-full gap-1") as self.box:
            ui.label(f"Ranks ({world_size(self.cfg)} processes)").classes("text-sm font-semibold text-grey-7")
            self.table = ui.table(columns=self.COLUMNS, rows=[], row_key="rank").props("dense flat bordered") \
                .classes("w-full").mark("ranks")
            for name, slot in self.SLOTS.items():
                self.table.add_slot(name, slot)
        self.box.set_visibility(self.shown)
        self.latest: dict[str, Any] = {}
        self.active = False
        if self.shown:  # heartbeats change between reports (a rank that dies stops the reports altogether)
            ui.timer(HEARTBEAT_SECONDS, self.redraw)

    def show(self, latest: dict[str, Any], active: bool) -> None:
        """Redraw with the run's latest report and whether it is active (then every heartbeat interval)."""
        self.latest, self.active = latest, active
        self.redraw()

    def redraw(self) -> None:
        if not self.shown:
            return
        rows = rank_states(self.folder, self.cfg, self.latest, self.active)
        self.table.rows = [{**r, "color": RANK_COLORS.get(r["status"], "grey"), "pid": r["pid"] or "–",
                            "heartbeat": f"{r['heartbeat_age']:.0f} s ago" if r["heartbeat_age"] is not None
                            else "–", "tokens_per_second": _fmt(r["tokens_per_second"], "tokens_per_second"),
                            "peak_memory_gb": _fmt(r["peak_memory_gb"], "peak_memory_gb"),
                            "rss_gb": _fmt(r["rss_gb"], "peak_memory_gb")} for r in rows]
        self.table.update()


class MonitorPage:
    """One run's status, progress, metric cards, live charts and log, following the run's shared watcher."""

    def __init__(self, services: Services, run_id: str, runs: list[dict[str, Any]]):
        self.manager, self.run_id = services.manager, run_id
        self.options = {r["id"]: f"{r.get('name') or r['id']} · {r.get('status')} · {r['id']}" for r in runs}
        self.options.setdefault(run_id, run_id)
        with ui.row().classes("w-full items-center gap-3"):
            self.picker = ui.select(self.options, value=run_id, label="Run", with_input=True, on_change=self.pick) \
                .props("dense outlined").classes("w-[28rem] max-w-full").mark("run-select")
            self.status = ui.badge("", color="grey").classes("text-sm").mark("status")
            self.stop_btn = ui.button("Stop", icon="stop", on_click=self.stop).props("outline color=negative") \
                .mark("stop")
            self.resume_btn = ui.button("Resume", icon="play_arrow", on_click=self.resume).props("outline") \
                .mark("resume")
        try:
            self.watcher = services.watchers.get(run_id)
        except ConfigError as e:
            ui.label(f"Run {run_id}: {e.reason}").classes("text-negative").mark("run-missing")
            self.stop_btn.disable()
            self.resume_btn.disable()
            return
        with ui.card().classes("w-full border-l-4").props("flat bordered") \
                .mark("ending-card") as self.note_card:
            self.note = ui.label("").classes("text-base").mark("ending-note")
        self.note_card.set_visibility(False)
        self.reason = ui.label("").classes("text-sm text-grey-8").mark("reason")
        with ui.column().classes("w-full gap-1"):
            self.progress = ui.linear_progress(value=0, show_value=False, size="10px").mark("progress")
            self.progress_label = ui.label("").classes("text-sm").mark("progress-text")
        self.cards: dict[str, ui.label] = {}
        with ui.row().classes("w-full gap-2"):
            for key, title in CARDS:
                with ui.card().classes("px-3 py-2 min-w-[8.5rem]").props("flat bordered"):
                    ui.label(title).classes("text-xs text-grey-7")
                    self.cards[key] = ui.label("–").classes("text-lg font-medium").mark(f"card-{key}")
        charts: dict[str, ui.echart] = {}
        preference = next((r for r in runs if r["id"] == run_id), {}).get("mode") in ("dpo", "orpo")
        with ui.grid().classes("w-full gap-3 grid-cols-1 xl:grid-cols-2"):
            for key, (title, series, ytype) in CHARTS.items():
                if key in PREFERENCE_CHARTS and not preference:
                    continue
                charts[key] = ui.echart(line_chart(title, series, ytype)).classes("w-full h-72").mark(f"chart-{key}")
        self.ranks = RanksTable(self.watcher)
        ui.label("Worker log").classes("text-sm font-semibold text-grey-7")
        log = ui.log(max_lines=self.watcher.log_lines).classes("w-full h-64 text-xs").mark("log")
        self.view = LiveView(self.watcher, charts, log)
        self.watcher.poll(force=True)
        on_change(self.version, self.update, LIVE_SECONDS)

    def pick(self, e: Any) -> None:
        if e.value and e.value != self.run_id:
            ui.navigate.to(f"/monitor/{e.value}")

    def version(self) -> int:
        self.watcher.poll()
        return self.watcher.version

    def update(self) -> None:
        latest = self.watcher.latest()
        st, why = latest.get("status") or "?", latest.get("reason") or ""
        if self.status.text != st:
            info = self.watcher.info()
            self.options[self.run_id] = f"{info.get('name') or self.run_id} · {st} · {self.run_id}"
            self.picker.set_options(self.options, value=self.run_id)
        self.status.set_text(st)
        self.status.props["color"] = STATUS_COLORS.get(st, "grey")
        checkpoints = [c["iteration"] for c in self.watcher.checkpoints()]
        note = ending_note(self.watcher.info(), checkpoints)
        self.note.set_text(note or "")
        self.note_card.set_visibility(note is not None)
        self.note_card.classes(remove="border-red-600 border-orange-500",
                               add="border-red-600" if st == "failed" else "border-orange-500")
        self.reason.set_text(WAITING_TEXT if st == WAITING else "" if note else why)
        self.progress.set_value(round(latest.get("progress") or 0.0, 4))
        self.progress_label.set_text(progress_text(latest))
        for key, text in card_texts(latest).items():
            self.cards[key].set_text(text)
        waiting = st == WAITING
        self.stop_btn.set_enabled(st in ACTIVE or waiting)
        self.resume_btn.set_enabled(resume_refusal(self.watcher.info(), checkpoints) is None)
        self.resume_btn.set_text("Start now" if waiting else "Resume")
        self.view.push_series()
        self.view.push_log()
        self.ranks.show(latest, st in ACTIVE)

    def stop(self) -> None:
        try:
            waiting = self.manager.get(self.run_id).get("status") == WAITING
            self.manager.stop(self.run_id)
            ui.notify("Taken off the queue" if waiting
                      else "Stop requested: the run writes a final checkpoint and ends")
        except ConfigError as e:
            ui.notify(str(e), type="negative")

    def resume(self) -> None:
        try:
            folder = self.manager.resume(self.run_id)
        except ConfigError as e:
            ui.notify(str(e), type="negative")
            return
        ui.notify(f"Resuming {folder.id}")
        if folder.id != self.run_id:
            ui.navigate.to(f"/monitor/{folder.id}")


def monitor_page(services: Services, run_id: str | None = None) -> None:
    """Build the Monitor page for ``run_id`` (default: the running run, else the newest)."""
    runs = services.manager.list()
    if run_id is None and runs:
        active = [r for r in runs if r.get("status") in ACTIVE]
        run_id = (active or runs)[0]["id"]
    ui.label("Monitor").classes("text-2xl font-semibold")
    if not runs:
        ui.label("No runs yet.").mark("no-runs")
        ui.link("Start one on the Train page", "/train")
        return
    MonitorPage(services, run_id, runs)
