"""The evaluation service: evaluate a model, a run's checkpoints or ``RUN@ITER`` in the model worker; one job at a
time for the app (progress, cancel, plain state with a ``version`` counter), blocking calls for the CLI; suite
files in the workspace's ``evals/``. Thread-safe; nothing here imports MLX or NiceGUI.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.errors import ForgeError
from services.evaluation import results
from services.evaluation.suites import SUFFIXES, Suite, SuiteError, from_dict, load_suite, parse_suite_text
from services.inference.service import CancelHandle, ModelService
from services.library.models import find_model
from services.training.folder import RunFolder
from services.training.manager import RunManager, parse_ref
from services.workspace import Workspace, safe_name, write_atomic


class EvalError(ForgeError, RuntimeError):
    """An evaluation could not run; the message says what and where."""


@dataclass
class Target:
    """What one evaluation runs on: a base model and the adapters to swap in (None: the base itself)."""

    model: Path
    adapters: list[str | None]
    folder: RunFolder | None = None


class Evaluations:
    """Evaluate in the model worker of ``models`` (one copy of the base, adapters swapped)."""

    def __init__(self, workspace: Workspace, manager: RunManager, models: ModelService):
        self.workspace, self.manager, self.models = workspace, manager, models
        self.version = 0
        self._lock = threading.Lock()
        self._state: dict[str, Any] = {"state": "idle", "message": "", "fraction": 0.0, "owner": None, "records": []}
        self._cancel: CancelHandle | None = None

    # -- what to evaluate -------------------------------------------------------------------------

    def target(self, ref: str, with_base: bool = True) -> Target:
        """``RUN`` (base + every checkpoint), ``RUN@ITER`` (that checkpoint), or a model / published model."""
        run_id, iteration = parse_ref(ref) if "@" in ref else (ref, None)
        if (self.workspace.runs / run_id).is_dir() and RunFolder(self.workspace.runs / run_id).exists():
            folder = RunFolder(self.workspace.runs / run_id)
            its = folder.checkpoint_iterations()
            if iteration is not None and iteration not in its:
                raise EvalError(f"run {run_id} has no checkpoint {iteration} (checkpoints: {its or 'none'})")
            chosen = [iteration] if iteration is not None else its
            adapters = [str(folder.checkpoint_dir(i)) for i in chosen]
            base = [None] if with_base and iteration is None else []
            return Target(Path(folder.info()["model"]), base + adapters, folder)
        return Target(find_model(self.workspace, ref), [None])

    def on_model(self, model: str | os.PathLike, adapters: list[str | None]) -> Target:
        """A model and adapters picked by hand (the Playground's base and/or checkpoints); nothing is recorded."""
        if not adapters:
            raise EvalError("pick the base model and/or one or more checkpoints to evaluate")
        return Target(find_model(self.workspace, model), list(adapters))

    # -- blocking ---------------------------------------------------------------------------------

    def run(self, ref: str | Target, suites: list[Suite], tasks: dict[str, Any] | None = None, *,
            on_message: Any = None, cancel: CancelHandle | None = None, record: bool = True) -> list[dict[str, Any]]:
        """Evaluate ``ref`` (see :meth:`target`, or a :class:`Target`); a run's complete records are appended to its
        ``evals.jsonl`` (``record``; a suite cut short by a cancel is returned, never recorded). Returns them."""
        target = ref if isinstance(ref, Target) else self.target(ref)
        reply = self.models.evaluate(target.model, target.adapters, [s.to_dict() for s in suites], tasks,
                                     on_message=on_message, cancel=cancel)
        records = reply["records"]
        whole = [r for r in records if not r.get("partial")]
        if record and target.folder is not None and whole:
            results.append(target.folder, whole)
        return records

    # -- one job for the app ----------------------------------------------------------------------

    @property
    def state(self) -> dict[str, Any]:
        with self._lock:
            return {**self._state, "version": self.version}

    def _set(self, **fields: Any) -> None:
        with self._lock:
            self._state.update(fields)
            self.version += 1

    def start(self, ref: str | Target, suites: list[Suite], tasks: dict[str, Any] | None = None, *,
              owner: str | None = None) -> None:
        """Evaluate ``ref`` (as :meth:`run`) in a thread; follow :attr:`state` (state, fraction, message, records
        as each one ends, ``owner``: who started it, ``ref`` by default)."""
        if not suites and not tasks:
            raise EvalError("pick one or more suites to evaluate")
        with self._lock:
            if self._state["state"] == "running":
                raise EvalError("an evaluation is running; cancel it or wait for it to end")
            self._cancel = CancelHandle()
            self._state = {"state": "running", "message": "starting…", "fraction": 0.0,
                           "owner": owner if owner is not None else str(ref), "records": []}
            self.version += 1
            cancel = self._cancel
        threading.Thread(target=self._job, args=(ref, suites, tasks, cancel), daemon=True, name="evaluate").start()

    def _job(self, ref: str | Target, suites: list[Suite], tasks: dict[str, Any] | None, cancel: CancelHandle) -> None:
        names = [s.name for s in suites]

        def on_message(msg: dict[str, Any]) -> None:
            if msg.get("type") == "record":
                with self._lock:
                    self._state["records"] = [*self._state["records"], msg["record"]]
                    self.version += 1
                return
            if msg.get("type") != "progress":
                return
            targets = max(msg.get("targets", 1), 1)
            done = (msg.get("target", 1) - 1) / targets
            if msg.get("cases"):
                suite = names.index(msg["suite"]) if msg["suite"] in names else 0
                done += (suite + msg["case"] / msg["cases"]) / targets / max(len(suites), 1)
            self._set(fraction=min(done, 1.0), message=f"target {msg.get('target')}/{msg.get('targets')}"
                      + (f" · {msg['suite']} case {msg['case']}/{msg['cases']}" if msg.get("cases") else ""))

        try:
            records = self.run(ref, suites, tasks, on_message=on_message, cancel=cancel)
        except ForgeError as e:
            self._set(state="error", message=str(e))
            return
        self._set(state="cancelled" if cancel.cancelled else "done", fraction=1.0, records=records,
                  message=f"{len(records)} result(s)" + (" (cancelled)" if cancel.cancelled else ""))

    def cancel(self) -> None:
        """Cancel the running job: the case being generated ends, its suite's results so far are kept."""
        with self._lock:
            handle = self._cancel
        if handle is not None:
            handle.cancel()

    # -- suite files ------------------------------------------------------------------------------

    def suite_files(self) -> list[Path]:
        """The suites saved in the workspace's ``evals/``."""
        folder = self.workspace.evals
        return sorted(p for p in folder.iterdir() if p.suffix in SUFFIXES) if folder.is_dir() else []

    def save_suite(self, suite_data: str | dict[str, Any], name: str) -> Path:
        """Check a suite (YAML text or plain data) and save it as ``evals/NAME.yaml`` (its name set to NAME)."""
        name = safe_name(name, "suite name")
        suite = (parse_suite_text(suite_data, f"{name}.yaml") if isinstance(suite_data, str)
                 else from_dict(suite_data, where=f"{name}.yaml"))
        suite.name = name
        path = self.workspace.evals / f"{name}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, suite.to_yaml())
        return path

    def import_suite(self, filename: str, data: bytes) -> Path:
        """Check an uploaded suite file (YAML or JSONL) and save it into ``evals/`` as YAML."""
        stem, suffix = Path(filename).stem, Path(filename).suffix
        if suffix not in SUFFIXES:
            raise EvalError(f"{filename}: a suite file ends in {', '.join(SUFFIXES)}")
        tmp = self.workspace.evals / f".import-{safe_name(stem, 'suite name')}{suffix}"
        tmp.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(tmp, data)
        try:
            suite = load_suite(tmp)
        except SuiteError as e:
            raise SuiteError(str(e).replace(str(tmp), filename)) from None
        finally:
            tmp.unlink(missing_ok=True)
        return self.save_suite(suite.to_yaml(), stem)
