"""Padding-free IFT batches: packed rows keep every sample's loss and targets, and a packed run trains like an
unpacked one (real MLX, the tiny model)."""

from __future__ import annotations

import random
from collections import Counter

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_lm.utils import load

from services.config import ConfigProblems, resolve, with_defaults
from services.training import packing
from services.training.batching import collate
from services.training.data import DataError, Sample, prepare
from services.training.folder import history
from services.training.manager import RunManager
from tests.conftest import base_config, chat_row, write_jsonl

WIDTH = 128


@pytest.fixture(scope="module")
def model_and_samples(tiny_model, chat_data):
    model, tokenizer = load(str(tiny_model))
    cfg = resolve(base_config(tiny_model, chat_data, mode="ift", max_seq_length=WIDTH))
    samples = prepare(cfg, tokenizer).train
    return model, tokenizer, samples


def test_rows_hold_every_sample_once_and_fit(model_and_samples):
    _, _, samples = model_and_samples
    lengths = [len(s.tokens) for s in samples] + [WIDTH + 40]  # one longer than a row: truncated, as unpacked
    rows = packing.pack_rows(lengths, WIDTH)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(min(lengths[i], WIDTH) for i in row) <= WIDTH for row in rows)
    assert len(rows) < len(lengths) / 2  # short chats: several per row
    assert rows == packing.pack_rows(lengths, WIDTH)


def test_packed_rows_keep_each_samples_loss_and_targets(model_and_samples):
    """Per sample: summed loss and target count of one packed forward pass = the sample alone = unpadded batches."""
    model, _, samples = model_and_samples
    rows = [[samples[i] for i in row] for row in packing.pack_rows([len(s.tokens) for s in samples], WIDTH)]
    packed = packing.sample_losses(model, rows, WIDTH)
    worst = 0.0
    for row, losses in zip(rows, packed, strict=True):
        assert len(row) > 1 or len(row[0].tokens) > WIDTH // 2
        for s, (total, n) in zip(row, losses, strict=True):
            ref_total, ref_n = packing.alone_loss(model, s, WIDTH)
            assert n == ref_n == sum(s.mask[1:WIDTH])
            assert total == pytest.approx(ref_total, rel=1e-5)
            worst = max(worst, abs(total / n - ref_total / ref_n))
    assert worst < 1e-5
    # the same samples in mlx-lm-style padded batches of 4 (ForgeLLM's unpacked collation)
    flat = [s for row in rows for s in row]
    alone = {id(s): t for row, losses in zip(rows, packed, strict=True) for s, t in zip(row, losses, strict=True)}
    for i in range(0, len(flat) - 3, 4):
        tokens, mask = collate(flat[i : i + 4], WIDTH)
        ce = (nn.losses.cross_entropy(model(tokens[:, :-1]), tokens[:, 1:]) * mask).astype(mx.float32)
        for j, s in enumerate(flat[i : i + 4]):
            total, n = alone[id(s)]
            assert int(mask[j].sum().item()) == n
            assert ce[j].sum().item() / n == pytest.approx(total / n, abs=1e-5)


def test_a_sample_does_not_see_its_row_neighbours(model_and_samples):
    """Changing one sample of a row changes no other sample's logits (without the block mask it would)."""
    model, _, samples = model_and_samples
    row = sorted(samples, key=lambda s: len(s.tokens))[:3]
    width = sum(len(s.tokens) for s in row) + 5
    first = Sample([(t + 7) % 500 for t in row[0].tokens], row[0].mask)
    tokens, _, seg = packing.collate_packed([row, [first, *row[1:]]], width)
    logits = packing.packed_logits(model, tokens[:, :-1], seg)
    later = np.asarray(seg[0]) > 1
    a, b = np.asarray(logits[0])[later], np.asarray(logits[1])[later]
    assert np.array_equal(a, b)
    plain = np.asarray(model(tokens[:, :-1]))  # the model's own causal mask lets later samples see the first
    assert not np.allclose(plain[0][later], plain[1][later], atol=1e-4)


def test_the_model_check_passes_a_llama(model_and_samples):
    model, _, samples = model_and_samples
    assert packing.check_model(model, samples, WIDTH) < 1e-5


def test_too_few_rows_for_a_batch_is_a_clear_error(model_and_samples):
    _, _, samples = model_and_samples
    with pytest.raises(DataError, match=r"pack_samples: .* fill \d+ row\(s\) of max_seq_length=128 .* batch_size=64"):
        packing.PackedSampler(samples, 64, WIDTH)


def test_config_refuses_pack_samples_outside_ift(tiny_model, chat_data):
    for mode, says in (("cpt", "mode: cpt packs its documents with packing: true"), ("dpo", "mode: ift"),
                       (None, "mode: ift")):
        with pytest.raises(ConfigProblems, match="pack_samples") as e:
            resolve(base_config(tiny_model, chat_data, mode=mode, pack_samples=True))
        assert says in str(e.value)
    with pytest.raises(ConfigProblems, match="pack_samples.*one process"):
        resolve(base_config(tiny_model, chat_data, mode="ift", pack_samples=True, distributed={"processes": 2}))
    with pytest.raises(ConfigProblems, match="pack_samples"):
        resolve(base_config(tiny_model, chat_data, mode="ift", pack_samples="yes"))
    assert resolve(base_config(tiny_model, chat_data, mode="ift", pack_samples=True))["pack_samples"] is True
    assert with_defaults({})["pack_samples"] is False


# ----------------------------------------------------------------------------------------- a run in both modes


@pytest.fixture(scope="module")
def equal_chats(tiny_model, tmp_path_factory):
    """Chats that all render to the same length L: packed rows of 4 hold the samples of unpacked batches of 8."""
    _, tokenizer = load(str(tiny_model))
    rng = random.Random(5)
    rows = [chat_row(rng) for _ in range(600)]
    lengths = [len(tokenizer.apply_chat_template(r["messages"])) for r in rows]
    length, count = Counter(lengths).most_common(1)[0]
    assert count >= 48
    same = [r for r, n in zip(rows, lengths, strict=True) if n == length]
    d = tmp_path_factory.mktemp("equal-chats")
    write_jsonl(d / "train.jsonl", same[:40])
    write_jsonl(d / "valid.jsonl", same[40:48])
    return d, length


def _train(manager: RunManager, cfg: dict) -> list[dict]:
    folder = manager.launch(cfg)
    info = manager.wait(folder.id, timeout=300)
    assert info["status"] == "completed", info.get("reason")
    return history(folder.metrics()[0])


def test_a_packed_run_trains_like_the_unpacked_run(tmp_path, tiny_model, equal_chats):
    from services.workspace import Workspace

    data, length = equal_chats
    manager = RunManager(Workspace.resolve(tmp_path / "ws"))
    common = {"mode": "ift", "iters": 12, "steps_per_report": 2, "steps_per_eval": 6, "save_every": 12,
              "max_seq_length": 4 * length, "learning_rate": 1e-3}
    plain = _train(manager, base_config(tiny_model, data, batch_size=8, **common))
    packed = _train(manager, base_config(tiny_model, data, batch_size=2, pack_samples=True, **common))
    for kind, key in (("train", "train_loss"), ("val", "val_loss")):
        a = [r[key] for r in plain if r["type"] == kind]
        b = [r[key] for r in packed if r["type"] == kind]
        assert len(a) == len(b) > 1
        assert np.allclose(a, b, rtol=0, atol=1e-5), (a, b)
        print(kind, "largest difference", max(abs(x - y) for x, y in zip(a, b, strict=True)))
    a_train = [r for r in plain if r["type"] == "train"]
    b_train = [r for r in packed if r["type"] == "train"]
    assert [r["trained_tokens"] for r in a_train] == [r["trained_tokens"] for r in b_train]
    assert all(r["padding_share"] > 0 for r in a_train)  # rows padded to a multiple of 32 (+1)
    assert all(r["padding_share"] == 0 for r in b_train)  # four samples fill each row exactly


def test_a_packed_run_stopped_and_resumed_is_bitwise_identical(manager, tiny_model, chat_data):
    from test_engine import reports, run_to_end, same_end, stop_and_resume

    cfg = base_config(tiny_model, chat_data, mode="ift", pack_samples=True, batch_size=2, iters=60,
                      steps_per_report=5, steps_per_eval=20, save_every=7)
    ref = run_to_end(manager, cfg)
    folder = stop_and_resume(manager, cfg, 12)
    same_end(folder, ref, 60)
    keys = ("iteration", "train_loss", "trained_tokens", "padding_share")
    ours = [tuple(r[k] for k in keys) for r in reports(folder, "train")]
    assert ours == [tuple(r[k] for k in keys) for r in reports(ref, "train")]
    assert all(r[3] is not None and 0 <= r[3] < 0.5 for r in ours)
    assert [r["val_loss"] for r in reports(folder, "val")] == [r["val_loss"] for r in reports(ref, "val")]
