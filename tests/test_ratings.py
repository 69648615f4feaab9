"""Blind ratings from the Playground: which side was shown where, ties and "both bad" counted but not trained on,
one dataset per session, the rated checkpoint."""

from __future__ import annotations

import json

import pytest

from services.library.datasets import (
    RATINGS_FILE,
    LibraryError,
    list_datasets,
    rated_checkpoint,
    rating_tally,
    ratings,
    record_rating,
    session_dataset_name,
    suggested_dataset,
)
from services.training.preference import check_pair_row


def shown(a: str | None, b: str | None, ta: str = "answer a", tb: str = "answer b") -> dict:
    return {"A": {"target": a, "label": a or "base", "text": ta}, "B": {"target": b, "label": b or "base", "text": tb}}


def test_ratings_record_sides_and_keep_ties_out_of_training(workspace):
    name = session_dataset_name(0)
    assert name.startswith("ratings-19")
    ck = "/runs/r1/checkpoints/0000010"
    sampling = {"temperature": 0.0, "max_tokens": 12}
    folder = record_rating(workspace, name, "q1", shown(None, ck, "base says", "ckpt says"), "B", "/m/tiny", sampling)
    record_rating(workspace, name, "q2", shown(ck, None, "good", "bad"), "A", "/m/tiny", sampling)
    record_rating(workspace, name, "q3", shown(ck, None), "tie", "/m/tiny", sampling)
    record_rating(workspace, name, "q4", shown(None, ck), "both_bad", "/m/tiny", sampling)
    assert folder == workspace.datasets / name
    pairs = [json.loads(x) for x in (folder / "train.jsonl").read_text().splitlines()]
    assert pairs == [{"prompt": "q1", "chosen": "ckpt says", "rejected": "base says"},
                     {"prompt": "q2", "chosen": "good", "rejected": "bad"}]  # the tie and "both bad" are left out
    for i, row in enumerate(pairs):
        check_pair_row(row, f"train.jsonl:{i + 1}")
    recs = ratings(workspace, name)
    assert [r["verdict"] for r in recs] == ["B", "A", "tie", "both_bad"]
    assert recs[0]["shown"]["A"]["target"] is None and recs[0]["shown"]["B"]["target"] == ck
    assert recs[0]["model"] == "/m/tiny" and recs[0]["sampling"] == sampling
    assert rating_tally(recs) == {"pairs": 2, "ties": 1, "both_bad": 1, "ratings": 4}
    assert rated_checkpoint(recs) == ck
    # the session's dataset is a preference dataset (the ratings log is no split), suggested for DPO
    entry = next(d for d in list_datasets(workspace) if d["key"] == name)
    assert entry["format"] == "preference (train)" and (folder / RATINGS_FILE).is_file()
    assert suggested_dataset(list_datasets(workspace), "dpo") == name


def test_rated_checkpoint_is_the_one_shown_most_and_bad_input_writes_nothing(workspace):
    a, b = "/runs/r/checkpoints/0000010", "/runs/r/checkpoints/0000020"
    recs = [{"shown": shown(a, b), "verdict": "B"}, {"shown": shown(b, None)}, {"shown": shown(None, a)}]
    assert rated_checkpoint(recs) == b  # shown twice each: the one chosen more often
    assert rated_checkpoint(recs[:2]) == b  # shown most often
    assert rated_checkpoint([{**recs[0], "verdict": "tie"}, *recs[1:]]) == a  # then the one rated last
    assert rated_checkpoint([{"shown": shown(None, None)}]) is None and rated_checkpoint([]) is None
    assert ratings(workspace, "never-rated") == [] and ratings(workspace, "../x") == []
    with pytest.raises(LibraryError, match="verdict"):
        record_rating(workspace, "s", "q", shown(None, a), "maybe")
    with pytest.raises(LibraryError, match="sides A and B"):
        record_rating(workspace, "s", "q", {"A": shown(None, a)["A"]}, "A")
    with pytest.raises(LibraryError, match="dataset name"):
        record_rating(workspace, "../escape", "q", shown(None, a), "tie")
    with pytest.raises(LibraryError, match="chosen"):
        record_rating(workspace, "s", "q", shown(None, a, " ", "x"), "A")
    assert not (workspace.datasets / "s" / RATINGS_FILE).exists()
