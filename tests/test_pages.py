"""Browser app through NiceGUI's simulated user: shell, Train page (validation, presets, YAML) and Monitor page.

Real services on a temporary workspace; the end-to-end test trains the tiny model in a real worker.
"""

from __future__ import annotations

import asyncio
import math
import os
from functools import partial
from pathlib import Path

import pytest
import yaml
from nicegui import ui
from nicegui.elements.upload_files import SmallFileUpload
from nicegui.testing import User, user_simulation
from uihelpers import el, set_value
from uihelpers import wait_for as _wait_for

from app.composition import build_services
from app.lan import persisted_secret
from pages.shell import make_root, status_texts
from pages.train.form import (
    check_form,
    config_to_form,
    default_form,
    form_to_config,
    lr_curve,
    lr_preview,
    visible_fields,
)
from services.config import list_presets, parse_yaml, schedule
from services.training.folder import RunFolder

wait_for = partial(_wait_for, timeout=10.0)



REPO = Path(__file__).resolve().parent.parent


def make_run(manager, run_id: str) -> RunFolder:
    folder = RunFolder(manager.workspace.runs / run_id)
    folder.path.mkdir(parents=True)
    folder.update(id=run_id, name=run_id, status="completed", iters=100, iteration=0, checkpoints=[], best=None)
    return folder


def train(it: int, loss: float) -> dict:
    return {"type": "train", "step": it, "iteration": it, "train_loss": loss, "learning_rate": 1e-4}


@pytest.fixture
def services(workspace):
    s = build_services(workspace)
    yield s
    for info in s.manager.active():
        s.manager.stop(info["id"])
        s.manager.wait(info["id"], timeout=60)


@pytest.fixture
async def ui_user(services) -> User:
    async with user_simulation(make_root(services)) as user:
        yield user


# ------------------------------------------------------------------------------------------ shell


async def test_shell_has_nav_and_status_strip(ui_user: User):
    await ui_user.open("/")
    await ui_user.should_see("ForgeLLM")
    await ui_user.should_see(marker="nav-train")
    await ui_user.should_see(marker="nav-monitor")
    await ui_user.should_see("no run active")
    await ui_user.should_see("BLAS")
    ui_user.find(marker="nav-monitor").click()
    await ui_user.should_see("No runs yet.")
    ui_user.find(marker="nav-train").click()
    await ui_user.should_see(marker="start")


def test_status_texts():
    run = {"id": "r", "name": "demo", "status": "running", "iteration": 50, "iters": 200}
    text, link, machine = status_texts({"active": run, "system": {"cpu_percent": 12.0, "ram_used_gb": 3.0,
                                                                   "ram_total_gb": 16.0, "blas": "mkl"}})
    assert text == "▶ demo · running · 50/200 (25%)" and link == "/monitor/r"
    assert "CPU 12%" in machine and "BLAS mkl" in machine
    text, link, _ = status_texts({"active": None, "waiting": 2, "system": {}})
    assert text == "no run active · 2 waiting" and link == "/runs"


def test_persisted_secret(tmp_path):
    p = tmp_path / ".forgellm" / "token"
    a = persisted_secret(p, 16)
    assert persisted_secret(p, 16) == a and len(a) >= 16
    assert (p.stat().st_mode & 0o777) == 0o600


# ------------------------------------------------------------------------------------------ Train page


async def test_validation_inline_and_nothing_starts(ui_user: User, services):
    await ui_user.open("/train")
    await ui_user.should_see("model = None: choose a model")
    assert el(ui_user, "field-model").error == "choose a model"
    ui_user.find(marker="field-batch_size").clear().type("0")
    await ui_user.should_see("batch_size = 0: must be an integer ≥ 1")
    assert "integer" in el(ui_user, "field-batch_size").error
    ui_user.find(marker="field-learning_rate").clear().type("5")
    await ui_user.should_see("learning_rate = 5")
    assert "between 0 and 1" in el(ui_user, "field-learning_rate").error
    ui_user.find(marker="field-rank").clear()
    await ui_user.should_see("rank = None: required")
    set_value(ui_user, "field-model", "no-such-model")
    await ui_user.should_see("not found")
    ui_user.find(marker="start").click()
    await asyncio.sleep(0.2)
    assert services.manager.list() == []
    assert not list(services.workspace.runs.iterdir())
    await ui_user.should_not_see("Config is valid.")


async def test_a_fresh_form_starts_on_a_model_and_a_dataset_that_fits_the_mode(ui_user: User, services, tiny_model,
                                                                                chat_data, cpt_corpus):
    ws = services.workspace
    os.symlink(tiny_model, ws.models / "tiny")
    os.symlink(chat_data, ws.datasets / "a-chats")  # sorts first, but is no CPT corpus
    os.symlink(cpt_corpus, ws.datasets / "b-corpus")
    await ui_user.open("/train")
    assert el(ui_user, "field-model").value == "tiny" and el(ui_user, "field-mode").value == "cpt"
    assert el(ui_user, "field-data").value == "b-corpus"
    assert el(ui_user, "field-model").error is None and el(ui_user, "field-data").error is None
    set_value(ui_user, "field-mode", "ift")
    assert el(ui_user, "field-data").value == "a-chats"  # the page's own pick follows the mode
    set_value(ui_user, "field-data", "b-corpus")
    set_value(ui_user, "field-mode", "cpt")
    set_value(ui_user, "field-mode", "ift")
    assert el(ui_user, "field-data").value == "b-corpus"  # the user's pick stays


async def test_presets_fill_fields(ui_user: User, services):
    presets = list_presets(services.configs_dir)
    assert "cpt-lora" in presets
    raw = parse_yaml(presets["cpt-lora"].read_text())
    await ui_user.open("/train")
    set_value(ui_user, "preset", "cpt-lora")
    assert el(ui_user, "field-iters").value == raw["iters"]
    assert el(ui_user, "field-learning_rate").value == raw["learning_rate"]
    assert el(ui_user, "field-mode").value == "cpt"
    assert el(ui_user, "field-schedule").value == "cosine"
    assert el(ui_user, "field-warmup").value == raw["lr_schedule"]["warmup"]
    assert el(ui_user, "field-final_lr").value == raw["lr_schedule"]["arguments"][2]
    assert el(ui_user, "field-rank").value == raw["lora_parameters"]["rank"]
    assert el(ui_user, "field-early_stopping").value is True
    assert el(ui_user, "field-patience").value == raw["early_stopping"]["patience"]
    assert el(ui_user, "field-keep_checkpoints").value == raw["keep_checkpoints"]
    assert el(ui_user, "field-model").value == raw["model"]
    # the schedule preview: warm-up from 0, peak, decay to the final rate
    data = el(ui_user, "lr-chart").options["series"][0]["data"]
    assert len(data) == raw["iters"] and data[0][1] == 0.0
    assert max(y for _, y in data) == pytest.approx(raw["learning_rate"])
    assert data[-1][1] == pytest.approx(raw["lr_schedule"]["arguments"][2], rel=0.01)
    # ift-dora trains by epochs with a constant rate and DoRA
    set_value(ui_user, "preset", "ift-dora")
    assert el(ui_user, "field-length_mode").value == "epochs"
    assert el(ui_user, "field-fine_tune_type").value == "dora"
    assert el(ui_user, "field-schedule").value == "constant"
    await ui_user.should_see(marker="field-mask_all_turns")
    await ui_user.should_not_see(marker="field-packing")


async def test_yaml_round_trip(ui_user: User):
    await ui_user.open("/train")
    set_value(ui_user, "preset", "ift-lora")
    ui_user.find(marker="field-batch_size").clear().type("6")
    ui_user.find(marker="download").click()
    first = (await ui_user.download.next()).content
    cfg = yaml.safe_load(first)
    assert cfg["batch_size"] == 6 and cfg["epochs"] == 10 and cfg["lr_schedule"]["name"] == "cosine_decay"
    # change fields, then upload the downloaded file: every field comes back
    set_value(ui_user, "preset", "cpt-full")
    assert el(ui_user, "field-fine_tune_type").value == "full"
    upload = el(ui_user, "upload")
    await upload.handle_uploads([SmallFileUpload("ift-lora.yaml", "application/x-yaml", first)])
    await wait_for(lambda: el(ui_user, "field-fine_tune_type").value == "lora")
    ui_user.find(marker="download").click()
    second = (await ui_user.download.next()).content
    assert second == first


async def test_upload_keeps_unknown_keys_and_reports_bad_yaml(ui_user: User):
    await ui_user.open("/train")
    text = (b"model: some/model\ndata: some/data\nfine_tune_type: lora\nlearning_rate: 1e-5\niters: 50\n"
            b"lora_parameters: {rank: 4, scale: 10.0, dropout: 0.0, keys: [self_attn.q_proj]}\n"
            b"lr_schedule: {name: exponential_decay, arguments: [1e-5, 0.99]}\ntest: true\n")
    upload = el(ui_user, "upload")
    await upload.handle_uploads([SmallFileUpload("mlx.yaml", "application/x-yaml", text)])
    await wait_for(lambda: el(ui_user, "field-iters").value == 50)
    assert el(ui_user, "field-mode").value == "mlx-lm"
    assert el(ui_user, "field-schedule").value == "custom"
    ui_user.find(marker="download").click()
    cfg = yaml.safe_load((await ui_user.download.next()).content)
    assert cfg["lora_parameters"]["keys"] == ["self_attn.q_proj"] and cfg["test"] is True
    assert cfg["lr_schedule"] == {"name": "exponential_decay", "arguments": [1e-5, 0.99]}
    assert "mode" not in cfg and cfg["learning_rate"] == 1e-5
    await upload.handle_uploads([SmallFileUpload("bad.yaml", "application/x-yaml", b"a: [1, 2\n")])
    await asyncio.sleep(0.2)
    assert el(ui_user, "field-iters").value == 50  # nothing changed


async def test_an_upload_the_cli_would_refuse_shows_its_problems_and_starts_nothing(ui_user: User, services,
                                                                                    tiny_model, chat_data):
    """Issue 15 W2: the upload shows exactly what ``forgellm train`` says, and Start never launches it."""
    await ui_user.open("/train")
    upload = el(ui_user, "upload")
    head = f"model: {tiny_model}\ndata: {chat_data}\nmode: ift\n".encode()
    for text, shown in ((b"iters: 1000000000000000000000000000000\n",
                         "iters = 1000000000000000000000000000000: must be an integer ≥ 1 and ≤ 1,000,000,000"),
                        (b"iters: 1.0e30\n", "iters = 1e+30: must be an integer ≥ 1 and ≤ 1,000,000,000"),
                        (b"lr_schedule: cosine\n", "lr_schedule = 'cosine': must be a mapping"),
                        (b"a: &a [x, x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
                         b"project_name: [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]\n", "project_name = [")):
        await upload.handle_uploads([SmallFileUpload("bad.yaml", "application/x-yaml", head + text)])
        await wait_for(lambda: shown in el(ui_user, "upload-problems").text)  # noqa: B023
        assert "bad.yaml was not loaded" in el(ui_user, "upload-problems").text
        assert el(ui_user, "field-model").value != str(tiny_model)  # the form kept what it had
        ui_user.find(marker="start").click()
        await asyncio.sleep(0.1)
        assert services.manager.list() == []
    await upload.handle_uploads([SmallFileUpload("ok.yaml", "application/x-yaml",
                                                 b"model: not/here\n" + head.split(b"\n", 1)[1] + b"iters: 7\n")])
    await wait_for(lambda: el(ui_user, "field-iters").value == 7)
    assert el(ui_user, "upload-problems").text == ""
    await ui_user.should_see("model = 'not/here': not found")  # the form shows it, as the CLI would
    ui_user.find(marker="start").click()
    await asyncio.sleep(0.1)
    assert services.manager.list() == []


def test_form_round_trip_for_every_preset():
    presets = list_presets(REPO / "configs")
    assert {"cpt-lora", "ift-lora", "ift-dora", "cpt-full"} <= set(presets)
    for name, path in presets.items():
        cfg = form_to_config(config_to_form(parse_yaml(path.read_text())))
        again = form_to_config(config_to_form(parse_yaml(yaml.safe_dump(cfg))))
        assert again == cfg, name
        raw = parse_yaml(path.read_text())
        for key in ("lr_schedule", "learning_rate", "lora_parameters", "early_stopping", "iters", "epochs"):
            assert cfg.get(key) == raw.get(key), (name, key)


def test_preference_fields_round_trip():
    raw = parse_yaml((REPO / "configs" / "dpo-lora.yaml").read_text())
    form = config_to_form(raw)
    assert (form["mode"], form["beta"], form["loss_type"], form["best_by"], form["compat"]) == \
        ("dpo", 0.1, "sigmoid", "accuracy", False)
    assert form_to_config(form)["preference"] == raw["preference"]
    # ORPO has no loss type nor label smoothing: the form leaves them out, and they are hidden
    orpo = {**form, "mode": "orpo", "beta": 0.25}
    assert form_to_config(orpo)["preference"] == {"beta": 0.25, "best": "accuracy", "compat": False}
    shown = visible_fields(orpo)
    assert shown["beta"] and shown["best_by"] and not shown["loss_type"] and not shown["label_smoothing"]
    assert not visible_fields({**form, "loss_type": "ipo"})["label_smoothing"]
    assert not any(visible_fields({**form, "mode": "ift"})[k] for k in ("beta", "loss_type", "best_by", "compat"))
    assert "preference" not in form_to_config({**form, "mode": "ift"})
    # a key the form has no widget for is kept (and validation names it)
    odd = config_to_form({**raw, "preference": {**raw["preference"], "gamma": 2}})
    assert form_to_config(odd)["preference"]["gamma"] == 2


async def test_dpo_preset_shows_the_preference_card(ui_user: User, services):
    await ui_user.open("/train")
    await ui_user.should_not_see(marker="field-beta")
    set_value(ui_user, "preset", "dpo-lora")
    assert el(ui_user, "field-mode").value == "dpo" and el(ui_user, "field-best_by").value == "accuracy"
    await ui_user.should_see(marker="field-beta")
    await ui_user.should_see(marker="field-label_smoothing")
    set_value(ui_user, "field-loss_type", "hinge")
    await ui_user.should_not_see(marker="field-label_smoothing")
    ui_user.find(marker="field-beta").clear().type("-1")
    await ui_user.should_see("must be a positive number")


@pytest.mark.parametrize(("kind", "warmup", "accum"), [("cosine", 10, 1), ("linear", 5, 2), ("constant", 7, 1),
                                                       ("cosine", 0, 1)])
def test_lr_preview_matches_mlx(kind, warmup, accum):
    import mlx.core as mx
    from mlx_lm.tuner.utils import build_schedule

    sched = schedule(kind, 2e-4, 60, warmup, 1e-5)
    curve = lr_curve(sched, 2e-4, 60, accum)
    assert [it for it, _ in curve] == list(range(1, 61))  # one point per iteration: the preview did not fail
    fn = build_schedule(sched) if sched else (lambda step: mx.array(2e-4))
    for it, lr in curve:
        step = math.ceil(it / accum) - 1
        assert lr == pytest.approx(float(fn(mx.array(step))), rel=1e-5, abs=1e-10), (it, step)


def test_the_form_reports_one_problem_per_field_blanks_first(services):
    form = {**default_form(), "model": "no-such-model", "data": None, "batch_size": 0, "rank": None}
    cfg, errors = check_form(form, services.manager.prepare_config)
    assert cfg["batch_size"] == 0 and cfg["model"] == "no-such-model"
    fields = [e.field for e in errors]
    assert fields[:2] == ["data", "rank"] and "batch_size" in fields and "model" in fields
    assert len(fields) == len(set(fields))  # "data" is blank and also no dataset: reported once
    assert next(e for e in errors if e.field == "rank").reason == "required"
    assert "not found" in next(e for e in errors if e.field == "model").reason


def test_fields_shown_follow_the_choices():
    shown = visible_fields({**default_form(), "fine_tune_type": "full", "mode": "ift", "schedule": "cosine"})
    assert not shown["rank"] and shown["train_embeddings"] and shown["mask_all_turns"] and not shown["packing"]
    assert shown["pack_samples"] and not visible_fields({**default_form(), "mode": "cpt"})["pack_samples"]
    assert shown["final_lr"] and shown["iters"] and not shown["epochs"] and not shown["patience"]
    shown = visible_fields({**default_form(), "length_mode": "epochs", "early_stopping": True})
    assert shown["rank"] and shown["epochs"] and not shown["iters"] and not shown["final_lr"] and shown["patience"]


def test_lr_preview_follows_the_form():
    form = config_to_form(parse_yaml((REPO / "configs" / "cpt-lora.yaml").read_text()))
    curve, note = lr_preview(form, form_to_config(form))
    assert len(curve) == form["iters"] and note == ""
    long = lr_curve({"name": "cosine_decay", "arguments": [1e-4, 5000]}, 1e-4, 5000)
    assert 300 < len(long) <= 401 and long[0][0] == 1 and long[-1][0] == 5000  # thinned, the ends kept
    by_epochs = {**form, "length_mode": "epochs", "schedule_steps": None, "schedule": "constant"}
    curve, note = lr_preview(by_epochs, form_to_config(by_epochs))
    assert len(curve) == 100 and "first 100 shown" in note
    blank = {**form, "learning_rate": None}
    assert lr_preview(blank, form_to_config(blank)) == ([], "Set a learning rate and a length to see the schedule.")
    assert lr_curve({"name": "no-such-schedule", "arguments": [1e-4]}, 1e-4, 10) == []  # a custom schedule it
    # cannot draw shows no curve rather than a wrong one


# ------------------------------------------------------------------------------------------ Monitor + real run


@pytest.fixture
def tiny_in_workspace(services, tiny_model, chat_data) -> None:
    """The tiny model as ``models/tiny`` and the chat set as ``datasets/chat`` (links)."""
    os.symlink(tiny_model, services.workspace.models / "tiny")
    os.symlink(chat_data, services.workspace.datasets / "chat")


async def fill_tiny_run(user: User, **changes) -> None:
    """A valid IFT-LoRA config for the tiny model, through the form."""
    values = {"field-model": "tiny", "field-data": "chat", "field-mode": "ift", "field-fine_tune_type": "lora",
              "field-name": "ui-tiny", "field-length_mode": "iters", "field-iters": 20, "field-batch_size": 4,
              "field-learning_rate": 1e-3, "field-schedule": "cosine", "field-warmup": 2, "field-final_lr": 1e-4,
              "field-num_layers": 2, "field-rank": 4, "field-max_seq_length": 128, "field-steps_per_report": 5,
              "field-steps_per_eval": 10, "field-save_every": 10, "field-val_batches": 2,
              "field-early_stopping": False, **changes}
    for marker, value in values.items():
        set_value(user, marker, value)
    await user.should_see("Config is valid.")


@pytest.mark.slow
async def test_train_to_monitor_real_run(ui_user: User, services, tiny_in_workspace):
    await ui_user.open("/train")
    await fill_tiny_run(ui_user)
    ui_user.find(marker="start").click()
    runs = await wait_for(lambda: services.manager.list(), timeout=5)
    run_id = runs[0]["id"]
    await wait_for(lambda: ui_user.back_history[-1] == f"/monitor/{run_id}" or
                   any(e.value == run_id for e in _maybe(ui_user, "run-select")), timeout=5)
    await wait_for(lambda: _text(ui_user, "status") == "completed", timeout=240, step=0.5)
    await ui_user.should_see("20 iterations")  # the reason
    loss = el(ui_user, "chart-loss").options["series"]
    assert [x for x, _ in loss[0]["data"]] == [5, 10, 15, 20]
    assert [x for x, _ in loss[1]["data"]] == [0, 10, 20]
    marks = loss[0]["markPoint"]["data"]
    assert [m["value"] for m in marks] == [10, 20] and sum("best" in m["name"] for m in marks) == 1
    assert _text(ui_user, "card-train_loss") != "–"
    assert "iteration 20 / 20" in _text(ui_user, "progress-text")
    assert el(ui_user, "progress").value == 1.0
    assert el(ui_user, "log").default_slot.children  # log tail shown
    assert not el(ui_user, "stop").enabled and not el(ui_user, "resume").enabled
    # a reload (or another browser) shows the whole history, read back from the run folder
    await ui_user.open(f"/monitor/{run_id}")
    await wait_for(lambda: _text(ui_user, "status") == "completed")
    assert el(ui_user, "chart-loss").options["series"][0]["data"] == loss[0]["data"]
    await ui_user.open("/monitor")
    await wait_for(lambda: _text(ui_user, "status") == "completed")


@pytest.mark.slow
async def test_a_packed_run_from_the_form_shows_its_padding_on_the_monitor(ui_user: User, services,
                                                                           tiny_in_workspace):
    await ui_user.open("/train")
    await fill_tiny_run(ui_user, **{"field-pack_samples": True, "field-batch_size": 2, "field-iters": 10,
                                    "field-steps_per_eval": 10, "field-save_every": 10})
    ui_user.find(marker="start").click()
    runs = await wait_for(lambda: services.manager.list(), timeout=5)
    folder = services.manager.folder(runs[0]["id"])
    assert folder.config()["pack_samples"] is True
    await wait_for(lambda: _text(ui_user, "status") == "completed", timeout=240, step=0.5)
    last = [r for r in folder.metrics()[0] if r.get("type") == "train"][-1]
    assert 0 <= last["padding_share"] < 0.2  # short chats fill rows of 128 tokens
    assert _text(ui_user, "card-padding_share") == f"{last['padding_share']:.1%}"
    assert _text(ui_user, "card-tokens_per_second") == f"{last['tokens_per_second']:,.0f}"


def _maybe(user: User, marker: str):
    try:
        with user:
            return list(user.find(marker=marker).elements)
    except AssertionError:
        return []


def _text(user: User, marker: str) -> str | None:
    try:
        return el(user, marker).text
    except (AssertionError, AttributeError):
        return None


async def test_monitor_unknown_run(ui_user: User, services):
    make_run(services.manager, "known")
    await ui_user.open("/monitor/nope")
    await ui_user.should_see("no such run")
    await ui_user.open("/monitor")
    await wait_for(lambda: _text(ui_user, "status") == "completed")


async def test_stop_and_resume_buttons(ui_user: User, services):
    folder = make_run(services.manager, "stopped-run")
    folder.update(status="stopped", reason="stopped at iteration 10 of 100", iteration=10,
                  checkpoints=[{"iteration": 10, "val_loss": None}])
    (folder.checkpoints / "0000010").mkdir(parents=True)
    for it in (5, 10):
        folder.append_metric(train(it, 2.0))
    await ui_user.open(f"/monitor/{folder.id}")
    await wait_for(lambda: _text(ui_user, "status") == "stopped")
    assert el(ui_user, "resume").enabled and not el(ui_user, "stop").enabled
    assert el(ui_user, "chart-loss").options["series"][0]["markPoint"]["data"][0]["coord"] == [10, 2.0]
    with ui_user:
        assert isinstance(el(ui_user, "log"), ui.log)


@pytest.mark.slow
async def test_queue_from_the_train_page_and_take_a_run_off_it(ui_user: User, services, tiny_in_workspace):
    await ui_user.open("/train")
    await fill_tiny_run(ui_user, **{"field-name": "long", "field-iters": 2000, "field-save_every": 1000,
                                    "field-steps_per_eval": 1000})
    ui_user.find(marker="queue").click()  # nothing is running: it starts at once
    first = (await wait_for(lambda: services.manager.list(), timeout=5))[0]["id"]
    await wait_for(lambda: ui_user.back_history[-1] == f"/monitor/{first}", timeout=5)
    await ui_user.open("/train")
    await fill_tiny_run(ui_user, **{"field-name": "later"})
    ui_user.find(marker="start").click()  # a run is training: Start asks first
    await ui_user.should_see("long is training")
    assert len(services.manager.list()) == 1
    ui_user.find(marker="busy-queue").click()
    await ui_user.should_see("queued: it starts after the active run")
    second = services.manager.waiting()[0]["id"]
    await ui_user.open(f"/monitor/{second}")
    await wait_for(lambda: _text(ui_user, "status") == "waiting")
    await ui_user.should_see("in the training queue")
    assert el(ui_user, "resume").text == "Start now" and el(ui_user, "resume").enabled and el(ui_user, "stop").enabled
    services.status.forget()  # skip the status cache
    assert "1 waiting" in status_texts(services.status.snapshot())[0]
    ui_user.find(marker="stop").click()
    await wait_for(lambda: _text(ui_user, "status") == "stopped")
    assert "off the queue" in services.manager.get(second)["reason"] and not el(ui_user, "stop").enabled
    await ui_user.open("/train")
    await fill_tiny_run(ui_user, **{"field-name": "beside", "field-iters": 2000, "field-save_every": 1000,
                                    "field-steps_per_eval": 1000})
    ui_user.find(marker="start").click()
    await ui_user.should_see("long is training")
    ui_user.find(marker="busy-start").click()  # the person insists: side by side
    await wait_for(lambda: ui_user.back_history[-1].startswith("/monitor/") and first not in ui_user.back_history[-1],
                   timeout=5)
    third = ui_user.back_history[-1].rsplit("/", 1)[1]
    assert services.manager.get(third)["status"] in ("queued", "running")
    for run_id in (third, first):
        services.manager.stop(run_id)
        assert services.manager.wait(run_id, timeout=120)["status"] == "stopped"
    assert services.manager.get(second)["status"] == "stopped"  # it left the queue: it did not start


async def test_a_failed_run_leads_with_its_reason_and_last_good_checkpoint(ui_user: User, services):
    folder = make_run(services.manager, "failed-run")
    folder.update(status="failed", reason="validation loss became nan at iteration 12; lower the learning rate",
                  iteration=12, checkpoints=[{"iteration": 10, "val_loss": 2.0}])
    await ui_user.open(f"/monitor/{folder.id}")
    await wait_for(lambda: _text(ui_user, "status") == "failed")
    note = el(ui_user, "ending-note")
    assert note.text.startswith("This run failed: validation loss became nan at iteration 12")
    assert el(ui_user, "ending-card").visible and _text(ui_user, "reason") == ""  # said once, up front
