"""The prepared-data cache: tokenized, packed and masked data stored once per input, memory-mapped by every run.

An entry lives in ``WS/.forgellm/cache/prepared/KEY/``. ``KEY`` hashes everything the prepared data depends on:
the content of the data files (:func:`services.training.data.fingerprint`: names and bytes; reading the files
costs a small fraction of tokenizing them, and no clock or copy tool can fool it), the tokenizer's files, its chat
template, the mode, packing and masking settings, ``max_seq_length``, the split settings and the format version.
Each split is three raw arrays: ``SPLIT.tokens`` (int32, the samples' tokens back to back; packed CPT windows
overlap by one token, so they are views into one stream), ``SPLIT.index`` (int64 ``start, length`` per sample) and,
for IFT, ``SPLIT.mask`` (bool, one per token; CPT trains on every token but a window's first).

An entry is built in a hidden folder next to it while the data streams through the tokenizer in batches (so
memory does not grow with the corpus); ``entry.json`` (statistics and settings) and then ``manifest.json`` (size
and sha256 of every file) are written last, and one rename publishes it. Opening verifies the manifest: a
corrupt or partial entry is removed and built again, never trained on.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from services.errors import ForgeError
from services.training import data as data_mod
from services.training.data import Document, Prepared, Sample
from services.training.folder import MANIFEST, checkpoint_problem, write_manifest
from services.units import clock
from services.workspace import Workspace, disk_full_reason, is_disk_full, read_json, staged, write_json

FORMAT = 1
ENTRY = "entry.json"
STALE_SECONDS = 86_400.0  # a build folder untouched this long belongs to a killed worker
BATCH_CHARS = 4_000_000  # text per encode_batch call: enough for every core, little memory
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json")
KEY_SETTINGS = ("mode", "packing", "max_seq_length", "valid_fraction", "seed", "mask_all_turns", "mask_prompt",
                "text_feature", "prompt_feature", "completion_feature", "chat_feature")

Progress = Callable[[int, int, int], None]  # (documents done, documents in all, tokens so far); may raise


def progress_line(preparing: dict[str, Any]) -> str:
    """``preparing the data: 1,234 / 4,883 documents · 5,600,000 tokens · ETA 1:23`` (the Monitor and the CLI)."""
    eta = preparing.get("eta_seconds")
    return (f"preparing the data: {preparing['documents']:,} / {preparing['total']:,} documents · "
            f"{preparing['tokens']:,} tokens · ETA {clock(eta)}")


class PreparationStopped(ForgeError, RuntimeError):
    """Stop was asked while the data was being prepared."""


def cache_root(ws: Workspace) -> Path:
    """The cache folder of a workspace; a preflight probe's throw-away workspace uses its owner's."""
    root = ws.root
    if root.parent.name == "probes" and root.parent.parent.name == ".forgellm":
        root = root.parent.parent.parent
    return root / ".forgellm" / "cache" / "prepared"


def tokenizer_identity(tokenizer: Any, model: str | Path) -> str:
    """SHA-256 over the model folder's tokenizer files and the chat template the tokenizer holds (for a model
    that is no local folder: over the serialized fast tokenizer, or at least the model's name)."""
    h = hashlib.sha256()
    folder = Path(model)
    found = [name for name in TOKENIZER_FILES if (folder / name).is_file()]
    for name in found:
        h.update(name.encode())
        h.update((folder / name).read_bytes())
    if not found:
        backend = getattr(getattr(tokenizer, "_tokenizer", tokenizer), "backend_tokenizer", None)
        h.update((backend.to_str() if backend is not None else str(model)).encode())
        h.update(f"{tokenizer.bos_token_id},{tokenizer.eos_token_id}".encode())
    h.update(str(getattr(tokenizer, "chat_template", None)).encode())
    return h.hexdigest()


def cacheable(cfg: dict[str, Any]) -> bool:
    """ForgeLLM's CPT and IFT modes (plain mlx-lm configs tokenize lazily; preference pairs and replay mixtures
    are prepared in memory)."""
    return cfg.get("mode") in ("cpt", "ift") and not cfg.get("mixture")


def cache_key(cfg: dict[str, Any], tokenizer: Any, fp: str) -> str:
    """The entry name for a config's data with this tokenizer (``fp``: the data's content fingerprint)."""
    parts = {"format": FORMAT, "data": fp, "tokenizer": tokenizer_identity(tokenizer, cfg["model"]),
             "settings": {k: cfg.get(k) for k in KEY_SETTINGS}}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


class TokenArrays(Sequence):
    """A split's samples over memory-mapped arrays: ``dataset[i]`` is a :class:`Sample` of numpy views."""

    def __init__(self, tokens: np.ndarray, index: np.ndarray, mask: np.ndarray | None):
        self.tokens, self.index, self.mask = tokens, index, mask
        self.lengths = index[:, 1] if len(index) else np.zeros(0, np.int64)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> Sample:  # type: ignore[override]
        start, n = (int(x) for x in self.index[i])
        toks = self.tokens[start : start + n]
        if self.mask is not None:
            return Sample(toks, self.mask[start : start + n])
        mask = np.ones(n, np.bool_)
        mask[0] = False
        return Sample(toks, mask)



class SplitWriter:
    """Appends one split's samples to its files as they come; ``close`` writes the index."""

    def __init__(self, folder: Path, name: str, with_mask: bool):
        self.folder, self.name = folder, name
        self.tokens = (folder / f"{name}.tokens").open("wb")
        self.mask = (folder / f"{name}.mask").open("wb") if with_mask else None
        self.index: list[np.ndarray] = []
        self.trained: list[int] = []  # per sample added with a mask
        self.length = 0  # tokens written
        self.documents = 0

    def add(self, tokens: Sequence[int], mask: Sequence[bool]) -> None:
        """One sample of its own."""
        self.index.append(np.array([[self.length, len(tokens)]], np.int64))
        self.trained.append(int(np.count_nonzero(mask)))
        self._write(tokens, mask)

    def stream(self, tokens: Sequence[int]) -> None:
        """Tokens of a packed stream, cut into windows by :meth:`windows`."""
        self._write(tokens, None)

    def windows(self, start: int, seq_len: int) -> None:
        """Overlapping-by-one windows of the stream written since token ``start`` (:func:`data.window`)."""
        n = self.length - start
        starts = np.arange(0, max(n - 1, 0), seq_len - 1, dtype=np.int64)
        self.index.append(np.stack([start + starts, np.minimum(seq_len, n - starts)], axis=1))

    def _write(self, tokens: Sequence[int], mask: Sequence[bool] | None) -> None:
        self.tokens.write(np.asarray(tokens, np.int32).tobytes())
        if self.mask is not None:
            self.mask.write(np.asarray(mask, np.bool_).tobytes())
        self.length += len(tokens)

    def close(self) -> dict[str, Any]:
        self.tokens.close()
        if self.mask is not None:
            self.mask.close()
        index = np.concatenate(self.index) if self.index else np.zeros((0, 2), np.int64)
        index.tofile(self.folder / f"{self.name}.index")
        return {"tokens": self.length, "samples": len(index), "mask": self.mask is not None}


def open_split(folder: Path, name: str, meta: dict[str, Any]) -> TokenArrays:
    """Memory-map one split of an entry."""
    def mapped(suffix: str, dtype: Any, shape: tuple[int, ...]) -> np.ndarray:
        if not shape[0]:
            return np.zeros(shape, dtype)
        return np.memmap(folder / f"{name}.{suffix}", dtype=dtype, mode="r", shape=shape)

    tokens = mapped("tokens", np.int32, (meta["tokens"],))
    index = mapped("index", np.int64, (meta["samples"], 2))
    mask = mapped("mask", np.bool_, (meta["tokens"],)) if meta["mask"] else None
    return TokenArrays(tokens, index, mask)


@dataclass
class Meter:
    """Counts documents and tokens for the progress callback."""

    total: int
    progress: Progress | None
    documents: int = 0
    tokens: int = 0

    def tick(self, documents: int, tokens: int) -> None:
        self.documents += documents
        self.tokens += tokens
        if self.progress:
            self.progress(self.documents, self.total, self.tokens)


def _batches(docs: Iterator[tuple[str, Document]]) -> Iterator[list[tuple[str, Document]]]:
    batch: list[tuple[str, Document]] = []
    size = 0
    for item in docs:
        batch.append(item)
        size += len(item[1].text)
        if size >= BATCH_CHARS:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _cpt_sources(cfg: dict[str, Any], data: Path) -> tuple[int, Iterator[tuple[str, Document]]]:
    """How many documents, and each one with its split, in :func:`data.prepare_cpt`'s order."""
    files = data_mod.split_files(data) if data.is_dir() else {}
    parts = [(s, files[s]) for s in ("train", "valid") if s in files] if "train" in files else [("", data)]
    counts = [sum(1 for _ in data_mod.iter_documents(f)) for _, f in parts]
    for (_, f), n in zip(parts, counts, strict=True):
        if not n:
            data_mod.read_documents(f)  # raises the "no documents found" error
    if "train" in files:
        def both() -> Iterator[tuple[str, Document]]:
            for s, f in parts:
                yield from ((s, d) for d in data_mod.iter_documents(f))
        return sum(counts), both()
    total = counts[0]
    held = data_mod.valid_indices(total, cfg["valid_fraction"], cfg["seed"])
    return total, (("valid" if i in held else "train", d) for i, d in enumerate(data_mod.iter_documents(data)))


def build_cpt(cfg: dict[str, Any], tokenizer: Any, data: Path, folder: Path, progress: Progress | None
              ) -> dict[str, Any]:
    """Stream a corpus through the tokenizer into ``folder``: the samples of :func:`data.prepare_cpt`."""
    seq_len, packing = cfg["max_seq_length"], bool(cfg["packing"])
    eos = tokenizer.eos_token_id
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos
    total, sources = _cpt_sources(cfg, data)
    writers = {s: SplitWriter(folder, s, with_mask=False) for s in ("train", "valid")}
    if packing:
        for w in writers.values():
            w.stream([bos])
    meter, corpus_tokens, valid_docs = Meter(total, progress), 0, []
    for batch in _batches(sources):
        ids = data_mod.encode_texts(tokenizer, [d.text for _, d in batch])
        for (split, doc), toks in zip(batch, ids, strict=True):
            w = writers[split]
            w.documents += 1
            if split == "train":
                corpus_tokens += len(toks) + 1
            else:
                valid_docs.append(doc.where)
            start = w.length
            w.stream(toks + [eos] if packing else [bos, *toks, eos])
            if not packing:
                w.windows(start, seq_len)
        meter.tick(len(batch), sum(len(t) for t in ids))
    if packing:
        for w in writers.values():
            if w.documents:
                w.windows(0, seq_len)
    splits = {s: w.close() for s, w in writers.items()}
    stats: dict[str, Any] = {"format": "text", "mode": "cpt", "packing": packing}
    for s in ("train", "valid"):
        lengths = open_split(folder, s, splits[s]).lengths
        stats[s] = data_mod.split_stats(lengths, np.maximum(lengths - 1, 0), writers[s].documents)
    stats["train"]["corpus_tokens"] = corpus_tokens
    stats["valid_documents"] = valid_docs
    return {"splits": splits, "stats": stats}


def build_ift(cfg: dict[str, Any], tokenizer: Any, data: Path, folder: Path, progress: Progress | None
              ) -> dict[str, Any]:
    """Render every row into ``folder``: the samples of :func:`data.prepare_ift`, with their masks."""
    fmt, rows_of = data_mod.split_rows(cfg, data)
    data_mod.check_ift_format(fmt, cfg, data)
    seq = cfg["max_seq_length"]
    meter = Meter(sum(len(r) for r in rows_of.values()), progress)
    splits, left_out, trained = {}, {}, {}
    for s in data_mod.SPLITS:
        w, left_out[s] = SplitWriter(folder, s, with_mask=True), []
        for where, row in rows_of.get(s, []):
            x = data_mod.render_row(tokenizer, row, fmt, cfg, where)
            if any(x.mask[1:seq]):
                w.add(x.tokens, x.mask)
            else:
                left_out[s].append(where)
            meter.tick(1, len(x.tokens))
        splits[s], trained[s] = w.close(), w.trained
    if rows_of.get("train") and not splits["train"]["samples"]:
        raise data_mod.DataError(f"{data}: no training sample has a trained (assistant) token within "
                                 f"max_seq_length={seq}; the prompts are longer: raise max_seq_length")
    stats: dict[str, Any] = {"format": fmt, "mode": "ift", "mask_all_turns": bool(cfg.get("mask_all_turns"))}
    for s in ("train", "valid"):
        arrays = open_split(folder, s, splits[s])
        stats[s] = data_mod.split_stats(arrays.lengths, trained[s], len(arrays), max_len=seq)
        if left_out[s]:
            stats[s]["left_out"] = len(left_out[s])
            stats[s]["left_out_examples"] = left_out[s][:5]
    return {"splits": splits, "stats": stats}


def _size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file())


class PreparedCache:
    """The prepared-data entries of one workspace: open (verified), build, list and delete."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.last: dict[str, Any] = {}  # what the latest prepare did: key, hit, problem (a rebuilt entry), seconds

    @classmethod
    def of(cls, ws: Workspace) -> PreparedCache:
        return cls(cache_root(ws))

    def problem(self, key: str) -> str | None:
        """Why entry ``key`` cannot be used (missing, partial, corrupt), or None."""
        folder = self.root / key
        if not (folder / MANIFEST).is_file() or not (folder / ENTRY).is_file():
            return f"{folder}: incomplete entry (no manifest)"
        problem = checkpoint_problem(folder)
        if problem:
            return problem
        meta = read_json(folder / ENTRY) or {}
        if meta.get("format") != FORMAT or meta.get("key") != key:
            return f"{folder}: entry of another format or key"
        return None

    def open(self, key: str) -> Prepared | None:
        """The verified entry ``key`` memory-mapped, or None (a damaged one is removed and said in ``last``)."""
        folder = self.root / key
        if not folder.exists():
            return None
        problem = self.problem(key)
        if problem:
            self.last["problem"] = problem
            shutil.rmtree(folder, ignore_errors=True)
            return None
        meta = read_json(folder / ENTRY)
        sets = {s: open_split(folder, s, m) for s, m in meta["splits"].items()}
        return Prepared(sets["train"], sets["valid"], sets.get("test", []), dict(meta["stats"]))

    def build(self, key: str, cfg: dict[str, Any], tokenizer: Any, progress: Progress | None = None) -> Prepared:
        """Prepare the data into a new entry ``key`` and open it; a concurrent builder's entry wins the race."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.sweep()
        target = self.root / key
        data = Path(cfg["data"])
        build = build_cpt if cfg["mode"] == "cpt" else build_ift
        try:
            with staged(target) as tmp:
                tmp.mkdir()
                made = build(cfg, tokenizer, data, tmp, progress)
                write_json(tmp / ENTRY, {"format": FORMAT, "key": key, "created": time.time(), "data": str(data),
                                         "model": str(cfg["model"]), "mode": cfg["mode"],
                                         "max_seq_length": cfg["max_seq_length"], "packing": cfg.get("packing"),
                                         **made})
                write_manifest(tmp)  # last: an entry without it is partial
        except OSError:
            if self.problem(key) is not None:  # not a concurrent build that got there first
                raise
        opened = self.open(key)
        assert opened is not None, f"entry {key} vanished after it was built"
        return opened

    def prepare(self, cfg: dict[str, Any], tokenizer: Any, splits: Sequence[str] = data_mod.SPLITS,
                progress: Progress | None = None) -> Prepared:
        """The data of a CPT or IFT config from its entry, built first on a miss; checked as
        :func:`data.prepare` checks it."""
        tic = time.perf_counter()
        data = Path(cfg["data"])
        if not data.exists():
            raise data_mod.DataError(f"{data}: no such file or folder (field 'data')")
        fp = data_mod.fingerprint(data_mod.data_paths(cfg))
        key = cache_key(cfg, tokenizer, fp)
        self.last = {"key": key}
        prepared = self.open(key)
        self.last["hit"] = prepared is not None
        if prepared is None:
            try:
                prepared = self.build(key, cfg, tokenizer, progress)
            except OSError as e:  # the run still trains: on data prepared in memory, as before the cache
                if not is_disk_full(e):
                    raise
                self.last["note"] = f"not cached, {disk_full_reason(self.root)}"
                return data_mod.prepare(cfg, tokenizer, splits)
        self.last["seconds"] = time.perf_counter() - tic
        return data_mod.conclude(prepared, cfg, splits, fp)

    def sweep(self, age: float = STALE_SECONDS) -> None:
        """Remove the folders of builds that were killed (nothing written in them for ``age`` seconds)."""
        for tmp in self.root.glob(".*.tmp"):
            try:
                newest = max((f.stat().st_mtime for f in tmp.rglob("*")), default=tmp.stat().st_mtime)
            except OSError:  # a concurrent build is publishing (renaming) or cleaning up this folder right now
                continue
            if time.time() - newest > age:
                shutil.rmtree(tmp, ignore_errors=True)

    def lookup(self, cfg: dict[str, Any], tokenizer: Any) -> Prepared | None:
        """The verified entry of a config's data if one is there (nothing is built)."""
        if not cacheable(cfg) or not Path(cfg["data"]).exists():
            return None
        return self.open(cache_key(cfg, tokenizer, data_mod.fingerprint(data_mod.data_paths(cfg))))

    def entries(self) -> list[dict[str, Any]]:
        """Every entry, newest first: key, size in bytes, data, model, mode, seq length, tokens, created."""
        if not self.root.is_dir():
            return []
        out = []
        for folder in self.root.iterdir():
            if folder.name.startswith(".") or not folder.is_dir():
                continue
            meta = read_json(folder / ENTRY) if (folder / ENTRY).is_file() else {}
            splits = (meta or {}).get("splits") or {}
            stats = (meta or {}).get("stats") or {}
            out.append({"key": folder.name, "bytes": _size(folder), "data": (meta or {}).get("data"),
                        "train": stats.get("train"), "valid": stats.get("valid"),
                        "model": (meta or {}).get("model"), "mode": (meta or {}).get("mode"),
                        "max_seq_length": (meta or {}).get("max_seq_length"),
                        "tokens": sum(s.get("tokens", 0) for s in splits.values()),
                        "created": (meta or {}).get("created"), "complete": (folder / MANIFEST).is_file()})
        return sorted(out, key=lambda e: -(e["created"] or 0))

    def entries_for(self, data: str | Path, model: str | Path, max_seq_length: int) -> list[dict[str, Any]]:
        """The entries (of :meth:`entries`) prepared from ``data`` with ``model``'s tokenizer at ``max_seq_length``:
        what a run on them trains on, without tokenizing anything."""
        def same(a: Any, b: str | Path) -> bool:
            return a is not None and Path(a).resolve() == Path(b).resolve()

        return [e for e in self.entries() if e["complete"] and same(e["data"], data) and same(e["model"], model)
                and e["max_seq_length"] == max_seq_length]

    def delete(self, key: str) -> None:
        """Remove entry ``key`` (a run that has it open keeps reading its mapped files until it ends)."""
        folder = self.root / key
        if folder.parent != self.root or key.startswith(".") or not folder.is_dir():
            raise data_mod.DataError(f"{folder}: no such prepared-data entry")
        shutil.rmtree(folder)

    def total_bytes(self) -> int:
        return sum(e["bytes"] for e in self.entries())
