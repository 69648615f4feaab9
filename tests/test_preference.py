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
from test_engine import reports, run_to_end, stop_when, tensors_equal

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
