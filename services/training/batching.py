"""Batches for the training loop, in mlx-lm's exact order, with state that can be saved and restored.

mlx-lm's ``iterate_batches`` is a generator whose epoch permutations come from numpy's global RNG;
a generator cannot be checkpointed, so :class:`BatchSampler` keeps the same logic as plain state
(``perm``, ``pos``). Two collations: mlx-lm's ``(tokens, offset)`` rows for plain mlx-lm configs,
and ForgeLLM's ``Sample(tokens, mask)`` rows with an explicit per-token loss mask.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.tuner.datasets import CacheDataset

from services.training.data import Sample

PAD_TO = 32


def sorted_indices(dataset: Any) -> list[int]:
    """mlx-lm's order: ``CacheDataset.itemlen`` (constant, so identity); ForgeLLM samples by token length (stable)."""
    if isinstance(dataset, CacheDataset):
        return sorted(range(len(dataset)), key=dataset.itemlen)
    if hasattr(dataset, "lengths"):  # memory-mapped samples: the same stable order without touching them
        return np.argsort(np.asarray(dataset.lengths), kind="stable").tolist()
    return sorted(range(len(dataset)), key=lambda i: len(dataset[i].tokens))


def batch_indices(dataset: Any, batch_size: int) -> list[list[int]]:
    if len(dataset) < batch_size:
        raise ValueError(f"Dataset must have at least batch_size={batch_size} examples but only has {len(dataset)}.")
    idx = sorted_indices(dataset)
    return [idx[i : i + batch_size] for i in range(0, len(idx) - batch_size + 1, batch_size)]


def padded_width(lengths: list[int], max_seq_length: int) -> int:
    return min(1 + PAD_TO * ((max(lengths) + PAD_TO - 1) // PAD_TO), max_seq_length)


def collate(rows: list, max_seq_length: int) -> tuple[mx.array, mx.array]:
    """Pad a batch. mlx-lm rows give ``(tokens, (offset, length))``; ForgeLLM rows give ``(tokens, mask)``."""
    if isinstance(rows[0], Sample):
        lengths = [min(len(s.tokens), max_seq_length) for s in rows]
        width = padded_width([len(s.tokens) for s in rows], max_seq_length)
        tokens = np.zeros((len(rows), width), np.int32)
        mask = np.zeros((len(rows), width - 1), np.bool_)
        for j, (s, n) in enumerate(zip(rows, lengths, strict=True)):
            tokens[j, :n] = s.tokens[:n]
            mask[j, : n - 1] = s.mask[1:n]
        return mx.array(tokens), mx.array(mask)
    # mlx-lm's iterate_batches body, unchanged in effect
    seqs, offsets = zip(*rows, strict=True)
    lengths = [len(x) for x in seqs]
    width = padded_width(lengths, max_seq_length)
    tokens = np.zeros((len(rows), width), np.int32)
    for j in range(len(rows)):
        n = min(lengths[j], max_seq_length)
        tokens[j, :n] = seqs[j][:n]
        lengths[j] = n
    return mx.array(tokens), mx.array(list(zip(offsets, lengths, strict=True)))


def masked_loss(model: nn.Module, batch: mx.array, mask: mx.array) -> tuple[mx.array, mx.array]:
    """Mean cross-entropy over the tokens whose mask is set (mlx-lm's ``default_loss`` with a general mask)."""
    logits = model(batch[:, :-1])
    ce = nn.losses.cross_entropy(logits, batch[:, 1:]) * mask
    ntoks = mask.sum()
    return ce.astype(mx.float32).sum() / ntoks, ntoks


def trained_tokens(rows: list[Sample], max_seq_length: int) -> int:
    """How many tokens of ForgeLLM rows the loss counts, once collated (the global count a shard divides by)."""
    return int(sum(np.count_nonzero(s.mask[1 : min(len(s.tokens), max_seq_length)]) for s in rows))


class BatchSampler:
    """Endless training batches; the permutation of an epoch is drawn lazily from numpy's global RNG.

    With ``shard = (rank, size)`` each batch yields rows ``rank::size`` of the global batch (mlx-lm's split
    across ranks); ``with_total`` adds the global batch's trained-token count, for a loss summed over ranks.
    ``batches`` replaces the length-sorted batches of sample indices (e.g. packed rows,
    :class:`services.training.packing.PackedSampler`)."""

    def __init__(self, dataset: Any, batch_size: int, max_seq_length: int, shard: tuple[int, int] = (0, 1),
                 with_total: bool = False, batches: list | None = None):
        self.dataset, self.max_seq_length = dataset, max_seq_length
        self.batches = batch_indices(dataset, batch_size) if batches is None else batches
        self.perm: np.ndarray | None = None
        self.pos = 0
        self.shard, self.with_total = shard, with_total
        self.filled = self.cells = 0  # sample tokens and token cells of the batches since the last report

    def count(self, filled: int, cells: int) -> None:
        """Add a batch's sample tokens and token cells (rows × width) to the padding account."""
        self.filled += filled
        self.cells += cells

    def padding_share(self) -> float | None:
        """The share of padding in the batches since the last call (``None`` before any batch); resets the count."""
        share = 1 - self.filled / self.cells if self.cells else None
        self.filled = self.cells = 0
        return share

    def __len__(self) -> int:
        return len(self.batches)

    def next(self) -> tuple[mx.array, ...]:
        """The next batch (this rank's share of it; with ``with_total`` also the whole batch's trained tokens)."""
        rows = [self.dataset[j] for j in self.batches[self.next_index()]]
        rank, size = self.shard
        share = rows[rank::size]
        batch = collate(share, self.max_seq_length)
        self.count(sum(min(len(r.tokens if isinstance(r, Sample) else r[0]), self.max_seq_length) for r in share),
                   batch[0].size)
        if self.with_total:
            return (*batch, mx.array(trained_tokens(rows, self.max_seq_length), mx.float32))
        return batch

    def next_index(self) -> int:
        """The next batch of the epoch's permutation (a new permutation when the epoch is through)."""
        if self.perm is None or self.pos == len(self.perm):
            self.perm = np.random.permutation(len(self.batches))
            self.pos = 0
        self.pos += 1
        return int(self.perm[self.pos - 1])

    def state(self) -> dict[str, Any]:
        return {"perm": None if self.perm is None else self.perm.copy(), "pos": self.pos}

    def restore(self, state: dict[str, Any]) -> None:
        self.perm = None if state["perm"] is None else np.asarray(state["perm"])
        self.pos = int(state["pos"])


def eval_batches(dataset: Any, batch_size: int, max_seq_length: int, loop: bool = False, comm_group: Any = None):
    """One pass over every sequence (the last batch may be partial) in a fresh permutation.

    The ``iterate_batches`` contract that mlx-lm's ``evaluate`` expects; its loss is weighted by tokens,
    so a partial batch counts exactly. (mlx-lm's own iterator drops the remainder.)
    Under ``comm_group`` (several ranks) each rank takes rows ``rank::size`` of every batch; a rank whose share
    of a short last batch is empty gets one row with nothing to count, so every rank sees the same batches.
    """
    idx = sorted_indices(dataset)
    batches = [idx[i : i + batch_size] for i in range(0, len(idx), batch_size)]
    rank, size = (comm_group.rank(), comm_group.size()) if comm_group is not None else (0, 1)
    while True:
        for i in np.random.permutation(len(batches)):
            rows = [dataset[j] for j in batches[i]]
            share = rows[rank::size] or [Sample(rows[0].tokens, np.zeros_like(rows[0].mask))]
            yield collate(share, max_seq_length)
        if not loop:
            break
