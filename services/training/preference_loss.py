"""DPO and ORPO inside the training loop: pair batches, the reference log-probabilities, the losses, the
per-report metrics and the validation of a preference run.

The reference model is never a second copy of the weights:

* ``adapters-off``: LoRA/DoRA runs that start from the base: the policy with its adapter layers swapped for
  the frozen layers they wrap is exactly the base model (computed per batch, outside the gradient);
* ``precomputed``: full fine-tunes and forks (whose starting weights are not the base): the log-probabilities of
  every pair under the weights the run starts from, computed once before the first step and kept in the run
  folder (``reference_logps.npz``), so a resume reads them instead of recomputing them from changed weights.

``preference.compat: true`` reproduces mlx-lm-lora's loop: a batch is drawn from a fresh permutation at every
iteration, and validation runs before the step on full batches in length order, weighted by answer tokens.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_map, tree_unflatten

from services.training import preference
from services.training.batching import BatchSampler
from services.training.preference import Pair, settings

REFERENCE_FILE = "reference_logps.npz"
# per-batch sums the loss returns beside the mean loss (pair-weighted averages over a report or a validation)
STATS = ("rewards_chosen", "rewards_rejected", "preference_accuracy", "logps_chosen", "logps_rejected", "pairs")
REPORTED = ("rewards_chosen", "rewards_rejected", "reward_margin", "preference_accuracy", "logps_chosen",
            "logps_rejected")


# ----------------------------------------------------------------------------------------- batches


def collate_pairs(pairs: list[Pair], max_seq_length: int, pad_to: int = 1
                  ) -> tuple[mx.array, mx.array, mx.array, mx.array]:
    """``(chosen, rejected, chosen_mask, rejected_mask)``: both sides padded to the batch's longest sequence
    (at most ``max_seq_length``, then rounded up to ``pad_to``, as mlx-lm-lora's ORPO batches are); a mask (over
    targets, one shorter) marks the answer tokens kept."""
    longest = min(max(max(len(p.chosen), len(p.rejected)) for p in pairs), max_seq_length)
    width = pad_to * ((longest + pad_to - 1) // pad_to)
    out = []
    for side in ("chosen", "rejected"):
        tokens = np.zeros((len(pairs), width), np.int32)
        mask = np.zeros((len(pairs), width - 1), np.float32)
        for j, p in enumerate(pairs):
            seq = getattr(p, side)[:width]
            tokens[j, : len(seq)] = seq
            mask[j, max(p.prompt_length - 1, 0) : len(seq) - 1] = 1.0  # target t is token t + 1
        out.append((mx.array(tokens), mx.array(mask)))
    (c, cm), (r, rm) = out
    return c, r, cm, rm


def sequence_logps(model: nn.Module, tokens: mx.array, mask: mx.array, clip: bool = False) -> mx.array:
    """Summed log-probability of the masked targets of each row (ORPO clips each token's at -1000)."""
    logits = model(tokens[:, :-1]).astype(mx.float32)
    logp = -nn.losses.cross_entropy(logits, tokens[:, 1:])
    if clip:
        logp = mx.clip(logp, -1000.0, 0.0)
    return (logp * mask).sum(-1)


def lora_layers(model: nn.Module) -> list[tuple[str, nn.Module, nn.Module]]:
    """``(path, adapter layer, the frozen layer it wraps)`` for each LoRA/DoRA layer of ``model``."""
    out = []
    for name, module in model.named_modules():
        base = getattr(module, "linear", None) or getattr(module, "embedding", None)
        if hasattr(module, "lora_a") and isinstance(base, nn.Module):
            out.append((name, module, base))
    return out


@contextmanager
def adapters_off(model: nn.Module):
    """``model`` as its base: every adapter layer swapped for the layer it wraps, and back afterwards."""
    layers = lora_layers(model)
    model.update_modules(tree_unflatten([(name, base) for name, _, base in layers]))
    try:
        yield model
    finally:
        model.update_modules(tree_unflatten([(name, layer) for name, layer, _ in layers]))


# ----------------------------------------------------------------------------------------- losses


def _log1mexp(x: mx.array) -> mx.array:
    """``log(1 - exp(x))`` for ``x < 0``, stable on both sides of ``-ln 2``."""
    x = mx.minimum(x, -1e-7)
    return mx.where(x > -0.6931471805599453, mx.log(-mx.expm1(x)), mx.log1p(-mx.exp(x)))


def pair_losses(mode: str, pref: dict[str, Any], pol: tuple[mx.array, mx.array], ref: tuple[mx.array, mx.array],
                counts: tuple[mx.array, mx.array]) -> tuple[mx.array, mx.array, mx.array]:
    """Per-pair ``(loss, chosen reward, rejected reward)`` from summed log-probabilities and answer token counts.

    DPO: ``sigmoid`` (with optional label smoothing), ``ipo`` (length-normalised scores) and ``hinge`` on
    ``beta * ((pc - pr) - (rc - rr))``. ORPO: the chosen side's mean token NLL minus ``beta`` times the log-sigmoid
    of the log odds ratio of the mean token log-probabilities (no reference)."""
    beta = float(pref["beta"])
    nc, nr = (mx.maximum(n, 1) for n in counts)
    if mode == "orpo":
        c, r = pol[0] / nc, pol[1] / nr
        log_odds = (c - r) - (_log1mexp(c) - _log1mexp(r))
        return -c - beta * nn.log_sigmoid(log_odds), beta * c, beta * r
    pc, pr = pol
    rc, rr = ref
    if pref["loss_type"] == "ipo":
        pc, pr, rc, rr = pc / nc, pr / nr, rc / nc, rr / nr
    logits = (pc - pr) - (rc - rr)
    if pref["loss_type"] == "ipo":
        losses = (logits - 1 / (2 * beta)) ** 2
    elif pref["loss_type"] == "hinge":
        losses = nn.relu(1 - beta * logits)
    else:
        ls = float(pref.get("label_smoothing") or 0.0)
        losses = -(1 - ls) * nn.log_sigmoid(beta * logits) - ls * nn.log_sigmoid(-beta * logits)
    return losses, beta * (pc - rc), beta * (pr - rr)


def make_loss(mode: str, pref: dict[str, Any]):
    """The ``loss(model, chosen, rejected, cmask, rmask, ref_c, ref_r)`` the loop differentiates: the batch's mean
    pair loss, its answer tokens, and the per-batch sums of :data:`STATS`."""
    clip = mode == "orpo"

    def loss(model, chosen, rejected, cmask, rmask, ref_c, ref_r):
        pol = (sequence_logps(model, chosen, cmask, clip), sequence_logps(model, rejected, rmask, clip))
        return from_logps(mode, pref, pol, (cmask.sum(-1), rmask.sum(-1)), (ref_c, ref_r))

    return loss


def from_logps(mode: str, pref: dict[str, Any], pol: tuple[mx.array, mx.array], counts: tuple[mx.array, mx.array],
               ref: tuple[mx.array, mx.array]) -> tuple[mx.array, mx.array, mx.array]:
    """``(mean loss, answer tokens, STATS sums)`` of a batch from its summed policy log-probabilities."""
    losses, rew_c, rew_r = pair_losses(mode, pref, pol, ref, counts)
    nc, nr = (mx.maximum(n, 1) for n in counts)
    # a tie (the untrained policy is its reference) counts half: accuracy starts at 0.5, not 0
    right = (rew_c > rew_r).astype(mx.float32) + 0.5 * (rew_c == rew_r).astype(mx.float32)
    sums = mx.stack([rew_c.sum(), rew_r.sum(), right.sum(), (pol[0] / nc).sum(), (pol[1] / nr).sum(),
                     mx.array(float(pol[0].shape[0]))])
    return losses.mean(), counts[0].sum() + counts[1].sum(), mx.stop_gradient(sums)


def two_pass_value_and_grad(model: nn.Module, mode: str, pref: dict[str, Any]):
    """``value_and_grad`` of :func:`make_loss`'s loss in two passes that never hold the activations of both
    sides at once: the loss depends on the weights only through each pair's summed log-probabilities, so

        dL/dθ = Σ_pairs dL/dpc · dpc/dθ + dL/dpr · dpr/dθ

    First both sides' log-probabilities are computed without a gradient; then the small pair loss is
    differentiated in them (the weights ``dL/dpc``, ``dL/dpr``); then each side's gradient is the gradient of its
    weighted log-probabilities, one side after the other, summed. Each phase is evaluated before the next (MLX
    would otherwise schedule the passes together), so the step cannot be compiled as one graph. Without dropout
    only: MLX cannot replay a random state, so the gradient passes would draw other dropout masks."""
    clip = mode == "orpo"

    def side_grad(tokens: mx.array, mask: mx.array, weights: mx.array) -> Any:
        return nn.value_and_grad(model, lambda m: (sequence_logps(m, tokens, mask, clip) * weights).sum())(model)[1]

    def value_and_grad(model, chosen, rejected, cmask, rmask, ref_c, ref_r):
        pol = (sequence_logps(model, chosen, cmask, clip), sequence_logps(model, rejected, rmask, clip))
        counts = (cmask.sum(-1), rmask.sum(-1))
        (lvalue, toks, sums), (wc, wr) = mx.value_and_grad(
            lambda pc, pr: from_logps(mode, pref, (pc, pr), counts, (ref_c, ref_r)), argnums=(0, 1))(*pol)
        mx.eval(lvalue, toks, sums, wc, wr)
        grad_c = side_grad(chosen, cmask, wc)
        mx.eval(grad_c)  # the chosen side's activations are freed before the rejected side's pass
        grad = tree_map(lambda a, b: a + b, grad_c, side_grad(rejected, rmask, wr))
        return (lvalue, toks, sums), grad

    return value_and_grad


def averages(sums: np.ndarray | mx.array, prefix: str = "") -> dict[str, float]:
    """The reported metrics from accumulated :data:`STATS` sums."""
    s = dict(zip(STATS, np.asarray(sums, np.float64).tolist(), strict=True))
    n = max(s["pairs"], 1.0)
    out = {k: s[k] / n for k in STATS if k != "pairs"}
    out["reward_margin"] = out["rewards_chosen"] - out["rewards_rejected"]
    return {f"{prefix}{k}": out[k] for k in REPORTED}


# ----------------------------------------------------------------------------------------- the run's objective


class PairSampler(BatchSampler):
    """Training batches of pairs, each with its reference log-probabilities."""

    def __init__(self, objective: Objective, batch_size: int, max_seq_length: int, compat: bool):
        super().__init__(objective.train, batch_size, max_seq_length)
        self.objective, self.compat = objective, compat

    def next(self) -> tuple[mx.array, ...]:
        if self.compat:  # mlx-lm-lora builds a new batch generator, so a new permutation, every iteration
            index = int(np.random.permutation(len(self.batches))[0])
        else:
            index = self.next_index()
        batch = self.objective.batch("train", self.batches[index])
        pairs = [self.objective.train[j] for j in self.batches[index]]
        width = batch[0].shape[1]
        self.count(sum(min(len(p.chosen), width) + min(len(p.rejected), width) for p in pairs),
                   batch[0].size + batch[1].size)
        return batch


class Objective:
    """What a DPO/ORPO run adds to the loop: its loss, batches, reference, metrics and validation."""

    def __init__(self, cfg: dict[str, Any], model: nn.Module, train: list[Pair], valid: list[Pair], run_path: Path):
        self.cfg, self.model, self.mode = cfg, model, cfg["mode"]
        self.pref = settings(cfg)
        self.train, self.valid = train, valid
        self.compat = bool(self.pref["compat"])
        self.loss = make_loss(self.mode, self.pref)
        self.ref_file = run_path / REFERENCE_FILE
        self.stored: dict[str, np.ndarray] | None = None  # precomputed reference: split → (pairs, 2)
        self.sums = mx.zeros((len(STATS),))
        self.last_val: dict[str, float] = {}

    @property
    def two_pass(self) -> bool:
        """Whether the step is :func:`two_pass_value_and_grad` rather than the joint pass
        (:func:`services.training.preference.two_pass`)."""
        return preference.two_pass(self.cfg)

    def value_and_grad(self, model: nn.Module):
        """The step's ``value_and_grad`` (see :attr:`two_pass`)."""
        if self.two_pass:
            return two_pass_value_and_grad(model, self.mode, self.pref)
        return nn.value_and_grad(model, self.loss)

    @property
    def reference(self) -> str:
        if self.mode == "orpo":
            return "none (ORPO needs no reference model)"
        return "precomputed" if self.stored is not None else "adapters-off"

    def prepare_reference(self, resume: Path | None, run_path: Path) -> None:
        """Choose the reference (:func:`services.training.preference.reference_kind`): the stored
        log-probabilities if this run has them; else precompute them when the starting weights are not the base."""
        if self.mode == "orpo":
            return
        if self.ref_file.exists():
            with np.load(self.ref_file) as f:
                self.stored = {k: f[k] for k in f.files}
            return
        forked = resume is not None and run_path.resolve() not in resume.resolve().parents
        if preference.reference_kind(self.cfg, forked) == "precomputed":
            self.model.eval()  # no dropout: the reference is deterministic and draws no random numbers
            self.stored = {"train": self._logps_of(self.train), "valid": self._logps_of(self.valid)}
            self.model.train()
            np.savez(self.ref_file, **self.stored)

    def _logps_of(self, pairs: list[Pair]) -> np.ndarray:
        out = np.zeros((len(pairs), 2), np.float32)
        size = self.cfg["batch_size"]
        for i in range(0, len(pairs), size):
            c, r, cm, rm = collate_pairs(pairs[i : i + size], self.cfg["max_seq_length"])
            logps = mx.stack([sequence_logps(self.model, c, cm), sequence_logps(self.model, r, rm)], axis=1)
            out[i : i + size] = np.array(logps)
        return out

    def batch(self, split: str, indices: list[int]) -> tuple[mx.array, ...]:
        """A collated batch with its reference log-probabilities (zeros for ORPO, which ignores them)."""
        pairs = self.train if split == "train" else self.valid
        # padding changes no value, but it changes the sums' rounding, which Adam amplifies: match it in compat
        pad_to = 8 if self.compat and self.mode == "orpo" else 1
        c, r, cm, rm = collate_pairs([pairs[j] for j in indices], self.cfg["max_seq_length"], pad_to)
        if self.mode == "orpo":
            ref_c = ref_r = mx.zeros((len(indices),))
        elif self.stored is not None:
            ref = mx.array(self.stored[split][np.asarray(indices)])
            ref_c, ref_r = ref[:, 0], ref[:, 1]
        else:
            with adapters_off(self.model):
                ref_c, ref_r = sequence_logps(self.model, c, cm), sequence_logps(self.model, r, rm)
            mx.eval(ref_c, ref_r)  # before the policy pass: the two never hold activations at once
        return c, r, cm, rm, ref_c, ref_r

    # -- reports ----------------------------------------------------------------------------------

    def accumulate(self, sums: mx.array) -> None:
        self.sums = self.sums + sums

    def train_report(self) -> dict[str, float]:
        out = averages(self.sums)
        self.sums = mx.zeros((len(STATS),))
        return out

    def save(self, folder: Path) -> None:
        mx.save_safetensors(str(folder / "preference.safetensors"), {"sums": self.sums})

    def restore(self, folder: Path) -> None:
        path = folder / "preference.safetensors"
        if path.exists():  # a fork from an SFT checkpoint starts a fresh report window
            self.sums = mx.load(str(path))["sums"]

    # -- validation -------------------------------------------------------------------------------

    def _val_batches(self) -> list[list[int]]:
        order = sorted(range(len(self.valid)), key=lambda i: len(self.valid[i].chosen))
        size, limit = self.cfg["batch_size"], self.cfg["val_batches"]
        if self.compat:  # mlx-lm-lora: full batches in length order
            batches = [order[i : i + size] for i in range(0, len(order) - size + 1, size)]
        else:  # every pair (the last batch may be partial), a fixed seeded order of batches
            batches = [order[i : i + size] for i in range(0, len(order), size)]
            batches = [batches[i] for i in np.random.RandomState(self.cfg["seed"]).permutation(len(batches))]
        return batches if limit == -1 else batches[:limit]

    def evaluate(self) -> float:
        """Validation loss (and :attr:`last_val`, the metrics): mlx-lm-lora weights batches by answer tokens in
        compat mode; otherwise every pair counts once."""
        self.model.eval()
        total, weight, sums = mx.array(0.0), mx.array(0.0), mx.zeros((len(STATS),))
        for indices in self._val_batches():
            lvalue, toks, batch_sums = self.loss(self.model, *self.batch("valid", indices))
            w = toks if self.compat else batch_sums[-1]
            total, weight, sums = total + lvalue * w, weight + w, sums + batch_sums
            mx.eval(total, weight, sums)
        self.last_val = averages(sums, "val_")
        return (total / weight).item()
