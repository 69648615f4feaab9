"""The Playground's Perplexity tab: exp of mlx-lm's validation loss of the picked model and adapter on a dataset."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from nicegui import ui

from pages.playground.selection import Selection
from services.errors import ForgeError
from services.inference.requests import adapter_label
from services.library.datasets import validation_datasets

if TYPE_CHECKING:
    from app.composition import Services

COLUMNS = [{"name": k, "label": k, "field": k, "align": "left"}
           for k in ("model", "adapter", "dataset", "loss", "perplexity", "tokens")]


class PerplexityPanel:
    """Dataset, sequence length and batch size, the latest result and a table of every result so far."""

    def __init__(self, services: Services, selection: Selection, on_done: Callable[[], None]) -> None:
        """``on_done`` is called after each measurement (the page redraws the model status)."""
        self.models, self.selection, self.on_done = services.models, selection, on_done
        ui.label("Perplexity of the picked model and adapter on a dataset's validation split (valid.jsonl): "
                 "exp of mlx-lm's validation loss. Loads the picked model first.").classes("text-sm opacity-70")
        datasets = {str(Path(d["path"]).resolve()): d["label"] for d in validation_datasets(services.workspace)}
        with ui.row().classes("w-full items-end gap-3"):
            self.dataset = ui.select(datasets, label="Dataset", value=next(iter(datasets), None), with_input=True) \
                .props("dense outlined").classes("w-96").mark("ppl-dataset")
            self.max_seq = ui.number("Max sequence length", value=512, step=64, format="%.0f") \
                .props("dense outlined").classes("w-44").mark("ppl-max-seq")
            self.batch = ui.number("Batch size", value=4, step=1, format="%.0f").props("dense outlined") \
                .classes("w-32").mark("ppl-batch")
            self.run_btn = ui.button("Compute", icon="functions", on_click=self.measure).mark("ppl-run")
        self.note = ui.label("").classes("text-sm").mark("ppl-result")
        self.table = ui.table(columns=COLUMNS, rows=[], row_key="n").props("dense flat bordered") \
            .classes("w-full").mark("ppl-table")
        self.table.set_visibility(False)

    async def measure(self) -> None:
        model, dataset = self.selection.model_path(), self.dataset.value
        if not model or not dataset:
            ui.notify("Pick a model and a dataset", type="warning")
            return
        adapter = self.selection.adapter_path()
        self.run_btn.disable()
        self.note.set_text("computing…")
        try:
            res = await self.models.aperplexity(model, adapter, dataset, int(self.max_seq.value or 512),
                                                int(self.batch.value or 4))
        except ForgeError as e:
            self.note.set_text(f"error: {e}")
            ui.notify(str(e), type="negative", multi_line=True)
            return
        finally:
            self.run_btn.enable()
            self.on_done()
        ppl = res["perplexity"]
        self.note.set_text(f"loss {res['loss']:.4f} · perplexity {ppl:,.2f} · {res['rows_used']} of "
                           f"{res['rows']} rows, {res['tokens']:,} tokens")
        self.table.add_row({"n": len(self.table.rows), "model": Path(model).name, "adapter": adapter_label(adapter),
                            "dataset": Path(dataset).name, "loss": f"{res['loss']:.4f}", "perplexity": f"{ppl:,.2f}",
                            "tokens": res["tokens"]})
        self.table.set_visibility(True)
