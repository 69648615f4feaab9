"""Evaluate what an :class:`services.inference.worker.Engine` holds: suites, perplexity suites and lm-eval tasks.

Runs inside a process that has the model (the model worker, or the training worker between steps). For several
targets (the base and checkpoints of one run) the base is loaded once and only adapter tensors are swapped.
Each result is one plain record (see :mod:`services.evaluation.results`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from services.evaluation.results import target_fields
from services.evaluation.suites import Suite, from_dict, score_case, summarize
from services.inference.worker import Cancel, Engine

Emit = Callable[[dict[str, Any]], None]


def run_suite(engine: Engine, suite: Suite, cancel: Cancel, emit: Emit | None = None) -> dict[str, Any]:
    """One suite on the active model: every case's output and verdict, or the perplexity of its dataset."""
    t0 = time.perf_counter()
    if suite.kind == "perplexity":
        ppl = engine.perplexity(suite.dataset, suite.max_seq_length, suite.batch_size, suite.mask_prompt)
        metrics = {"perplexity": ppl["perplexity"], "loss": ppl["loss"], "tokens": ppl["tokens"]}
        return {"name": suite.name, "kind": "perplexity", "metrics": metrics, "primary": "perplexity",
                "score": ppl["perplexity"], "higher_is_better": False, "seconds": time.perf_counter() - t0}
    cases = []
    reqs = [suite.request(c) for c in suite.cases]
    step = suite.batch_size if all(engine.batchable(r) for r in reqs) else 1  # greedy: several cases at once
    for i in range(0, len(reqs), step):
        if cancel.is_set():
            break
        chunk = suite.cases[i:i + step]
        outs = (engine.generate_batch(reqs[i:i + step]) if step > 1 and len(chunk) > 1
                else [engine.generate(reqs[i], cancel, None)])
        cases += [score_case(c, o["text"], len(o["tokens"])) for c, o in zip(chunk, outs, strict=True)]
        if emit is not None:
            emit({"type": "progress", "suite": suite.name, "case": len(cases), "cases": len(suite.cases)})
    metrics = summarize(suite, cases)
    partial = {"partial": True} if len(cases) < len(suite.cases) else {}  # cancelled: shown, never recorded
    return {"name": suite.name, "kind": "suite", "metrics": metrics, "primary": "pass_rate",
            "score": metrics["pass_rate"], "higher_is_better": True, "min_pass_rate": suite.min_pass_rate,
            "cases": cases, "seconds": time.perf_counter() - t0, **partial}


def evaluate_active(engine: Engine, suites: list[Suite], tasks: dict[str, Any] | None, cancel: Cancel,
                    emit: Emit | None = None) -> list[dict[str, Any]]:
    """Every suite, then the lm-eval tasks, on the model as it is now."""
    records = [run_suite(engine, s, cancel, emit) for s in suites if not cancel.is_set()]
    if tasks and not cancel.is_set():
        from services.evaluation import harness  # lm-eval (the eval extra) only when tasks are asked for

        lm = harness.ForgeLM(engine.model, engine.tokenizer, use_chat_template=tasks.get("chat_template"))
        records += harness.run_tasks(lm, tasks)
    return records


def evaluate_targets(engine: Engine, targets: list[str | None], suites: list[dict[str, Any]],
                     tasks: dict[str, Any] | None, cancel: Cancel, emit: Emit) -> dict[str, Any]:
    """Every target (None: the base; else a checkpoint/adapter folder) on one base; emits each record as it ends."""
    parsed = [from_dict(s, where=s.get("name", "suite")) for s in suites]
    engine.require()
    full = any(t is not None and engine.read_adapter(t).kind == "full" for t in targets)
    # full fine-tune weights replace the base's: each such target is loaded on its own (no sharing possible)
    adapters = targets if full else engine.prepare_compare(targets)
    previous, base = engine.active, engine.model_path
    records: list[dict[str, Any]] = []
    try:
        for i, adapter in enumerate(adapters):
            if cancel.is_set():
                break
            if full:
                engine.load(base, adapter)
            else:
                engine.activate(adapter)
            emit({"type": "progress", "target": i + 1, "targets": len(targets), "label": target_fields(targets[i])})

            def on_case(msg: dict[str, Any], i: int = i) -> None:
                emit({**msg, "target": i + 1, "targets": len(targets)})

            for rec in evaluate_active(engine, parsed, tasks, cancel, on_case):
                rec.update(target_fields(targets[i]))
                records.append(rec)
                emit({"type": "record", "record": rec})
    finally:
        if not full:
            engine.activate(previous if previous is not None and engine.fits(previous) else None)
    return {"records": records, "cancelled": cancel.is_set(), **engine.describe()}
