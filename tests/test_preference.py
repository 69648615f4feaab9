"""Preference training (DPO, ORPO): parity with mlx-lm-lora, learning, exact resume, bad rows, config."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import base_config, sentence, write_jsonl
from test_engine import reports, run_to_end, same_end, stop_and_resume

from services.config import ConfigProblems, resolve
from services.training.data import DataError

REPO = Path(__file__).resolve().parent.parent


def pref_row(rng: random.Random) -> dict:
    """A pair with a clear preference: the chosen answer agrees ("yes."), the rejected one refuses."""
    body = sentence(rng)
    return {"prompt": sentence(rng), "chosen": f"yes. {body}", "rejected": f"no, never. {body} {sentence(rng)}"}


@pytest.fixture(scope="session")
def pref_data(tmp_path_factory) -> Path:
    rng = random.Random(3)
    d = tmp_path_factory.mktemp("pref")
    write_jsonl(d / "train.jsonl", [pref_row(rng) for _ in range(32)])
    write_jsonl(d / "valid.jsonl", [pref_row(rng) for _ in range(16)])
    return d


def pref_config(model: Path, data: Path, mode: str = "dpo", **over) -> dict:
    cfg = base_config(model, data, mode=mode, iters=12, steps_per_report=3, steps_per_eval=4, save_every=6,
                      learning_rate=2e-3, max_seq_length=96, preference={"beta": 0.1})
    cfg.update(over)
    return cfg


def lora_reference(cfg: dict, tmp_path: Path) -> list[dict]:
    """mlx-lm-lora's reports on the same config (tests/mlx_lora_reference.py)."""
    path = tmp_path / "ref.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "mlx_lora_reference.py"), str(path),
                           str(tmp_path / "ref")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(x) for x in proc.stdout.splitlines() if x.startswith('{"type"')]


@pytest.mark.parametrize("mode", ["dpo", "orpo"])
def test_loss_streams_equal_mlx_lm_lora_report_for_report(manager, tiny_model, pref_data, tmp_path, mode):
    cfg = pref_config(tiny_model, pref_data, mode, preference={"beta": 0.1, "compat": True})
    ref = lora_reference(cfg, tmp_path)
    folder = run_to_end(manager, cfg)
    ours_train, ref_train = reports(folder, "train"), [r for r in ref if r["type"] == "train"]
    assert [r["iteration"] for r in ours_train] == [r["iteration"] for r in ref_train] == [3, 6, 9, 12]
    for a, b in zip(ours_train, ref_train, strict=True):
        assert abs(a["train_loss"] - b["train_loss"]) < 1e-4, (a["iteration"], a["train_loss"], b["train_loss"])
    ours_val, ref_val = reports(folder, "val"), [r for r in ref if r["type"] == "val"]
    assert len(ours_val) == len(ref_val) == 4
    for a, b in zip(ours_val, ref_val, strict=True):
        assert abs(a["val_loss"] - b["val_loss"]) < 1e-4, (a["iteration"], a["val_loss"], b["val_loss"])
    # the losses moved: the comparison is of a run that trains, not of two constants
    assert abs(ours_train[-1]["train_loss"] - ours_train[0]["train_loss"]) > 1e-3


def test_dpo_learns_a_clear_preference_on_held_out_pairs(manager, tiny_model, pref_data):
    cfg = pref_config(tiny_model, pref_data, iters=40, steps_per_eval=20, save_every=20, learning_rate=5e-3,
                      preference={"beta": 0.5, "best": "accuracy"})
    folder = run_to_end(manager, cfg)
    val = reports(folder, "val")
    assert val[0]["iteration"] == 0 and val[0]["val_preference_accuracy"] == 0.5  # policy == reference
    assert val[-1]["val_preference_accuracy"] >= 0.9, val[-1]
    assert val[-1]["val_reward_margin"] > 0 and val[-1]["val_rewards_chosen"] > val[-1]["val_rewards_rejected"]
    train = reports(folder, "train")
    assert {"rewards_chosen", "rewards_rejected", "reward_margin", "preference_accuracy", "logps_chosen",
            "logps_rejected"} <= set(train[-1])
    info = folder.info()
    assert info["best"]["val_accuracy"] == max(c["val_accuracy"] for c in info["checkpoints"])
    stats = json.loads(folder.stats_path.read_text())
    assert stats["reference"] == "adapters-off" and stats["train"]["pairs"] == 32
    # greedy answers move toward the chosen style
    from mlx_lm import generate, load

    from services.training.data import chat_tokens
    base, tok = load(str(tiny_model))
    tuned, _ = load(str(tiny_model), adapter_path=str(folder.path))
    prompt = chat_tokens(tok, [{"role": "user", "content": "the cat sees the ball."}], gen=True)
    before, after = (generate(m, tok, prompt, max_tokens=4) for m in (base, tuned))
    assert after.startswith("y") and not before.startswith("y"), (before, after)  # "yes." is the chosen start


MEASURED = ("second", "time", "memory", "rss", "eta")  # what a report measures of the machine, not of the run


def learned(folder) -> list[dict]:
    """The train reports without the machine's figures: loss, rewards, accuracy, log-probabilities, tokens."""
    return [{k: v for k, v in r.items() if not any(m in k for m in MEASURED)} for r in reports(folder, "train")]


@pytest.mark.parametrize("dropout", [0.0, 0.1])  # the two-pass step, and the joint pass (dropout)
def test_dpo_stop_and_resume_is_bitwise_identical(manager, tiny_model, pref_data, tmp_path, dropout):
    cfg = pref_config(tiny_model, pref_data, iters=60, steps_per_report=5, steps_per_eval=20, save_every=7,
                      lora_parameters={"rank": 4, "dropout": dropout, "scale": 10.0})
    ref = run_to_end(manager, cfg)
    folder = stop_and_resume(manager, cfg, 12)
    same_end(folder, ref, 60)
    assert learned(folder) == learned(ref)
    assert [r["val_loss"] for r in reports(folder, "val")] == [r["val_loss"] for r in reports(ref, "val")]


@pytest.mark.parametrize("mode", ["dpo", "orpo"])
def test_the_two_pass_step_equals_the_joint_pass(tiny_model, pref_data, mode):
    """The default step computes the chosen and rejected sides' gradients one after the other; they sum to the
    joint pass's gradient and its loss is the same."""
    import mlx.core as mx
    import mlx.nn as nn
    import numpy as np
    from mlx.utils import tree_flatten
    from mlx_lm.utils import load

    from services.training import preference
    from services.training.preference_loss import collate_pairs, lora_layers, make_loss, two_pass_value_and_grad
    from services.training.trainer import apply_fine_tune_type

    cfg = resolve(pref_config(tiny_model, pref_data, mode, lora_parameters={"rank": 4, "dropout": 0.0,
                                                                            "scale": 10.0}))
    model, tok = load(str(tiny_model))
    mx.random.seed(0)
    apply_fine_tune_type(model, cfg)
    for _, layer, _ in lora_layers(model):  # adapters away from zero: the policy is not its reference
        layer.lora_b = mx.random.normal(layer.lora_b.shape) * 0.05
    pairs = preference.prepare(cfg, tok, Path(pref_data), ("train",)).train[:4]
    c, r, cm, rm = collate_pairs(pairs, cfg["max_seq_length"])
    ref = (mx.zeros((4,)) - 30.0, mx.zeros((4,)) - 35.0)
    pref = preference.settings(cfg)
    (l1, t1, s1), g1 = nn.value_and_grad(model, make_loss(mode, pref))(model, c, r, cm, rm, *ref)
    (l2, t2, s2), g2 = two_pass_value_and_grad(model, mode, pref)(model, c, r, cm, rm, *ref)
    assert abs(l1.item() - l2.item()) < 1e-6 and t1.item() == t2.item()
    assert np.allclose(np.array(s1), np.array(s2), atol=1e-5)
    flat1, flat2 = dict(tree_flatten(g1)), dict(tree_flatten(g2))
    assert flat1.keys() == flat2.keys() and len(flat1) > 0
    for k, v in flat1.items():
        assert np.allclose(np.array(v), np.array(flat2[k]), rtol=1e-4, atol=1e-6), k
    assert max(float(mx.abs(v).max()) for v in flat1.values()) > 1e-4  # a gradient that is not zero


def test_full_fine_tune_precomputes_the_reference_once(manager, tiny_model, pref_data):
    cfg = pref_config(tiny_model, pref_data, fine_tune_type="full", learning_rate=1e-4, iters=6, save_every=3)
    folder = run_to_end(manager, cfg)
    stats = json.loads(folder.stats_path.read_text())
    assert stats["reference"] == "precomputed" and (folder.path / "reference_logps.npz").exists()
    val = reports(folder, "val")
    assert abs(val[0]["val_loss"] - 0.6931471805599453) < 1e-6  # log 2: the policy starts as its reference


def bad_rows_file(tmp_path: Path, good: int = 0) -> Path:
    rng = random.Random(5)
    rows = [{"prompt": "p", "chosen": "same", "rejected": "same"},
            {"prompt": "p", "chosen": "  ", "rejected": "an answer"},
            {"prompt": "long " * 400, "chosen": "a", "rejected": "b"}]
    rows += [pref_row(rng) for _ in range(good)]
    return write_jsonl(tmp_path / "bad" / "train.jsonl", rows)


def test_bad_rows_are_named_file_line_and_left_out(tiny_model, tmp_path):
    from mlx_lm.utils import load

    from services.training.data import prepare

    path = bad_rows_file(tmp_path, good=8)
    _, tok = load(str(tiny_model))
    cfg = resolve(pref_config(tiny_model, path.parent, batch_size=2))
    prepared = prepare(cfg, tok, ("train",))
    assert len(prepared.train) == 8
    left = prepared.stats["train"]["left_out_examples"]
    assert left[0].startswith(f"{path}:1: chosen and rejected are the same")
    assert left[1].startswith(f"{path}:2: empty chosen answer")
    assert left[2].startswith(f"{path}:3: the prompt takes") and "max_seq_length=96" in left[2]


def test_a_dataset_of_only_invalid_rows_refuses_to_start(manager, tiny_model, tmp_path):
    path = bad_rows_file(tmp_path)
    cfg = pref_config(tiny_model, path.parent, batch_size=1)
    folder = manager.launch(cfg)
    info = manager.wait(folder.id, timeout=120)
    assert info["status"] == "failed"
    assert "no usable preference pair" in info["reason"] and f"{path}:1" in info["reason"]


def test_config_validates_the_preference_block(tiny_model, pref_data):
    with pytest.raises(ConfigProblems) as e:
        resolve(pref_config(tiny_model, pref_data, preference={"beta": -1, "loss_type": "kto", "lambda": 1}))
    fields = {x.field for x in e.value.errors}
    assert {"preference.beta", "preference.loss_type", "preference.lambda"} <= fields
    with pytest.raises(ConfigProblems) as e:
        resolve(pref_config(tiny_model, pref_data, mode="ift"))
    assert "preference" in {x.field for x in e.value.errors}
    resolve(pref_config(tiny_model, pref_data, mode="orpo"))


def test_preference_rows_under_ift_say_which_mode_they_need(tiny_model, pref_data):
    from mlx_lm.utils import load

    from services.training.data import prepare

    _, tok = load(str(tiny_model))
    with pytest.raises(DataError, match="mode: dpo or orpo"):
        prepare(resolve(base_config(tiny_model, pref_data, mode="ift")), tok)
