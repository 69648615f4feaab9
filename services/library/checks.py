"""Check a dataset line by line, write a cleaned copy, preview it, count its tokens, split it, and show
what the model sees of one sample (tokens, loss mask, truncation).

Formats follow :mod:`services.training.data` (the training pipeline): a ``.jsonl`` file or a folder with
``train/valid/test.jsonl`` holds text, completions, chat rows (chat rows may carry ``tools``) or preference
pairs (rendered by :mod:`services.training.preference`, as DPO/ORPO runs render them); any other
folder, or a ``.txt``/``.md`` file, holds raw documents for continued pre-training. Every problem is
reported as ``file:line: reason`` (``file: reason`` for a whole document).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import threading
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from services.library.datasets import unique_path
from services.training.data import (
    CPT_SUFFIXES,
    DataError,
    Document,
    check_row,
    encode_text,
    read_jsonl_lenient,
    render_row,
    row_format,
    split_files,
)
from services.training.preference import SIDES, answer_mask, pair_stats, render_pair, render_split
from services.workspace import staged, write_atomic

FORMATS = {"text": "text rows", "completions": "prompt/completion rows", "chat": "chat rows",
           "tools": "chat rows with tools", "documents": "raw text documents (CPT)",
           "preference": "preference pairs (DPO/ORPO)"}
RUN_CFG: dict[str, Any] = {"mask_all_turns": True}  # what a ForgeLLM IFT run does by default
MAX_SHOWN_TOKENS = 1500


@dataclass
class FileCheck:
    """One file of a dataset: its good rows (or document), and every bad line."""

    path: Path
    name: str  # split name (train/valid/test) or the path relative to the dataset
    kind: str  # "jsonl" or "document"
    rows: list[tuple[int, dict]] = field(default_factory=list)
    bad: list[str] = field(default_factory=list)
    bad_lines: list[int] = field(default_factory=list)  # 0: the whole file
    document: Document | None = None

    @property
    def good(self) -> int:
        """Usable samples: the good rows, or 1 for a usable document."""
        return len(self.rows) if self.kind == "jsonl" else int(self.document is not None)


@dataclass
class DatasetCheck:
    path: Path
    layout: str  # "file" (one jsonl), "splits" (train/valid/test.jsonl) or "documents"
    fmt: str  # text | completions | chat | documents (the pipeline's format)
    files: list[FileCheck]
    tools: bool = False

    @property
    def label(self) -> str:
        return FORMATS["tools" if self.tools else self.fmt]

    @property
    def bad(self) -> list[str]:
        return [b for f in self.files for b in f.bad]

    @property
    def good(self) -> int:
        return sum(f.good for f in self.files)

    def samples(self) -> list[tuple[str, str, int, Any]]:
        """``(where, file name, line, row or Document)`` of every usable sample, in file order."""
        out: list[tuple[str, str, int, Any]] = []
        for f in self.files:
            if f.kind == "jsonl":
                out.extend((f"{f.path}:{n}", f.name, n, row) for n, row in f.rows)
            elif f.document is not None:
                out.append((str(f.path), f.name, 0, f.document))
        return out

    def summary(self) -> dict[str, Any]:
        return {"path": str(self.path), "layout": self.layout, "format": self.fmt, "label": self.label,
                "files": {f.name: {"good": f.good, "bad": len(f.bad)} for f in self.files},
                "samples": self.good, "bad_lines": len(self.bad)}


# ----------------------------------------------------------------------------------------- checking


def _line_of(message: str, path: Path) -> int:
    rest = message[len(str(path)):]
    if rest.startswith(":"):
        head = rest[1:].split(":", 1)[0]
        if head.isdigit():
            return int(head)
    return 0


def _majority_format(rows: list[tuple[int, dict]], cfg: dict[str, Any] | None) -> str | None:
    counts = Counter(f for f in (row_format(r, cfg) for _, r in rows) if f)
    return counts.most_common(1)[0][0] if counts else None


def check_jsonl(path: Path, name: str, fmt: str | None = None, cfg: dict[str, Any] | None = None
                ) -> tuple[FileCheck, str | None]:
    """Every line of a jsonl file checked as ``fmt`` rows (default: the most common row format in the file)."""
    rows, bad = read_jsonl_lenient(path)
    fmt = fmt or _majority_format(rows, cfg)
    fc = FileCheck(path, name, "jsonl")
    for n, row in rows:
        where = f"{path}:{n}"
        try:
            if fmt is None:
                raise DataError(f"{where}: unknown row format with keys {sorted(row)}; use {{'messages': [...]}}, "
                                "{'prompt', 'completion'} or {'text'}")
            check_row(row, fmt, where, cfg)
            tools = row.get("tools")
            if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
                raise DataError(f"{where}: 'tools' must be a list of function definitions (JSON objects)")
        except DataError as e:
            bad.append(str(e))
            continue
        fc.rows.append((n, row))
    fc.bad = sorted(bad, key=lambda b: _line_of(b, path))
    fc.bad_lines = sorted(_line_of(b, path) for b in bad)
    return fc, fmt


def check_document(path: Path, name: str) -> FileCheck:
    fc = FileCheck(path, name, "document")
    try:
        text = path.read_text(encoding="utf-8-sig")  # as training reads it: a BOM is not part of the text
    except UnicodeDecodeError as e:
        fc.bad, fc.bad_lines = [f"{path}: not UTF-8 text ({e.reason} at byte {e.start})"], [0]
        return fc
    if not text.strip():
        fc.bad, fc.bad_lines = [f"{path}: empty document"], [0]
    else:
        fc.document = Document(str(path), text)
    return fc


def check_dataset(path: str | os.PathLike, cfg: dict[str, Any] | None = None) -> DatasetCheck:
    """Detect the layout and format of a dataset and check every line; raises :class:`DataError` if unusable."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            fc, fmt = check_jsonl(path, path.name, cfg=cfg)
            if fmt is None:
                raise DataError(f"{path}: no line is a text, completions or chat row" + (
                    f" (first problem: {fc.bad[0]})" if fc.bad else " (empty file)"))
            return DatasetCheck(path, "file", fmt, [fc], tools=any("tools" in r for _, r in fc.rows))
        if suffix in (".txt", ".md"):
            return DatasetCheck(path, "documents", "documents", [check_document(path, path.name)])
        raise DataError(f"{path}: unsupported file type; use .jsonl, .txt, .md or a folder of them")
    splits = split_files(path)
    if splits:
        if "train" not in splits:
            raise DataError(f"{path}: has {', '.join(p.name for p in splits.values())} but no train.jsonl")
        train, fmt = check_jsonl(splits["train"], "train", cfg=cfg)
        if fmt is None:
            raise DataError(f"{splits['train']}: no line is a text, completions or chat row")
        files = [train] + [check_jsonl(p, s, fmt, cfg)[0] for s, p in splits.items() if s != "train"]
        return DatasetCheck(path, "splits", fmt, files, tools=any("tools" in r for f in files for _, r in f.rows))
    docs = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in CPT_SUFFIXES
                  and not any(part.startswith(".") for part in p.relative_to(path).parts))
    if not docs:
        raise DataError(f"{path}: no .jsonl, .txt or .md files in this folder")
    files = [check_jsonl(p, str(p.relative_to(path)), "text", cfg)[0] if p.suffix.lower() == ".jsonl"
             else check_document(p, str(p.relative_to(path))) for p in docs]
    return DatasetCheck(path, "documents", "documents", files)


# ----------------------------------------------------------------------------------------- writing


def _kept_lines(fc: FileCheck) -> bytes:
    bad = set(fc.bad_lines)
    with fc.path.open("rb") as fh:
        return b"".join(line if line.endswith(b"\n") else line + b"\n"
                        for n, line in enumerate(fh, 1) if n not in bad and line.strip())


def write_clean_copy(check: DatasetCheck) -> Path:
    """A copy without the bad lines (and bad documents) next to the original, written atomically.

    ``data.jsonl`` → ``data-clean.jsonl``; a folder ``set`` → ``set-clean/``. The original is not touched.
    """
    if not check.bad:
        raise DataError(f"{check.path}: no bad lines to drop")
    if check.good == 0:
        raise DataError(f"{check.path}: every line is bad; nothing would be left")
    src = check.path
    if src.is_file():
        target = unique_path(src.parent, f"{src.stem}-clean{src.suffix}")
        write_atomic(target, _kept_lines(check.files[0]))
        return target
    target = unique_path(src.parent, f"{src.name}-clean")
    by_path = {f.path: f for f in check.files}
    with staged(target) as tmp:
        for p in sorted(src.rglob("*")):
            if not p.is_file():
                continue
            out = tmp / p.relative_to(src)
            out.parent.mkdir(parents=True, exist_ok=True)
            fc = by_path.get(p)
            if fc is None:
                shutil.copy2(p, out)
            elif fc.kind == "jsonl":
                out.write_bytes(_kept_lines(fc))
            elif fc.document is not None:
                shutil.copy2(p, out)
    return target


def make_split(check: DatasetCheck, valid_fraction: float = 0.1, seed: int = 0, target: Path | None = None) -> Path:
    """Write ``train.jsonl``/``valid.jsonl`` (good samples only, shuffled with ``seed``) into a new folder.

    Rows keep their original text; documents become ``{"text": ...}`` rows. Default target: ``NAME-split``.
    """
    import numpy as np  # noqa: PLC0415

    if check.layout == "splits":
        raise DataError(f"{check.path}: already split into {', '.join(f.name for f in check.files)}")
    if not 0 < valid_fraction < 1:
        raise DataError(f"valid_fraction = {valid_fraction}: must be between 0 and 1")
    lines: list[bytes] = []
    for f in check.files:
        if f.kind == "jsonl":
            good = {n for n, _ in f.rows}
            with f.path.open("rb") as fh:
                lines += [ln.rstrip(b"\r\n") + b"\n" for n, ln in enumerate(fh, 1) if n in good]
        elif f.document is not None:
            lines.append((json.dumps({"text": f.document.text}, ensure_ascii=False) + "\n").encode())
    if len(lines) < 2:
        raise DataError(f"{check.path}: {len(lines)} usable sample(s); a split needs at least 2")
    order = np.random.RandomState(seed).permutation(len(lines))
    n_valid = min(max(1, round(len(lines) * valid_fraction)), len(lines) - 1)
    valid_idx = set(order[:n_valid].tolist())
    src = check.path
    target = target or unique_path(src.parent, f"{src.stem if src.is_file() else src.name}-split")
    if target.exists():
        raise DataError(f"{target}: already exists")
    with staged(target) as tmp:
        tmp.mkdir()
        (tmp / "train.jsonl").write_bytes(b"".join(ln for i, ln in enumerate(lines) if i not in valid_idx))
        (tmp / "valid.jsonl").write_bytes(b"".join(ln for i, ln in enumerate(lines) if i in valid_idx))
    return target


# ----------------------------------------------------------------------------------------- preview


def _clip(text: str, n: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 1] + "…"


def summarize(sample: Any, fmt: str, width: int = 160) -> str:
    """One line describing a row or document."""
    if isinstance(sample, Document):
        return f"{len(sample.text):,} chars: {_clip(sample.text, width)}"
    if fmt == "chat":
        msgs = sample.get("messages") or []
        tools = f"[{len(sample['tools'])} tools] " if isinstance(sample.get("tools"), list) else ""
        turns = " | ".join(f"{m.get('role')}: {_clip(m.get('content') or '', 60)}" for m in msgs)
        return _clip(tools + turns, width * 2)
    if fmt == "completions":
        return f"{_clip(sample.get('prompt', ''), width // 2)} → {_clip(sample.get('completion', ''), width // 2)}"
    if fmt == "preference":
        prompt = sample.get("prompt")
        text = prompt if isinstance(prompt, str) else " | ".join(str(m.get("content", "")) for m in prompt or []
                                                                 if isinstance(m, dict))
        return (f"{_clip(text, width // 3)} ✓ {_clip(str(sample.get('chosen', '')), width // 3)} "
                f"✗ {_clip(str(sample.get('rejected', '')), width // 3)}")
    return _clip(sample.get("text", ""), width)


def preview(check: DatasetCheck, page: int = 1, size: int = 10) -> tuple[list[dict[str, Any]], int]:
    """One page (1-based) of usable samples as table rows, and the total number of samples."""
    samples = check.samples()
    start = max(page - 1, 0) * size
    rows = [{"index": start + i, "file": name, "line": line or "", "summary": summarize(s, check.fmt)}
            for i, (_, name, line, s) in enumerate(samples[start:start + size])]
    return rows, len(samples)


# ----------------------------------------------------------------------------------------- tokens


_TOKENIZER_LOCK = threading.Lock()


def load_tokenizer(model_path: str) -> Any:
    """The model's Hugging Face tokenizer (what mlx-lm wraps); no MLX import, cached per folder. One thread at a
    time: transformers' lazy first import is not thread-safe (a page's estimate and its fit run side by side)."""
    with _TOKENIZER_LOCK:
        return _load_tokenizer(model_path)


@lru_cache(maxsize=4)
def _load_tokenizer(model_path: str) -> Any:
    from transformers import AutoTokenizer  # noqa: PLC0415

    try:
        return AutoTokenizer.from_pretrained(model_path)
    except (OSError, ValueError) as e:
        raise DataError(f"{model_path}: cannot load the tokenizer ({e})") from None


def render(tokenizer: Any, sample: Any, fmt: str, where: str, cfg: dict[str, Any] | None = None) -> tuple[list, list]:
    """``(tokens, loss mask)`` of one sample as a run renders it (documents: plain tokens, all trained)."""
    if isinstance(sample, Document):
        toks = encode_text(tokenizer, sample.text)
        return toks, [True] * len(toks)
    s = render_row(tokenizer, sample, fmt, {**RUN_CFG, **(cfg or {})}, where)
    return s.tokens, s.mask


def _histogram(lengths: list[int], bins: int) -> list[tuple[int, int, int]]:
    if not lengths:
        return []
    top = max(lengths)
    raw = max(top / bins, 1)
    mag = 10 ** math.floor(math.log10(raw))
    width = next(int(m * mag) for m in (1, 2, 2.5, 5, 10) if m * mag >= raw) or 1
    counts = Counter(n // width for n in lengths)
    return [(b * width, (b + 1) * width, counts.get(b, 0)) for b in range(min(lengths) // width, top // width + 1)]


def _lengths_summary(lengths: list[int], bins: int) -> dict[str, Any]:
    srt = sorted(lengths)
    pct = (lambda q: srt[min(int(q * len(srt)), len(srt) - 1)]) if srt else (lambda q: 0)
    return {"min": srt[0] if srt else 0, "max": srt[-1] if srt else 0,
            "mean": round(sum(srt) / len(srt), 1) if srt else 0, "p50": pct(0.5), "p95": pct(0.95),
            "histogram": _histogram(lengths, bins)}


def _digest(sample: Any) -> bytes:
    key = sample.text if isinstance(sample, Document) else json.dumps(sample, sort_keys=True)
    return hashlib.sha1(key.encode()).digest()


def token_stats(check: DatasetCheck, tokenizer: Any, max_seq_length: int, cfg: dict[str, Any] | None = None,
                bins: int = 20) -> dict[str, Any]:
    """Samples, tokens (as the run renders them), trained tokens, length spread and histogram, truncation at
    ``max_seq_length`` and exact duplicates. Documents are packed in CPT, so they report windows instead;
    preference pairs add their pair statistics (see :func:`pair_token_stats`)."""
    if check.fmt == "preference":
        return pair_token_stats(check, tokenizer, max_seq_length, bins)
    lengths: list[int] = []
    trained, errors, seen, dups, untrainable = 0, [], set(), 0, 0
    for where, _, _, sample in check.samples():
        digest = _digest(sample)
        if digest in seen:
            dups += 1
        seen.add(digest)
        try:
            toks, mask = render(tokenizer, sample, check.fmt, where, cfg)
        except DataError as e:
            errors.append(str(e))
            continue
        lengths.append(len(toks))
        trained += sum(mask[:max_seq_length]) if check.fmt != "documents" else len(toks)
        untrainable += check.fmt != "documents" and not any(mask[1:max_seq_length])  # a run leaves these out
    out: dict[str, Any] = {
        "samples": len(lengths), "tokens": sum(lengths), "trained_tokens": trained, **_lengths_summary(lengths, bins),
        "duplicates": dups, "untrainable": untrainable, "max_seq_length": max_seq_length, "errors": errors,
    }
    if check.fmt == "documents":  # bos d1 eos d2 eos … cut into windows overlapping by one token
        stream = 1 + sum(n + 1 for n in lengths)
        out["windows"] = math.ceil((stream - 1) / max(max_seq_length - 1, 1)) if lengths else 0
        out["truncated_samples"] = out["truncated_tokens"] = 0
    else:
        out["truncated_samples"] = sum(n > max_seq_length for n in lengths)
        out["truncated_tokens"] = sum(max(n - max_seq_length, 0) for n in lengths)
    return out


def pair_token_stats(check: DatasetCheck, tokenizer: Any, max_seq_length: int, bins: int = 20) -> dict[str, Any]:
    """:func:`token_stats` of preference pairs, rendered as a DPO/ORPO run renders them: lengths are each pair's
    longer side (its batch width), ``untrainable`` the rows a run leaves out (``left_out``: ``file:line: why``),
    and ``pairs`` the pair statistics (answer lengths of each side, the share where chosen is longer)."""
    pairs, left_out, errors, seen, dups = [], [], [], set(), 0
    for where, _, _, row in check.samples():
        digest = _digest(row)
        dups += digest in seen
        seen.add(digest)
        try:
            kept, left = render_split(tokenizer, [(where, row)], max_seq_length)
        except DataError as e:
            errors.append(str(e))
            continue
        pairs += kept
        left_out += left
    lengths = [max(len(p.chosen), len(p.rejected)) for p in pairs]
    return {"samples": len(pairs) + len(left_out), "tokens": sum(len(p.chosen) + len(p.rejected) for p in pairs),
            "trained_tokens": sum(sum(answer_mask(p, side)[:max_seq_length]) for p in pairs for side in SIDES),
            **_lengths_summary(lengths, bins), "duplicates": dups, "untrainable": len(left_out),
            "left_out": left_out, "max_seq_length": max_seq_length, "errors": errors,
            "truncated_samples": sum(n > max_seq_length for n in lengths),
            "truncated_tokens": sum(max(n - max_seq_length, 0) for n in lengths),
            "pairs": pair_stats(pairs, max_seq_length)}


def what_the_model_sees(tokenizer: Any, sample: Any, fmt: str, max_seq_length: int, where: str = "sample",
                        cfg: dict[str, Any] | None = None, limit: int = MAX_SHOWN_TOKENS) -> dict[str, Any]:
    """One sample rendered as the run renders it: every token's text and state.

    States: ``trained`` (a loss target), ``masked`` (context only) and ``cut`` (beyond ``max_seq_length``;
    for documents, where the next packed window starts). At most ``limit`` tokens are returned. A preference
    pair gives ``{"chosen": view, "rejected": view}``, each side as :func:`pair_view` renders it.
    """
    if fmt == "preference":
        return pair_view(tokenizer, sample, max_seq_length, where, limit)
    toks, mask = render(tokenizer, sample, fmt, where, cfg)
    return _token_view(tokenizer, toks, mask, max_seq_length, isinstance(sample, Document), limit)


def pair_view(tokenizer: Any, row: dict, max_seq_length: int, where: str = "sample",
              limit: int = MAX_SHOWN_TOKENS) -> dict[str, Any]:
    """Both sides of a preference pair as a DPO/ORPO run sees them: prompt (masked), answer (trained), cut."""
    pair = render_pair(tokenizer, row, where)
    return {side: _token_view(tokenizer, getattr(pair, side), answer_mask(pair, side), max_seq_length, False, limit)
            for side in SIDES}


def _token_view(tokenizer: Any, toks: list[int], mask: list[bool], max_seq_length: int, doc: bool, limit: int
                ) -> dict[str, Any]:
    out = []
    for i, (t, m) in enumerate(zip(toks[:limit], mask[:limit], strict=True)):
        state = "cut" if not doc and i >= max_seq_length else ("trained" if m else "masked")
        out.append({"i": i, "id": int(t), "text": tokenizer.decode([t]), "state": state})
    return {"tokens": out, "total": len(toks), "shown": len(out), "trained": sum(mask[:max_seq_length]),
            "truncated_at": max_seq_length if not doc and len(toks) > max_seq_length else None,
            "windows_at": list(range(max_seq_length - 1, len(toks), max_seq_length - 1)) if doc else []}
