"""What every page shares: status colours, labels, the page frame, number texts and the metric charts.

Pages import only this module and :mod:`pages.shell` from ``pages``; a helper two pages need lives here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from nicegui import ui

from services.system import is_local_request

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


def line_chart(title: str, series: list[tuple[str, str]], ytype: str,
               colors: list[str] | None = None) -> dict[str, Any]:
    """ECharts options of one metric chart over iterations: one empty line per ``(series, label)``.

    With ``colors`` (one per series, for an overlay of runs) each line has its colour, validation lines are dashed
    and the legend scrolls below the chart.
    """
    opts: dict[str, Any] = {
        "animation": False,
        "title": {"text": title, "textStyle": {"fontSize": 13, "color": "#9e9e9e"}, "left": 8, "top": 4},
        "legend": {"top": 4, "right": 8, "textStyle": {"color": "#9e9e9e"}}, "tooltip": {"trigger": "axis"},
        "grid": {"left": 64, "right": 16, "top": 36, "bottom": 32},
        "xAxis": {"type": "value", "min": 0, "name": "iteration", "nameLocation": "middle", "nameGap": 22},
        "yAxis": {"type": ytype, "scale": True},
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
