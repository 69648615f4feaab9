"""Evaluation inside the training worker, at every checkpoint (and of the base before step 1).

Chosen over a follow-up job because the training process already holds the model with its live adapter:
evaluating there needs no second copy of the base, no reload and no fuse, costs only the generation time of
the suites, and is what lets ``best_by: eval:SUITE`` and ``early_stopping.by`` act while the run trains.
The RNG states (numpy's and MLX's) and the train/eval mode are restored afterwards, so a run with evals
trains bit for bit like one without, and resumes exactly.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import numpy as np

from services.evaluation import results
from services.evaluation.plan import EvalPlan, plan_for
from services.evaluation.runner import evaluate_active
from services.inference.worker import Cancel, Engine
from services.training.folder import RunFolder
from services.workspace import Workspace


class CheckpointEvals:
    """Evaluates the training model at each checkpoint; records to ``evals.jsonl``, moves ``best``, may stop."""

    def __init__(self, plan: EvalPlan, folder: RunFolder, model: Any, tokenizer: Any, model_config: dict[str, Any]):
        self.plan, self.folder = plan, folder
        self.engine = Engine()
        self.engine.model, self.engine.tokenizer = model, tokenizer
        self.engine.model_path, self.engine.model_config = str(folder.path), model_config

    def at(self, iteration: int) -> str | None:
        """Evaluate the model as it is at ``iteration`` (0: the untrained adapter, i.e. the base).

        Returns an early-stop reason when ``early_stopping.by`` has not improved for ``patience`` checkpoints.
        """
        model = self.engine.model
        np_state, mx_state = np.random.get_state(), mx.random.state[0]
        model.eval()
        try:
            records = evaluate_active(self.engine, self.plan.suites, self.plan.tasks, Cancel())
        finally:
            model.train()
            np.random.set_state(np_state)
            k0, k1 = (int(x) for x in np.array(mx_state))
            mx.random.seed((k0 << 32) | k1)  # as an exact resume restores it
        label = "base" if iteration == 0 else f"{self.folder.id}@{iteration}"
        target = None if iteration == 0 else str(self.folder.checkpoint_dir(iteration))
        for r in records:
            r.update(iteration=iteration, label=label, target=target)
        results.append(self.folder, records)
        summary = ", ".join(f"{r['name']} {r['score']:.3g}" for r in records if r.get("score") is not None)
        self.folder.log(f"eval at {label}: {summary}")
        if iteration == 0:
            return None
        everything = results.read(self.folder)
        if self.plan.best_by:
            self._move_best(everything)
        return self._stop_reason(everything, iteration)

    def best(self, ckpts: list[dict[str, Any]], records: list[dict[str, Any]] | None = None) -> dict[str, Any] | None:
        """The entry of ``ckpts`` (run.json's checkpoints) that the eval table says is best by ``best_by``, with
        ``by`` and ``score``; the trainer's rotation keeps it (``keep_checkpoints``)."""
        present = {c["iteration"]: c for c in ckpts}
        scored = [r for r in (results.read(self.folder) if records is None else records)
                  if r.get("iteration") in present]
        top = results.best(scored, self.plan.best_by) if self.plan.best_by else None
        if top is None:
            return None
        return {**present[top["iteration"]], "by": f"eval:{self.plan.best_by}", "score": top["score"]}

    def _move_best(self, records: list[dict[str, Any]]) -> None:
        with self.folder.lock():
            top = self.best(self.folder.info().get("checkpoints", []), records)
            if top is not None:
                self.folder.update(best=top)

    def _stop_reason(self, records: list[dict[str, Any]], iteration: int) -> str | None:
        name = self.plan.stop_by
        if not name:
            return None
        # counted from the records, not kept in memory: a resumed run goes on counting where it was
        done = sorted({r["iteration"] for r in records
                       if r["name"] == name and 0 < (r.get("iteration") or 0) <= iteration})
        bad = 0
        for it in done:
            bad = 0 if results.improved(records, name, it, self.plan.min_delta) else bad + 1
        if bad >= self.plan.patience:
            return f"no improvement of eval:{name} beyond {self.plan.min_delta} for {bad} checkpoints"
        return None


def checkpoint_evals(folder: RunFolder, cfg: dict[str, Any], model: Any, tokenizer: Any) -> CheckpointEvals | None:
    """The evaluator for a run whose config has ``eval`` (None otherwise)."""
    plan = plan_for(cfg, Workspace(folder.path.parent.parent))
    if plan is None:
        return None
    model_config = getattr(model, "args", None)
    return CheckpointEvals(plan, folder, model, tokenizer, vars(model_config) if model_config is not None else {})
