"""Train page: defaults fitted to the data and machine, the estimate beside Start, the cut-samples warning, the
question before a run estimated beyond the Settings threshold, schedule lengths that follow the data, and the
draft that survives leaving the page and a reload (NiceGUI's simulated user, real services)."""

from __future__ import annotations

import asyncio
import os
from functools import partial

import pytest
from nicegui.elements.upload_files import SmallFileUpload
from nicegui.testing import User
from test_pages import services as services  # noqa: PLC0414 (fixtures: real services, the simulated user)
from test_pages import ui_user as ui_user  # noqa: PLC0414
from uihelpers import el, els, set_value
from uihelpers import wait_for as _wait_for

from services.config import list_presets, load_yaml
from services.settings import load_settings, set_confirm_minutes
from services.training import defaults, preflight

wait_for = partial(_wait_for, timeout=20.0)


@pytest.fixture(autouse=True)
def tiny_and_chats(services, tiny_model, chat_data) -> None:
    """The tiny model as ``models/tiny`` and the chat set as ``datasets/chat`` (links)."""
    os.symlink(tiny_model, services.workspace.models / "tiny")
    os.symlink(chat_data, services.workspace.datasets / "chat")


def text(user: User, marker: str) -> str:
    """The text of the one element with ``marker``; "" while it is hidden (the simulated user finds only
    visible elements)."""
    found = els(user, marker)
    assert len(found) <= 1, found
    return found[0].text if found else ""


def fitted_or_not(user: User) -> bool:
    """The fresh form's automatic fit has ended (fitted, or not possible: this workspace has no CPT corpus)."""
    return text(user, "proposal").startswith(("Fitted", "Fix the config"))


async def tiny_ift(user: User, **changes) -> None:
    for marker, value in {"field-model": "tiny", "field-data": "chat", "field-mode": "ift", "field-num_layers": 2,
                          "field-max_seq_length": 128, "field-early_stopping": False, **changes}.items():
        set_value(user, marker, value)
    await user.should_see("Config is valid.")


async def test_a_fresh_form_gets_the_fitted_defaults_and_an_estimate(ui_user: User, services, tiny_model,
                                                                      cpt_corpus):
    os.symlink(cpt_corpus, services.workspace.datasets / "corpus")
    await ui_user.open("/train")
    await wait_for(lambda: text(ui_user, "proposal").startswith("Fitted to the data and this machine"))
    preset = {**load_yaml(list_presets(services.configs_dir)["cpt-lora"]), "model": "tiny", "data": "corpus"}
    preset.pop("name")
    cfg = services.manager.prepare_config(preset)
    want = defaults.propose(cfg, budget_seconds=defaults.DEFAULT_BUDGET_SECONDS)["changes"]
    assert el(ui_user, "field-data").value == "corpus" and el(ui_user, "field-length_mode").value == "iters"
    for key in ("max_seq_length", "batch_size", "iters", "steps_per_eval", "val_batches", "warmup"):
        assert el(ui_user, f"field-{key}").value == want[key], key
    assert el(ui_user, "field-schedule").value == "cosine"  # from the cpt-lora preset
    await wait_for(lambda: f"({want['iters']} iterations;" in text(ui_user, "estimate"))
    assert text(ui_user, "estimate").startswith("Estimated ≈")


async def test_samples_longer_than_max_seq_length_are_announced_before_start(ui_user: User, services):
    await ui_user.open("/train")
    await tiny_ift(ui_user, **{"field-max_seq_length": 32})
    await wait_for(lambda: "will be cut" in text(ui_user, "cut-warning"))
    cfg = services.manager.prepare_config({"model": "tiny", "data": "chat", "mode": "ift", "max_seq_length": 32,
                                           "num_layers": 2})
    cut = preflight.data_facts(cfg)["truncated"]
    assert cut > 0 and text(ui_user, "cut-warning").startswith(f"⚠ {cut} of 48 training samples")
    set_value(ui_user, "field-max_seq_length", 1024)
    await wait_for(lambda: text(ui_user, "cut-warning") == "")


async def test_a_run_estimated_beyond_the_threshold_asks_before_it_starts(ui_user: User, services):
    set_confirm_minutes(services.workspace, 0.05)  # 3 s: the tiny run's start-up alone is longer
    await ui_user.open("/train")
    await tiny_ift(ui_user, **{"field-iters": 20, "field-length_mode": "iters"})
    ui_user.find(marker="start").click()
    await wait_for(lambda: "longer than the 0.05 min set on the Settings page" in text(ui_user, "long-text"))
    assert services.manager.list() == []  # nothing started while it asks
    ui_user.find(marker="long-cancel").click()
    await asyncio.sleep(0.3)
    assert services.manager.list() == []
    ui_user.find(marker="start").click()
    await wait_for(lambda: el(ui_user, "long-dialog").parent_slot.parent.value)
    ui_user.find(marker="long-start").click()
    runs = await wait_for(lambda: services.manager.list())
    await wait_for(lambda: ui_user.back_history[-1] == f"/monitor/{runs[0]['id']}")
    services.manager.stop(runs[0]["id"])
    services.manager.wait(runs[0]["id"], timeout=60)


async def test_below_the_threshold_start_does_not_ask(ui_user: User, services):
    assert load_settings(services.workspace).confirm_minutes == 30.0
    await ui_user.open("/train")
    await tiny_ift(ui_user, **{"field-iters": 20, "field-length_mode": "iters"})
    ui_user.find(marker="start").click()
    runs = await wait_for(lambda: services.manager.list())
    await wait_for(lambda: ui_user.back_history[-1] == f"/monitor/{runs[0]['id']}")  # started without asking
    services.manager.stop(runs[0]["id"])
    services.manager.wait(runs[0]["id"], timeout=60)


async def test_a_preset_schedule_follows_the_data_and_the_iterations(ui_user: User, services):
    await ui_user.open("/train")
    await wait_for(lambda: fitted_or_not(ui_user))
    set_value(ui_user, "preset", "ift-lora")  # 10 epochs; its schedule says 120 iterations
    await tiny_ift(ui_user, **{"field-batch_size": 8})
    await wait_for(lambda: el(ui_user, "field-schedule_steps").value == 10 * (48 // 8))  # 10 epochs of 6 steps
    set_value(ui_user, "field-epochs", 2)
    await wait_for(lambda: el(ui_user, "field-schedule_steps").value == 12)
    set_value(ui_user, "field-length_mode", "iters")
    set_value(ui_user, "field-iters", 50)
    await wait_for(lambda: el(ui_user, "field-schedule_steps").value is None)
    assert len(el(ui_user, "lr-chart").options["series"][0]["data"]) == 50
    set_value(ui_user, "field-schedule_steps", 80)  # the person sets it: it stays
    set_value(ui_user, "field-iters", 60)
    await asyncio.sleep(1.5)
    assert el(ui_user, "field-schedule_steps").value == 80


async def test_the_draft_survives_leaving_the_page_and_a_reload(ui_user: User, services):
    await ui_user.open("/train")
    await wait_for(lambda: fitted_or_not(ui_user))
    await tiny_ift(ui_user, **{"field-iters": 77, "field-length_mode": "iters", "field-name": "my-draft"})
    await ui_user.open("/runs")
    await ui_user.open("/train")
    assert el(ui_user, "field-iters").value == 77 and el(ui_user, "field-name").value == "my-draft"
    assert el(ui_user, "field-mode").value == "ift" and el(ui_user, "field-max_seq_length").value == 128
    await asyncio.sleep(0.5)
    assert el(ui_user, "field-iters").value == 77  # no late fit overwrote it
    ui_user.find(marker="reset-form").click()
    await wait_for(lambda: el(ui_user, "field-name").value == "" and fitted_or_not(ui_user))
    assert el(ui_user, "field-iters").value != 77


async def test_the_threshold_is_set_on_the_settings_page(ui_user: User, services):
    await ui_user.open("/settings")
    assert el(ui_user, "confirm-minutes").value == 30.0
    set_value(ui_user, "confirm-minutes", 12)
    ui_user.find(marker="confirm-save").click()
    await ui_user.should_see("Runs estimated above 12 min ask first")
    assert load_settings(services.workspace).confirm_minutes == 12.0
    set_value(ui_user, "confirm-minutes", None)
    ui_user.find(marker="confirm-save").click()
    await ui_user.should_see("Runs are started without asking")
    assert load_settings(services.workspace).confirm_minutes is None


async def test_the_probe_shows_progress_can_be_cancelled_and_ends_with_one_suggestion(ui_user: User, services):
    await ui_user.open("/train")
    await wait_for(lambda: fitted_or_not(ui_user))
    await tiny_ift(ui_user, **{"field-iters": 500, "field-length_mode": "iters"})
    ui_user.find(marker="preflight-probe").click()
    await wait_for(lambda: els(ui_user, "probe-progress"))  # shown (the simulated user finds visible elements)
    assert el(ui_user, "preflight-probe").text == "Cancel probe"
    ui_user.find(marker="preflight-probe").click()  # cancel
    await wait_for(lambda: text(ui_user, "preflight-probe-text") == "probe cancelled", timeout=60)
    assert not els(ui_user, "probe-progress")
    ui_user.find(marker="preflight-probe").click()
    await wait_for(lambda: text(ui_user, "preflight-suggestion").startswith("Suggestion:"), timeout=120)
    assert text(ui_user, "preflight-probe-text").startswith("measured over")
    assert "at the measured speed" in text(ui_user, "preflight-suggestion")
    assert [b.text for b in els(ui_user, "preflight-apply")] == ["Apply the suggestion"]  # the one button
    ui_user.find(marker="preflight-apply").click()
    await wait_for(lambda: el(ui_user, "field-iters").value != 500 and text(ui_user, "proposal").startswith("Fitted"))
    assert el(ui_user, "field-max_seq_length").value % defaults.SEQ_STEP == 0


async def test_an_uploaded_schedule_length_stays_as_written(ui_user: User, services):
    await ui_user.open("/train")
    await wait_for(lambda: fitted_or_not(ui_user))  # a fresh form: its schedule follows the run
    yaml_text = (b"model: tiny\ndata: chat\nmode: ift\nnum_layers: 2\nmax_seq_length: 128\niters: 50\n"
            b"lr_schedule: {name: cosine_decay, arguments: [1.0e-4, 75, 1.0e-5], warmup: 5, warmup_init: 0.0}\n")
    await el(ui_user, "upload").handle_uploads([SmallFileUpload("c.yaml", "application/x-yaml", yaml_text)])
    await wait_for(lambda: el(ui_user, "field-iters").value == 50)
    assert el(ui_user, "field-schedule_steps").value == 80
    set_value(ui_user, "field-iters", 60)
    await wait_for(lambda: f"({60} iterations;" in text(ui_user, "estimate"))  # an estimate came and went
    assert el(ui_user, "field-schedule_steps").value == 80


async def test_picking_a_quantized_model_says_what_it_costs_here_and_offers_float(ui_user: User, services, tiny_model):
    import json
    import shutil

    q4 = services.workspace.models / "tiny-q4"  # the catalogue reads config.json: a 4-bit model as imported
    shutil.copytree(tiny_model, q4)
    cfg = json.loads((q4 / "config.json").read_text())
    (q4 / "config.json").write_text(json.dumps({**cfg, "quantization": {"bits": 4, "group_size": 32}}))
    await ui_user.open("/train")
    set_value(ui_user, "field-model", "tiny-q4")
    await wait_for(lambda: "quantized weights (4-bit (group 32))" in text(ui_user, "model-quantized-note"))
    note = text(ui_user, "model-quantized-note")
    assert "(33x)" in note and "--dequantize" in note and "Import float weights" in note
    set_value(ui_user, "field-model", "tiny")
    await wait_for(lambda: text(ui_user, "model-quantized-note") == "")
