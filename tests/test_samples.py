"""Bundled sample data: well-formed files and an idempotent, atomic install."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
from mlx_lm.tuner.datasets import ChatDataset, load_local_dataset

from services.library import samples
from services.library.samples import SAMPLES_DIR, install_samples
from services.library.tiny_model import build_tiny_model

ROLES = {"system", "user", "assistant"}


def _rows(path: Path) -> list[dict]:
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        assert line.strip(), f"{path.name}:{n} is blank"
        rows.append(json.loads(line))
    return rows


def _check_chat_row(row: dict, where: str) -> int:
    """Validate one chat row; return its number of user turns."""
    assert list(row) == ["messages"], where
    msgs = row["messages"]
    assert isinstance(msgs, list) and msgs, where
    for m in msgs:
        assert set(m) == {"role", "content"}, where
        assert m["role"] in ROLES, where
        assert isinstance(m["content"], str) and m["content"].strip() == m["content"] != "", where
    turns = msgs[1:] if msgs[0]["role"] == "system" else msgs
    expected = ["user", "assistant"] * (len(turns) // 2)
    assert [m["role"] for m in turns] == expected and len(turns) % 2 == 0, f"{where}: roles must alternate"
    return len(turns) // 2


@pytest.mark.parametrize("split, lo, hi", [("train", 44, 52), ("valid", 10, 14)])
def test_ift_jsonl_rows_are_valid_chat(split, lo, hi):
    rows = _rows(SAMPLES_DIR / "ift" / f"{split}.jsonl")
    assert lo <= len(rows) <= hi
    turns = [_check_chat_row(r, f"{split}.jsonl:{i + 1}") for i, r in enumerate(rows)]
    assert max(turns) <= 3
    multi = sum(t > 1 for t in turns)
    assert len(rows) / 4 <= multi <= len(rows) / 2  # about a third are multi-turn
    assert any(r["messages"][0]["role"] == "system" for r in rows)
    assert any(r["messages"][0]["role"] == "user" for r in rows)


def test_ift_rows_do_not_repeat_between_splits():
    first_q = {split: {r["messages"][-2]["content"] for r in _rows(SAMPLES_DIR / "ift" / f"{split}.jsonl")}
               for split in ("train", "valid")}
    assert not first_q["train"] & first_q["valid"]


def test_ift_loads_as_mlx_lm_chat_dataset(tmp_path):
    tok_dir = build_tiny_model(tmp_path / "tiny")
    from mlx_lm import load

    _, tok = load(str(tok_dir))
    cfg = SimpleNamespace(mask_prompt=True, chat_feature="messages")
    train, valid, test = load_local_dataset(SAMPLES_DIR / "ift", tok, cfg)
    assert isinstance(train, ChatDataset) and len(train) == len(_rows(SAMPLES_DIR / "ift" / "train.jsonl"))
    assert len(valid) == len(_rows(SAMPLES_DIR / "ift" / "valid.jsonl")) and len(test) == 0
    for i in range(len(train)):
        tokens, offset = train.process(train[i])
        assert 0 < offset < len(tokens)


def test_cpt_documents():
    docs = sorted(p for p in (SAMPLES_DIR / "cpt").iterdir())
    assert len(docs) == 8
    assert {p.suffix for p in docs} == {".md", ".txt"}
    for p in docs:
        text = p.read_text(encoding="utf-8")
        words = len(re.findall(r"\S+", text))
        assert 300 <= words <= 500, f"{p.name} has {words} words"
        assert "sourdough" in text.lower() or "dough" in text.lower(), p.name


def test_install_copies_and_is_idempotent(tmp_path):
    datasets = tmp_path / "datasets"
    paths = install_samples(datasets)
    assert paths == {"cpt": datasets / "sample-cpt", "ift": datasets / "sample-ift", "dpo": datasets / "sample-dpo"}
    for kind, dst in paths.items():
        src = SAMPLES_DIR / kind
        assert sorted(p.name for p in dst.iterdir()) == sorted(p.name for p in src.iterdir())
        for f in src.iterdir():
            assert (dst / f.name).read_bytes() == f.read_bytes()
    assert sorted(p.name for p in datasets.iterdir()) == ["sample-cpt", "sample-dpo", "sample-ift"]  # no temp

    edited = paths["ift"] / "train.jsonl"
    edited.write_text('{"messages": []}\n')
    (paths["cpt"] / "extra.txt").write_text("mine")
    assert install_samples(datasets) == paths
    assert edited.read_text() == '{"messages": []}\n'  # an existing dataset is never overwritten
    assert (paths["cpt"] / "extra.txt").exists()


def test_install_refills_only_what_is_missing(tmp_path):
    install_samples(tmp_path)
    for f in (tmp_path / "sample-ift").iterdir():
        f.unlink()
    (tmp_path / "sample-ift").rmdir()
    install_samples(tmp_path)
    assert (tmp_path / "sample-ift" / "valid.jsonl").is_file()


def test_install_rejects_a_file_in_the_way(tmp_path):
    (tmp_path / "sample-cpt").write_text("not a folder")
    with pytest.raises(ValueError, match=r"sample-cpt exists and is not a folder"):
        install_samples(tmp_path)


def test_install_failure_leaves_nothing_behind(tmp_path, monkeypatch):
    def broken_copy(src, dst, **kw):
        Path(dst).mkdir()
        (Path(dst) / "half.txt").write_text("x")
        raise OSError("disk full")

    monkeypatch.setattr(samples.shutil, "copytree", broken_copy)
    with pytest.raises(OSError, match="disk full"):
        install_samples(tmp_path / "ds")
    assert list((tmp_path / "ds").iterdir()) == []


def test_missing_sample_folder_is_reported(tmp_path, monkeypatch):
    monkeypatch.setattr(samples, "SAMPLES_DIR", tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="nowhere/cpt is missing"):
        install_samples(tmp_path / "ds")
