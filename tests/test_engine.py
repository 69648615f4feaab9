"""Training engine: mlx-lm parity, exact resume, kill -9 recovery, early stopping and rotation."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import pytest
import yaml
from conftest import base_config, sentence, write_jsonl

from services.training.folder import RunFolder, history

REPO = Path(__file__).resolve().parent.parent


def run_to_end(manager, cfg: dict) -> RunFolder:
    folder = manager.launch(cfg)
    info = manager.wait(folder.id, timeout=300)
    assert info["status"] in ("completed", "early-stopped"), info
    return folder


def tensors_equal(a: Path, b: Path) -> None:
    ta, tb = mx.load(str(a)), mx.load(str(b))
    assert sorted(ta) == sorted(tb)
    for k in ta:
        assert mx.array_equal(ta[k], tb[k]).item(), f"{a.name}: tensor {k} differs"


def reports(folder: RunFolder, kind: str) -> list[dict]:
    records, _ = folder.metrics()
    return [r for r in history(records) if r["type"] == kind]


def mlx_reference(cfg: dict, tmp_path: Path) -> tuple[list[dict], Path]:
    """Reports and adapters of mlx-lm's own trainer on the same config."""
    cfg_path = tmp_path / "mlx.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "mlx_adapters"
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "mlx_reference.py"), str(cfg_path), str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith('{"type"')]
    return lines, out / "adapters.safetensors"


@pytest.mark.parametrize("variant", ["constant", "cosine-dropout"])
def test_plain_mlx_config_matches_mlx_lm_report_for_report(manager, tiny_model, chat_data, tmp_path, variant):
    cfg = base_config(tiny_model, chat_data, mask_prompt=True, train=True)
    if variant == "cosine-dropout":
        cfg.update(seed=42, lr_schedule={"name": "cosine_decay", "arguments": [1e-3, 25, 1e-5], "warmup": 5,
                                         "warmup_init": 1e-5},
                   lora_parameters={"rank": 8, "dropout": 0.1, "scale": 20.0})
    ref, ref_adapters = mlx_reference(cfg, tmp_path)
    folder = run_to_end(manager, cfg)

    ref_train = [r for r in ref if r["type"] == "train"]
    ref_val = [r for r in ref if r["type"] == "val"]
    ours_train, ours_val = reports(folder, "train"), reports(folder, "val")
    assert [r["iteration"] for r in ours_train] == [r["iteration"] for r in ref_train] == [5, 10, 15, 20, 25, 30]
    assert [r["iteration"] for r in ours_val] == [r["iteration"] for r in ref_val] == [0, 9, 19, 29]
    for a, b in zip(ours_train, ref_train, strict=True):
        assert a["train_loss"] == b["train_loss"]
        assert a["learning_rate"] == b["learning_rate"]
        assert a["trained_tokens"] == b["trained_tokens"]
    for a, b in zip(ours_val, ref_val, strict=True):
        assert a["val_loss"] == b["val_loss"]
    tensors_equal(folder.path / "adapters.safetensors", ref_adapters)


def stop_when(manager, folder: RunFolder, iteration: int, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if any(r["iteration"] >= iteration for r in reports(folder, "train")):
            manager.stop(folder.id)
            return
        time.sleep(0.02)
    raise AssertionError("run did not reach the stop point")


def stop_and_resume(manager, cfg: dict, at: int) -> RunFolder:
    """``cfg`` launched, stopped once it reports iteration ``at``, then resumed to the end; its final checkpoint's
    adapters and optimizer state are checked against ``ref``'s by the caller with :func:`same_end`."""
    folder = manager.launch(cfg)
    stop_when(manager, folder, at)
    info = manager.wait(folder.id)
    assert info["status"] == "stopped" and at <= info["iteration"] < cfg["iters"], info
    manager.resume(folder.id)
    assert manager.wait(folder.id)["status"] == "completed"
    return folder


def same_end(folder: RunFolder, ref: RunFolder, it: int) -> None:
    for name in ("adapters.safetensors", "optimizer.safetensors"):
        tensors_equal(folder.checkpoint_dir(it) / name, ref.checkpoint_dir(it) / name)


RESUME_CASES = {
    # ForgeLLM CPT with LoRA dropout and a cosine schedule: RNG, data order and schedule must all resume
    "cpt-lora": dict(mode="cpt", lora_parameters={"rank": 4, "dropout": 0.1, "scale": 10.0}, max_seq_length=48,
                     lr_schedule={"name": "cosine_decay", "arguments": [1e-3, 300, 1e-5], "warmup": 10}),
    # a plain mlx-lm config, full fine-tune, gradient accumulation (pending gradients must resume too)
    "mlx-full": dict(fine_tune_type="full", learning_rate=1e-4, grad_accumulation_steps=2, mask_prompt=True),
}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_model, chat_data, cpt_corpus):
    """The reference result of each resume case, run straight through once."""
    from services.training.manager import RunManager
    from services.workspace import Workspace

    manager = RunManager(Workspace.resolve(tmp_path_factory.mktemp("ws-ref")))
    out = {}
    for name, over in RESUME_CASES.items():
        data = cpt_corpus if over.get("mode") == "cpt" else chat_data
        cfg = base_config(tiny_model, data, iters=300, steps_per_eval=25, save_every=50, **over)
        out[name] = (cfg, run_to_end(manager, cfg))
    return out


@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_stop_and_resume_is_bitwise_identical(manager, uninterrupted, case):
    cfg, ref = uninterrupted[case]
    folder = manager.launch(cfg)
    stop_when(manager, folder, 40)
    info = manager.wait(folder.id)
    assert info["status"] == "stopped", info
    k = info["iteration"]
    assert 40 <= k < 300 and k in folder.checkpoint_iterations()

    manager.resume(folder.id)
    info = manager.wait(folder.id)
    assert info["status"] == "completed", info
    final = folder.checkpoint_dir(300)
    tensors_equal(final / "adapters.safetensors", ref.checkpoint_dir(300) / "adapters.safetensors")
    tensors_equal(final / "optimizer.safetensors", ref.checkpoint_dir(300) / "optimizer.safetensors")
    ours = [(r["iteration"], r["train_loss"]) for r in reports(folder, "train")]
    theirs = [(r["iteration"], r["train_loss"]) for r in reports(ref, "train")]
    assert ours == theirs
    assert [r["val_loss"] for r in reports(folder, "val")] == [r["val_loss"] for r in reports(ref, "val")]


def test_kill_9_marks_interrupted_and_resumes_exactly(manager, uninterrupted):
    cfg, ref = uninterrupted["cpt-lora"]
    folder = manager.launch(cfg)
    deadline = time.time() + 120
    while not folder.checkpoint_iterations() and time.time() < deadline:
        time.sleep(0.02)
    pid = manager.get(folder.id)["pid"]
    os.kill(pid, signal.SIGKILL)
    time.sleep(0.3)
    info = manager.get(folder.id)
    assert info["status"] == "interrupted"
    assert "ended unexpectedly" in info["reason"] and "resume from checkpoint" in info["reason"]
    first_session = info["trained_seconds"]
    assert 0 < first_session <= info["ended"] - info["started"] + 1e-3  # closed when last seen alive
    # no file is left corrupt: everything parses and loads
    json.loads(folder.run_json.read_text())
    for line in folder.metrics_path.read_text().splitlines()[:-1]:
        json.loads(line)
    for it in folder.checkpoint_iterations():
        for f in ("adapters.safetensors", "optimizer.safetensors"):
            mx.load(str(folder.checkpoint_dir(it) / f))

    manager.resume(folder.id)
    info = manager.wait(folder.id)
    assert info["status"] == "completed", info
    assert info["trained_seconds"] > first_session + (info["ended"] - info["started"]) - 1e-3  # both sessions
    tensors_equal(folder.checkpoint_dir(300) / "adapters.safetensors", ref.checkpoint_dir(300) / "adapters.safetensors")
    assert [r["train_loss"] for r in reports(folder, "train")] == [r["train_loss"] for r in reports(ref, "train")]


def test_early_stopping_and_rotation_on_a_run_built_to_overfit(manager, tiny_model, tmp_path):
    import random

    from conftest import chat_row, write_jsonl

    rng = random.Random(5)
    data = tmp_path / "small"
    write_jsonl(data / "train.jsonl", [chat_row(rng) for _ in range(8)])
    write_jsonl(data / "valid.jsonl", [chat_row(rng) for _ in range(8)])
    cfg = base_config(tiny_model, data, mode="ift", iters=400, learning_rate=5e-3, steps_per_eval=5, save_every=5,
                      steps_per_report=5, keep_checkpoints=2,
                      lora_parameters={"rank": 16, "dropout": 0.0, "scale": 20.0},
                      early_stopping={"patience": 3, "min_delta": 0.0, "overfit_threshold": 0.25})
    folder = manager.launch(cfg)
    info = manager.wait(folder.id)
    assert info["status"] == "early-stopped", info
    assert info["iteration"] < 400
    vals = reports(folder, "val")
    best_val = min(r["val_loss"] for r in vals)
    assert info["best"]["val_loss"] == best_val
    on_disk = folder.checkpoint_iterations()
    last_two = sorted(c["iteration"] for c in info["checkpoints"])[-2:]
    assert set(on_disk) == set(last_two) | {info["best"]["iteration"]}
    assert info["best"]["iteration"] in on_disk
    assert vals[-1]["val_loss"] > best_val  # it stopped because validation got worse


def test_result_loads_with_mlx_lm_generate(manager, tiny_model, chat_data):
    folder = run_to_end(manager, base_config(tiny_model, chat_data, mode="ift", iters=10))
    generate = Path(sys.executable).parent / "mlx_lm.generate"  # the venv's, also when it is not activated
    proc = subprocess.run([str(generate), "--model", str(tiny_model), "--adapter-path", str(folder.path),
                           "--prompt", "the cat", "--max-tokens", "5"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Generation:" in proc.stdout or "tokens-per-sec" in proc.stdout


def test_nan_loss_fails_the_run_with_an_actionable_reason(manager, tiny_model, chat_data, tmp_path):
    import shutil

    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_model, broken)
    weights = mx.load(str(broken / "model.safetensors"))
    weights["model.norm.weight"] = mx.full(weights["model.norm.weight"].shape, float("nan"))
    mx.save_safetensors(str(broken / "model.safetensors"), weights, metadata={"format": "mlx"})
    folder = manager.launch(base_config(broken, chat_data, mode="ift", iters=20))
    info = manager.wait(folder.id, timeout=120)
    assert info["status"] == "failed" and "validation loss of the untrained model is nan" in info["reason"]
    train_only = tmp_path / "train-only"
    train_only.mkdir()
    shutil.copy(chat_data / "train.jsonl", train_only / "train.jsonl")
    folder = manager.launch(base_config(broken, train_only, mode="ift", iters=20, valid_fraction=0.0))
    info = manager.wait(folder.id, timeout=120)
    assert info["status"] == "failed"
    assert "loss became nan at iteration 1" in info["reason"] and "Lower the learning rate" in info["reason"]
    assert folder.checkpoint_iterations() == []  # a NaN state is never saved as a checkpoint


def test_a_batch_with_nothing_to_train_names_max_seq_length_not_the_learning_rate(manager, tiny_model, tmp_path):
    """Plain mlx-lm mode keeps mlx-lm's data handling: prompts longer than the window leave a batch with no
    target (0/0); the reason says so. ForgeLLM modes leave such samples out (tests/test_data.py)."""
    rng = random.Random(2)
    rows = [{"prompt": " ".join(sentence(rng) for _ in range(12)), "completion": sentence(rng)} for _ in range(8)]
    write_jsonl(tmp_path / "long" / "train.jsonl", rows)
    folder = manager.launch(base_config(tiny_model, tmp_path / "long", iters=5, steps_per_eval=100,
                                        mask_prompt=True, max_seq_length=16))
    info = manager.wait(folder.id, timeout=120)
    assert info["status"] == "failed" and "max_seq_length=16" in info["reason"], info["reason"]
    assert "learning rate" not in info["reason"]


def test_run_records_versions_hardware_and_blas(manager, tiny_model, chat_data):
    from services import blas

    folder = run_to_end(manager, base_config(tiny_model, chat_data, iters=2, save_every=2))
    info = folder.info()
    assert {"forgellm", "mlx", "mlx_lm", "python"} <= set(info["versions"])
    assert info["hardware"]["cpus"] >= 1 and info["dataset_fingerprint"] and info["seed"] == 0
    expected = "mkl" if blas._mkl_libs() and sys.platform.startswith("linux") else info["blas"]
    assert info["blas"] == expected


def test_full_fine_tune_with_embeddings_and_grad_checkpoint(manager, tiny_model, cpt_corpus):
    cfg = base_config(tiny_model, cpt_corpus, mode="cpt", fine_tune_type="full", train_embeddings=True,
                      grad_checkpoint=True, learning_rate=1e-4, iters=6, save_every=3, max_seq_length=64)
    folder = run_to_end(manager, cfg)
    saved = mx.load(str(folder.path / "adapters.safetensors"))
    base = mx.load(str(tiny_model / "model.safetensors"))
    assert "model.embed_tokens.weight" in saved and "model.norm.weight" in saved
    assert set(saved) == set(base)  # everything trained, not just the blocks
    assert not mx.array_equal(saved["model.embed_tokens.weight"], base["model.embed_tokens.weight"]).item()
    assert folder.info()["parameters"]["trainable"] == folder.info()["parameters"]["total"]


def test_validation_uses_every_held_out_sequence_even_fewer_than_a_batch(manager, tiny_model, chat_data, tmp_path):
    from mlx_lm.tuner.trainer import evaluate
    from mlx_lm.utils import load

    from services.config import resolve
    from services.training.batching import eval_batches, masked_loss
    from services.training.data import prepare

    data = tmp_path / "three-valid"
    data.mkdir()
    (data / "train.jsonl").write_text((chat_data / "train.jsonl").read_text())
    (data / "valid.jsonl").write_text("".join((chat_data / "valid.jsonl").read_text().splitlines(True)[:3]))
    cfg = base_config(tiny_model, data, mode="ift", iters=4, steps_per_eval=4, save_every=4, val_batches=-1)
    folder = run_to_end(manager, cfg)
    first_val = reports(folder, "val")[0]
    assert first_val["iteration"] == 0
    # the untrained model's validation loss: token-weighted over all three sequences, one at a time
    model, tok = load(str(tiny_model))
    valid = prepare(resolve(cfg), tok).valid
    assert len(valid) == 3
    direct = evaluate(model, valid, batch_size=1, num_batches=-1, max_seq_length=128, loss=masked_loss,
                      iterate_batches=eval_batches)
    assert first_val["val_loss"] == pytest.approx(direct, rel=1e-5)
