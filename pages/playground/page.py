"""Playground page: load a model (optionally a run or checkpoint adapter), chat or continue text, compare
checkpoints side by side (blind A/B preferences included), measure perplexity on a dataset and run an eval suite
on the base and/or checkpoints.

The model lives in the shared :class:`services.inference.service.ModelService` worker process; the panels only
await its async APIs (or run its blocking ones in a thread), so the event loop never waits on the model. The
model status is polled every 0.5 s and redrawn only when ``ModelService.version`` changed.

Routes: ``/playground``, ``/playground?run=RUN&iteration=N`` (or ``run=RUN@N``), ``/playground/RUN`` and
``/playground/RUN/N``: the last three preselect that run's base model and adapter and load them;
``/playground?model=published/NAME`` preselects and loads a model without adapter.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from nicegui import ui

from pages.common import page_column
from pages.playground.chat import ChatPanel
from pages.playground.compare import ComparePanel
from pages.playground.evaluate import EvalPanel
from pages.playground.model_bar import ModelBar
from pages.playground.perplexity import PerplexityPanel
from pages.playground.selection import Selection

if TYPE_CHECKING:
    from app.composition import Services

STATUS_TICK = 0.5


def playground_page(services: Services, run: str | None = None, iteration: str | None = None,
                    model: str | None = None) -> None:
    """Build the Playground page; ``run`` (``RUN`` or ``RUN@N``) and ``iteration`` preselect and load an adapter,
    ``model`` (``published/NAME``, a name under ``models/`` or a path) a model without adapter."""
    with page_column():
        ui.label("Playground").classes("text-2xl font-semibold")
        bar = ModelBar(services)
        with ui.tabs().classes("w-full").props("align=left dense no-caps") as tabs:
            chat_tab = ui.tab("Chat", icon="chat").mark("tab-chat")
            compare_tab = ui.tab("Compare", icon="compare_arrows").mark("tab-compare")
            ppl_tab = ui.tab("Perplexity", icon="functions").mark("tab-perplexity")
            eval_tab = ui.tab("Evaluate", icon="fact_check").mark("tab-evaluate")
        with ui.tab_panels(tabs, value=chat_tab).classes("w-full").props("animated=false"):
            with ui.tab_panel(chat_tab).classes("px-1 pb-2 pt-2"):
                chat = ChatPanel(services.models, ensure_loaded=bar.load)
            selection = Selection(bar, chat.settings)
            with ui.tab_panel(compare_tab).classes("px-1 pb-2 pt-2 gap-3"):
                compare = ComparePanel(services, selection, on_done=bar.poll)
            with ui.tab_panel(ppl_tab).classes("px-1 pb-2 pt-2 gap-3"):
                PerplexityPanel(services, selection, on_done=bar.poll)
            with ui.tab_panel(eval_tab).classes("px-1 pb-2 pt-2 gap-3"):
                evaluate = EvalPanel(services, selection)
    bar.on_status.append(chat.update_mode)
    bar.on_unload.append(chat.stop)
    bar.on_adapters.append(compare.refresh_targets)
    bar.on_adapters.append(evaluate.refresh_targets)
    bar.on_status.append(evaluate.on_status)
    bar.refresh_adapters(keep=services.models.status.get("adapter"))
    bar.poll()
    ui.timer(STATUS_TICK, bar.poll)
    if run:
        if bar.preselect(run, iteration) and bar.differs(bar.model_path(), bar.adapter_path()):
            ui.timer(0.05, bar.load, once=True)
    elif model:
        if bar.preselect_model(model) and bar.differs(bar.model_path(), None):
            ui.timer(0.05, bar.load, once=True)
