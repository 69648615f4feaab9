"""Data preparation: all-turn masks, CPT packing and splits, replay mixture, and bad input."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from conftest import base_config, chat_row, sentence, write_jsonl

from services.config import resolve
from services.training import data as data_mod
from services.training.data import DataError


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from mlx_lm.utils import load_tokenizer

    return load_tokenizer(tiny_model)


def spans(mask: list[bool]) -> list[tuple[int, int]]:
    out, start = [], None
    for j, m in enumerate([*mask, False]):
        if m and start is None:
            start = j
        elif not m and start is not None:
            out.append((start, j))
            start = None
    return out


def test_every_assistant_token_of_a_three_turn_chat_carries_loss(tokenizer, tiny_model):
    row = chat_row(random.Random(3), turns=3, system=True)
    cfg = resolve(base_config(tiny_model, ".", mode="ift"))
    sample = data_mod.render_row(tokenizer, row, "chat", cfg, "test:1")
    assert sample.tokens == list(tokenizer.apply_chat_template(row["messages"], return_dict=False))
    trained = [tokenizer.decode(sample.tokens[a:b]) for a, b in spans(sample.mask)]
    assistant = [m["content"] for m in row["messages"] if m["role"] == "assistant"]
    # exactly the three assistant turns, each with its end-of-turn marker, and nothing else
    assert trained == [f"{a}<|im_end|>\n" for a in assistant]
    untrained = tokenizer.decode([t for t, m in zip(sample.tokens, sample.mask, strict=True) if not m])
    for m in row["messages"]:
        if m["role"] != "assistant":
            assert m["content"] in untrained


def test_mlx_lm_mask_prompt_trains_only_the_last_turn(tokenizer, tiny_model):
    row = chat_row(random.Random(3), turns=3)
    cfg = resolve(base_config(tiny_model, ".", mode="ift", mask_all_turns=False, mask_prompt=True))
    sample = data_mod.render_row(tokenizer, row, "chat", cfg, "test:1")
    assert len(spans(sample.mask)) == 1
    assert tokenizer.decode(sample.tokens[slice(*spans(sample.mask)[0])]).startswith(row["messages"][-1]["content"])


def test_cpt_trains_every_corpus_token_once_per_epoch_and_splits_by_document(tokenizer, tiny_model, cpt_corpus):
    cfg = resolve(base_config(tiny_model, cpt_corpus, mode="cpt", max_seq_length=32, valid_fraction=0.25))
    prepared = data_mod.prepare(cfg, tokenizer)
    valid_docs = set(prepared.stats["valid_documents"])
    all_docs = data_mod.read_documents(cpt_corpus)
    train_docs = [d for d in all_docs if d.where not in valid_docs]
    assert valid_docs and train_docs and len(valid_docs) + len(train_docs) == len(all_docs)

    # the targets of the packed windows, in order, are exactly the train stream: each token once
    targets = [t for s in prepared.train for t, m in zip(s.tokens, s.mask, strict=True) if m]
    eos = tokenizer.eos_token_id
    stream = [t for d in train_docs for t in [*tokenizer.encode(d.text, add_special_tokens=False), eos]]
    assert sorted(targets) == sorted(stream) and len(targets) == len(stream)
    assert all(len(s.tokens) <= 32 for s in prepared.train)
    # no document is in both splits: the valid stream is made of the held-out documents only
    valid_targets = [t for s in prepared.valid for t, m in zip(s.tokens, s.mask, strict=True) if m]
    held_out = [d for d in all_docs if d.where in valid_docs]
    assert len(valid_targets) == sum(len(tokenizer.encode(d.text, add_special_tokens=False)) + 1 for d in held_out)
    # deterministic by seed, different with another seed
    again = data_mod.prepare(cfg, tokenizer)
    assert again.stats["valid_documents"] == prepared.stats["valid_documents"]
    other = data_mod.prepare({**cfg, "seed": 7}, tokenizer)
    assert other.stats["valid_documents"] != prepared.stats["valid_documents"]


def test_replay_mixture_ratio_holds_within_one_percent(tokenizer, tiny_model, cpt_corpus, tmp_path):
    rng = random.Random(9)
    replay = tmp_path / "general"
    replay.mkdir()
    for i in range(5):
        (replay / f"g{i}.md").write_text(" ".join(f"general text {sentence(rng)}" for _ in range(40)))
    for ratio in (0.1, 0.3):
        cfg = resolve(base_config(tiny_model, cpt_corpus, mode="cpt", max_seq_length=64,
                                  mixture={"data": str(replay), "ratio": ratio}))
        prepared = data_mod.prepare(cfg, tokenizer)
        trained = sum(s.trained for s in prepared.train)
        domain = prepared.stats["train"]["corpus_tokens"]
        assert abs((trained - domain) / trained - ratio) < 0.01
        only_valid = data_mod.prepare(cfg, tokenizer, splits=("valid",))  # what the publisher evaluates on
        assert only_valid.valid == prepared.valid and only_valid.valid and only_valid.train == []


def test_ift_single_file_is_split_without_overlap(tokenizer, tiny_model, tmp_path):
    rng = random.Random(4)
    rows = [chat_row(rng) for _ in range(40)]
    path = write_jsonl(tmp_path / "all.jsonl", rows)
    cfg = resolve(base_config(tiny_model, path, mode="ift", valid_fraction=0.2))
    prepared = data_mod.prepare(cfg, tokenizer)
    assert (len(prepared.train), len(prepared.valid)) == (32, 8)
    assert not {tuple(s.tokens) for s in prepared.train} & {tuple(s.tokens) for s in prepared.valid}
    assert prepared.stats["steps_per_epoch"] == 8
    only_valid = data_mod.prepare(cfg, tokenizer, splits=("valid",))
    assert only_valid.valid == prepared.valid and only_valid.train == []


def test_samples_with_no_trained_token_inside_the_window_are_left_out_and_named(tokenizer, tiny_model, tmp_path):
    rng = random.Random(5)
    rows = [chat_row(rng) for _ in range(12)]
    for i in (3, 7):  # a prompt far longer than the window: the answer starts past max_seq_length
        rows[i]["messages"][0]["content"] = " ".join(sentence(rng) for _ in range(30))
    folder = tmp_path / "chats"
    write_jsonl(folder / "train.jsonl", rows)
    write_jsonl(folder / "valid.jsonl", rows[:4])
    cfg = resolve(base_config(tiny_model, folder, mode="ift", max_seq_length=96))
    prepared = data_mod.prepare(cfg, tokenizer)
    assert len(prepared.train) == 10 and len(prepared.valid) == 3
    assert all(any(s.mask[1:96]) for s in prepared.train + prepared.valid)  # every batch has targets
    train = prepared.stats["train"]
    assert train["left_out"] == 2 and train["left_out_examples"] == [f"{folder / 'train.jsonl'}:{i + 1}"
                                                                      for i in (3, 7)]
    assert prepared.stats["valid"]["left_out"] == 1
    from services.library import checks as dc  # what the Datasets page and `dataset check` warn about

    masks = {k: cfg[k] for k in ("mask_all_turns", "mask_prompt")}
    assert dc.token_stats(dc.check_dataset(folder / "train.jsonl"), tokenizer, 96, masks)["untrainable"] == 2
    from services.training import preflight

    assert preflight.data_facts(cfg, tokenizer)["samples"] == len(prepared.train)  # the estimate counts the same
    with pytest.raises(DataError, match="no training sample has a trained .assistant. token within "
                                        "max_seq_length=8"):
        data_mod.prepare(resolve(base_config(tiny_model, folder, mode="ift", max_seq_length=8)), tokenizer)


# ------------------------------------------------------------------------------------------ bad input


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "a"}\n{"text": "b"}\n{"text": oops}\n')
    with pytest.raises(DataError, match=rf"{path}:3: invalid JSON"):
        data_mod.read_rows(path)
    rows, bad = data_mod.read_jsonl_lenient(path)
    assert len(rows) == 2 and len(bad) == 1


def test_row_problems_name_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
        {"messages": [{"role": "user", "content": "hi"}]},
    ])
    with pytest.raises(DataError, match=rf"{path}:2: no assistant message"):
        data_mod.read_rows(path)
    path = write_jsonl(tmp_path / "r.jsonl", [{"messages": [{"role": "robot", "content": "x"}]}])
    with pytest.raises(DataError, match=rf"{path}:1: messages\[0\] needs a role"):
        data_mod.read_rows(path)


def test_empty_and_too_small_datasets_are_refused(tokenizer, tiny_model, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match="empty file"):
        data_mod.read_rows(empty)
    few = write_jsonl(tmp_path / "few" / "train.jsonl", [chat_row(random.Random(1)) for _ in range(3)])
    cfg = resolve(base_config(tiny_model, few.parent, mode="ift", batch_size=4))
    with pytest.raises(DataError, match="3 sequences, fewer than batch_size=4"):
        data_mod.prepare(cfg, tokenizer)
    with pytest.raises(DataError, match="a CPT jsonl row needs a string 'text' field"):
        data_mod.read_documents(tmp_path / "few")
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "a.txt").write_text("  \n")
    with pytest.raises(DataError, match="no documents found"):
        data_mod.read_documents(tmp_path / "blank")


def test_bad_config_values_name_the_field(manager, tiny_model, chat_data):
    from services.config import ConfigProblems

    cases = {
        "model": dict(model="/nowhere/model"),
        "lr_schedule.name": dict(lr_schedule={"name": "cosine", "arguments": [1e-3, 10]}),
        "learning_rate": dict(learning_rate=-1.0),
        "lora_parameters.rank": dict(lora_parameters={"rank": 0, "scale": 20.0, "dropout": 0.0}),
        "max_seq_length": dict(max_seq_length=100_000),
        "batch_size": dict(batch_size=0),
        "data": dict(data="/nowhere/data"),
        "learning_rat": dict(learning_rat=1e-4),
    }
    for field, over in cases.items():
        with pytest.raises(ConfigProblems) as err:
            manager.create({**base_config(tiny_model, chat_data), **over})
        fields = [e.field for e in err.value.errors]
        assert field in fields, (field, str(err.value))
    assert "exceeds the model's context of 1024" in _message(manager, base_config(tiny_model, chat_data,
                                                                                 max_seq_length=100_000))
    assert not any(manager.workspace.runs.iterdir())  # nothing half-made


def _message(manager, cfg) -> str:
    from services.config import ConfigProblems

    with pytest.raises(ConfigProblems) as err:
        manager.create(cfg)
    return str(err.value)


def test_bad_data_found_by_the_worker_marks_the_run_failed(manager, tiny_model, tmp_path):
    folder = tmp_path / "bad"
    rows = [chat_row(random.Random(2)) for _ in range(8)]
    write_jsonl(folder / "train.jsonl", rows)
    with open(folder / "train.jsonl", "a") as f:
        f.write("{broken\n")
    run = manager.launch(base_config(tiny_model, folder, mode="ift"))
    info = manager.wait(run.id, timeout=120)
    assert info["status"] == "failed"
    assert f"{folder / 'train.jsonl'}:9: invalid JSON" in info["reason"]


def test_epochs_set_the_number_of_iterations(manager, tiny_model, chat_data):
    run = manager.launch(base_config(tiny_model, chat_data, mode="ift", epochs=2, steps_per_eval=100,
                                     save_every=100))
    info = manager.wait(run.id, timeout=120)
    assert info["status"] == "completed"
    assert info["steps_per_epoch"] == 12 and info["iters"] == 24
    stats = (Path(run.path) / "dataset_stats.json").read_text()
    assert '"steps_per_epoch": 12' in stats


def test_a_json_error_says_where_and_what_the_character_is(tmp_path):
    from services.training.data import read_jsonl_lenient

    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "fine"}\n{"text": "a\ttab"}\n{"text": "cut\n')
    rows, bad = read_jsonl_lenient(path)
    assert [n for n, _ in rows] == [1]
    assert bad == [f"{path}:2: invalid JSON at column 12: a raw tab inside a string (write it as \\t)",
                   f"{path}:3: invalid JSON at column 10: Unterminated string"]
