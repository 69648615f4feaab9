"""Read, check and prepare training data for CPT and IFT runs.

Every problem is reported as ``file:line: reason``. Prepared samples are ``Sample(tokens, mask)``
where ``mask[j]`` says whether token ``j`` is a loss target (``mask[0]`` is always False).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from services.errors import ForgeError, json_problem

TEXT_SUFFIXES = (".txt", ".md")
CPT_SUFFIXES = (".txt", ".md", ".jsonl")
ROLES = {"system", "user", "assistant", "tool"}
SPLITS = ("train", "valid", "test")


class DataError(ForgeError, ValueError):
    """Bad training data; the message starts with ``file:line`` (or the file) where the problem is."""


@dataclass
class Sample:
    tokens: list[int]
    mask: list[bool]

    @property
    def trained(self) -> int:
        return int(np.count_nonzero(self.mask))


@dataclass
class Document:
    where: str  # "file" or "file:line"
    text: str


@dataclass
class Prepared:
    """Tokenized splits and their statistics."""

    train: list[Sample]
    valid: list[Sample]
    test: list[Sample] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------- reading


def read_jsonl(path: str | Path) -> list[tuple[int, dict]]:
    """``(line number, object)`` for every non-blank line; the first malformed line raises."""
    rows, bad = read_jsonl_lenient(path)
    if bad:
        raise DataError(bad[0])
    return rows


def read_jsonl_lenient(path: str | Path) -> tuple[list[tuple[int, dict]], list[str]]:
    """Like :func:`read_jsonl` but returns every problem as ``file:line: reason`` instead of raising."""
    path = Path(path)
    rows: list[tuple[int, dict]] = []
    bad: list[str] = []
    try:
        fh = path.open("rb")
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    with fh:
        for n, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8-sig" if n == 1 else "utf-8")  # a BOM may open the file
            except UnicodeDecodeError as e:
                bad.append(f"{path}:{n}: not UTF-8 text ({e.reason} at byte {e.start})")
                continue
            if not line.strip():
                continue
            try:
                obj = json.loads(line.rstrip("\r\n"))  # so a line cut short reports its own last column
            except json.JSONDecodeError as e:
                bad.append(f"{path}:{n}: {json_problem(e)}")
                continue
            except RecursionError:
                bad.append(f"{path}:{n}: too deeply nested (JSON arrays or objects inside each other)")
                continue
            if not isinstance(obj, dict):
                bad.append(f"{path}:{n}: expected a JSON object, got {type(obj).__name__}")
                continue
            rows.append((n, obj))
    return rows, bad


def row_format(row: dict, cfg: dict[str, Any] | None = None) -> str | None:
    """``chat``, ``completions`` or ``text`` as mlx-lm detects it (same keys, same precedence), or ``preference``
    (``prompt``/``chosen``/``rejected``, for DPO and ORPO)."""
    cfg = cfg or {}
    if "chosen" in row and "rejected" in row:
        return "preference"
    if cfg.get("prompt_feature", "prompt") in row and cfg.get("completion_feature", "completion") in row:
        return "completions"
    if cfg.get("chat_feature", "messages") in row:
        return "chat"
    if cfg.get("text_feature", "text") in row:
        return "text"
    return None


def check_row(row: dict, fmt: str, where: str, cfg: dict[str, Any] | None = None) -> None:
    """Raise :class:`DataError` if ``row`` is not a valid ``fmt`` row."""
    cfg = cfg or {}
    if row_format(row, cfg) != fmt:
        raise DataError(f"{where}: expected a {fmt} row like the first row of the file, got keys {sorted(row)}")
    if fmt == "preference":
        from services.training.preference import check_pair_row  # it builds on this module

        check_pair_row(row, where)
    elif fmt == "text":
        text = row[cfg.get("text_feature", "text")]
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{where}: 'text' must be a non-empty string")
    elif fmt == "completions":
        for key in (cfg.get("prompt_feature", "prompt"), cfg.get("completion_feature", "completion")):
            if not isinstance(row[key], str):
                raise DataError(f"{where}: {key!r} must be a string")
        if not row[cfg.get("completion_feature", "completion")].strip():
            raise DataError(f"{where}: empty completion: nothing to learn")
    else:
        messages = row[cfg.get("chat_feature", "messages")]
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{where}: 'messages' must be a non-empty list")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ROLES:
                raise DataError(f"{where}: messages[{i}] needs a role in {sorted(ROLES)}")
            if not isinstance(m.get("content", ""), str):
                raise DataError(f"{where}: messages[{i}].content must be a string")
        roles = [m["role"] for m in messages]
        if "assistant" not in roles:
            raise DataError(f"{where}: no assistant message: nothing to learn")
        if "user" not in roles:
            raise DataError(f"{where}: no user message: a chat needs a user turn before the assistant's")
        first = next(r for r in roles if r != "system")
        if first != "user":
            raise DataError(f"{where}: the chat starts with {first!r}; after an optional system message the first "
                            "turn must be the user's")


def read_rows(path: Path, cfg: dict[str, Any] | None = None) -> tuple[str, list[tuple[str, dict]]]:
    """Format and ``(where, row)`` pairs of an IFT jsonl file, every row checked."""
    rows = read_jsonl(path)
    if not rows:
        raise DataError(f"{path}: empty file, no rows")
    fmt = row_format(rows[0][1], cfg)
    if fmt is None:
        raise DataError(
            f"{path}:{rows[0][0]}: unknown row format with keys {sorted(rows[0][1])}; "
            "use {'messages': [...]}, {'prompt', 'completion'}, {'text'} or {'prompt', 'chosen', 'rejected'}"
        )
    out = []
    for n, row in rows:
        check_row(row, fmt, f"{path}:{n}", cfg)
        out.append((f"{path}:{n}", row))
    return fmt, out


def split_files(data: Path) -> dict[str, Path]:
    """``train/valid/test.jsonl`` inside a folder (the mlx-lm layout), only those that exist."""
    return {s: data / f"{s}.jsonl" for s in SPLITS if (data / f"{s}.jsonl").exists()}


def read_documents(path: str | Path) -> list[Document]:
    """CPT documents from a file or a folder of ``.txt``/``.md`` files and ``.jsonl`` with a ``text`` field."""
    docs = list(iter_documents(path))
    if not docs:
        raise DataError(f"{path}: no documents found (.txt, .md, or .jsonl rows with a 'text' field)")
    return docs


def document_files(path: str | Path) -> list[Path]:
    """The files :func:`iter_documents` reads, in its order."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in CPT_SUFFIXES
                      and not any(part.startswith(".") for part in p.relative_to(path).parts))
    if path.suffix.lower() not in CPT_SUFFIXES:
        raise DataError(f"{path}: unsupported file type; use .txt, .md or .jsonl with a 'text' field")
    return [path]


def iter_documents(path: str | Path) -> Iterator[Document]:
    """The non-blank documents of :func:`read_documents` one at a time (one file in memory at once)."""
    for f in document_files(path):
        if f.suffix.lower() == ".jsonl":
            for n, row in read_jsonl(f):
                if not isinstance(row.get("text"), str):
                    raise DataError(f"{f}:{n}: a CPT jsonl row needs a string 'text' field, got keys {sorted(row)}")
                if row["text"].strip():
                    yield Document(f"{f}:{n}", row["text"])
        else:
            try:
                text = f.read_text(encoding="utf-8-sig")
            except UnicodeDecodeError as e:
                raise DataError(f"{f}: not UTF-8 text ({e.reason})") from None
            if text.strip():
                yield Document(str(f), text)


def fingerprint(paths: Iterable[Path]) -> str:
    """SHA-256 over the names and bytes of the data files: two runs on the same data share it."""
    h = hashlib.sha256()
    for root in paths:
        root = Path(root)
        files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
        for f in files:
            h.update(str(f.relative_to(root) if root.is_dir() else f.name).encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------------------- CPT


def encode_text(tokenizer: Any, text: str) -> list[int]:
    """Token ids of a text without special tokens: what training packs and the statistics count."""
    return list(tokenizer.encode(text, add_special_tokens=False))


def encode_texts(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """:func:`encode_text` of each text, in one call to the fast tokenizer's ``encode_batch`` on all cores
    (the same ids; a slow tokenizer encodes one text at a time)."""
    backend = getattr(getattr(tokenizer, "_tokenizer", tokenizer), "backend_tokenizer", None)
    if backend is None:
        return [encode_text(tokenizer, t) for t in texts]
    saved = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "true"  # workers turn it off for forks; this process forks no tokenizer
    try:
        return [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]
    finally:
        if saved is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = saved


def pack(token_docs: Sequence[list[int]], seq_len: int, bos: int, eos: int) -> list[Sample]:
    """Join documents as ``bos d1 eos d2 eos …`` and cut windows of ``seq_len`` tokens.

    Consecutive windows share one token (the last input of one is the first of the next), so every
    document token and every ``eos`` is a loss target exactly once.
    """
    stream = [bos]
    for doc in token_docs:
        stream.extend(doc)
        stream.append(eos)
    return window(stream, seq_len)


def window(stream: list[int], seq_len: int) -> list[Sample]:
    """Overlapping-by-one windows of ``stream``; all but each window's first token are targets."""
    stride = seq_len - 1
    out = []
    for start in range(0, max(len(stream) - 1, 0), stride):
        toks = stream[start : start + seq_len]
        if len(toks) >= 2:
            out.append(Sample(toks, [False] + [True] * (len(toks) - 1)))
    return out


def valid_indices(n: int, fraction: float, seed: int) -> set[int]:
    """Which of ``n`` documents a CPT corpus holds out for validation (seeded; at least one, never all)."""
    if fraction <= 0 or n < 2:
        return set()
    order = np.random.RandomState(seed).permutation(n)
    return set(order[: min(max(1, round(n * fraction)), n - 1)].tolist())


def _split_docs(docs: list[Document], fraction: float, seed: int) -> tuple[list[Document], list[Document]]:
    valid_idx = valid_indices(len(docs), fraction, seed)
    train = [d for i, d in enumerate(docs) if i not in valid_idx]
    valid = [d for i, d in enumerate(docs) if i in valid_idx]
    return train, valid


def _replay_pieces(replay: list[list[int]], target_tokens: int, seed: int) -> list[list[int]]:
    """Replay documents (shuffled, cycled if short) cut so that they hold ``target_tokens`` targets (+eos)."""
    pieces: list[list[int]] = []
    remaining = target_tokens
    rng = np.random.RandomState(seed + 1)
    if not any(replay):
        return pieces
    while remaining > 0:
        for i in rng.permutation(len(replay)):
            if remaining <= 0:
                break
            doc = replay[i]
            take = min(len(doc), remaining - 1)  # each piece is followed by one eos target
            if take <= 0:
                remaining = 0
                break
            pieces.append(doc[:take])
            remaining -= take + 1
    return pieces


def prepare_cpt(cfg: dict[str, Any], tokenizer: Any, data: Path, splits: Sequence[str] = SPLITS) -> Prepared:
    """Tokenize, split by document, optionally mix in a replay corpus, and pack into windows.

    Only the ``splits`` asked for are tokenized (the split itself does not depend on it)."""
    seq_len, seed = cfg["max_seq_length"], cfg["seed"]
    eos = tokenizer.eos_token_id
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos
    files = split_files(data) if data.is_dir() else {}
    if "train" in files:
        train_docs = read_documents(files["train"])
        valid_docs = read_documents(files["valid"]) if "valid" in files else []
    else:
        train_docs, valid_docs = _split_docs(read_documents(data), cfg["valid_fraction"], seed)
    train_tok = [encode_text(tokenizer, d.text) for d in train_docs] if "train" in splits else []
    valid_tok = [encode_text(tokenizer, d.text) for d in valid_docs] if "valid" in splits else []
    domain_tokens = sum(len(t) + 1 for t in train_tok)
    stats: dict[str, Any] = {"format": "text", "mode": "cpt", "packing": bool(cfg["packing"])}
    mix = cfg.get("mixture") if "train" in splits else None
    if mix:
        replay_docs = read_documents(Path(mix["data"]))
        replay_tok = [encode_text(tokenizer, d.text) for d in replay_docs]
        ratio = float(mix["ratio"])
        target = round(domain_tokens * ratio / (1 - ratio))
        pieces = _replay_pieces(replay_tok, target, seed)
        replay_tokens = sum(len(p) + 1 for p in pieces)
        order = np.random.RandomState(seed).permutation(len(train_tok) + len(pieces))
        combined = train_tok + pieces
        train_tok = [combined[i] for i in order]
        stats["mixture"] = {
            "data": str(mix["data"]), "ratio": ratio, "replay_tokens": replay_tokens, "domain_tokens": domain_tokens,
            "measured_ratio": replay_tokens / (replay_tokens + domain_tokens),
        }
    if cfg["packing"]:
        train = pack(train_tok, seq_len, bos, eos)
        valid = pack(valid_tok, seq_len, bos, eos) if valid_tok else []
    else:  # one document never shares a window with another
        train = [s for t in train_tok for s in pack([t], seq_len, bos, eos)]
        valid = [s for t in valid_tok for s in pack([t], seq_len, bos, eos)]
    stats["train"] = _split_stats(train, documents=len(train_docs))
    stats["valid"] = _split_stats(valid, documents=len(valid_docs))
    stats["train"]["corpus_tokens"] = domain_tokens
    stats["valid_documents"] = [d.where for d in valid_docs]
    return Prepared(train, valid, [], stats)


# ----------------------------------------------------------------------------------------- IFT


def chat_tokens(tokenizer: Any, messages: list[dict], tools: Any = None, gen: bool = False,
                where: str | None = None) -> list[int]:
    """``messages`` through the tokenizer's chat template as token ids (``gen``: with the generation prompt).

    With ``where`` (``file:line``), a conversation the template refuses is a :class:`DataError` naming it."""
    try:
        return list(tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=gen,
                                                  return_dict=False))
    except Exception as e:  # jinja2's TemplateError, or a ValueError from the template's raise_exception
        if where is None:
            raise
        raise DataError(f"{where}: the model's chat template cannot render this conversation ({e})") from None


def render_chat(tokenizer: Any, messages: list[dict], tools: Any, all_turns: bool, where: str) -> Sample:
    """Chat-template a conversation; loss on every assistant turn (or the last one only)."""
    tokens = chat_tokens(tokenizer, messages, tools, where=where)
    mask = [False] * len(tokens)
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    for i in turns if all_turns else turns[-1:]:
        start = chat_tokens(tokenizer, messages[:i], tools, gen=True, where=where)
        end = chat_tokens(tokenizer, messages[: i + 1], tools, where=where)
        if tokens[: len(start)] != start or tokens[: len(end)] != end:
            raise DataError(
                f"{where}: the model's chat template does not render turn {i} as a prefix of the whole "
                "conversation, so assistant tokens cannot be located; set mask_all_turns: false"
            )
        for j in range(len(start), len(end)):
            mask[j] = True
    mask[0] = False
    return Sample(tokens, mask)


def render_row(tokenizer: Any, row: dict, fmt: str, cfg: dict[str, Any], where: str) -> Sample:
    """One IFT row as tokens and loss mask, following ``mask_all_turns`` / ``mask_prompt``."""
    if fmt == "text":
        tokens = encode_text(tokenizer, row[cfg.get("text_feature") or "text"])
        if not tokens or tokens[-1] != tokenizer.eos_token_id:
            tokens.append(tokenizer.eos_token_id)
        return Sample(tokens, [False] + [True] * (len(tokens) - 1))
    if fmt == "completions":
        messages = [
            {"role": "user", "content": row[cfg.get("prompt_feature") or "prompt"]},
            {"role": "assistant", "content": row[cfg.get("completion_feature") or "completion"]},
        ]
    else:
        messages = row[cfg.get("chat_feature") or "messages"]
    masked = cfg.get("mask_all_turns") or cfg.get("mask_prompt")
    if not masked:
        tokens = chat_tokens(tokenizer, messages, row.get("tools"), where=where)
        return Sample(tokens, [False] + [True] * (len(tokens) - 1))
    return render_chat(tokenizer, messages, row.get("tools"), bool(cfg.get("mask_all_turns")), where)


def split_rows(cfg: dict[str, Any], data: Path) -> tuple[str, dict[str, list[tuple[str, dict]]]]:
    """The format and the checked ``(where, row)`` rows of each split of a jsonl dataset: the files of a folder,
    or one file split by ``valid_fraction`` (seeded)."""
    if data.is_dir():
        files = split_files(data)
        if "train" not in files:
            raise DataError(f"{data}: a jsonl dataset folder needs train.jsonl (and optionally valid.jsonl, "
                            "test.jsonl)")
        parsed = {s: read_rows(p, cfg) for s, p in files.items()}
        return parsed["train"][0], {s: rows for s, (_, rows) in parsed.items()}
    fmt, rows = read_rows(data, cfg)
    order = np.random.RandomState(cfg["seed"]).permutation(len(rows))
    n_valid = round(len(rows) * cfg["valid_fraction"]) if len(rows) > 1 else 0
    n_valid = min(n_valid, len(rows) - 1)
    valid_idx = set(order[:n_valid].tolist())
    return fmt, {"train": [r for i, r in enumerate(rows) if i not in valid_idx],
                 "valid": [r for i, r in enumerate(rows) if i in valid_idx]}


def check_ift_format(fmt: str, cfg: dict[str, Any], data: Path) -> None:
    """Refuse rows an IFT run cannot train on: preference pairs, or text rows with ``mask_prompt``."""
    if fmt == "preference":
        raise DataError(f"{data}: these are preference rows (prompt/chosen/rejected): train them with "
                        "mode: dpo or orpo")
    if fmt == "text" and cfg.get("mask_prompt"):
        raise DataError(f"{data}: mask_prompt needs chat or completions rows, these are text rows")


def prepare_ift(cfg: dict[str, Any], tokenizer: Any, data: Path, splits: Sequence[str] = SPLITS) -> Prepared:
    """Render every row with the chat template; split a single file by ``valid_fraction``.

    Every row is read and checked; only the ``splits`` asked for are rendered."""
    fmt, rows_of = split_rows(cfg, data)
    check_ift_format(fmt, cfg, data)
    rendered = {s: [(where, render_row(tokenizer, row, fmt, cfg, where)) for where, row in rows_of.get(s, [])]
                if s in splits else [] for s in SPLITS}
    # A sample whose trained tokens all lie past max_seq_length teaches nothing, and a batch of only such
    # samples has no target at all (a 0/0 loss): leave them out and say which.
    seq = cfg["max_seq_length"]
    out = {s: [x for _, x in rendered[s] if any(x.mask[1:seq])] for s in SPLITS}
    left_out = {s: [w for w, x in rendered[s] if not any(x.mask[1:seq])] for s in SPLITS}
    if rendered["train"] and not out["train"]:
        raise DataError(f"{data}: no training sample has a trained (assistant) token within max_seq_length={seq}; "
                        f"the prompts are longer: raise max_seq_length")
    stats = {"format": fmt, "mode": "ift", "mask_all_turns": bool(cfg.get("mask_all_turns"))}
    for s in ("train", "valid"):
        stats[s] = _split_stats(out[s], documents=len(out[s]), max_len=seq)
        if left_out[s]:
            stats[s]["left_out"] = len(left_out[s])
            stats[s]["left_out_examples"] = left_out[s][:5]
    return Prepared(out["train"], out["valid"], out["test"], stats)


def _split_stats(samples: list[Sample], documents: int, max_len: int | None = None) -> dict[str, Any]:
    return split_stats([len(s.tokens) for s in samples], [s.trained for s in samples], documents, max_len)


def split_stats(lengths: Sequence[int] | np.ndarray, trained: Sequence[int] | np.ndarray, documents: int,
                max_len: int | None = None) -> dict[str, Any]:
    """A split's statistics from its samples' token lengths and trained-token counts."""
    lengths = np.asarray(lengths, np.int64)
    st: dict[str, Any] = {
        "documents": documents,
        "sequences": len(lengths),
        "tokens": int(lengths.sum()),
        "trained_tokens": int(np.asarray(trained, np.int64).sum()),
        "max_length": int(lengths.max(initial=0)),
        "mean_length": round(int(lengths.sum()) / len(lengths), 1) if len(lengths) else 0,
    }
    if max_len is not None:
        st["truncated_samples"] = int((lengths > max_len).sum())
        st["truncated_tokens"] = int(np.maximum(lengths - max_len, 0).sum())
    return st


def prepare(cfg: dict[str, Any], tokenizer: Any, splits: Sequence[str] = SPLITS) -> Prepared:
    """Prepare the data of a ForgeLLM-mode config (``mode: cpt`` or ``ift``) and check it can train.

    ``splits``: the ones to tokenize (e.g. only ``valid`` to evaluate); the others come back empty."""
    data = Path(cfg["data"])
    if not data.exists():
        raise DataError(f"{data}: no such file or folder (field 'data')")
    if cfg["mode"] in ("dpo", "orpo"):
        from services.training.preference import prepare as prepare_pairs  # it builds on this module

        prepared = prepare_pairs(cfg, tokenizer, data, splits)
    else:
        prep = prepare_cpt if cfg["mode"] == "cpt" else prepare_ift
        prepared = prep(cfg, tokenizer, data, splits)
    return conclude(prepared, cfg, splits)


def data_paths(cfg: dict[str, Any]) -> list[Path]:
    """The data a config trains on: ``data`` and a mixture's replay corpus."""
    return [Path(cfg["data"])] + ([Path(cfg["mixture"]["data"])] if cfg.get("mixture") else [])


def conclude(prepared: Prepared, cfg: dict[str, Any], splits: Sequence[str], fp: str | None = None) -> Prepared:
    """Check that the prepared data can train and add its steps per epoch and the data's fingerprint."""
    if "train" in splits:
        check_trainable(prepared.train, prepared.valid, cfg["batch_size"], str(cfg["data"]))
        prepared.stats["steps_per_epoch"] = len(prepared.train) // cfg["batch_size"]
    prepared.stats["fingerprint"] = fp or fingerprint(data_paths(cfg))
    return prepared


def check_trainable(
    train: Sequence, valid: Sequence, batch_size: int, where: str, full_valid_batches: bool = False
) -> None:
    """Enough data for one batch; with ``full_valid_batches`` (mlx-lm's rule) validation needs one full batch too."""
    if len(train) == 0:
        raise DataError(f"{where}: the training split is empty")
    if len(train) < batch_size:
        raise DataError(
            f"{where}: the training split has {len(train)} sequences, fewer than batch_size={batch_size}; "
            "lower batch_size or add data"
        )
    if full_valid_batches and 0 < len(valid) < batch_size:
        raise DataError(
            f"{where}: the validation split has {len(valid)} sequences, fewer than batch_size={batch_size}; "
            "lower batch_size or valid_fraction, or add validation data"
        )
