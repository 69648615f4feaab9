"""Preflight: trainable parameters as the trainer counts them, data facts as the pipeline prepares them, the
memory estimate against a real probe run, and suggestions when the estimate does not fit."""

from __future__ import annotations

import math

import pytest
from conftest import base_config

from services.library.checks import load_tokenizer
from services.training import preflight
from services.training.manager import RunManager


@pytest.fixture
def resolved(workspace, tiny_model, chat_data):
    manager = RunManager(workspace)
    return lambda **over: manager.prepare_config(base_config(tiny_model, chat_data, mode="ift", **over))


@pytest.mark.parametrize("fine, layers", [("lora", 1), ("lora", -1), ("dora", 2), ("full", 1)])
def test_trainable_parameters_match_the_trainer(tiny_model, fine, layers):
    from mlx.utils import tree_flatten
    from mlx_lm import load

    from services.training.trainer import apply_fine_tune_type

    cfg = {"fine_tune_type": fine, "num_layers": layers, "lora_parameters": {"rank": 4, "scale": 20.0, "dropout": 0.0}}
    model, _ = load(str(tiny_model))
    apply_fine_tune_type(model, cfg)
    facts = preflight.model_facts(tiny_model, cfg)
    assert facts["trainable"] == sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    assert facts["params"] == sum(v.size for _, v in tree_flatten(load(str(tiny_model))[0].parameters()))


def test_data_facts_match_the_prepared_data(tiny_model, chat_data, cpt_corpus, workspace):
    from services.training.data import prepare

    manager = RunManager(workspace)
    tok = load_tokenizer(str(tiny_model))
    for data, mode in ((chat_data, "ift"), (cpt_corpus, "cpt")):
        cfg = manager.prepare_config(base_config(tiny_model, data, mode=mode, max_seq_length=64))
        est = preflight.estimate(cfg, tok, free_bytes=64e9)
        prepared = prepare(cfg, tok)
        assert est["steps_per_epoch"] == pytest.approx(prepared.stats["steps_per_epoch"], rel=0.2, abs=1), mode
        assert est["seq"] <= 63 and est["fits"] and est["suggestion"] is None
        assert est["seconds"] > 0 and est["iters"] == 30
    widest = max(len(s.tokens) for s in prepare(manager.prepare_config(
        base_config(tiny_model, chat_data, mode="ift", max_seq_length=512)), tok).train)
    est = preflight.estimate(manager.prepare_config(base_config(tiny_model, chat_data, mode="ift",
                                                                max_seq_length=512)), tok)
    assert est["seq"] == min(1 + 32 * math.ceil(est["data"]["max_length"] / 32), 512) - 1
    assert est["data"]["max_length"] >= widest - 1


def test_data_facts_are_counted_once_per_dataset_and_again_when_it_changes(tiny_model, chat_data, tmp_path,
                                                                          workspace, monkeypatch):
    import shutil

    from services.library import checks as dataset_check

    data = shutil.copytree(chat_data, tmp_path / "chats")
    calls = []
    real = dataset_check.token_stats
    monkeypatch.setattr(dataset_check, "token_stats", lambda *a, **k: calls.append(1) or real(*a, **k))
    manager = RunManager(workspace)
    cfg = manager.prepare_config(base_config(tiny_model, data, mode="ift", max_seq_length=64))
    first = preflight.data_facts(cfg)
    assert preflight.data_facts({**cfg, "batch_size": 1, "learning_rate": 0.5}) == first and len(calls) == 1
    assert preflight.data_facts({**cfg, "max_seq_length": 32}) != first and len(calls) == 2
    with open(data / "train.jsonl", "a") as f:  # the dataset grows: counted again
        f.write((data / "train.jsonl").read_text().splitlines()[0] + "\n")
    assert preflight.data_facts(cfg)["samples"] == first["samples"] + 1 and len(calls) == 3


def test_suggestions_fit_when_the_estimate_does_not(resolved, tiny_model):
    cfg = resolved(batch_size=16, max_seq_length=1024)
    est = preflight.estimate(cfg, free_bytes=64e9)
    need = est["process_gb"] * 1e9
    short = preflight.estimate(cfg, free_bytes=need - 1)
    sugg = short["suggestion"]
    assert not short["fits"] and sugg["batch_size"] < 16
    assert sugg["batch_size"] * sugg["grad_accumulation_steps"] >= 16
    facts = preflight.model_facts(cfg["model"], cfg)
    fitted = preflight.peak_bytes(facts, sugg["batch_size"], est["seq"])["peak"] + preflight.RUNTIME_GB * 1e9
    assert fitted <= need - 1
    nothing = preflight.estimate(cfg, free_bytes=1e6)
    assert not nothing["fits"] and nothing["suggestion"] is None


def test_probe_measures_a_few_real_steps_and_the_estimate_is_close(resolved, workspace):
    cfg = resolved(batch_size=4, max_seq_length=128)
    est = preflight.estimate(cfg)
    root = preflight.probes_dir(workspace)
    assert root.parent == workspace.root / ".forgellm"  # hidden from the workspace's runs, models and datasets
    probe = preflight.Probe(cfg, root=root).start()
    assert probe.wait(180) is not None, probe.message
    r = probe.result
    assert probe.state == "done" and r["iterations"] == preflight.PROBE_ITERS and r["tokens_per_second"] > 0
    assert r["peak_gb"] > 0 and r["rss_gb"] > r["peak_gb"]
    assert abs(est["peak_gb"] - r["peak_gb"]) / r["peak_gb"] <= 0.3
    assert root.is_dir() and not any(root.iterdir())  # the temporary workspace is gone
    advice = preflight.probe_advice(r, est, free_bytes=1e12)
    assert advice["fits"] and advice["seconds"] > 0 and abs(advice["estimate_error"]) <= 0.3
    tight = preflight.probe_advice(r, est, free_bytes=(r["rss_gb"] + 0.001) * 1e9 * 0.5 + 0.2e9)
    assert not tight["fits"] and "batch_size" in tight["suggestion"]["text"]


def test_probe_reports_a_failing_run(workspace, tiny_model, tmp_path):
    import random

    from conftest import chat_row, write_jsonl

    rng = random.Random(0)
    data = write_jsonl(tmp_path / "two" / "train.jsonl", [chat_row(rng) for _ in range(2)]).parent
    cfg = RunManager(workspace).prepare_config(base_config(tiny_model, data, mode="ift", batch_size=4))
    probe = preflight.Probe(cfg, root=tmp_path / "probes").start()
    probe.wait(120)
    assert probe.state == "failed" and "fewer than batch_size=4" in probe.message


def test_preference_runs_count_two_sequences_and_their_reference(workspace, tiny_model, tmp_path):
    """DPO: the pairs a run keeps, both sides' tokens per step, the joint pass holding twice the rows of the two-pass
    step, the reference named; the probe runs real DPO steps and the estimate is close to what they measure."""
    import random

    from conftest import write_jsonl
    from test_preference import pref_row

    from services.training import preference

    rng = random.Random(1)
    data = tmp_path / "pairs"
    write_jsonl(data / "train.jsonl", [pref_row(rng) for _ in range(12)] + [{"prompt": "p", "chosen": "x",
                                                                             "rejected": "x"}])
    write_jsonl(data / "valid.jsonl", [pref_row(rng) for _ in range(4)])
    manager = RunManager(workspace)
    tok = load_tokenizer(str(tiny_model))
    cfg = manager.prepare_config(base_config(tiny_model, data, mode="dpo", batch_size=4, max_seq_length=96,
                                             lora_parameters={"rank": 8, "dropout": 0.0, "scale": 20.0}))
    est = preflight.estimate(cfg, tok, free_bytes=64e9)
    prepared = preference.prepare(cfg, tok, data)
    assert est["samples"] == len(prepared.train) == 12 and est["steps_per_epoch"] == 3  # the equal pair is left out
    assert est["data"]["pairs"]["chosen_longer"] == prepared.stats["train"]["chosen_longer"] == 0.0
    assert est["tokens_per_step"] == pytest.approx(4 * prepared.stats["train"]["tokens"] / 12)
    assert est["preference"] == {"sequences_per_sample": 2, "step": "two-pass", "reference": "adapters-off",
                                 "extra_forwards": 4, "reference_once": False}
    from pages.train.preflight import preflight_lines

    assert any(line.startswith("Preference: 2 sequences per pair (two-pass step") and "adapters-off" in line
               for line in preflight_lines(est))
    joint = preflight.estimate({**cfg, "preference": {"compat": True}}, tok, free_bytes=64e9)
    assert joint["preference"]["step"] == "joint" and joint["parts_gb"]["activations"] == pytest.approx(
        2 * est["parts_gb"]["activations"])
    orpo = preflight.estimate({**cfg, "mode": "orpo"}, tok, free_bytes=64e9)
    assert orpo["preference"]["reference"] == "none" and orpo["seconds"] < est["seconds"]
    full = preflight.estimate({**cfg, "fine_tune_type": "full"}, tok, free_bytes=64e9)
    assert full["preference"]["reference"] == "precomputed" and full["preference"]["reference_once"]
    probe = preflight.Probe(cfg, root=tmp_path / "probes").start()
    assert probe.wait(180) is not None, probe.message
    assert probe.state == "done" and probe.result["iterations"] == preflight.PROBE_ITERS
    assert abs(est["peak_gb"] - probe.result["peak_gb"]) / probe.result["peak_gb"] <= 0.3, (est["peak_gb"],
                                                                                           probe.result)
