"""Plain-data views over the runs of a workspace, for the Runs, Run detail and Compare pages (no UI code).

* :func:`run_row` / :func:`filter_rows` / :func:`sort_rows`: one summary row per run, search and filters;
* :func:`checkpoint_rows`: a run's checkpoints with losses, perplexity, size and the best one marked;
* :func:`metric_series` / :func:`align`: a metric of :mod:`services.training.series` against iterations, epochs or
  trained tokens (validation records carry no token count, so it is interpolated from the training reports), bounded;
* :func:`config_diff`: only the config keys whose values differ between runs;
* :func:`resume_refusal` / :func:`fork_overrides`: what the Resume and Fork actions may do;
* :func:`resolve_model` / :func:`resolve_adapter` / :func:`run_adapter` / :func:`adapters_for`: the models and
  adapters (runs and checkpoints) that the Playground, the CLI and the publisher load.
"""

from __future__ import annotations

import bisect
import math
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from services.config import FORGE_DEFAULTS, MLX_LM_DEFAULTS, ConfigError
from services.errors import NotFound
from services.training.folder import ACTIVE, WAITING, RunFolder, history
from services.training.series import Point, bound, number, reading
from services.workspace import disk_size, read_json

if TYPE_CHECKING:
    from services.training.manager import RunManager

AXES = {"iteration": "iteration", "epoch": "epoch", "tokens": "trained tokens"}
SORT_KEYS = ("date", "name", "status", "best_val_loss", "duration", "mode", "method", "model", "dataset")
MAX_POINTS = 1000  # per series on the Compare page, which overlays up to eight runs
_DEFAULTS: dict[str, Any] = {**MLX_LM_DEFAULTS, **FORGE_DEFAULTS, "train": True}
_MISSING = object()


def dataset_name(data: Any) -> str:
    """Short name of a dataset path: the folder's name, or ``folder/file`` for a single file."""
    if not data:
        return "–"
    p = Path(str(data))
    return f"{p.parent.name}/{p.name}" if p.suffix and p.parent.name else p.name


def run_duration(info: dict[str, Any], now: float | None = None) -> float | None:
    """Seconds the worker trained, summed over its sessions (the open one counted up to now)."""
    start, total = info.get("started"), info.get("trained_seconds")
    if start is None:
        return total
    if info.get("ended") is None and info.get("status") in ACTIVE:
        return (total or 0.0) + max(0.0, (now or time.time()) - start)
    if total is not None:
        return total
    end = info.get("ended") or info.get("updated")  # a run.json from before trained_seconds
    return max(0.0, end - start) if end is not None else None


def listing_stamp(runs_dir: Path) -> tuple[tuple[str, int], ...]:
    """Changes whenever a run folder is added or removed or rewrites ``run.json`` (always by rename)."""
    try:
        with os.scandir(runs_dir) as it:
            return tuple(sorted((e.name, e.stat().st_mtime_ns) for e in it if e.is_dir()))
    except FileNotFoundError:
        return ()


def metrics_stamp(folder: RunFolder) -> tuple[int, int]:
    """Size and modification time of a run's metrics file: changes whenever the run reports."""
    try:
        st = folder.metrics_path.stat()
        return st.st_size, st.st_mtime_ns
    except FileNotFoundError:
        return 0, 0


def run_row(info: dict[str, Any], now: float | None = None) -> dict[str, Any]:
    """One row of the runs table (plain JSON-able values) for a ``run.json``."""
    best = info.get("best") or {}
    parent = info.get("parent") or {}
    created = info.get("created")
    return {
        "id": info.get("id"), "name": info.get("name") or info.get("id"), "label": info.get("label") or "",
        "status": info.get("status") or "?", "reason": info.get("reason") or "",
        "mode": info.get("mode") or "mlx-lm", "method": info.get("fine_tune_type") or "?",
        "model": Path(str(info.get("model") or "")).name or "–", "dataset": dataset_name(info.get("data")),
        "best_val_loss": number(best.get("val_loss")), "best_iteration": best.get("iteration"),
        "iteration": info.get("iteration") or 0, "iters": info.get("iters"),
        "duration": run_duration(info, now), "date": created,
        "date_text": time.strftime("%Y-%m-%d %H:%M", time.localtime(created)) if created else "–",
        "parent": f"{parent['run']}@{parent.get('iteration')}" if parent.get("run") else "",
        "checkpoints": len(info.get("checkpoints") or []), "world_size": info.get("world_size") or 1,
        "resume_refusal": resume_refusal(info, [c["iteration"] for c in info.get("checkpoints") or []
                                                if isinstance(c, dict) and "iteration" in c]) or "",
    }


def filter_rows(rows: list[dict[str, Any]], query: str = "", status: list[str] | None = None,
                mode: list[str] | None = None, method: list[str] | None = None) -> list[dict[str, Any]]:
    """Rows whose text fields contain every word of ``query`` and whose status/mode/method are among those given."""
    words = query.lower().split()
    out = []
    for r in rows:
        text = " ".join(str(r.get(k) or "") for k in ("id", "name", "label", "model", "dataset", "status", "mode",
                                                       "method", "parent")).lower()
        if words and not all(w in text for w in words):
            continue
        if (status and r["status"] not in status) or (mode and r["mode"] not in mode) or \
                (method and r["method"] not in method):
            continue
        out.append(r)
    return out


def sort_rows(rows: list[dict[str, Any]], key: str = "date", descending: bool = True) -> list[dict[str, Any]]:
    """Rows sorted by ``key``; rows without a value come last whatever the direction."""
    if key not in SORT_KEYS:
        raise ValueError(f"cannot sort runs by {key!r}")
    have = [r for r in rows if r.get(key) is not None]
    missing = [r for r in rows if r.get(key) is None]
    have.sort(key=lambda r: (r[key].lower() if isinstance(r[key], str) else r[key]), reverse=descending)
    return have + missing


def by_best_val_loss(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sort_rows(rows, "best_val_loss", descending=False)


# ---------------------------------------------------------------------------------------- checkpoints


def checkpoint_rows(folder: RunFolder, info: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Checkpoints on disk, oldest first: iteration, epoch, train/val loss, val perplexity, bytes, ``best``."""
    info = folder.info() if info is None else info
    listed = {c.get("iteration"): c for c in info.get("checkpoints") or [] if c.get("iteration") is not None}
    best = (info.get("best") or {}).get("iteration")
    rows = []
    for it in folder.checkpoint_iterations():
        c = listed.get(it, {})
        val = number(c.get("val_loss"))
        size = c.get("bytes")
        rows.append({"iteration": it, "epoch": c.get("epoch"), "train_loss": number(c.get("train_loss")),
                     "val_loss": val, "perplexity": math.exp(val) if val is not None and val < 700 else None,
                     "trained_tokens": c.get("trained_tokens"),
                     "bytes": size if size is not None else disk_size(folder.checkpoint_dir(it)),
                     "best": it == best})
    return rows


def dataset_stats(folder: RunFolder) -> dict[str, Any] | None:
    return read_json(folder.stats_path)


# ---------------------------------------------------------------------------------------- series


def run_records(folder: RunFolder) -> list[dict[str, Any]]:
    """All metric records as they stand after resumes."""
    records, _ = folder.metrics()
    return history(records)


def _interp(x: float, xs: list[float], ys: list[float]) -> float:
    """Piecewise-linear ``y(x)`` through (0, 0) and the given points; the last slope continues beyond them."""
    px, py = [0.0, *xs], [0.0, *ys]
    i = bisect.bisect_left(px, x)
    if i < len(px) and px[i] == x:
        return py[i]
    if i >= len(px):
        i = len(px) - 1
    x0, x1, y0, y1 = px[i - 1], px[i], py[i - 1], py[i]
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0) if x1 != x0 else y1


def metric_series(records: list[dict[str, Any]], metric: str) -> list[dict[str, float]]:
    """``[{"iteration", "epoch", "tokens", "y"}]`` for ``metric``; epoch/tokens filled in where records lack them."""
    train = sorted(((r["iteration"], r) for r in records if r.get("type") == "train"
                    and number(r.get("iteration")) is not None), key=lambda t: t[0])
    known: dict[str, tuple[list[float], list[float]]] = {}
    for axis, field in (("epoch", "epoch"), ("tokens", "trained_tokens")):
        pts = [(float(it), float(r[field])) for it, r in train if number(r.get(field)) is not None]
        known[axis] = ([p[0] for p in pts], [p[1] for p in pts])
    out = []
    for r in records:
        p = reading(r, metric)
        if p is None:
            continue
        it, y = p
        point = {"iteration": it, "y": y}
        for axis, field in (("epoch", "epoch"), ("tokens", "trained_tokens")):
            v = number(r.get(field))
            xs, ys = known[axis]
            if v is None and xs:
                v = _interp(it, xs, ys)
            point[axis] = v
        out.append(point)
    out.sort(key=lambda p: p["iteration"])
    return out


def align(series: list[dict[str, float]], axis: str = "iteration", max_points: int = MAX_POINTS) -> list[Point]:
    """``(x, y)`` points of a :func:`metric_series` against ``axis`` (points without that x are left out)."""
    if axis not in AXES:
        raise ValueError(f"unknown x axis {axis!r}; expected one of {', '.join(AXES)}")
    pts = [(round(p[axis], 6), p["y"]) for p in series if p.get(axis) is not None]
    return bound(pts, max_points)


# ---------------------------------------------------------------------------------------- configs


def flatten(cfg: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts as dotted keys (``lora_parameters.rank``); empty dicts and other values kept as they are."""
    out: dict[str, Any] = {}
    for k, v in cfg.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_diff(configs: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """``[{"key", "values": {run: value}}]`` for every (flattened) key whose value is not the same in all runs."""
    flat = {run: flatten(cfg or {}) for run, cfg in configs.items()}
    keys: list[str] = []
    for f in flat.values():
        keys.extend(k for k in f if k not in keys)
    out = []
    for key in keys:
        values = {run: f.get(key, _MISSING) for run, f in flat.items()}
        distinct = {repr(v) for v in values.values()}
        if len(distinct) > 1:
            out.append({"key": key, "values": {run: None if v is _MISSING else v for run, v in values.items()}})
    return out


def without_defaults(extra: dict[str, Any]) -> dict[str, Any]:
    """Config keys that differ from their defaults (what is left of a resolved config after the form took its part)."""
    return {k: v for k, v in extra.items() if _DEFAULTS.get(k, _MISSING) != v}


# ---------------------------------------------------------------------------------------- actions


def resume_refusal(info: dict[str, Any], checkpoint_iterations: list[int]) -> str | None:
    """Why a run cannot be resumed as it is, or ``None`` when it can."""
    status = info.get("status")
    if status in ACTIVE:
        return f"it is {status}; stop it before resuming"
    if status == WAITING:
        return None  # it starts now instead of waiting its turn
    if status == "completed":
        return "it has completed; fork it from a checkpoint to train further"
    if not checkpoint_iterations:
        return "it has no checkpoint to resume from"
    return None


def ending_note(info: dict[str, Any], checkpoint_iterations: list[int]) -> str | None:
    """What a person should read first about a run that failed or was interrupted: why, in its own words (not
    a traceback), and where it can go on from; None for any other run."""
    status = info.get("status")
    if status not in ("failed", "interrupted"):
        return None
    lines = [line for line in str(info.get("reason") or "no reason was recorded").splitlines() if line.strip()]
    why = " ".join(lines[:3]) + (" …" if len(lines) > 3 else "")
    where = (f"The last good checkpoint is {checkpoint_iterations[-1]}: Resume continues from it, or fork it with "
             "other settings." if checkpoint_iterations else "No checkpoint was written: start the run again.")
    return f"This run {'failed' if status == 'failed' else 'was interrupted'}: {why} {where}"


def fork_overrides(cfg: dict[str, Any], iteration: int, values: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Config overrides for a fork from checkpoint ``iteration`` and the problems with the values given.

    ``values`` may hold ``name``, ``learning_rate``, ``iters`` and ``epochs``; blanks keep the parent's value.
    """
    out: dict[str, Any] = {}
    problems: list[str] = []
    name = (values.get("name") or "").strip()
    if name:
        out["name"] = name
    lr = values.get("learning_rate")
    if lr is not None:
        if number(lr) is None or not 0 < lr < 1:
            problems.append("learning rate must be between 0 and 1")
        elif lr != cfg.get("learning_rate"):
            out["learning_rate"] = float(lr)
    if cfg.get("epochs") is not None:
        epochs = values.get("epochs")
        if epochs is not None:
            if number(epochs) is None or epochs <= 0:
                problems.append("epochs must be positive")
            elif epochs != cfg.get("epochs"):
                out["epochs"] = epochs
    else:
        iters = values.get("iters")
        if iters is not None:
            if isinstance(iters, float) and iters.is_integer():
                iters = int(iters)
            if not isinstance(iters, int) or isinstance(iters, bool) or iters <= iteration:
                problems.append(f"iterations must be an integer above the checkpoint's {iteration}")
            elif iters != cfg.get("iters"):
                out["iters"] = iters
        elif (cfg.get("iters") or 0) <= iteration:
            problems.append(f"the parent stops at iteration {cfg.get('iters')}: set more iterations")
    return out, problems


def default_fork_iters(cfg: dict[str, Any], iteration: int) -> int:
    """A sensible iteration count for a fork: the parent's, or as many more when the parent ends at ``iteration``."""
    iters = int(cfg.get("iters") or 0)
    return iters if iters > iteration else iteration + max(iters, 1)


# ---------------------------------------------------------------------------------------- adapters


class RunNotFound(NotFound, ConfigError):
    """A run or checkpoint that is not in the workspace (a :class:`ConfigError` too, for callers that catch that)."""


def resolve_model(manager: RunManager, value: str) -> Path:
    """A model folder given as a path or a name under the workspace's ``models/``."""
    return manager.resolve_path(value, "models", "model")


def run_adapter(manager: RunManager, run_id: str, iteration: int | None = None) -> Path:
    """A run's folder (its latest weights) or its checkpoint ``iteration``; :class:`RunNotFound` if there is none."""
    try:
        folder = manager.folder(run_id)
    except ConfigError as e:
        raise RunNotFound(e.field, e.value, e.reason) from None
    if iteration is None:
        return folder.path
    its = folder.checkpoint_iterations()
    if iteration not in its:
        raise RunNotFound("adapter", f"{run_id}@{iteration}", f"run {run_id} has checkpoints {its or 'none'}")
    return folder.checkpoint_dir(iteration)


def resolve_adapter(manager: RunManager, ref: str) -> Path:
    """``RUN``, ``RUN@ITER`` (a run of the workspace, or one of its checkpoints) or an adapter folder path."""
    from services.training.manager import parse_ref  # noqa: PLC0415 (the manager imports this module)

    path = Path(ref).expanduser()
    if path.is_dir():
        return path.resolve()
    run_id, iteration = parse_ref(ref)
    return run_adapter(manager, run_id, iteration)


def checkpoint_ref(manager: RunManager, adapter: str | Path | None) -> str | None:
    """``RUN@ITER`` for an adapter folder of the workspace: a checkpoint, or a run's folder (its last checkpoint);
    ``None`` for the base, a folder outside the runs or a run without checkpoints."""
    if not adapter:
        return None
    p = Path(adapter)
    run_id, it = (p.parent.parent.name, int(p.name)) if p.parent.name == "checkpoints" and p.name.isdigit() \
        else (p.name, None)
    try:
        its = manager.folder(run_id).checkpoint_iterations()
    except ConfigError:
        return None
    it = its[-1] if it is None and its else it
    return f"{run_id}@{it}" if it in its else None


def run_link(manager: RunManager, ref: str, iteration: str | int | None = None) -> tuple[Path | None, Path]:
    """(base model or None, adapter folder) that a link to ``RUN``/``RUN@N`` opens; ``iteration`` overrides N.

    Raises :class:`ConfigError` for a malformed reference, :class:`RunNotFound` for a missing run or checkpoint.
    """
    from services.training.manager import parse_ref  # noqa: PLC0415 (the manager imports this module)

    run_id, it = parse_ref(ref)
    if iteration not in (None, ""):
        if not str(iteration).isdigit():
            raise ConfigError("iteration", iteration, "expected a checkpoint number")
        it = int(iteration)
    adapter = run_adapter(manager, run_id, it)
    model = manager.get(run_id).get("model")
    return (Path(model).resolve() if model else None), adapter.resolve()


def adapters_for(manager: RunManager, model: str | None, lora_only: bool = False) -> dict[str, str]:
    """Runs and checkpoints (of ``model`` when given) with weights: resolved folder → ``RUN (latest)`` or
    ``RUN @ N`` (`` ★ best`` on the best checkpoint), newest checkpoint first; ``lora_only`` leaves out full
    fine-tunes (they cannot share a base)."""
    out: dict[str, str] = {}
    for info in manager.list():
        if model and info.get("model") and str(Path(info["model"]).resolve()) != model:
            continue
        if lora_only and info.get("fine_tune_type") == "full":
            continue
        try:
            folder = manager.folder(info["id"])
        except ConfigError:
            continue
        best = (info.get("best") or {}).get("iteration")
        if (folder.path / "adapters.safetensors").is_file():
            out[str(folder.path.resolve())] = f"{folder.id} (latest)"
        for it in reversed(folder.checkpoint_iterations()):
            out[str(folder.checkpoint_dir(it).resolve())] = f"{folder.id} @ {it}" + (" ★ best" if it == best else "")
    return out
