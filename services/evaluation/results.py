"""Eval results: the run folder's ``evals.jsonl``, the checkpoint × metric table, and "best by eval". No MLX.

One record per (target, suite or task)::

    {"name": SUITE|TASK, "kind": "suite"|"perplexity"|"task", "iteration": N (0: the base), "label": "base"|"RUN@N",
     "target": DIR|null, "metrics": {...}, "primary": METRIC, "score": x, "higher_is_better": bool,
     "cases": [...] (suites) | "samples": [...] (tasks), "min_pass_rate": x|null, "time": t}

Later records of the same (iteration, name) replace earlier ones (an evaluation run again).
"""

from __future__ import annotations

import difflib
import os
import time
from pathlib import Path
from typing import Any

from services.errors import ForgeError
from services.inference.requests import adapter_label
from services.training.folder import RunFolder
from services.workspace import append_jsonl, read_jsonl_tail

EVALS = "evals.jsonl"
BEST_PREFIX = "eval:"


class EvalConfigError(ForgeError, ValueError):
    """A run's ``eval``/``best_by`` settings are wrong; the message names the field."""


def evals_path(folder: RunFolder) -> Path:
    return folder.path / EVALS


def target_fields(target: str | os.PathLike | None) -> dict[str, Any]:
    """``target``, ``label`` and ``iteration`` of a record for a base (None) or an adapter/checkpoint folder."""
    if target is None:
        return {"target": None, "label": "base", "iteration": 0}
    p = Path(target)
    iteration = int(p.name) if p.parent.name == "checkpoints" and p.name.isdigit() else None
    return {"target": str(p), "label": adapter_label(p), "iteration": iteration}


def append(folder: RunFolder, records: list[dict[str, Any]]) -> None:
    """Append records to the run's ``evals.jsonl`` (each one whole line, or nothing)."""
    for r in records:
        append_jsonl(evals_path(folder), {**r, "time": round(time.time(), 3)})


def read(folder: RunFolder) -> list[dict[str, Any]]:
    """The run's current eval records: the latest per (iteration, name), in iteration order."""
    records, _ = read_jsonl_tail(evals_path(folder))
    latest: dict[tuple[Any, str], dict[str, Any]] = {}
    for r in records:
        latest[(r.get("iteration"), r["name"])] = r
    return sorted(latest.values(), key=lambda r: (r.get("iteration") is None, r.get("iteration") or 0, r["name"]))


def metric_names(records: list[dict[str, Any]]) -> list[str]:
    """The table's metric columns: each suite or task by name (its primary score), in first-seen order."""
    return list(dict.fromkeys(r["name"] for r in records))


def table(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per evaluated iteration (base first): ``iteration``, ``label`` and each metric's score."""
    rows: dict[Any, dict[str, Any]] = {}
    for r in records:
        row = rows.setdefault(r.get("iteration"), {"iteration": r.get("iteration"), "label": r.get("label")})
        row[r["name"]] = r.get("score")
    return list(rows.values())


def series(records: list[dict[str, Any]], name: str) -> list[tuple[int, float]]:
    """(iteration, score) of one metric over the run's checkpoints, base (iteration 0) included."""
    return [(r["iteration"], r["score"]) for r in records
            if r["name"] == name and r.get("iteration") is not None and r.get("score") is not None]


def best_by_name(best_by: object) -> str | None:
    """The suite/task name of ``best_by: eval:NAME`` (None for the default, validation loss)."""
    if best_by is None or best_by == "val_loss":
        return None
    if not isinstance(best_by, str) or not best_by.startswith(BEST_PREFIX) or not best_by[len(BEST_PREFIX):].strip():
        raise EvalConfigError(f"best_by: use 'val_loss' or 'eval:SUITE', got {best_by!r}")
    return best_by[len(BEST_PREFIX):].strip()


def best(records: list[dict[str, Any]], name: str) -> dict[str, Any] | None:
    """The checkpoint record (not the base) with the best score of ``name``; the earliest of equals."""
    scored = [r for r in records if r["name"] == name and r.get("score") is not None and (r.get("iteration") or 0) > 0]
    if not scored:
        return None
    sign = 1 if scored[0].get("higher_is_better", True) else -1
    return max(scored, key=lambda r: (sign * r["score"], -r["iteration"]))


def improved(records: list[dict[str, Any]], name: str, iteration: int, min_delta: float = 0.0) -> bool:
    """Whether ``iteration``'s score of ``name`` beats every earlier checkpoint's by more than ``min_delta``."""
    mine = [r for r in records if r["name"] == name and r.get("iteration") == iteration]
    earlier = [r for r in records if r["name"] == name and 0 < (r.get("iteration") or 0) < iteration]
    if not mine or mine[0].get("score") is None:
        return False
    if not earlier:
        return True
    sign = 1 if mine[0].get("higher_is_better", True) else -1
    return sign * mine[0]["score"] > max(sign * r["score"] for r in earlier if r.get("score") is not None) + min_delta


def word_diff(before: str, after: str) -> list[tuple[str, str]]:
    """``after`` against ``before`` word by word: ``(op, text)`` pieces, op one of ``same``, ``added``, ``removed``."""
    a, b = before.split(" "), after.split(" ")
    out: list[tuple[str, str]] = []
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_opcodes():
        if op == "equal":
            out.append(("same", " ".join(a[i1:i2])))
            continue
        if i2 > i1:
            out.append(("removed", " ".join(a[i1:i2])))
        if j2 > j1:
            out.append(("added", " ".join(b[j1:j2])))
    return out


def case_grid(records: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    """Per case of suite ``name``: its id and, per evaluated target (base first), output, pass/fail and the diff
    against the base's output."""
    recs = [r for r in records if r["name"] == name and r.get("cases")]
    base = next((r for r in recs if r.get("iteration") == 0), None)
    base_out = {c["id"]: c["output"] for c in (base or {}).get("cases", [])}
    grid: dict[str, dict[str, Any]] = {}
    for r in recs:
        for c in r["cases"]:
            row = grid.setdefault(c["id"], {"id": c["id"], "targets": []})
            row["targets"].append({"label": r.get("label"), "iteration": r.get("iteration"), "output": c["output"],
                                   "passed": c["passed"], "why": [x["why"] for x in c["checks"] if not x["passed"]],
                                   "diff": word_diff(base_out[c["id"]], c["output"])
                                   if c["id"] in base_out and r is not base else None})
    return list(grid.values())


def rank_runs(by_run: dict[str, list[dict[str, Any]]], name: str) -> list[dict[str, Any]]:
    """Runs ranked by their best checkpoint's ``name`` score (best first; runs without it last): ``run``,
    ``score``, ``iteration``, ``base`` (the base model's score) and ``higher_is_better``."""
    rows = []
    for run_id, records in by_run.items():
        top = best(records, name)
        base = next((r.get("score") for r in records if r["name"] == name and r.get("iteration") == 0), None)
        rows.append({"run": run_id, "score": top["score"] if top else None, "base": base,
                     "iteration": top["iteration"] if top else None,
                     "higher_is_better": top.get("higher_is_better", True) if top else True})
    scored = sorted((r for r in rows if r["score"] is not None),
                    key=lambda r: -r["score"] if r["higher_is_better"] else r["score"])
    return scored + [r for r in rows if r["score"] is None]
