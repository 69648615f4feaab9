"""Datasets page: import (upload or local path), every bad line listed with the choice to drop them, a paginated
preview, token statistics with a model's tokenizer, a train/valid split, and what the model sees of a sample.

All data work is :mod:`services.library.checks` and :mod:`services.library.imports`, run with ``run.io_bound``; this
module only lays out and formats. Uploads are re-checked on the server (size, name, type): the browser's
limit is a convenience only.
"""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

from nicegui import events, run, ui

from services.library import checks as dc
from services.library.datasets import dataset_path, import_dataset, list_datasets, store_upload
from services.library.models import LibraryError, list_models
from services.training.data import DataError
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
    rows = [("Samples", f"{st['samples']:,}"), ("Tokens", f"{st['tokens']:,}"),
            ("Length", f"min {st['min']:,} · mean {st['mean']:,} · p95 {st['p95']:,} · max {st['max']:,}")]
    if fmt == "documents":
        rows.append(("Windows", f"{st['windows']:,} of {st['max_seq_length']:,} tokens (documents are packed)"))
    else:
        rows += [("Trained tokens", f"{st['trained_tokens']:,} (loss targets within max_seq_length)"),
                 ("Truncated", f"{st['truncated_samples']:,} samples longer than {st['max_seq_length']:,} "
                               f"({st['truncated_tokens']:,} tokens dropped)")]
        if st.get("untrainable"):
            rows.append(("Nothing to train", f"{st['untrainable']:,} samples have no trained token within "
                                             f"{st['max_seq_length']:,} (a run leaves them out)"))
    rows.append(("Duplicates", f"{st['duplicates']:,} exact duplicate samples"))
    if st["errors"]:
        rows.append(("Not renderable", f"{len(st['errors'])}: {st['errors'][0]}"))
    return rows


def histogram_options(st: dict[str, Any]) -> dict[str, Any]:
    limit = st["max_seq_length"]
    data = [{"value": n, "itemStyle": {"color": "#ef4444" if lo >= limit else "#3b82f6"}}
            for lo, _, n in st["histogram"]]
    return {"animation": False, "grid": {"left": 50, "right": 16, "top": 24, "bottom": 48},
            "tooltip": {"trigger": "axis"},
            "xAxis": {"type": "category", "data": [f"{lo}–{hi}" for lo, hi, _ in st["histogram"]],
                      "name": "tokens per sample (red: over max_seq_length)", "nameLocation": "middle", "nameGap": 30},
            "yAxis": {"type": "value", "name": "samples", "minInterval": 1},
            "series": [{"type": "bar", "data": data, "name": "samples"}]}


def datasets_page(services: Services) -> None:
    """Build the Datasets page for one client."""
    ws = services.workspace
    st: dict[str, Any] = {"check": None, "key": None, "page": 1}
    ui.add_css(TOKEN_CSS)

    def dataset_options() -> dict[str, str]:
        return {d["key"]: d["label"] for d in list_datasets(ws)}

    models = {m["path"]: m["label"] for m in list_models(ws)}
    default_model = next(iter(models), None)

    ui.label("Datasets").classes("text-2xl font-semibold")
    with ui.row().classes("w-full items-start gap-4 no-wrap max-lg:flex-wrap"):
        with ui.column().classes("w-[360px] max-lg:w-full gap-3 shrink-0"):
            with ui.card().classes("w-full"):
                ui.label("Dataset").classes("text-sm font-semibold text-grey-7")
                with ui.row().classes("w-full items-center no-wrap"):
                    picker = ui.select(dataset_options(), label="Dataset", on_change=lambda e: open_dataset(e.value)) \
                        .props("dense outlined").classes("grow").mark("dataset-select")
                    ui.button(icon="refresh", on_click=lambda: refresh_options()).props("flat round dense") \
                        .tooltip("scan datasets/ again")
            with ui.card().classes("w-full").mark("dataset-import"):
                ui.label("Import").classes("text-sm font-semibold text-grey-7")
                uploader = ui.upload(label=f"Upload .jsonl / .txt / .md (up to {human_bytes(MAX_UPLOAD_BYTES)})",
                                     auto_upload=True, max_file_size=MAX_UPLOAD_BYTES, on_upload=lambda e: upload(e),
                                     on_rejected=lambda: ui.notify("File too large or not a dataset", type="warning")
                                     ).props("accept=.jsonl,.txt,.md flat bordered dense").classes("w-full") \
                    .mark("dataset-upload")
                ui.label("or from a file or folder on this machine").classes("text-xs text-grey-7")
                local = ui.input("Path").props("dense outlined").classes("w-full").mark("dataset-path")
                with ui.row().classes("w-full items-center gap-2"):
                    local_name = ui.input("Name (optional)").props("dense outlined").classes("w-40")
                    link = ui.switch("Link")
                    ui.button("Import", on_click=lambda: import_local()).props("outline dense") \
                        .mark("dataset-import-path")
            with ui.card().classes("w-full"):
                ui.label("Tokenizer and run settings").classes("text-sm font-semibold text-grey-7")
                model = ui.select(models, value=default_model, label="Model (tokenizer, chat template)",
                                  with_input=True).props("dense outlined").classes("w-full").mark("tok-model")
                with ui.row().classes("w-full items-center gap-2"):
                    max_len = ui.number("max_seq_length", value=512, min=8, step=64, format="%d") \
                        .props("dense outlined").classes("w-40").mark("max-seq")
                    all_turns = ui.switch("Loss on all assistant turns", value=True).mark("all-turns")
            with ui.card().classes("w-full"):
                ui.label("Train/valid split").classes("text-sm font-semibold text-grey-7")
                with ui.row().classes("w-full items-center gap-2"):
                    fraction = ui.number("valid fraction", value=0.1, min=0.01, max=0.9, step=0.05) \
                        .props("dense outlined").classes("w-32")
                    seed = ui.number("seed", value=0, format="%d").props("dense outlined").classes("w-24")
                    split_btn = ui.button("Write split", on_click=lambda: split()).props("outline dense") \
                        .mark("split")
                ui.label("Writes NAME-split/train.jsonl and valid.jsonl (usable samples only).") \
                    .classes("text-xs text-grey-7")

        with ui.column().classes("grow gap-3 min-w-0"):
            with ui.card().classes("w-full").mark("check-card"):
                check_title = ui.label("Choose or import a dataset.").classes("text-base font-semibold") \
                    .mark("check-title")
                check_info = ui.label("").classes("text-sm text-grey-8").mark("check-info")
                no_bad = ui.label("Every line is valid.").classes("text-sm text-positive").mark("no-bad-lines")
                bad_box = ui.scroll_area().classes("w-full h-40 border rounded").mark("bad-lines")
                with ui.row().classes("items-center gap-3") as drop_row:
                    drop_btn = ui.button("Drop bad lines", icon="cleaning_services", on_click=lambda: drop()) \
                        .props("outline color=negative").mark("drop-bad")
                    ui.label("writes a cleaned copy next to the original; the original is kept") \
                        .classes("text-xs text-grey-7")
            with ui.card().classes("w-full"):
                ui.label("Preview").classes("text-sm font-semibold text-grey-7")
                table = ui.table(columns=PREVIEW_COLUMNS, rows=[], row_key="index") \
                    .props("dense flat hide-pagination wrap-cells").classes("w-full cursor-pointer") \
                    .mark("preview-table")
                table.pagination = {"rowsPerPage": 0}
                pager = ui.pagination(1, 1, direction_links=True, on_change=lambda e: show_page(e.value)) \
                    .props("max-pages=7 boundary-numbers").mark("preview-pages")
            with ui.card().classes("w-full").mark("mask-card"):
                with ui.row().classes("w-full items-center gap-3"):
                    ui.label("What the model sees").classes("text-sm font-semibold text-grey-7")
                    ui.html('<span class="tok tok-trained">trained</span> <span class="tok tok-masked">masked '
                            '(context only)</span> <span class="tok tok-cut">cut (beyond max_seq_length)</span>')
                mask_info = ui.label("Click a preview row.").classes("text-sm").mark("mask-info")
                mask = ui.html("").classes("w-full mask-tokens").mark("mask-view")
            with ui.card().classes("w-full"):
                with ui.row().classes("w-full items-center"):
                    ui.label("Token statistics").classes("text-sm font-semibold text-grey-7")
                    ui.space()
                    stats_btn = ui.button("Count tokens", icon="functions", on_click=lambda: stats()) \
                        .props("outline dense").mark("stats-run")
                stats_grid = ui.grid(columns="auto 1fr").classes("gap-x-3 gap-y-1 text-sm").mark("stats")
                chart = ui.echart({"series": []}).classes("w-full h-56").mark("stats-chart")

    # -- behaviour --------------------------------------------------------------------------------

    def show_check(check: dc.DatasetCheck | None, error: str | None = None) -> None:
        st["check"], st["page"] = check, 1
        bad_box.clear()
        mask.set_content("")
        mask_info.set_text("Click a preview row.")
        stats_grid.clear()
        chart.options["series"] = []
        chart.set_visibility(False)
        for el in (split_btn, stats_btn):
            el.set_enabled(check is not None)
        if check is None:
            check_title.set_text(error or "Choose or import a dataset.")
            check_title.classes(replace="text-base font-semibold" + (" text-negative" if error else ""))
            check_info.set_text("")
            drop_row.set_visibility(False)
            bad_box.set_visibility(False)
            no_bad.set_visibility(False)
            table.rows = []
            pager.max = 1
            return
        check_title.set_text(f"{check.label} · {check.layout}")
        check_title.classes(replace="text-base font-semibold")
        bad = check.bad
        files = ", ".join(f"{f.name}: {len(f.rows) if f.kind == 'jsonl' else int(f.document is not None)}"
                          for f in check.files[:6]) + (" …" if len(check.files) > 6 else "")
        check_info.set_text(f"{check.good:,} usable samples ({files}) · {len(bad):,} bad line(s)")
        with bad_box:
            for b in bad[:BAD_SHOWN]:
                ui.label(short(b, ws.root)).classes("font-mono text-xs text-negative").mark("bad-line")
            if len(bad) > BAD_SHOWN:
                ui.label(f"… and {len(bad) - BAD_SHOWN:,} more (forgellm dataset check lists all)") \
                    .classes("text-xs")
        bad_box.set_visibility(bool(bad))
        no_bad.set_visibility(not bad)
        drop_row.set_visibility(bool(bad) and check.good > 0)
        drop_btn.set_text(f"Drop {len(bad):,} bad line(s)")
        show_page(1)

    def show_page(page: int) -> None:
        check = st["check"]
        if check is None:
            return
        rows, total = dc.preview(check, page, PAGE_SIZE)
        st["page"] = page
        table.rows = rows
        pager.max = max(1, math.ceil(total / PAGE_SIZE))
        if pager.value != page:
            pager.value = page

    async def open_dataset(key: str | None) -> None:
        if not key:
            show_check(None)
            return
        st["key"] = key
        try:
            path = dataset_path(ws, key)
            check = await run.io_bound(dc.check_dataset, path)
        except (DataError, LibraryError, ValueError, OSError) as e:
            show_check(None, f"{key}: {short(str(e), ws.root)}")
            return
        if st["key"] == key:
            show_check(check)

    def refresh_options(select: str | None = None) -> None:
        picker.set_options(dataset_options(), value=select if select is not None else picker.value)

    async def upload(e: events.UploadEventArguments) -> None:
        try:
            if e.file.size() > MAX_UPLOAD_BYTES:  # the browser's limit can be bypassed: check here too
                raise LibraryError(f"{e.file.name}: over the upload limit of {human_bytes(MAX_UPLOAD_BYTES)}")
            data = await e.file.read()
            path = await run.io_bound(store_upload, ws, e.file.name, data, MAX_UPLOAD_BYTES)
        except LibraryError as err:
            ui.notify(str(err), type="negative", multi_line=True)
            return
        finally:
            uploader.reset()
        ui.notify(f"Uploaded {path.name}")
        refresh_options(path.name)

    async def import_local() -> None:
        if not (local.value or "").strip():
            ui.notify("Enter a file or folder path", type="warning")
            return
        try:
            path = await run.io_bound(import_dataset, ws, local.value.strip(),
                                      (local_name.value or "").strip() or None, bool(link.value))
        except LibraryError as err:
            ui.notify(str(err), type="negative", multi_line=True)
            return
        ui.notify(f"Imported {path.name}")
        local.set_value("")
        refresh_options(path.name)

    async def drop() -> None:
        check = st["check"]
        if check is None:
            return
        try:
            path = await run.io_bound(dc.write_clean_copy, check)
        except (DataError, OSError) as err:
            ui.notify(str(err), type="negative", multi_line=True)
            return
        ui.notify(f"Wrote {path.name} without {len(check.bad)} bad line(s); {check.path.name} is kept",
                  type="positive", multi_line=True)
        refresh_options(path.name)

    async def split() -> None:
        check = st["check"]
        if check is None:
            return
        try:
            path = await run.io_bound(dc.make_split, check, float(fraction.value or 0.1), int(seed.value or 0))
        except (DataError, OSError) as err:
            ui.notify(str(err), type="negative", multi_line=True)
            return
        ui.notify(f"Wrote {path.name}/train.jsonl and valid.jsonl", type="positive")
        refresh_options(path.name)

    async def tokenizer() -> Any | None:
        if not model.value:
            ui.notify("Choose a model first: its tokenizer and chat template are used", type="warning")
            return None
        try:
            return await run.io_bound(dc.load_tokenizer, str(model.value))
        except DataError as err:
            ui.notify(str(err), type="negative", multi_line=True)
            return None

    def seq_len() -> int:
        return max(int(max_len.value or 512), 2)

    async def stats() -> None:
        check = st["check"]
        tok = await tokenizer() if check is not None else None
        if tok is None:
            return
        stats_btn.props("loading")
        try:
            result = await run.io_bound(dc.token_stats, check, tok, seq_len(), {"mask_all_turns": all_turns.value})
        finally:
            stats_btn.props(remove="loading")
        if check is not st["check"]:
            return
        stats_grid.clear()
        with stats_grid:
            for label, value in stats_text(result, check.fmt):
                ui.label(label).classes("text-grey-7")
                ui.label(value)
        chart.options.clear()
        chart.options.update(histogram_options(result))
        chart.set_visibility(True)

    async def show_mask(e: events.GenericEventArguments) -> None:
        check = st["check"]
        row = e.args[1] if isinstance(e.args, list) and len(e.args) > 1 else None
        if check is None or not isinstance(row, dict):
            return
        tok = await tokenizer()
        if tok is None:
            return
        where, _, _, sample = check.samples()[int(row["index"])]
        try:
            view = await run.io_bound(dc.what_the_model_sees, tok, sample, check.fmt, seq_len(), where,
                                      {"mask_all_turns": all_turns.value})
        except DataError as err:
            mask_info.set_text(short(str(err), ws.root))
            mask.set_content("")
            return
        cut = view["total"] - seq_len() if view["truncated_at"] is not None else 0
        mask_info.set_text(f"{short(where, ws.root)}: {view['total']:,} tokens, {view['trained']:,} trained"
                           + (f", {cut:,} cut at max_seq_length {seq_len():,}" if cut else "")
                           + (f" (first {view['shown']:,} shown)" if view["shown"] < view["total"] else ""))
        mask.set_content(tokens_html(view))

    table.on("rowClick", show_mask)
    show_check(None)
    chosen = parse_qs(urlsplit(ui.context.client.sub_pages_router.current_path).query).get("name")
    if chosen and chosen[0] in picker.options:
        picker.set_value(chosen[0])
