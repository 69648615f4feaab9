"""Datasets page: import (upload or local path), every bad line listed with the choice to drop them, a paginated
preview, token statistics with a model's tokenizer, a train/valid split, and what the model sees of a sample.

All data work is :mod:`services.library.checks` and :mod:`services.library.datasets`, run with ``run.io_bound``;
this module only lays out and formats. Uploads are re-checked on the server (size, name, type): the browser's
limit is a convenience only. :class:`DatasetsPage` holds the opened dataset's check and composes one small
component per card.
"""

from __future__ import annotations

import html
import math
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

from nicegui import events, run, ui

from pages.common import entered, is_local_client
from services.errors import ForgeError
from services.library import checks as dc
from services.library.datasets import (
    check_upload_size,
    dataset_path,
    import_dataset,
    list_datasets,
    server_path_access,
    store_upload,
)
from services.library.models import LibraryError, list_models
from services.training.data import DataError
from services.training.prepared import PreparedCache
from services.units import human_bytes

if TYPE_CHECKING:
    from app.composition import Services

MAX_UPLOAD_BYTES = 200_000_000
PAGE_SIZE = 10
BAD_SHOWN = 500
TOKEN_CSS = """
.tok { white-space: pre-wrap; font-family: ui-monospace, monospace; font-size: 12px; line-height: 22px;
       border-radius: 3px; padding: 1px 1px; margin-right: 1px; }
.tok-trained { background: #bbf7d0; color: #14532d; box-shadow: inset 0 -2px 0 #22c55e; }
.tok-masked { background: #e5e7eb; color: #4b5563; }
.tok-cut { background: #fee2e2; color: #991b1b; text-decoration: line-through; }
.tok-mark { font-family: ui-sans-serif, sans-serif; font-size: 11px; font-weight: 600; color: #b91c1c;
            border-left: 2px solid #b91c1c; padding: 0 4px; margin: 0 2px; }
.tok-nl { color: #9ca3af; }
.pair-view { display: flex; gap: 12px; align-items: flex-start; }
.pair-side { flex: 1 1 0; min-width: 0; border: 1px solid #e5e7eb; border-radius: 6px; padding: 6px; }
.pair-head { font-family: ui-sans-serif, sans-serif; font-size: 12px; font-weight: 600; margin-bottom: 4px; }
.pair-chosen .pair-head { color: #15803d; }
.pair-rejected .pair-head { color: #b91c1c; }
"""
PREVIEW_COLUMNS: list[dict[str, Any]] = [
    {"name": "index", "label": "#", "field": "index", "align": "right"},
    {"name": "file", "label": "File", "field": "file", "align": "left"},
    {"name": "line", "label": "Line", "field": "line", "align": "right"},
    {"name": "summary", "label": "Sample (click a row to see what the model sees)", "field": "summary",
     "align": "left", "style": "white-space: normal"},
]


def tokens_html(view: dict[str, Any]) -> str:
    """Token spans with a class per state (trained, masked, cut) and a mark where the sequence is cut."""
    out = []
    windows = set(view.get("windows_at") or [])
    for t in view["tokens"]:
        if view.get("truncated_at") == t["i"]:
            out.append(f'<span class="tok-mark">✂ max_seq_length {t["i"]}: the rest is dropped</span>')
        elif t["i"] in windows:
            out.append(f'<span class="tok-mark">⇥ next window from token {t["i"]}</span>')
        text = html.escape(t["text"]).replace("\n", '<span class="tok-nl">↵</span>\n')
        out.append(f'<span class="tok tok-{t["state"]}" title="#{t["i"]} · id {t["id"]} · {t["state"]}">{text}</span>')
    if view["shown"] < view["total"]:
        out.append(f'<span class="tok-mark">… {view["total"] - view["shown"]:,} more tokens not shown</span>')
    return "".join(out)


def short(message: str, ws_root: Path) -> str:
    """A problem line with the workspace's datasets folder left out of the path."""
    for prefix in (str(ws_root / "datasets") + "/", str(ws_root) + "/"):
        if message.startswith(prefix):
            return message[len(prefix):]
    return message


def stats_text(st: dict[str, Any], fmt: str) -> list[tuple[str, str]]:
    """(label, value) rows of the token statistics of a dataset in format ``fmt``."""
    rows = [("Samples", f"{st['samples']:,}"), ("Tokens", f"{st['tokens']:,}"),
            ("Length", f"min {st['min']:,} · mean {st['mean']:,} · p95 {st['p95']:,} · max {st['max']:,}")]
    if fmt == "documents":
        rows.append(("Windows", f"{st['windows']:,} of {st['max_seq_length']:,} tokens (documents are packed)"))
    else:
        rows += [("Trained tokens", f"{st['trained_tokens']:,} (loss targets within max_seq_length)"),
                 ("Truncated", f"{st['truncated_samples']:,} samples longer than {st['max_seq_length']:,} "
                               f"({st['truncated_tokens']:,} tokens dropped)")]
        if fmt == "preference":
            rows += pair_rows(st)
        elif st.get("untrainable"):
            rows.append(("Nothing to train", f"{st['untrainable']:,} samples have no trained token within "
                                             f"{st['max_seq_length']:,} (a run leaves them out)"))
    rows.append(("Duplicates", f"{st['duplicates']:,} exact duplicate samples"))
    if st["errors"]:
        rows.append(("Not renderable", f"{len(st['errors'])}: {st['errors'][0]}"))
    return rows


def prepared_rows(entries: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(label, value) rows of what runs prepared from the dataset (the cache's entries): what a run trains on."""
    rows = []
    for e in entries:
        train, valid = e.get("train") or {}, e.get("valid") or {}
        rows.append((f"Prepared ({e['mode']})", f"{train.get('sequences', 0):,} training sequences, "
                     f"{train.get('trained_tokens', 0):,} trained tokens; {valid.get('sequences', 0):,} "
                     f"validation sequences (cached, {human_bytes(e['bytes'])})"))
    return rows


def pair_rows(st: dict[str, Any]) -> list[tuple[str, str]]:
    """(label, value) rows of a preference dataset's pair statistics (lengths are each pair's longer side)."""
    ps = st["pairs"]
    rows = [("Pairs", f"{ps['pairs']:,} a run trains on (each: two sequences, the longer side's length above)")]
    if ps["pairs"]:
        share = ps["chosen_longer"]
        bias = " (a length bias: DPO may learn to prefer longer answers)" if share >= 0.7 else \
            " (a length bias: DPO may learn to prefer shorter answers)" if share <= 0.3 else ""
        rows += [("Answer lengths", f"chosen {ps['chosen_mean_length']:,} · rejected {ps['rejected_mean_length']:,}"
                                    f" tokens on average (prompt {ps['prompt_mean_length']:,})"),
                 ("Length bias", f"chosen is longer in {share:.0%} of pairs{bias}")]
    if st["untrainable"]:
        rows.append(("Left out", f"{st['untrainable']:,} rows: {st['left_out'][0]}"))
    return rows


def pair_html(view: dict[str, Any]) -> str:
    """The chosen and rejected sides of a pair side by side, each as :func:`tokens_html` draws it."""
    cols = [f'<div class="pair-side pair-{side}"><div class="pair-head">{side} · {view[side]["total"]:,} tokens, '
            f'{view[side]["trained"]:,} trained</div>{tokens_html(view[side])}</div>'
            for side in ("chosen", "rejected")]
    return f'<div class="pair-view">{"".join(cols)}</div>'


def histogram_options(st: dict[str, Any]) -> dict[str, Any]:
    """ECharts options of the sample-length histogram; bins over max_seq_length are red."""
    limit = st["max_seq_length"]
    data = [{"value": n, "itemStyle": {"color": "#ef4444" if lo >= limit else "#3b82f6"}}
            for lo, _, n in st["histogram"]]
    return {"animation": False, "grid": {"left": 50, "right": 16, "top": 24, "bottom": 48},
            "tooltip": {"trigger": "axis"},
            "xAxis": {"type": "category", "data": [f"{lo}–{hi}" for lo, hi, _ in st["histogram"]],
                      "name": "tokens per sample (red: over max_seq_length)", "nameLocation": "middle", "nameGap": 30},
            "yAxis": {"type": "value", "name": "samples", "minInterval": 1},
            "series": [{"type": "bar", "data": data, "name": "samples"}]}


Check = dc.DatasetCheck | None
Added = Callable[[str], None]  # a new entry of datasets/ to select


def card_title(text: str) -> None:
    ui.label(text).classes("text-sm font-semibold text-grey-7")


class DatasetPicker:
    """The dataset select (entries of ``datasets/``) and its rescan button."""

    def __init__(self, services: Services, on_pick: Callable[[str | None], Awaitable[None]]) -> None:
        self.ws = services.workspace
        with ui.card().classes("w-full"):
            card_title("Dataset")
            with ui.row().classes("w-full items-center no-wrap"):
                self.select = ui.select(self.options(), label="Dataset", on_change=lambda e: on_pick(e.value)) \
                    .props("dense outlined").classes("grow").mark("dataset-select")
                ui.button(icon="refresh", on_click=lambda: self.refresh()).props("flat round dense") \
                    .tooltip("scan datasets/ again")

    def options(self) -> dict[str, str]:
        return {d["key"]: d["label"] for d in list_datasets(self.ws)}

    def refresh(self, select: str | None = None) -> None:
        """Scan ``datasets/`` again; ``select`` (a new entry) becomes the chosen one."""
        self.select.set_options(self.options(), value=select if select is not None else self.select.value)


class DatasetImport:
    """Upload a file, or copy or link a file or folder of this machine into ``datasets/``."""

    def __init__(self, services: Services, on_added: Added) -> None:
        self.ws, self.on_added = services.workspace, on_added
        with ui.card().classes("w-full").mark("dataset-import"):
            card_title("Import")
            self.uploader = ui.upload(
                label=f"Upload .jsonl / .txt / .md (up to {human_bytes(MAX_UPLOAD_BYTES)})", auto_upload=True,
                max_file_size=MAX_UPLOAD_BYTES, on_upload=self.upload,
                on_rejected=lambda: ui.notify("File too large or not a dataset", type="warning"),
            ).props("accept=.jsonl,.txt,.md flat bordered dense").classes("w-full").mark("dataset-upload")
            # the rule is the library's; this page only says whether its browser is on this machine
            self.local = is_local_client()
            try:
                access = server_path_access(self.ws, self.local)
            except ForgeError as err:  # a broken settings file: say so, uploads still work
                ui.label(str(err)).classes("text-xs text-negative").mark("dataset-path-note")
                return
            ui.label(access.note()).classes("text-xs text-grey-7").mark("dataset-path-note")
            if not access.allowed:
                return
            self.path = ui.input("Path").props("dense outlined").classes("w-full").mark("dataset-path")
            with ui.row().classes("w-full items-center gap-2"):
                self.name = ui.input("Name (optional)").props("dense outlined").classes("w-40")
                self.link = ui.switch("Link")
                ui.button("Import", on_click=self.import_path).props("outline dense").mark("dataset-import-path")

    async def upload(self, e: events.UploadEventArguments) -> None:
        try:
            check_upload_size(e.file.name, e.file.size(), MAX_UPLOAD_BYTES)  # before reading it into memory
            data = await e.file.read()
            path = await run.io_bound(store_upload, self.ws, e.file.name, data, MAX_UPLOAD_BYTES)
        except LibraryError as err:
            ui.notify(str(err), type="negative", multi_line=True)
            return
        finally:
            self.uploader.reset()
        ui.notify(f"Uploaded {path.name}")
        self.on_added(path.name)

    async def import_path(self) -> None:
        source = entered(self.path, "Enter a file or folder path")
        if source is None:
            return
        try:
            path = await run.io_bound(import_dataset, self.ws, source, (self.name.value or "").strip() or None,
                                      bool(self.link.value), local=self.local)
        except ForgeError as err:
            ui.notify(str(err), type="negative", multi_line=True)
            return
        ui.notify(f"Imported {path.name}")
        self.path.set_value("")
        self.on_added(path.name)


class TokenizerSettings:
    """The model whose tokenizer and chat template are used, max_seq_length and the loss-on-all-turns switch."""

    def __init__(self, services: Services) -> None:
        models = {m["path"]: m["label"] for m in list_models(services.workspace)}
        with ui.card().classes("w-full"):
            card_title("Tokenizer and run settings")
            self.model = ui.select(models, value=next(iter(models), None), label="Model (tokenizer, chat template)",
                                   with_input=True).props("dense outlined").classes("w-full").mark("tok-model")
            with ui.row().classes("w-full items-center gap-2"):
                self.max_len = ui.number("max_seq_length", value=512, min=8, step=64, format="%d") \
                    .props("dense outlined").classes("w-40").mark("max-seq")
                self.all_turns = ui.switch("Loss on all assistant turns", value=True).mark("all-turns")

    def seq_len(self) -> int:
        return max(int(self.max_len.value or 512), 2)

    def options(self) -> dict[str, Any]:
        return {"mask_all_turns": self.all_turns.value}

    async def tokenizer(self) -> Any | None:
        """The chosen model's tokenizer, or None after telling why."""
        if not self.model.value:
            ui.notify("Choose a model first: its tokenizer and chat template are used", type="warning")
            return None
        try:
            return await run.io_bound(dc.load_tokenizer, str(self.model.value))
        except DataError as err:
            ui.notify(str(err), type="negative", multi_line=True)
            return None


class SplitCard:
    """Write a train/valid split of the opened dataset's usable samples."""

    def __init__(self, current: Callable[[], Check], on_added: Added) -> None:
        self.current, self.on_added = current, on_added
        with ui.card().classes("w-full"):
            card_title("Train/valid split")
            with ui.row().classes("w-full items-center gap-2"):
                self.fraction = ui.number("valid fraction", value=0.1, min=0.01, max=0.9, step=0.05) \
                    .props("dense outlined").classes("w-32")
                self.seed = ui.number("seed", value=0, format="%d").props("dense outlined").classes("w-24")
                self.button = ui.button("Write split", on_click=self.split).props("outline dense").mark("split")
            ui.label("Writes NAME-split/train.jsonl and valid.jsonl (usable samples only).") \
                .classes("text-xs text-grey-7")

    async def split(self) -> None:
        check = self.current()
        if check is None:
            return
        try:
            path = await run.io_bound(dc.make_split, check, float(self.fraction.value or 0.1),
                                      int(self.seed.value or 0))
        except (DataError, OSError) as err:
            ui.notify(str(err), type="negative", multi_line=True)
            return
        ui.notify(f"Wrote {path.name}/train.jsonl and valid.jsonl", type="positive")
        self.on_added(path.name)


class CheckCard:
    """What the check found: the layout, usable samples per file, every bad line, and "Drop bad lines"."""

    def __init__(self, services: Services, current: Callable[[], Check], on_added: Added) -> None:
        self.ws_root, self.current, self.on_added = services.workspace.root, current, on_added
        with ui.card().classes("w-full").mark("check-card"):
            self.title = ui.label("Choose or import a dataset.").classes("text-base font-semibold") \
                .mark("check-title")
            self.info = ui.label("").classes("text-sm text-grey-8").mark("check-info")
            self.no_bad = ui.label("Every line is valid.").classes("text-sm text-positive").mark("no-bad-lines")
            self.bad_box = ui.scroll_area().classes("w-full h-40 border rounded").mark("bad-lines")
            with ui.row().classes("items-center gap-3") as self.drop_row:
                self.drop_btn = ui.button("Drop bad lines", icon="cleaning_services", on_click=self.drop) \
                    .props("outline color=negative").mark("drop-bad")
                ui.label("writes a cleaned copy next to the original; the original is kept") \
                    .classes("text-xs text-grey-7")

    def show(self, check: Check, error: str | None = None) -> None:
        self.bad_box.clear()
        if check is None:
            self.title.set_text(error or "Choose or import a dataset.")
            self.title.classes(replace="text-base font-semibold" + (" text-negative" if error else ""))
            self.info.set_text("")
            for el in (self.drop_row, self.bad_box, self.no_bad):
                el.set_visibility(False)
            return
        self.title.set_text(f"{check.label} · {check.layout}")
        self.title.classes(replace="text-base font-semibold")
        bad = check.bad
        files = ", ".join(f"{f.name}: {f.good}" for f in check.files[:6]) + (" …" if len(check.files) > 6 else "")
        self.info.set_text(f"{check.good:,} usable samples ({files}) · {len(bad):,} bad line(s)")
        with self.bad_box:
            for b in bad[:BAD_SHOWN]:
                ui.label(short(b, self.ws_root)).classes("font-mono text-xs text-negative").mark("bad-line")
            if len(bad) > BAD_SHOWN:
                ui.label(f"… and {len(bad) - BAD_SHOWN:,} more (forgellm dataset check lists all)") \
                    .classes("text-xs")
        self.bad_box.set_visibility(bool(bad))
        self.no_bad.set_visibility(not bad)
        self.drop_row.set_visibility(bool(bad) and check.good > 0)
        self.drop_btn.set_text(f"Drop {len(bad):,} bad line(s)")

    async def drop(self) -> None:
        check = self.current()
        if check is None:
            return
        try:
            path = await run.io_bound(dc.write_clean_copy, check)
        except (DataError, OSError) as err:
            ui.notify(str(err), type="negative", multi_line=True)
            return
        ui.notify(f"Wrote {path.name} without {len(check.bad)} bad line(s); {check.path.name} is kept",
                  type="positive", multi_line=True)
        self.on_added(path.name)


class PreviewCard:
    """The usable samples, a page at a time; a click on a row asks what the model sees of it."""

    def __init__(self, on_row: Callable[[dict[str, Any]], Awaitable[None]]) -> None:
        self.check: Check = None
        with ui.card().classes("w-full"):
            card_title("Preview")
            self.table = ui.table(columns=PREVIEW_COLUMNS, rows=[], row_key="index") \
                .props("dense flat hide-pagination wrap-cells").classes("w-full cursor-pointer") \
                .mark("preview-table")
            self.table.pagination = {"rowsPerPage": 0}
            self.pager = ui.pagination(1, 1, direction_links=True, on_change=lambda e: self.show_page(e.value)) \
                .props("max-pages=7 boundary-numbers").mark("preview-pages")

        async def row_click(e: events.GenericEventArguments) -> None:
            row = e.args[1] if isinstance(e.args, list) and len(e.args) > 1 else None
            if isinstance(row, dict):
                await on_row(row)

        self.table.on("rowClick", row_click)

    def show(self, check: Check) -> None:
        self.check = check
        if check is None:
            self.table.rows = []
            self.pager.max = 1
        else:
            self.show_page(1)

    def show_page(self, page: int) -> None:
        if self.check is None:
            return
        rows, total = dc.preview(self.check, page, PAGE_SIZE)
        self.table.rows = rows
        self.pager.max = max(1, math.ceil(total / PAGE_SIZE))
        if self.pager.value != page:
            self.pager.value = page


class MaskCard:
    """One sample as the model sees it: trained, masked and cut tokens."""

    def __init__(self, services: Services, settings: TokenizerSettings) -> None:
        self.ws_root, self.settings = services.workspace.root, settings
        with ui.card().classes("w-full").mark("mask-card"):
            with ui.row().classes("w-full items-center gap-3"):
                card_title("What the model sees")
                ui.html('<span class="tok tok-trained">trained</span> <span class="tok tok-masked">masked '
                        '(context only)</span> <span class="tok tok-cut">cut (beyond max_seq_length)</span>')
            self.info = ui.label("Click a preview row.").classes("text-sm").mark("mask-info")
            self.view = ui.html("").classes("w-full mask-tokens").mark("mask-view")

    def clear(self) -> None:
        self.view.set_content("")
        self.info.set_text("Click a preview row.")

    async def show(self, check: dc.DatasetCheck, row: dict[str, Any]) -> None:
        tok = await self.settings.tokenizer()
        if tok is None:
            return
        where, _, _, sample = check.samples()[int(row["index"])]
        seq_len = self.settings.seq_len()
        try:
            view = await run.io_bound(dc.what_the_model_sees, tok, sample, check.fmt, seq_len, where,
                                      self.settings.options())
        except DataError as err:
            self.info.set_text(short(str(err), self.ws_root))
            self.view.set_content("")
            return
        if check.fmt == "preference":
            self.info.set_text(f"{short(where, self.ws_root)}: the pair as a DPO/ORPO run renders it (the prompt is "
                               "context, the answers are trained)")
            self.view.set_content(pair_html(view))
            return
        cut = view["total"] - seq_len if view["truncated_at"] is not None else 0
        self.info.set_text(f"{short(where, self.ws_root)}: {view['total']:,} tokens, {view['trained']:,} trained"
                           + (f", {cut:,} cut at max_seq_length {seq_len:,}" if cut else "")
                           + (f" (first {view['shown']:,} shown)" if view["shown"] < view["total"] else ""))
        self.view.set_content(tokens_html(view))


class StatsCard:
    """Token statistics of the opened dataset with the chosen tokenizer, and the length histogram."""

    def __init__(self, services: Services, settings: TokenizerSettings, current: Callable[[], Check]) -> None:
        self.settings, self.current = settings, current
        self.cache = PreparedCache.of(services.workspace)
        with ui.card().classes("w-full"):
            with ui.row().classes("w-full items-center"):
                card_title("Token statistics")
                ui.space()
                self.button = ui.button("Count tokens", icon="functions", on_click=self.count) \
                    .props("outline dense").mark("stats-run")
            self.grid = ui.grid(columns="auto 1fr").classes("gap-x-3 gap-y-1 text-sm").mark("stats")
            self.chart = ui.echart({"series": []}).classes("w-full h-56").mark("stats-chart")

    def clear(self) -> None:
        self.grid.clear()
        self.chart.options["series"] = []
        self.chart.set_visibility(False)

    async def count(self) -> None:
        check = self.current()
        tok = await self.settings.tokenizer() if check is not None else None
        if check is None or tok is None:
            return
        self.button.props("loading")
        try:
            result = await run.io_bound(dc.token_stats, check, tok, self.settings.seq_len(), self.settings.options())
        finally:
            self.button.props(remove="loading")
        if check is not self.current():
            return
        self.grid.clear()
        prepared = await run.io_bound(self.cache.entries_for, check.path, str(self.settings.model.value),
                                      self.settings.seq_len())
        with self.grid:
            for label, value in stats_text(result, check.fmt) + prepared_rows(prepared):
                ui.label(label).classes("text-grey-7")
                ui.label(value)
        self.chart.options.clear()
        self.chart.options.update(histogram_options(result))
        self.chart.set_visibility(True)


class CacheCard:
    """The workspace's prepared-data cache: each entry with its data, model, settings and size, deletable."""

    def __init__(self, services: Services) -> None:
        self.cache, self.ws_root = PreparedCache.of(services.workspace), services.workspace.root
        with ui.card().classes("w-full").mark("cache-card"):
            with ui.row().classes("w-full items-center"):
                card_title("Prepared data (cache)")
                ui.space()
                ui.button(icon="refresh", on_click=self.refresh).props("flat dense round").mark("cache-refresh")
            self.total = ui.label("").classes("text-xs text-grey-7").mark("cache-total")
            self.rows = ui.column().classes("w-full gap-1")
        self.refresh()

    def refresh(self) -> None:
        entries = self.cache.entries()
        self.total.set_text(f"{len(entries)} entr{'y' if len(entries) == 1 else 'ies'}, "
                            f"{human_bytes(sum(e['bytes'] for e in entries))}: tokenized once, reused by every run "
                            "on the same data, tokenizer and settings" if entries else
                            "Nothing cached yet: a run prepares its data here once.")
        self.rows.clear()
        with self.rows:
            for e in entries:
                with ui.row().classes("w-full items-center gap-2 text-sm no-wrap").mark(f"cache-{e['key']}"):
                    with ui.column().classes("grow gap-0 min-w-0"):
                        ui.label(f"{Path(e['data'] or '?').name} · {Path(e['model'] or '?').name}") \
                            .classes("truncate w-full")
                        ui.label(f"{e['mode']} · seq {e['max_seq_length']} · {e['tokens']:,} tokens") \
                            .classes("text-xs text-grey-7")
                    ui.label(human_bytes(e["bytes"]) + ("" if e["complete"] else " (partial)")) \
                        .classes("text-grey-7 whitespace-nowrap").mark("cache-size")
                    ui.button(icon="delete", on_click=lambda key=e["key"]: self.delete(key)) \
                        .props("flat dense round color=negative").mark("cache-delete")

    def delete(self, key: str) -> None:
        try:
            self.cache.delete(key)
        except (DataError, OSError) as e:
            ui.notify(short(str(e), self.ws_root), type="negative")
        self.refresh()


class DatasetsPage:
    """The settings column on the left, what the opened dataset holds on the right."""

    def __init__(self, services: Services) -> None:
        self.ws = services.workspace
        self.check: Check = None
        self.key: str | None = None
        ui.add_css(TOKEN_CSS)
        ui.label("Datasets").classes("text-2xl font-semibold")
        with ui.row().classes("w-full items-start gap-4 no-wrap max-lg:flex-wrap"):
            with ui.column().classes("w-[360px] max-lg:w-full gap-3 shrink-0"):
                self.picker = DatasetPicker(services, on_pick=self.open)
                self.importer = DatasetImport(services, on_added=self.picker.refresh)
                self.settings = TokenizerSettings(services)
                self.split = SplitCard(self.current, on_added=self.picker.refresh)
                self.cache = CacheCard(services)
            with ui.column().classes("grow gap-3 min-w-0"):
                self.found = CheckCard(services, self.current, on_added=self.picker.refresh)
                self.preview = PreviewCard(on_row=self.show_mask)
                self.mask = MaskCard(services, self.settings)
                self.stats = StatsCard(services, self.settings, self.current)
        self.show(None)

    def current(self) -> Check:
        """The opened dataset's check, or None."""
        return self.check

    def show(self, check: Check, error: str | None = None) -> None:
        """Make ``check`` the opened dataset (None: none, with ``error`` saying why) and reset the views."""
        self.check = check
        self.mask.clear()
        self.stats.clear()
        for button in (self.split.button, self.stats.button):
            button.set_enabled(check is not None)
        self.found.show(check, error)
        self.preview.show(check)

    async def open(self, key: str | None) -> None:
        if not key:
            self.show(None)
            return
        self.key = key
        try:
            path = dataset_path(self.ws, key)
            check = await run.io_bound(dc.check_dataset, path)
        except (DataError, LibraryError, ValueError, OSError) as e:
            self.show(None, f"{key}: {short(str(e), self.ws.root)}")
            return
        if self.key == key:
            self.show(check)

    async def show_mask(self, row: dict[str, Any]) -> None:
        if self.check is not None:
            await self.mask.show(self.check, row)

    def preselect(self, name: str) -> None:
        """Open ``datasets/NAME`` if it is there (the ``?name=`` deep link)."""
        if name in self.picker.select.options:
            self.picker.select.set_value(name)


def datasets_page(services: Services) -> None:
    """Build the Datasets page for one client."""
    page = DatasetsPage(services)
    chosen = parse_qs(urlsplit(ui.context.client.sub_pages_router.current_path).query).get("name")
    if chosen:
        page.preselect(chosen[0])
