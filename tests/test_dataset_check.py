"""Dataset checks: every bad line by file:line, the cleaned copy, token statistics against a direct count, the
mask view of a chat, splits, documents, and ``forgellm dataset check``."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import chat_row, sentence, write_jsonl

from services.library import checks as dc
from services.library.datasets import store_upload
from services.training.data import DataError, read_rows

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tok(tiny_model):
    return dc.load_tokenizer(str(tiny_model))


def bad_file(path: Path, rows: int = 30) -> tuple[Path, list[int]]:
    """A chat jsonl with exactly three malformed lines (5, 12, 20) and a blank line."""
    rng = random.Random(3)
    lines = [json.dumps(chat_row(rng)) for _ in range(rows)]
    lines[4] = '{"messages": [{"role": "user", "content": "unterminated'
    lines[11] = json.dumps({"messages": [{"role": "user", "content": "no answer"}]})
    lines[19] = json.dumps({"messages": [{"role": "narrator", "content": "x"}, {"role": "assistant", "content": "y"}]})
    lines.insert(25, "")
    path.write_text("\n".join(lines) + "\n")
    return path, [5, 12, 20]


def test_three_malformed_lines_reported_and_the_rest_usable(tmp_path, workspace):
    src, lines = bad_file(tmp_path / "bad.jsonl")
    uploaded = store_upload(workspace, "bad.jsonl", src.read_bytes(), max_bytes=10_000_000)
    check = dc.check_dataset(uploaded)
    assert check.fmt == "chat" and check.good == 27
    assert [b.split(": ", 1)[0] for b in check.bad] == [f"{uploaded}:{n}" for n in lines]
    assert "invalid JSON" in check.bad[0] and "no assistant message" in check.bad[1] and "role" in check.bad[2]
    original = uploaded.read_bytes()
    clean = dc.write_clean_copy(check)
    assert clean == workspace.datasets / "bad-clean.jsonl" and uploaded.read_bytes() == original
    fmt, rows = read_rows(clean)  # what training reads: every row valid
    assert fmt == "chat" and len(rows) == 27
    assert not dc.check_dataset(clean).bad
    with pytest.raises(DataError, match="no bad lines"):
        dc.write_clean_copy(dc.check_dataset(clean))


def test_bad_lines_in_every_split_and_non_utf8(tmp_path):
    d = tmp_path / "set"
    rng = random.Random(0)
    write_jsonl(d / "train.jsonl", [chat_row(rng) for _ in range(6)])
    (d / "valid.jsonl").write_bytes(json.dumps(chat_row(rng)).encode() + b"\n" + b'{"text": "\xff\xfe"}\n'
                                    + json.dumps({"prompt": "a", "completion": "b"}).encode() + b"\n")
    check = dc.check_dataset(d)
    assert check.layout == "splits" and check.good == 7
    assert [(f.name, f.good) for f in check.files] == [("train", 6), ("valid", 1)]
    assert [b.split(": ", 1)[0] for b in check.bad] == [f"{d}/valid.jsonl:2", f"{d}/valid.jsonl:3"]
    assert "not UTF-8" in check.bad[0] and "expected a chat row" in check.bad[1]
    clean = dc.write_clean_copy(check)
    assert clean.name == "set-clean" and dc.check_dataset(clean).good == 7 and not dc.check_dataset(clean).bad


def test_tools_rows_and_bad_tools(tmp_path):
    rng = random.Random(0)
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    rows = [{**chat_row(rng), "tools": tools} for _ in range(3)] + [{**chat_row(rng), "tools": "f"}]
    check = dc.check_dataset(write_jsonl(tmp_path / "t.jsonl", rows))
    assert check.label == "chat rows with tools" and check.good == 3
    assert check.bad == [f"{tmp_path}/t.jsonl:4: 'tools' must be a list of function definitions (JSON objects)"]


def test_token_stats_equal_a_direct_count(tmp_path, tok, cpt_corpus):
    rng = random.Random(1)
    rows = [chat_row(rng, turns=rng.randint(1, 3), system=True) for _ in range(20)]
    rows += [rows[0]]  # one exact duplicate
    check = dc.check_dataset(write_jsonl(tmp_path / "c.jsonl", rows))
    st = dc.token_stats(check, tok, max_seq_length=64)
    direct = [len(tok.apply_chat_template(r["messages"], return_dict=False)) for r in rows]
    assert st["samples"] == len(rows) and st["tokens"] == sum(direct)
    assert (st["min"], st["max"]) == (min(direct), max(direct))
    assert st["truncated_samples"] == sum(n > 64 for n in direct)
    assert st["truncated_tokens"] == sum(max(n - 64, 0) for n in direct)
    assert st["duplicates"] == 1 and sum(c for _, _, c in st["histogram"]) == len(rows)
    text_rows = [{"text": sentence(rng)} for _ in range(5)]
    st = dc.token_stats(dc.check_dataset(write_jsonl(tmp_path / "t.jsonl", text_rows)), tok, 64)
    assert st["tokens"] == sum(len(tok.encode(r["text"], add_special_tokens=False)) + 1 for r in text_rows)  # + EOS
    docs = dc.check_dataset(cpt_corpus)
    st = dc.token_stats(docs, tok, 64)
    texts = [p.read_text() for p in sorted(cpt_corpus.glob("*.txt"))]
    assert docs.fmt == "documents" and st["tokens"] == sum(len(tok.encode(t, add_special_tokens=False)) for t in texts)
    assert st["windows"] > 0 and st["truncated_samples"] == 0


def test_mask_view_of_a_three_turn_chat_highlights_exactly_the_assistant_tokens(tok):
    rng = random.Random(7)
    row = chat_row(rng, turns=3, system=True)
    view = dc.what_the_model_sees(tok, row, "chat", max_seq_length=4096)
    runs, current = [], []
    for t in view["tokens"]:
        if t["state"] == "trained":
            current.append(t["id"])
        elif current:
            runs.append(current)
            current = []
    runs += [current] if current else []
    answers = [m["content"] for m in row["messages"] if m["role"] == "assistant"]
    assert [tok.decode(r) for r in runs] == [f"{a}<|im_end|>\n" for a in answers]
    assert view["trained"] == sum(len(r) for r in runs) and view["truncated_at"] is None
    masked = tok.decode([t["id"] for t in view["tokens"] if t["state"] == "masked"])
    for m in row["messages"]:
        if m["role"] != "assistant":
            assert m["content"] in masked
    last_only = dc.what_the_model_sees(tok, row, "chat", 4096, cfg={"mask_all_turns": False, "mask_prompt": True})
    assert last_only["trained"] == len(runs[-1])
    cut = dc.what_the_model_sees(tok, row, "chat", max_seq_length=20)
    assert cut["truncated_at"] == 20 and {t["state"] for t in cut["tokens"][20:]} == {"cut"}
    assert cut["trained"] == sum(t["state"] == "trained" for t in cut["tokens"][:20])


def test_preview_pages(tmp_path):
    rng = random.Random(0)
    check = dc.check_dataset(write_jsonl(tmp_path / "p.jsonl", [chat_row(rng) for _ in range(23)]))
    rows, total = dc.preview(check, page=3, size=10)
    assert total == 23 and [r["index"] for r in rows] == [20, 21, 22] and rows[0]["line"] == 21
    assert rows[0]["summary"].startswith("user: the ")


def test_split_writes_train_and_valid(tmp_path, cpt_corpus):
    src, _ = bad_file(tmp_path / "s.jsonl")
    check = dc.check_dataset(src)
    out = dc.make_split(check, valid_fraction=0.2, seed=1)
    train, valid = (out / "train.jsonl").read_text().splitlines(), (out / "valid.jsonl").read_text().splitlines()
    assert out.name == "s-split" and (len(train), len(valid)) == (22, 5)
    good = {ln for ln in src.read_text().splitlines() if ln.strip()}
    assert set(train) | set(valid) <= good and not set(train) & set(valid)
    assert dc.check_dataset(out).layout == "splits"
    with pytest.raises(DataError, match="already split"):
        dc.make_split(dc.check_dataset(out))
    docs = dc.make_split(dc.check_dataset(cpt_corpus), 0.25)
    assert len((docs / "valid.jsonl").read_text().splitlines()) == 3
    assert dc.check_dataset(docs).fmt == "text"


def test_documents_folder_reports_bad_documents(tmp_path):
    d = tmp_path / "docs"
    d.mkdir()
    (d / "a.txt").write_text("the cat eats an apple.")
    (d / "b.md").write_bytes(b"caf\xe9")
    (d / "c.txt").write_text("  \n")
    check = dc.check_dataset(d)
    assert check.fmt == "documents" and check.good == 1
    assert [f.good for f in check.files] == [1, 0, 0]
    assert check.bad == [f"{d}/b.md: not UTF-8 text (unexpected end of data at byte 3)",
                         f"{d}/c.txt: empty document"]
    clean = dc.write_clean_copy(check)
    assert sorted(p.name for p in clean.iterdir()) == ["a.txt"]


def test_cli_dataset_check(tmp_path, tiny_model):
    src, lines = bad_file(tmp_path / "cli.jsonl")
    proc = subprocess.run([sys.executable, "-m", "app.cli", "--workspace", str(tmp_path / "ws"), "dataset", "check",
                           str(src), "--model", str(tiny_model), "--max-seq-length", "64"],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 1, proc.stderr
    out = proc.stdout
    assert "chat rows (file), 27 usable samples, 3 bad" in out and "tokens: " in out and "truncated at 64" in out
    assert [ln.split(": ", 1)[0] for ln in out.splitlines() if ln.startswith(str(src))] == \
        [str(src)] + [f"{src}:{n}" for n in lines]
