"""Padding-free IFT batches: several samples in one row of ``max_seq_length`` tokens, none attending to another.

mlx-lm's models take no mask argument: each family's model builds its attention mask with
``create_attention_mask(h, cache)``, which returns ``cache.make_mask(N, ...)`` when the layer's cache object has
one, and passes it to every attention layer (RoPE is applied at ``cache.offset``; ``cache.update_and_fetch``
returns the keys and values attended to). :class:`SegmentMask` is such a cache object: offset 0, keys and values
passed through, and a block-diagonal causal mask, so a packed row is one forward pass of independent samples.
Positions are those of the row (a sample at column ``p`` is rotated by ``p`` more): RoPE's scores depend only on
relative positions, which :func:`check_model` measures on the run's own model before training starts.

Input is any sequence of samples with ``tokens`` and a per-token loss ``mask`` (``mask[j]``: token ``j`` is a
target), e.g. :class:`services.training.data.Sample`; output are the rows (:func:`pack_rows`) and the arrays of a
batch of rows (:func:`collate_packed`), which :func:`packed_loss` trains on.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import Any, Protocol

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from services.training.batching import BatchSampler, masked_loss
from services.training.data import DataError

# how far a sample's loss in a packed row may be from its loss alone before the model is refused
MODEL_CHECK_TOLERANCE = 1e-4


class Tokenized(Protocol):
    tokens: Sequence[int]
    mask: Sequence[bool]


def pack_rows(lengths: Sequence[int], width: int) -> list[list[int]]:
    """Sample indices per row: best-fit decreasing, each sample taking ``min(length, width)`` of ``width`` columns.

    Deterministic (ties keep index order); rows come out in the order they were opened."""
    order = sorted(range(len(lengths)), key=lambda i: -min(lengths[i], width))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (columns left, row), sorted: the tightest row that fits is found by bisect
    for i in order:
        n = min(lengths[i], width)
        at = bisect.bisect_left(free, (n, -1))
        if at == len(free):
            rows.append([i])
            left, row = width - n, len(rows) - 1
        else:
            left, row = free.pop(at)
            rows[row].append(i)
            left -= n
        if left > 1:  # a sample needs two tokens to hold one target
            bisect.insort(free, (left, row))
    return rows


def collate_packed(rows: Sequence[Sequence[Tokenized]], width: int) -> tuple[mx.array, mx.array, mx.array]:
    """``(tokens, loss mask, segments)`` of a batch of packed rows, ``width`` tokens each.

    ``tokens`` is ``(R, width)``; ``mask`` and ``segments`` are ``(R, width - 1)``, over the inputs
    ``tokens[:, :-1]``: the target ``tokens[:, j + 1]`` counts when ``mask[:, j]``; ``segments`` numbers the
    samples of a row from 1 (0: padding), and a target never crosses into the next sample."""
    tokens = np.zeros((len(rows), width), np.int32)
    mask = np.zeros((len(rows), width - 1), np.bool_)
    segments = np.zeros((len(rows), width - 1), np.int32)
    for r, row in enumerate(rows):
        p = 0
        for k, s in enumerate(row, 1):
            n = min(len(s.tokens), width)
            if p + n > width:
                raise ValueError(f"row {r}: its samples hold {p + n} tokens, more than the row's {width}")
            tokens[r, p : p + n] = s.tokens[:n]
            mask[r, p : p + n - 1] = s.mask[1:n]
            segments[r, p : min(p + n, width - 1)] = k
            p += n
    return mx.array(tokens), mx.array(mask), mx.array(segments)


def fill(rows: Sequence[Sequence[Tokenized]], width: int) -> tuple[int, int]:
    """``(sample tokens, token cells)`` of a batch of packed rows (what its padding share is computed from)."""
    return sum(min(len(s.tokens), width) for row in rows for s in row), len(rows) * width


class SegmentMask:
    """A stand-in for a layer's KV cache that gives attention a block-diagonal causal mask and nothing else.

    ``segments`` is ``(B, L)``; a query attends to the keys at or before it with the same segment number."""

    offset = 0

    def __init__(self, segments: mx.array):
        seg = segments[:, None, :]
        causal = mx.arange(segments.shape[1])
        self.mask = (seg[..., :, None] == seg[..., None, :]) & (causal[:, None] >= causal[None, :])

    def make_mask(self, n: int, return_array: bool = False, window_size: int | None = None) -> mx.array:
        if window_size is None:
            return self.mask
        q = mx.arange(n)
        return self.mask & (q[:, None] < q[None, :] + window_size)

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        return keys, values

    def empty(self) -> bool:
        return True


def packed_logits(model: nn.Module, inputs: mx.array, segments: mx.array) -> mx.array:
    """The model's logits over packed ``inputs``, each sample seeing only itself."""
    cache = SegmentMask(segments)
    return model(inputs, cache=[cache] * len(model.layers))


def packed_loss(model: nn.Module, batch: mx.array, mask: mx.array, segments: mx.array) -> tuple[mx.array, mx.array]:
    """Mean cross-entropy over the masked targets of packed rows: ``masked_loss`` with a block-diagonal mask."""
    return masked_loss(lambda inputs: packed_logits(model, inputs, segments), batch, mask)


def sample_losses(model: nn.Module, rows: Sequence[Sequence[Tokenized]], width: int) -> list[list[tuple[float, int]]]:
    """``(summed loss, targets)`` of every sample of every row, from one packed forward pass."""
    tokens, mask, segments = collate_packed(rows, width)
    logits = packed_logits(model, tokens[:, :-1], segments)
    ce = (nn.losses.cross_entropy(logits, tokens[:, 1:]) * mask).astype(mx.float32)
    out = []
    for r, row in enumerate(rows):
        seg = segments[r]
        out.append([(float((ce[r] * (seg == k)).sum().item()), int((mask[r] & (seg == k)).sum().item()))
                    for k in range(1, len(row) + 1)])
    return out


def alone_loss(model: nn.Module, sample: Tokenized, width: int) -> tuple[float, int]:
    """``(summed loss, targets)`` of one sample alone, unpadded: the reference a packed row must match."""
    n = min(len(sample.tokens), width)
    tokens = mx.array(np.asarray(sample.tokens[:n], np.int32))[None]
    mask = mx.array(np.asarray(sample.mask[1:n], np.bool_))[None]
    ce = (nn.losses.cross_entropy(model(tokens[:, :-1]), tokens[:, 1:]) * mask).astype(mx.float32)
    return float(ce.sum().item()), int(mask.sum().item())


def check_model(model: nn.Module, samples: Sequence[Tokenized], width: int) -> float:
    """The largest difference of a per-sample mean loss, packed against alone, on a few of ``samples``.

    Raises ``ValueError`` naming the model family when it exceeds :data:`MODEL_CHECK_TOLERANCE` (a family that does
    not build its mask through the cache object, or whose positions are not relative)."""
    by_length = sorted(samples, key=lambda s: len(s.tokens))
    picks = by_length[:2] + by_length[len(by_length) // 2 :][:1]
    rows = [[picks[i] for i in row] for row in pack_rows([len(s.tokens) for s in picks], width)]
    packed = sample_losses(model, rows, width)
    worst = 0.0
    for row, losses in zip(rows, packed, strict=True):
        for s, (total, n) in zip(row, losses, strict=True):
            ref_total, ref_n = alone_loss(model, s, width)
            if n != ref_n:
                raise ValueError(f"pack_samples: a packed sample trains {n} tokens, alone {ref_n}")
            worst = max(worst, abs(total / max(n, 1) - ref_total / max(ref_n, 1)))
    if not worst <= MODEL_CHECK_TOLERANCE:
        kind = getattr(model, "model_type", type(model).__module__)
        raise ValueError(f"pack_samples: this model ({kind}) does not keep packed samples apart (a sample's loss "
                         f"moves by {worst:.2e} when packed with others); set pack_samples: false")
    return worst


def row_batches(rows: list[list[int]], batch_size: int) -> list[list[list[int]]]:
    """Rows grouped ``batch_size`` at a time, in row order (the last, short group dropped)."""
    return [rows[i : i + batch_size] for i in range(0, len(rows) - batch_size + 1, batch_size)]


def packed_eval_batches(dataset: Sequence[Tokenized], batch_size: int, max_seq_length: int, loop: bool = False,
                        comm_group: Any = None):
    """:func:`services.training.batching.eval_batches` over packed rows: every row once (the last batch may hold
    fewer rows) in a fresh permutation; ``batch_size`` counts rows, as in training."""
    if comm_group is not None and comm_group.size() > 1:
        raise ValueError("pack_samples runs in one process")
    rows = pack_rows([len(s.tokens) for s in dataset], max_seq_length)
    batches = [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
    while True:
        for i in np.random.permutation(len(batches)):
            yield collate_packed([[dataset[j] for j in row] for row in batches[i]], max_seq_length)
        if not loop:
            break


def packing_stats(samples: Sequence[Tokenized], rows: list[list[int]], width: int) -> dict[str, Any]:
    """Rows, samples per row and padding share of a packed split."""
    used = sum(min(len(samples[i].tokens), width) for row in rows for i in row)
    return {"rows": len(rows), "samples_per_row": round(len(samples) / max(len(rows), 1), 2),
            "padding_share": round(1 - used / max(len(rows) * width, 1), 4)}


class PackedSampler(BatchSampler):
    """Endless batches of ``batch_size`` packed rows of ``max_seq_length`` tokens (:class:`BatchSampler`'s order
    and checkpointable state, over groups of rows instead of groups of samples)."""

    def __init__(self, dataset: Sequence[Tokenized], batch_size: int, max_seq_length: int):
        self.rows = pack_rows([len(s.tokens) for s in dataset], max_seq_length)
        if len(self.rows) < batch_size:
            raise DataError(f"pack_samples: the training samples fill {len(self.rows)} row(s) of max_seq_length="
                            f"{max_seq_length} tokens, fewer than batch_size={batch_size}; lower batch_size "
                            "(a packed batch is batch_size full rows) or add data")
        super().__init__(dataset, batch_size, max_seq_length, batches=row_batches(self.rows, batch_size))

    def next(self) -> tuple[mx.array, ...]:
        rows = [[self.dataset[i] for i in row] for row in self.batches[self.next_index()]]
        self.count(*fill(rows, self.max_seq_length))
        return collate_packed(rows, self.max_seq_length)

    def stats(self) -> dict[str, Any]:
        return packing_stats(self.dataset, self.rows, self.max_seq_length)
