"""Defaults that fit the data and the machine: a proposal for ``max_seq_length``, batch size, run length and
the evaluation schedule of a resolved config, used by the Train page (a fresh form, "Fit to data and machine",
the probe's "Apply the suggestion") and ``forgellm propose``.

- ``max_seq_length``: the 95th percentile of the samples' token lengths, rounded up to a multiple of 64 and
  capped by the model's context (documents for CPT are packed: windows of :data:`DOCUMENT_WINDOW` tokens);
- batch size: the largest of 8, 4, 2, 1 that leaves at least :data:`MIN_STEPS_PER_EPOCH` steps per epoch and fits
  free memory by the preflight memory model;
- length: enough epochs for about :data:`TARGET_UPDATES` optimizer updates (1 to :data:`MAX_EPOCHS`), fewer
  when the estimate (validation included) would pass the time budget;
- validation and checkpoints about four times per run, with at most :data:`VALIDATION_SHARE` of the training
  work spent validating; warm-up 5 % of the run.
"""

from __future__ import annotations

import math
from typing import Any

from services.config import read_schedule, schedule, world_size
from services.library.models import context_limit
from services.training import preflight
from services.workspace import read_json

DOCUMENT_WINDOW = 256
SEQ_STEP = 64
MIN_SEQ = 64
MAX_SEQ = 2048  # never proposed beyond this, whatever the model's context
BATCHES = (8, 4, 2, 1)
MIN_STEPS_PER_EPOCH = 8
TARGET_UPDATES = 100
MAX_EPOCHS = 10
MIN_ITERS = 10
EVALS_PER_RUN = 4
VALIDATION_SHARE = 0.15
WARMUP_SHARE = 0.05
DEFAULT_BUDGET_SECONDS = 20 * 60


def proposed_seq(facts: dict[str, Any], cfg: dict[str, Any], context: int | None) -> int:
    """``max_seq_length`` for the data: p95 of the token lengths rounded up (documents: packing windows)."""
    cap = min(context or MAX_SEQ, MAX_SEQ)
    if facts["fmt"] == "documents" and cfg.get("packing", True):
        return min(DOCUMENT_WINDOW, cap)
    p95 = int(facts.get("p95_length") or facts["max_length"] or MIN_SEQ)
    return max(MIN_SEQ, min(SEQ_STEP * math.ceil(p95 / SEQ_STEP), cap))


def proposed_batch(model: dict[str, Any], cfg: dict[str, Any], samples: int, seq: int, free: float) -> int:
    """The largest batch that leaves enough steps per epoch and fits ``free`` bytes (1 when none does)."""
    procs = max(1, world_size(cfg))  # every form of `distributed` (processes or hosts)
    for b in BATCHES:
        if b % procs or (b > 1 and samples // b < MIN_STEPS_PER_EPOCH):
            continue
        if preflight.fits_in(model, b, seq, {**cfg, "grad_accumulation_steps": 1}, free)[0]:
            return b
    return max(procs, 1)


def eval_plan(iters: int, batch: int, valid_samples: int) -> dict[str, int]:
    """Report, validate and save about :data:`EVALS_PER_RUN` times; bounded validation batches."""
    every = max(1, math.ceil(iters / EVALS_PER_RUN))
    evals = preflight.validations(iters, every)
    most = max(1, int(VALIDATION_SHARE * 3 * iters / evals))  # an eval batch costs about a third of a step
    val_batches = -1 if valid_samples <= most * batch else most
    return {"steps_per_eval": every, "save_every": every, "val_batches": val_batches,
            "steps_per_report": max(1, min(10, math.ceil(iters / 20)))}


def _apply(cfg: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    out = {**cfg, **{k: v for k, v in changes.items() if k != "warmup"}}
    out.pop("epochs", None)
    return out


def propose(cfg: dict[str, Any], tokenizer: Any | None = None, free_bytes: float | None = None,
            budget_seconds: float = DEFAULT_BUDGET_SECONDS, tokens_per_second: float | None = None,
            blas: str | None = None) -> dict[str, Any]:
    """Settings that fit the data and machine for a resolved config (``RunManager.prepare_config``).

    Returns ``changes`` (config keys: ``max_seq_length``, ``batch_size``, ``grad_accumulation_steps``, ``iters``,
    ``warmup``, ``steps_per_eval``, ``save_every``, ``val_batches``, ``steps_per_report``), ``epochs`` (passes
    over the training set), ``estimate`` (:func:`preflight.estimate` of the result; ``tokens_per_second`` a
    measured speed, e.g. a probe's), ``seconds`` (validation and start-up included), ``truncated`` (samples
    longer than the proposed length) and ``reasons`` (one line per choice)."""
    import psutil  # noqa: PLC0415

    free = float(free_bytes if free_bytes is not None else psutil.virtual_memory().available)
    context = context_limit(read_json(f"{cfg['model']}/config.json") or {})
    wide = {**cfg, "max_seq_length": min(context or MAX_SEQ, MAX_SEQ)}
    facts = preflight.data_facts(wide, tokenizer)
    seq = proposed_seq(facts, cfg, context)
    model = preflight.model_facts(cfg["model"], cfg)
    at_seq = preflight.data_facts({**cfg, "max_seq_length": seq}, tokenizer)
    batch = proposed_batch(model, cfg, at_seq["samples"], at_seq["seq"], free)
    steps = max(at_seq["samples"] // batch, 1)
    epochs = min(MAX_EPOCHS, max(1, round(TARGET_UPDATES / steps)))
    iters = epochs * steps
    changes: dict[str, Any] = {"max_seq_length": seq, "batch_size": batch, "grad_accumulation_steps": 1}

    def estimate(n: int) -> dict[str, Any]:
        plan = {"iters": n, **eval_plan(n, batch, at_seq["valid_samples"])}
        est = preflight.estimate(_apply(cfg, {**changes, **plan}), tokenizer, free, blas,
                                 measured_tps=tokens_per_second)
        return {"plan": plan, "est": est}

    trial = estimate(iters)
    total = trial["est"]["total_seconds"]
    if total > budget_seconds:  # time grows with iterations (validation follows them): scale down
        per_iter = (total - trial["est"]["startup_seconds"]) / iters
        fit = int((budget_seconds - trial["est"]["startup_seconds"]) // max(per_iter, 1e-9))
        iters = max(MIN_ITERS, min(iters, fit))
        trial = estimate(iters)
    changes.update(trial["plan"], warmup=max(1, round(WARMUP_SHARE * iters)))
    est = trial["est"]
    packed = at_seq["fmt"] == "documents" and cfg.get("packing", True)
    reasons = [
        f"max_seq_length {seq}: "
        + (f"packed windows of {seq} tokens" if packed
           else f"95 % of the samples have ≤ {facts.get('p95_length')} tokens")
        + (f" (the model's context is {context:,})" if context else ""),
        f"batch size {batch}: {at_seq['samples']:,} training samples → {steps:,} steps per epoch; "
        f"{est['peak_gb']:.2f} GB of {free / 1e9:.1f} GB free",
        f"{iters:,} iterations ≈ {iters / steps:.1f} epoch(s)"
        + (" (shortened to fit the time budget)" if iters < epochs * steps else ""),
        f"validation every {changes['steps_per_eval']} iterations on "
        + ("the whole validation set" if changes["val_batches"] < 0 else f"{changes['val_batches']} batches"),
    ]
    return {"changes": changes, "epochs": iters / steps, "estimate": est, "seconds": est["total_seconds"],
            "truncated": at_seq["truncated"], "reasons": reasons, "budget_seconds": budget_seconds}


def apply_to_config(user_cfg: dict[str, Any], proposal: dict[str, Any]) -> dict[str, Any]:
    """A user config with the proposal's changes (a decaying or warm-up schedule rebuilt for the new length)."""
    ch = proposal["changes"]
    out = _apply(user_cfg, ch)
    known = read_schedule(user_cfg.get("lr_schedule"))
    if known is not None:  # any other schedule is the user's own: kept as it is
        out["lr_schedule"] = schedule(known["kind"], known["lr"], ch["iters"], ch["warmup"], known["final_lr"])
    return out
