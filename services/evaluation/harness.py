"""lm-evaluation-harness on a model already in memory: the base, or the base with a swapped adapter, never fused.

:class:`ForgeLM` is ``mlx_lm.evaluate.MLXLM`` (the reference: the same loglikelihood, rolling loglikelihood and
generate-until code) over a model and tokenizer that the caller holds, so one copy of the base serves every
checkpoint. Tasks come only from local task folders (lm-eval's YAML task format over local files): nothing
reaches the Hub.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any

from lm_eval.api.model import LM
from mlx_lm.evaluate import MLXLM

from services.evaluation.tasks import TaskError

SEED = 1234
SAMPLE_KEYS = ("doc_id", "target", "filtered_resps")


class ForgeLM(MLXLM):
    """mlx-lm's lm-eval model class over a model that is already loaded (adapters swapped in place)."""

    def __init__(self, model: Any, tokenizer: Any, max_tokens: int | None = None, batch_size: int = 8,
                 use_chat_template: bool | None = None) -> None:
        LM.__init__(self)
        self._model, self.tokenizer = model, tokenizer
        self._max_tokens, self._batch_size, self._sampler = max_tokens, batch_size, None
        self.use_chat_template = (tokenizer.chat_template is not None if use_chat_template is None
                                  else use_chat_template)


def load_tasks(spec: dict[str, Any]) -> list[Any]:
    """lm-eval's task objects for ``spec`` from its local folder; raises :class:`TaskError` in one line."""
    from lm_eval.tasks import TaskManager

    folder = Path(spec["task_dir"])
    try:
        manager = TaskManager(include_path=str(folder), include_defaults=False)
        missing = [t for t in spec["tasks"] if t not in manager.all_tasks]
        if missing:
            known = ", ".join(sorted(manager.all_tasks)) or "none"
            raise TaskError(f"task folder {folder}: no task named {', '.join(missing)} (tasks there: {known})")
        with _cwd(folder):  # relative data_files in a task's YAML are relative to its folder
            loaded = manager.load(spec["tasks"])
        return [loaded["tasks"][name] for name in spec["tasks"]]
    except TaskError:
        raise
    except Exception as e:  # noqa: BLE001 (lm-eval and datasets raise many types; the reason is what counts)
        reason = " ".join(str(e).split()) or type(e).__name__
        raise TaskError(f"task folder {folder}: lm-eval cannot load {', '.join(spec['tasks'])}: "
                        f"{type(e).__name__}: {reason}") from e


@contextlib.contextmanager
def _cwd(path: Path):
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def run_tasks(lm: LM, spec: dict[str, Any]) -> list[dict[str, Any]]:
    """Run the tasks of ``spec`` on ``lm``; one record per task with its metrics and per-sample results."""
    import lm_eval

    tasks = load_tasks(spec)
    chat = getattr(lm, "use_chat_template", False) if spec.get("chat_template") is None else spec["chat_template"]
    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    with _cwd(Path(spec["task_dir"])):
        out = lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=spec.get("num_fewshot"),
                                      limit=spec.get("limit"), apply_chat_template=bool(chat),
                                      fewshot_as_multiturn=bool(chat), log_samples=True, bootstrap_iters=0,
                                      random_seed=SEED, numpy_random_seed=SEED, torch_random_seed=SEED,
                                      fewshot_random_seed=SEED)
    records = []
    for name in spec["tasks"]:
        metrics = {k.split(",")[0]: float(v) for k, v in (out["results"].get(name) or {}).items()
                   if isinstance(v, (int, float)) and not k.startswith("sample") and "_stderr" not in k}
        samples = [_sample(s, metrics) for s in out["samples"].get(name, [])]
        primary = next((k for k in ("acc", "exact_match", "acc_norm") if k in metrics), next(iter(metrics), None))
        records.append({"name": name, "kind": "task", "metrics": metrics, "primary": primary,
                        "score": metrics.get(primary) if primary else None, "higher_is_better": True,
                        "samples": samples})
    return records


def _sample(s: dict[str, Any], metrics: dict[str, Any]) -> dict[str, Any]:
    out = {k: s.get(k) for k in SAMPLE_KEYS}
    resps = s.get("filtered_resps") or []
    out["filtered_resps"] = [r[0] if isinstance(r, (list, tuple)) and len(r) == 2 and isinstance(r[1], bool)
                             else r for r in resps]
    for key in metrics:
        if key in s:
            out[key] = float(s[key])
    return out
