"""Defaults that fit the data and the machine (services.training.defaults) on the tiny model and every sample
dataset, and the preflight probe's bound."""

from __future__ import annotations

import math

import pytest
from conftest import base_config

from services.library.checks import load_tokenizer
from services.library.samples import SAMPLE_DATASETS, install_samples
from services.training import defaults, preflight
from services.training.manager import RunManager

MODES = {"cpt": "cpt", "ift": "ift", "dpo": "dpo"}


@pytest.fixture
def samples(workspace):
    return install_samples(workspace.datasets)


@pytest.mark.parametrize("kind", list(SAMPLE_DATASETS))
def test_proposal_fits_each_sample_dataset(kind, samples, workspace, tiny_model):
    manager = RunManager(workspace)
    user = {"model": str(tiny_model), "data": str(samples[kind]), "mode": MODES[kind], "max_seq_length": 1024,
            "num_layers": 2, "batch_size": 4, "iters": 1000,
            "lr_schedule": {"name": "cosine_decay", "arguments": [1e-4, 990, 1e-5], "warmup": 10, "warmup_init": 0.0}}
    cfg = manager.prepare_config(user)
    tok = load_tokenizer(str(tiny_model))
    p = defaults.propose(cfg, tok, free_bytes=8e9)
    ch = p["changes"]
    assert p["seconds"] < 30 * 60 and p["estimate"]["fits"]
    assert p["seconds"] == pytest.approx(p["estimate"]["seconds"] + p["estimate"]["eval_seconds"]
                                         + p["estimate"]["startup_seconds"])
    facts = preflight.data_facts({**cfg, "max_seq_length": 1024}, tok)
    if kind == "cpt":
        assert ch["max_seq_length"] == defaults.DOCUMENT_WINDOW
    else:  # p95 of the lengths, rounded up to 64, and at most 5 % of the samples cut
        assert ch["max_seq_length"] % defaults.SEQ_STEP == 0 and ch["max_seq_length"] >= facts["p95_length"]
        assert ch["max_seq_length"] - facts["p95_length"] < defaults.SEQ_STEP
        assert p["truncated"] <= 0.05 * facts["samples"] + 1
    at_seq = preflight.data_facts({**cfg, "max_seq_length": ch["max_seq_length"]}, tok)
    steps = at_seq["samples"] // ch["batch_size"]
    assert steps >= defaults.MIN_STEPS_PER_EPOCH or ch["batch_size"] == 1
    assert ch["iters"] % steps == 0 and 1 <= ch["iters"] // steps <= defaults.MAX_EPOCHS  # whole epochs
    assert ch["steps_per_eval"] == ch["save_every"] == math.ceil(ch["iters"] / defaults.EVALS_PER_RUN)
    assert p["estimate"]["eval_seconds"] <= 0.5 * p["estimate"]["seconds"]  # validation stays a minor share
    out = defaults.apply_to_config(user, p)
    assert "epochs" not in out and out["iters"] == ch["iters"]
    assert out["lr_schedule"]["arguments"] == [1e-4, ch["iters"] - ch["warmup"], 1e-5]
    manager.prepare_config(out)  # the proposal is a valid config


def test_proposal_keeps_to_the_time_budget_and_the_memory(samples, workspace, tiny_model):
    cfg = RunManager(workspace).prepare_config({"model": str(tiny_model), "data": str(samples["ift"]),
                                                "mode": "ift", "num_layers": 2,
                                                "max_seq_length": 1024})
    tok = load_tokenizer(str(tiny_model))
    free = defaults.propose(cfg, tok, free_bytes=8e9)
    slow = defaults.propose(cfg, tok, free_bytes=8e9, tokens_per_second=50.0, budget_seconds=120)
    assert slow["changes"]["iters"] < free["changes"]["iters"] and "shortened" in slow["reasons"][2]
    assert slow["seconds"] <= 120 or slow["changes"]["iters"] == defaults.MIN_ITERS
    model = preflight.model_facts(cfg["model"], cfg)
    seq = free["estimate"]["seq"]
    need_two = preflight.fits_in(model, 2, seq, cfg, 1e12)[1] + preflight.RUNTIME_GB * 1e9
    tight = defaults.propose(cfg, tok, free_bytes=need_two + 1)
    assert tight["changes"]["batch_size"] <= 2 < free["changes"]["batch_size"]


def test_probe_is_bounded_in_time_and_sequence_length(workspace, tiny_model, chat_data, tmp_path):
    cfg = RunManager(workspace).prepare_config(base_config(tiny_model, chat_data, mode="ift", max_seq_length=1024))
    assert preflight.probe_config(cfg)["max_seq_length"] == preflight.PROBE_SEQ
    assert preflight.probe_config(cfg, full_length=True)["max_seq_length"] == 1024
    probe = preflight.Probe(cfg, root=tmp_path / "probes", iters=100_000, max_seconds=45).start()
    assert probe.wait(120) is not None, probe.message
    r = probe.result
    assert probe.state == "done" and r["bounded"] and 1 <= r["iterations"] < 100_000, probe.message
    assert r["max_seq_length"] == preflight.PROBE_SEQ and "45 s bound" in probe.message
    assert probe.fraction == 1.0 and not any((tmp_path / "probes").iterdir())
    cancelled = preflight.Probe(cfg, root=tmp_path / "probes", iters=100_000).start()
    cancelled.cancel()
    cancelled.wait(60)
    assert cancelled.state == "cancelled", cancelled.message


def test_the_cli_proposes_the_same_config(samples, workspace, tiny_model, tmp_path, capsys):
    from app.cli import main
    from services.config import load_yaml

    out, base = tmp_path / "fitted.yaml", tmp_path / "base.yaml"
    base.write_text("num_layers: 2\n")
    assert main(["--workspace", str(workspace.root), "propose", str(base), "--model", str(tiny_model), "--data",
                 str(samples["ift"]), "--mode", "ift", "-o", str(out)]) == 0
    cfg = load_yaml(out)
    manager = RunManager(workspace)
    want = defaults.propose(manager.prepare_config({"model": str(tiny_model), "data": str(samples["ift"]),
                                                    "mode": "ift", "max_seq_length": defaults.MIN_SEQ,
                                                    "num_layers": 2}),
                            budget_seconds=20 * 60)["changes"]
    assert {k: cfg[k] for k in ("max_seq_length", "batch_size", "iters", "val_batches")} == \
        {k: want[k] for k in ("max_seq_length", "batch_size", "iters", "val_batches")}
    manager.prepare_config(cfg)
    assert "estimated ≈" in capsys.readouterr().err


def test_a_proposal_rebuilds_a_known_schedule_for_its_length_and_keeps_a_custom_one():
    from services.config import read_schedule, schedule

    proposal = {"changes": {"iters": 200, "warmup": 10}}
    for kind in ("constant", "linear", "cosine"):
        user = {"iters": 1000, "lr_schedule": schedule(kind, 1e-4, 1000, 50, 1e-6)}
        out = defaults.apply_to_config(user, proposal)
        assert out["lr_schedule"] == schedule(kind, 1e-4, 200, 10, 1e-6)
        assert read_schedule(out["lr_schedule"])["final_lr"] == (0.0 if kind == "constant" else 1e-6)
    custom = {"name": "step_decay", "arguments": [1e-4, 0.5, 100]}
    assert defaults.apply_to_config({"iters": 1000, "lr_schedule": custom}, proposal)["lr_schedule"] == custom


def test_the_proposed_batch_divides_over_every_form_of_distributed(tiny_model):
    cfg = {"model": str(tiny_model), "max_seq_length": 64, "fine_tune_type": "lora", "num_layers": 2,
           "distributed": {"hosts": ["a", "b", "c"]}}
    model = preflight.model_facts(cfg["model"], cfg)
    assert defaults.proposed_batch(model, cfg, samples=10_000, seq=64, free=8e9) % 3 == 0
