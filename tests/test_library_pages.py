"""Models and Datasets pages and the Train page's preflight, through NiceGUI's simulated user."""

from __future__ import annotations

import json
import random
import shutil
import time
from functools import partial
from pathlib import Path

import pytest
from conftest import chat_row
from nicegui import ui
from nicegui.elements.upload_files import SmallFileUpload
from nicegui.testing import User, user_simulation
from uihelpers import el, els, from_this_machine
from uihelpers import wait_for as _wait_for

from app.composition import build_services
from pages.datasets import tokens_html
from pages.shell import make_root

wait_for = partial(_wait_for, timeout=20.0)


@pytest.fixture
def services(workspace, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))
    s = build_services(workspace)
    yield s
    s.model_imports.close()


@pytest.fixture
async def ui_user(services) -> User:
    async with user_simulation(make_root(services)) as user:
        yield user


def bad_upload() -> bytes:
    rng = random.Random(5)
    lines = [json.dumps(chat_row(rng, turns=3)) for _ in range(12)]
    lines[2], lines[6], lines[9] = "not json", "[1]", json.dumps({"messages": [{"role": "user", "content": "q"}]})
    return ("\n".join(lines) + "\n").encode()


async def test_nav_has_models_and_datasets(ui_user: User):
    await ui_user.open("/")
    ui_user.find(marker="nav-models").click()
    await ui_user.should_see("Local models")
    await ui_user.should_see(marker="system-panel")
    ui_user.find(marker="nav-datasets").click()
    await ui_user.should_see("Choose or import a dataset.")


async def test_models_page_lists_imports_and_deletes(ui_user: User, services, tiny_model):
    shutil.copytree(tiny_model, services.workspace.models / "tiny")
    await from_this_machine(ui_user).open("/models")  # a folder of this machine: for its own browser only
    table = el(ui_user, "models-table")
    rows = await wait_for(lambda: table.rows)
    assert [(r["name"], r["source_text"], r["params_text"], r["dtype"], r["chat_text"]) for r in rows] == \
        [("tiny", "workspace", rows[0]["params_text"], "float32", "yes")]
    for text in ("BLAS", "Device", "Disk", "RAM"):
        await ui_user.should_see(text)
    # import a folder through the page: a child process does it, the table picks it up
    el(ui_user, "import-kind").value = "folder"
    el(ui_user, "import-source").value = str(tiny_model)
    el(ui_user, "import-name").value = "copy"
    ui_user.find(marker="import-start").click()
    await wait_for(lambda: any(r["name"] == "copy" for r in table.rows), timeout=60)
    assert (services.workspace.models / "copy" / "config.json").is_file()
    # delete asks first; cancel keeps it, confirm removes it
    ui_user.find(marker="models-table").trigger("delete_model", "copy")
    await ui_user.should_see("Delete models/copy?")
    ui_user.find(marker="model-delete-cancel").click()
    assert (services.workspace.models / "copy").exists()
    ui_user.find(marker="models-table").trigger("delete_model", "copy")
    ui_user.find(marker="model-delete-confirm").click()
    await wait_for(lambda: [r["name"] for r in table.rows] == ["tiny"])
    assert not (services.workspace.models / "copy").exists()


async def test_models_page_refuses_to_delete_a_model_in_use(ui_user: User, services, tiny_model, monkeypatch):
    shutil.copytree(tiny_model, services.workspace.models / "tiny")
    run = {"id": "run-1", "model": str(services.workspace.models / "tiny")}
    monkeypatch.setattr(services.manager, "active", lambda: [run])
    await ui_user.open("/models")
    table = el(ui_user, "models-table")
    await wait_for(lambda: table.rows)
    ui_user.find(marker="models-table").trigger("delete_model", "tiny")
    await ui_user.should_see("tiny is used by the running run run-1; stop it first")
    await ui_user.should_not_see("Delete models/tiny?")
    assert (services.workspace.models / "tiny" / "config.json").is_file()


async def test_hub_import_offline_says_why_quickly(ui_user: User, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    await ui_user.open("/models")
    el(ui_user, "import-source").value = "HuggingFaceTB/SmolLM2-135M-Instruct"
    t0 = time.perf_counter()
    ui_user.find(marker="import-start").click()
    found = await wait_for(lambda: [m for m in els(ui_user, "import-message") if "cannot download" in m.text],
                           timeout=5)
    assert time.perf_counter() - t0 < 5 and "HF_HUB_OFFLINE" in found[0].text


async def test_datasets_upload_bad_lines_drop_preview_mask_stats_split(ui_user: User, services, tiny_model):
    shutil.copytree(tiny_model, services.workspace.models / "tiny")
    await ui_user.open("/datasets")
    upload = el(ui_user, "dataset-upload")
    await upload.handle_uploads([SmallFileUpload("my data.jsonl", "application/jsonl", bad_upload())])
    bad = await wait_for(lambda: els(ui_user, "bad-line"))
    assert sorted((b.text.split(": ", 1)[0] for b in bad), key=lambda w: int(w.rsplit(":", 1)[1])) == \
        ["my_data.jsonl:3", "my_data.jsonl:7", "my_data.jsonl:10"]  # the finder returns a set
    assert "9 usable samples" in el(ui_user, "check-info").text
    assert el(ui_user, "dataset-select").value == "my_data.jsonl"
    # drop them: a cleaned copy is written and opened; the original stays
    ui_user.find(marker="drop-bad").click()
    await wait_for(lambda: el(ui_user, "dataset-select").value == "my_data-clean.jsonl")
    await wait_for(lambda: els(ui_user, "no-bad-lines"))
    assert (services.workspace.datasets / "my_data.jsonl").read_bytes() == bad_upload()
    table = el(ui_user, "preview-table")
    assert [r["line"] for r in table.rows] == list(range(1, 10))
    # what the model sees of the first row: its assistant turns, highlighted
    ui_user.find(marker="preview-table").trigger("rowClick", [{}, table.rows[0], 0])
    mask = el(ui_user, "mask-view")
    await wait_for(lambda: "tok-trained" in mask.content)
    assert "tok-masked" in mask.content and "trained" in el(ui_user, "mask-info").text
    # token statistics with the chosen model's tokenizer
    ui_user.find(marker="stats-run").click()
    await ui_user.should_see("Trained tokens")
    chart = el(ui_user, "stats-chart")
    assert sum(d["value"] for d in chart.options["series"][0]["data"]) == 9
    # a split
    ui_user.find(marker="split").click()
    await wait_for(lambda: el(ui_user, "dataset-select").value == "my_data-clean-split")
    assert (services.workspace.datasets / "my_data-clean-split" / "valid.jsonl").is_file()


async def test_datasets_page_shows_preference_pairs(ui_user: User, services, tiny_model):
    """A preference dataset: detected, bad rows named, pair statistics with the length bias, both sides of a pair
    side by side as the DPO run renders them."""
    from services.training.preference import render_pair

    shutil.copytree(tiny_model, services.workspace.models / "tiny")
    rows = [{"prompt": f"question {i}?", "chosen": f"a long and careful answer number {i}.", "rejected": "no."}
            for i in range(5)] + [{"prompt": "q", "chosen": "same", "rejected": "same"}, {"prompt": "q"}]
    data = ("\n".join(json.dumps(r) for r in rows) + "\n").encode()
    await ui_user.open("/datasets")
    await el(ui_user, "dataset-upload").handle_uploads([SmallFileUpload("pairs.jsonl", "application/jsonl", data)])
    bad = await wait_for(lambda: els(ui_user, "bad-line"))
    assert [b.text.split(": ", 1)[0] for b in bad] == ["pairs.jsonl:7"]  # no rejected side
    assert "preference pairs" in el(ui_user, "check-title").text + el(ui_user, "check-info").text
    ui_user.find(marker="stats-run").click()
    await ui_user.should_see("Length bias")
    await ui_user.should_see("chosen is longer in 100% of pairs (a length bias")
    await ui_user.should_see("pairs.jsonl:6: chosen and rejected are the same answer")
    table = el(ui_user, "preview-table")
    ui_user.find(marker="preview-table").trigger("rowClick", [{}, table.rows[0], 0])
    mask = el(ui_user, "mask-view")
    await wait_for(lambda: "pair-chosen" in mask.content)
    assert "pair-rejected" in mask.content and "tok-masked" in mask.content and "tok-trained" in mask.content
    from services.library.checks import load_tokenizer

    tok = load_tokenizer(str(tiny_model))
    pair = render_pair(tok, rows[0], "x")  # the training renderer: as many trained tokens as the run's answer
    assert f"chosen · {len(pair.chosen):,} tokens, {len(pair.chosen) - pair.prompt_length:,} trained" in mask.content


async def test_upload_refused_on_the_server(ui_user: User, services):
    await ui_user.open("/datasets")
    upload = el(ui_user, "dataset-upload")
    await upload.handle_uploads([SmallFileUpload("tool.exe", "application/octet-stream", b"MZ")])
    await ui_user.should_see("unsupported file type .exe")
    assert not any(services.workspace.datasets.iterdir())


def test_tokens_html_escapes_and_marks_the_cut():
    view = {"tokens": [{"i": 0, "id": 1, "text": "<b>", "state": "masked"},
                       {"i": 1, "id": 2, "text": "a\n", "state": "trained"},
                       {"i": 2, "id": 3, "text": "z", "state": "cut"}], "total": 5, "shown": 3, "truncated_at": 2}
    out = tokens_html(view)
    assert "&lt;b&gt;" in out and "<b>" not in out and "✂ max_seq_length 2" in out
    assert out.index("✂") < out.index("tok-cut") and "2 more tokens not shown" in out


async def test_train_page_preflight_estimate_and_probe(ui_user: User, services, tiny_model, chat_data):
    shutil.copytree(tiny_model, services.workspace.models / "tiny")
    await ui_user.open("/train")
    for marker, value in (("field-model", "tiny"), ("field-data", str(chat_data)), ("field-mode", "ift"),
                          ("field-num_layers", 2), ("field-max_seq_length", 128), ("field-iters", 20)):
        element = el(ui_user, marker)
        with ui_user:
            if isinstance(element, ui.select) and value not in element.options:
                element.set_options({**element.options, value: value})
            element.value = value
    ui_user.find(marker="preflight-estimate").click()
    text = el(ui_user, "preflight-text")
    await wait_for(lambda: "Peak memory" in text.text)
    assert "fits" in text.text and "12 steps/epoch" in text.text and "20 iterations" in text.text
    ui_user.find(marker="preflight-probe").click()
    probe = el(ui_user, "preflight-probe-text")
    await wait_for(lambda: "Probe:" in probe.text, timeout=120)
    assert "tok/s" in probe.text and "of the measured peak" in probe.text
    assert not any(p for p in (services.workspace.root / ".forgellm" / "probes").iterdir())
    assert Path(services.workspace.runs).is_dir() and not any(services.workspace.runs.iterdir())


def test_the_ui_process_never_imports_mlx():
    import subprocess
    import sys

    code = ("import sys, app.main, pages.shell, pages.models, pages.datasets, pages.train.page, "
            "services.training.preflight; print('mlx.core' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         cwd=Path(__file__).resolve().parent.parent)
    assert out.stdout.strip() == "False", out.stderr


async def test_datasets_page_lists_prepared_data_with_its_size_and_deletes_it(ui_user: User, services, tiny_model,
                                                                              cpt_corpus):
    from mlx_lm.utils import load_tokenizer

    from services.config import resolve
    from services.training.prepared import PreparedCache

    model = shutil.copytree(tiny_model, services.workspace.models / "tiny")
    shutil.copytree(cpt_corpus, services.workspace.datasets / "corpus")
    cache = PreparedCache.of(services.workspace)
    await ui_user.open("/datasets")
    await ui_user.should_see("Nothing cached yet")
    prepared = cache.prepare(resolve({"model": str(model), "data": str(services.workspace.datasets / "corpus"),
                                      "mode": "cpt", "max_seq_length": 32}), load_tokenizer(model))
    [entry] = cache.entries()
    ui_user.find(marker="cache-refresh").click()
    await wait_for(lambda: els(ui_user, f"cache-{entry['key']}"))
    size = el(ui_user, "cache-size").text
    assert size.endswith(("KB", "MB")) and "1 entry" in el(ui_user, "cache-total").text
    # the statistics of the dataset say what a run prepared from it (read off the entry)
    el(ui_user, "dataset-select").set_value("corpus")
    el(ui_user, "max-seq").set_value(32)
    await wait_for(lambda: el(ui_user, "stats-run").enabled)
    ui_user.find(marker="stats-run").click()
    await ui_user.should_see("Prepared (cpt)")
    await ui_user.should_see(f"{len(prepared.train):,} training sequences")
    ui_user.find(marker="cache-delete").click()
    await wait_for(lambda: not els(ui_user, f"cache-{entry['key']}"))
    assert cache.entries() == [] and not (cache.root / entry["key"]).exists()
    await ui_user.should_see("Nothing cached yet")
