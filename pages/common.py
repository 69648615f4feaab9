"""What every page shares: status colours, labels, the page frame, number texts, the metric charts and the views
of an evaluation (its progress and cancel, a case's output with pass/fail).

Pages import only this module and :mod:`pages.shell` from ``pages``; a helper two pages need lives here.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from nicegui import app, ui

from services.system import is_local_request

if TYPE_CHECKING:
    from services.evaluation.service import Evaluations

STATUS_COLORS = {"waiting": "blue-grey", "queued": "grey", "running": "primary", "completed": "positive",
                 "stopped": "warning", "early-stopped": "teal", "failed": "negative", "interrupted": "orange"}
METHODS = {"lora": "LoRA", "dora": "DoRA", "full": "Full"}
MODES = {"cpt": "CPT", "ift": "IFT", "dpo": "DPO", "orpo": "ORPO", "mlx-lm": "plain mlx-lm"}
# chart marker → (title, [(series, label)], y-axis type)
CHARTS: dict[str, tuple[str, list[tuple[str, str]], str]] = {
    "loss": ("Loss", [("train_loss", "train"), ("val_loss", "validation")], "value"),
    "perplexity": ("Perplexity", [("perplexity", "train"), ("val_perplexity", "validation")], "log"),
    "lr": ("Learning rate", [("learning_rate", "learning rate")], "value"),
    "speed": ("Throughput (trained tokens/s)", [("tokens_per_second", "trained tokens/s")], "value"),
    "memory": ("Memory (GB)", [("peak_memory_gb", "MLX peak"), ("rss_gb", "process RSS")], "value"),
    "margin": ("Reward margin", [("reward_margin", "train"), ("val_reward_margin", "validation")], "value"),
    "accuracy": ("Preference accuracy", [("preference_accuracy", "train"),
                                         ("val_preference_accuracy", "validation")], "value"),
    "rewards": ("Rewards", [("rewards_chosen", "chosen"), ("rewards_rejected", "rejected"),
                            ("val_rewards_chosen", "val chosen"), ("val_rewards_rejected", "val rejected")], "value"),
    "logps": ("Log-probability per answer token", [("logps_chosen", "chosen"), ("logps_rejected", "rejected")],
              "value"),
}
PREFERENCE_CHARTS = ("margin", "accuracy", "rewards", "logps")  # shown for dpo/orpo runs only
MAX_MARKS = 50


def page_column() -> ui.column:
    """The page's frame: the whole width of the shell."""
    return ui.column().classes("w-full gap-3")


def fmt_loss(v: float | None) -> str:
    return "–" if v is None or not math.isfinite(v) else f"{v:.4f}"


def recall(key: str) -> Any:
    """What this browser kept under ``key`` (:func:`remember`), or ``None``: drafts and results that survive
    leaving a page and a reload (NiceGUI's ``app.storage.user``, one per browser)."""
    try:
        value = app.storage.user.get(key)
    except RuntimeError:  # no storage secret (never the case under run_app or the test simulation)
        return None
    return copy.deepcopy(value)


def remember(key: str, value: Any) -> None:
    """Keep ``value`` (plain JSON data) for this browser under ``key``; ``None`` forgets it."""
    try:
        if value is None:
            app.storage.user.pop(key, None)
        else:
            app.storage.user[key] = json.loads(json.dumps(value, default=str))
    except RuntimeError:
        pass


# ECharts tooltip values, rounded in the browser (a formatter must be JavaScript: NiceGUI's ':' key prefix):
# five significant digits, small numbers (learning rates) in scientific notation
ROUNDED_TOOLTIP = {"trigger": "axis", ":valueFormatter":
                   "v => typeof v !== 'number' ? v : (v !== 0 && Math.abs(v) < 1e-3 ? v.toExponential(2) "
                   ": String(Number(v.toPrecision(5))))"}


# grid lines and labels that read on a light and on a dark page alike (ECharts draws white-ish lines otherwise)
AXIS_STYLE = {"splitLine": {"lineStyle": {"color": "rgba(128, 128, 128, 0.22)"}},
              "axisLine": {"lineStyle": {"color": "#9e9e9e"}}, "axisLabel": {"color": "#9e9e9e"},
              "nameTextStyle": {"color": "#9e9e9e"}}


def line_chart(title: str, series: list[tuple[str, str]], ytype: str,
               colors: list[str] | None = None) -> dict[str, Any]:
    """ECharts options of one metric chart over iterations: one empty line per ``(series, label)``.

    With ``colors`` (one per series, for an overlay of runs) each line has its colour, validation lines are dashed
    and the legend scrolls below the chart.
    """
    opts: dict[str, Any] = {
        "animation": False,
        "title": {"text": title, "textStyle": {"fontSize": 13, "color": "#9e9e9e"}, "left": 8, "top": 4},
        "legend": {"top": 4, "right": 8, "textStyle": {"color": "#9e9e9e"}}, "tooltip": dict(ROUNDED_TOOLTIP),
        "grid": {"left": 64, "right": 16, "top": 36, "bottom": 32},
        "xAxis": {"type": "value", "min": 0, "name": "iteration", "nameLocation": "middle", "nameGap": 22,
                  **AXIS_STYLE},
        "yAxis": {"type": ytype, "scale": True, **AXIS_STYLE},
        "series": [{"name": label, "type": "line", "showSymbol": name.startswith("val"), "symbolSize": 5,
                    "sampling": "lttb", "data": []} for name, label in series],
    }
    if colors:
        opts.update(legend={"type": "scroll", "bottom": 0, "textStyle": {"color": "#9e9e9e"}},
                    grid={**opts["grid"], "bottom": 64})
        opts["xAxis"]["nameGap"] = 24
        for line, color in zip(opts["series"], colors, strict=True):
            val = line["showSymbol"]
            line.update(itemStyle={"color": color}, lineStyle={"color": color, "type": "dashed" if val else "solid",
                                                               "width": 1.5 if val else 2})
    return opts


def checkpoint_marks(checkpoints: list[dict[str, Any]], train: list[tuple[float, float]]) -> list[dict[str, Any]]:
    """ECharts markPoints for checkpoints (at their val loss, else the train loss there); the best one stands out."""
    marks = []
    shown = checkpoints[-MAX_MARKS:]
    best = next((c for c in checkpoints if c.get("best")), None)
    if best is not None and best not in shown:
        shown = [best, *shown]
    for c in shown:
        it, y = c.get("iteration"), c.get("val_loss")
        if y is None:
            before = [p for p in train if p[0] <= it]
            if not before:
                continue
            y = before[-1][1]
        mark: dict[str, Any] = {"name": f"checkpoint {it}", "coord": [it, y], "value": it,
                                "symbol": "pin", "symbolSize": 26, "itemStyle": {"color": "#90a4ae"}}
        if c.get("best"):
            mark.update(name=f"best checkpoint {it}", symbolSize=40, itemStyle={"color": "#f9a825"})
        marks.append(mark)
    return marks


# how often the Monitor and the status strip look at a live run (both read the same watcher, so they agree)
LIVE_SECONDS = 0.5


def on_change(source: Callable[[], Any], redraw: Callable[[], None], interval: float) -> ui.timer:
    """Call ``redraw`` now and then whenever ``source()`` (a version, a stamp) differs from its last value, which
    is asked every ``interval`` seconds."""
    seen: list[Any] = []

    def check() -> None:
        value = source()
        if seen and seen[0] == value:
            return
        seen[:] = [value]
        redraw()

    check()
    return ui.timer(interval, check)


def entered(field: ui.input, missing: str) -> str | None:
    """The stripped text of an input, or None after telling the person ``missing`` (what to enter)."""
    text = (field.value or "").strip()
    if not text:
        ui.notify(missing, type="warning")
    return text or None


def is_local_client() -> bool:
    """Whether the page is being built for a browser on this machine (loopback address and loopback Host): only
    those see the LAN token and may import files of this machine."""
    try:
        request = ui.context.client.request
    except RuntimeError:  # no request: nothing says where the browser is
        return False
    return is_local_request(request.client.host if request.client else None, request.headers.get("host"))


# ----------------------------------------------------------------------------------------- evaluations

OUTPUT_BOX = "whitespace-pre-wrap break-all font-mono max-h-40 overflow-auto"  # long outputs scroll, not stretch
DIFF_CLASSES = {"same": "", "added": "bg-green-2 text-green-10", "removed": "bg-red-2 text-red-10 line-through"}


class EvalProgress:
    """The progress bar, the message and the Cancel button of the app's one evaluation job
    (:class:`services.evaluation.service.Evaluations`), shown where ``owner`` started it; markers
    ``MARK-bar``, ``MARK-cancel``, ``MARK-progress``."""

    def __init__(self, evals: Evaluations, owner: str, mark: str = "eval") -> None:
        self.owner = owner
        with ui.row().classes("w-full items-center gap-2 no-wrap"):
            self.bar = ui.linear_progress(value=0, show_value=False).classes("grow").mark(f"{mark}-bar")
            self.cancel = ui.button("Cancel", icon="stop", on_click=evals.cancel).props("outline dense") \
                .mark(f"{mark}-cancel")
        self.message = ui.label("").classes("text-sm text-grey-7").mark(f"{mark}-progress")
        self.show(evals.state)

    def show(self, state: dict[str, Any]) -> None:
        """Redraw from :attr:`Evaluations.state`; another page's job shows only as "busy"."""
        mine = state.get("owner") == self.owner
        running = mine and state["state"] == "running"
        self.bar.set_visibility(running)
        self.bar.value = state.get("fraction") or 0
        self.cancel.set_visibility(running)
        busy = state["state"] == "running" and not mine
        self.message.set_text(f"{state['state']}: {state['message']}" if mine else
                              "another evaluation is running; it must end first" if busy else "")


def visible_text(text: str) -> str:
    """Line breaks shown as ↵ (a model that answers with blank lines would otherwise look like no answer)."""
    return text.replace("\n", "↵\n")


def case_output(t: dict[str, Any]) -> None:
    """One target's output of a case (an item of :func:`services.evaluation.results.case_grid`): its label, a
    pass/fail badge, the output (or its word diff against the base) and why checks failed."""
    with ui.column().classes("min-w-48 basis-0 grow gap-1").mark("eval-output"):
        with ui.row().classes("items-center gap-1"):
            ui.label(t["label"]).classes("text-xs text-grey-7")
            ui.badge("pass" if t["passed"] else "fail", color="positive" if t["passed"] else "negative") \
                .mark("eval-verdict")
        if t["diff"] is None:
            ui.label(visible_text(t["output"]) or "(empty)").classes(f"text-sm {OUTPUT_BOX}")
        else:
            with ui.element("div").classes(f"text-sm {OUTPUT_BOX}").mark("eval-diff"):
                for op, text in t["diff"]:
                    ui.label(visible_text(text) + " ").classes(f"inline {DIFF_CLASSES[op]}")
        for why in t["why"]:
            ui.label(why).classes("text-xs text-negative")


def case_grid_view(grid: list[dict[str, Any]]) -> None:
    """Each case of :func:`services.evaluation.results.case_grid` as a card: its outputs side by side."""
    for row in grid:
        with ui.card().classes("w-full").props("flat bordered").mark(f"eval-case-{row['id']}"):
            ui.label(row["id"]).classes("text-sm font-semibold")
            with ui.row().classes("w-full gap-2 no-wrap overflow-x-auto"):
                for t in row["targets"]:
                    case_output(t)
