"""Training manager: create, start, stop, resume and fork runs, and find them again after a restart.

Runs live in ``workspace/runs/ID``; this class holds no state that the folders do not. Each run trains
in its own detached worker process; a worker that died (kill -9, out of memory) is recognised by its
pid and marked ``interrupted``. Thread-safe; ``version`` grows whenever something it reports changes.

The training queue: :meth:`RunManager.enqueue` makes a run that is ``waiting``; whenever no run is
active, :meth:`RunManager.start_next` starts the oldest waiting one. A worker calls it as it ends, and so
does whoever finds a worker dead, so the queue moves on with no app open. A file lock keeps two
processes from starting the same run.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil

from services import __version__
from services import config as config_mod
from services.config import ConfigError, ConfigProblems
from services.errors import NotFound
from services.evaluation.plan import config_problems
from services.jobs import REPO_ROOT, child_env
from services.library.models import LibraryError, check_model_folder, weight_names
from services.notify import notify, run_event
from services.training import distributed
from services.training import index as run_index
from services.training.folder import ACTIVE, WAITING, RunFolder
from services.workspace import Workspace, disk_full_reason, disk_low, is_disk_full, read_json

log = logging.getLogger("forgellm")

# Keys a fork may not change: the checkpoint's weights would not fit the new model or layers.
FORK_FIXED = ("model", "fine_tune_type", "num_layers", "lora_parameters", "train_embeddings")
# Keys that decide the batch order; a fork that changes one starts a fresh data order.
DATA_KEYS = ("data", "mode", "batch_size", "max_seq_length", "seed", "valid_fraction", "packing", "mixture",
             "mask_all_turns", "mask_prompt")
QUEUED_GRACE_SECONDS = 120


def parse_ref(ref: str) -> tuple[str, int | None]:
    """``RUN`` or ``RUN@ITER`` → (run id, iteration or None)."""
    run, _, it = ref.partition("@")
    if it and not it.isdigit():
        raise ConfigError("run", ref, "expected RUN or RUN@ITERATION")
    return run, int(it) if it else None


class RunManager:
    def __init__(self, workspace: Workspace, python: str = sys.executable):
        self.workspace, self.python = workspace, python
        self._lock = threading.RLock()
        self.version = 0
        self._procs: dict[str, subprocess.Popen] = {}
        self._starting_next = False
        self._refused: set[str] = set()

    # -- paths ----------------------------------------------------------------------------------

    def folder(self, run_id: str) -> RunFolder:
        try:
            folder = RunFolder(self.workspace.inside(self.workspace.runs / run_id))
        except ValueError:
            raise ConfigError("run", run_id, "no such run in the workspace") from None
        if folder.path.parent != self.workspace.runs or not folder.exists():
            raise ConfigError("run", run_id, "no such run in the workspace")
        why = self.not_a_run_folder(self.workspace.runs / run_id)
        if why:
            raise ConfigError("run", run_id, f"{why}; not used")
        return folder

    def not_a_run_folder(self, path: Path) -> str | None:
        """Why ``runs/NAME`` is refused (None: it is fine): a symlink, or holding a symlink that leads out of the
        workspace. ForgeLLM never lists, refreshes or writes through one (nothing is written outside)."""
        if path.is_symlink():
            return f"{path} is a symlink (to {os.path.realpath(path)}); a run folder must be a real folder in runs/"
        try:
            with os.scandir(path) as it:
                links = [Path(e.path) for e in it if e.is_symlink()]
        except OSError:
            return None
        for link in links:
            try:
                self.workspace.inside(link)
            except ValueError:
                return f"{link} is a symlink leading out of the workspace (to {os.path.realpath(link)})"
        return None

    def resolve_path(self, value: str, kind: str, field: str) -> Path:
        """A model or dataset path: as given, or relative to the workspace's ``models/``/``datasets/``."""
        try:
            return self.workspace.find(value, kind)
        except NotFound as e:
            raise ConfigError(field, value, str(e)) from None
        except OSError as e:  # a name too long for the file system, a folder that cannot be read
            raise ConfigError(field, value, f"cannot be looked up ({e.strerror})") from None

    def prepare_config(self, user_cfg: dict[str, Any]) -> dict[str, Any]:
        """Resolve defaults and paths and check everything that can be checked without loading the model.

        Every problem is reported at once: the model and data paths are checked even when other fields are bad."""
        cfg = config_mod.with_defaults(user_cfg)
        errors: list[ConfigError] = []
        try:
            config_mod.validate(cfg, user_keys=set(user_cfg))
        except ConfigProblems as e:
            errors.extend(e.errors)
        flagged = {e.field for e in errors}
        if "model" not in flagged:
            try:
                model = self.resolve_path(cfg["model"], "models", "model")
                try:
                    check_model_folder(model)
                except LibraryError as e:
                    raise ConfigError("model", cfg["model"], str(e)) from None
                try:
                    model_cfg = read_json(model / "config.json")
                except (ValueError, OSError) as e:  # not JSON, not UTF-8, unreadable
                    raise ConfigError("model", cfg["model"], f"{model / 'config.json'} cannot be read ({e})") from None
                if not isinstance(model_cfg, dict):
                    raise ConfigError("model", cfg["model"], f"{model / 'config.json'} is not a JSON object")
                cfg["model"] = str(model)
                try:
                    names = weight_names(model)
                except LibraryError as e:
                    raise ConfigError("model", cfg["model"], str(e)) from None
                if not errors:  # the checks against the model need a valid config
                    config_mod.check_against_model(cfg, model_cfg, names)
            except ConfigError as e:
                errors.append(e)
            except ConfigProblems as e:
                errors.extend(e.errors)
        mixture = cfg.get("mixture") if "mixture" not in flagged else None
        for field, holder in (("data", cfg), ("mixture.data", mixture)):
            if field in flagged or not holder or holder.get("data") is None:
                continue
            try:
                holder["data"] = str(self.resolve_path(holder["data"], "datasets", field))
            except ConfigError as e:
                errors.append(e)
        if "eval" not in flagged:
            errors += [ConfigError(f, cfg.get(f.split(".")[0]), why) for f, why in config_problems(cfg, self.workspace)]
        if errors:
            raise ConfigProblems(errors)
        return cfg

    # -- lifecycle ------------------------------------------------------------------------------

    def create(self, user_cfg: dict[str, Any], parent: dict[str, Any] | None = None,
               status: str = "queued") -> RunFolder:
        """Validate a config and make its run folder (status ``queued``, or ``waiting`` for the queue);
        nothing is made if it is invalid."""
        cfg = self.prepare_config(user_cfg)
        with self._lock:
            base = time.strftime("%Y%m%d-%H%M%S")
            slug = re.sub(r"[^a-z0-9]+", "-", (cfg.get("name") or cfg.get("mode") or "mlx-lm").lower())[:60].strip("-")
            self.workspace.runs.mkdir(parents=True, exist_ok=True)
            run_id, n = f"{base}-{slug or 'run'}", 1
            while True:  # mkdir is the claim: another process creating a run in the same second takes the next name
                try:
                    (self.workspace.runs / run_id).mkdir()
                    break
                except FileExistsError:
                    n += 1
                    run_id = f"{base}-{slug or 'run'}-{n}"
            folder = RunFolder(self.workspace.runs / run_id)
            folder.write_config(cfg)
            folder.update(id=run_id, name=cfg.get("name") or run_id, status=status, reason=None,
                          created=time.time(), mode=cfg.get("mode") or "mlx-lm", fine_tune_type=cfg["fine_tune_type"],
                          model=cfg["model"], data=cfg["data"], seed=cfg["seed"], parent=parent,
                          forgellm=__version__, checkpoints=[], best=None, iteration=0,
                          world_size=config_mod.world_size(cfg),
                          iters=None if cfg.get("epochs") else cfg.get("iters"))  # by epochs: the worker counts
            self.version += 1
        return folder

    def start(self, run_id: str, checkpoint: Path | None = None) -> int:
        """Spawn the worker for a queued, stopped or interrupted run; return its pid.

        Exactly one worker per run, across processes: the decision is taken under the run's lock, a run
        another process has just launched is refused, and the worker itself exits at once if it finds the
        run claimed (see :meth:`RunFolder.claim_worker`).
        """
        folder = self.folder(run_id)
        self._wait_for_exiting_worker(folder)
        with self._lock, folder.lock():
            info = folder.info()
            if folder.worker_alive() or (info.get("status") in ACTIVE and self.is_alive(info)):
                raise ConfigError("run", run_id, "is already running")
            launched = info.get("launched") or 0
            if info.get("status") == "queued" and not info.get("pid") and time.time() - launched < QUEUED_GRACE_SECONDS:
                raise ConfigError("run", run_id, "is already starting (its worker was launched "
                                                 f"{time.time() - launched:.0f} s ago)")
            previous = self._procs.get(run_id)
            if previous is not None:
                previous.wait(timeout=60)  # it has written its final status and is exiting
            folder.stop_path.unlink(missing_ok=True)
            cmd = distributed.worker_command(folder, folder.config(), self.python, checkpoint)
            env = child_env(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
            # The worker records its own pid and start time; until it does, `_procs` vouches for it.
            folder.update(status="queued", pid=None, pid_created=None, reason=None, launched=time.time())
            log = open(folder.log_path, "a")  # noqa: SIM115 (handed to the child)
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=env, cwd=REPO_ROOT, start_new_session=True)
            log.close()
            self._procs[run_id] = proc
            self.version += 1
            return proc.pid

    @staticmethod
    def _wait_for_exiting_worker(folder: RunFolder, timeout: float = 60.0) -> None:
        """A worker that has written its final status may still be handing over the queue: let it exit."""
        deadline = time.time() + timeout
        while folder.worker_alive() and folder.info().get("status") not in ACTIVE and time.time() < deadline:
            time.sleep(0.05)

    def launch(self, user_cfg: dict[str, Any]) -> RunFolder:
        folder = self.create(user_cfg)
        self.start(folder.id)
        return folder

    def enqueue(self, user_cfg: dict[str, Any]) -> RunFolder:
        """A new run that waits for the runs ahead of it; it starts at once when no run is active."""
        folder = self.create(user_cfg, status=WAITING)
        self.start_next()
        return folder

    def waiting(self) -> list[dict[str, Any]]:
        """The waiting runs, first in line first."""
        return _in_line(self.list())

    def start_next(self) -> str | None:
        """Start the oldest waiting run if no run is active; returns its id (None: nothing started)."""
        with self._lock:
            if self._starting_next:  # re-entered through refresh() below: the outer call decides
                return None
            if not any(f.exists() and f.info().get("status") == WAITING for f in map(RunFolder, self._run_paths())):
                return None  # no queue here: no lock file, no second listing (every worker asks as it ends)
            self._starting_next = True
            try:
                with _queue_lock(self.workspace):
                    runs = self.list()
                    if any(r.get("status") in ACTIVE for r in runs):
                        return None
                    waiting = _in_line(runs)
                    if not waiting:
                        return None
                    self.start(waiting[0]["id"])
                    self.folder(waiting[0]["id"]).update(from_queue=True)  # its end may be the queue's end
                    return waiting[0]["id"]
            finally:
                self._starting_next = False

    def stop(self, run_id: str) -> None:
        """Ask the worker to stop after its current step (it writes a final checkpoint); a waiting run
        leaves the queue."""
        folder = self.folder(run_id)
        with self._lock, _queue_lock(self.workspace):  # not while another process starts it
            if folder.info().get("status") == WAITING:
                folder.update(status="stopped", reason="taken off the queue before it started")
                self.version += 1
                return
        folder.stop_path.write_text(f"{time.time()}\n")  # a worker still starting up finds it
        info = folder.info()
        if info.get("pid") and self.is_alive(info):
            try:
                os.kill(info["pid"], signal.SIGTERM)
            except ProcessLookupError:
                pass
        self.version += 1

    def resume(self, run_id: str, iteration: int | None = None, overrides: dict[str, Any] | None = None) -> RunFolder:
        """Continue a run exactly from its latest checkpoint (a waiting run: start it now); an earlier checkpoint
        or changes make a fork."""
        folder = self.folder(run_id)
        info = self.refresh(folder)
        its = folder.checkpoint_iterations()
        if (iteration is None or (its and iteration == its[-1])) and not overrides:
            why = run_index.resume_refusal(info, its)
            if why:
                raise ConfigError("run", run_id, why)
            if info.get("status") != WAITING:
                self.start(run_id, folder.checkpoint_dir(its[-1]))
                return folder
            with self._lock, _queue_lock(self.workspace):
                if folder.info().get("status") == WAITING:  # not started by the queue meanwhile
                    self.start(run_id)  # start it now, next to the active one
            return folder
        if info.get("status") in ACTIVE:
            raise ConfigError("run", run_id, f"is {info['status']}; stop it before forking it")
        if not its:
            raise ConfigError("run", run_id, "has no checkpoint to fork from")
        if iteration is not None and iteration not in its:
            raise ConfigError("iteration", iteration, f"run {run_id} has checkpoints {its}")
        return self.fork(run_id, iteration or its[-1], overrides or {})

    def fork(self, run_id: str, iteration: int, overrides: dict[str, Any]) -> RunFolder:
        """A new run that starts from ``run_id``'s checkpoint ``iteration`` with changed hyperparameters."""
        parent = self.folder(run_id)
        if iteration not in parent.checkpoint_iterations():
            raise ConfigError("iteration", iteration, f"run {run_id} has no checkpoint at that iteration")
        base = parent.config()
        for key in FORK_FIXED:
            if key in overrides and overrides[key] != base.get(key):
                raise ConfigError(key, overrides[key], "a fork keeps the parent's model and trainable layers")
        user = {**config_mod.user_view(base), **overrides}
        user.setdefault("name", f"{parent.info().get('name', run_id)}-fork")
        folder = self.create(user, parent={"run": run_id, "iteration": iteration,
                                           "same_data_order": all(base.get(k) == user.get(k, base.get(k))
                                                                  for k in DATA_KEYS)})
        self.start(folder.id, parent.checkpoint_dir(iteration))
        return folder

    def delete(self, run_id: str) -> None:
        """Remove a run's folder (only inside ``workspace/runs``); refused while the run is active."""
        with self._lock:
            folder = self.folder(run_id)
            path = self.workspace.inside(folder.path)
            if path.parent != self.workspace.inside(self.workspace.runs) or path.is_symlink():
                raise ConfigError("run", run_id, "is not a run folder of this workspace")
            info = self.refresh(folder)
            if info.get("status") in ACTIVE:
                raise ConfigError("run", run_id, f"is {info['status']}; stop it before deleting")
            shutil.rmtree(path)
            self._procs.pop(run_id, None)
            self.version += 1

    def set_label(self, run_id: str, label: str | None) -> dict[str, Any]:
        """Set (or clear, with an empty label) the run's free-text label in ``run.json``."""
        label = (label or "").strip()
        if len(label) > 200:
            raise ConfigError("label", label[:20] + "…", "is longer than 200 characters")
        info = self.folder(run_id).update(label=label or None)
        self.version += 1
        return info

    # -- discovery ------------------------------------------------------------------------------

    def reap(self) -> int:
        """Collect the exit status of every ended worker this process started; returns how many were reaped."""
        with self._lock:
            ended = [run_id for run_id, proc in self._procs.items() if proc.poll() is not None]
            for run_id in ended:
                del self._procs[run_id]
        return len(ended)

    def is_alive(self, info: dict[str, Any]) -> bool:
        """Whether the run's worker process is still there (pid plus start time, so a reused pid is not it)."""
        proc = self._procs.get(info.get("id", ""))
        pid = info.get("pid")
        running = proc is not None and proc.poll() is None  # poll() also reaps our own child: never a zombie
        if proc is not None and (not pid or pid == proc.pid):
            return running
        if not pid:
            return False
        try:
            p = psutil.Process(pid)
            created = info.get("pid_created")
            if created is not None and abs(p.create_time() - created) > 1.0:
                return False
            return p.status() != psutil.STATUS_ZOMBIE
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return False

    def refresh(self, folder: RunFolder) -> dict[str, Any]:
        """run.json, with an active run whose worker is gone marked ``interrupted``."""
        with self._lock:
            info = folder.info()
            if info.get("status") not in ACTIVE or self.is_alive(info) or folder.worker_alive():
                return info
            since = info.get("launched") or info.get("created") or 0
            if info.get("status") == "queued" and not info.get("pid") and time.time() - since < QUEUED_GRACE_SECONDS:
                return info  # a worker started by another process may still be importing
            with folder.lock():  # not while another process starts it
                info = folder.info()  # the worker may have finished between the two reads
                if info.get("status") not in ACTIVE or self.is_alive(info) or folder.worker_alive():
                    return info
                its = folder.checkpoint_iterations()
                last = f"; resume from checkpoint {its[-1]}" if its else "; no checkpoint was written"
                at = _last_iteration(folder)
                reason = (f"{disk_full_reason(folder.path)}; the worker stopped at iteration {at}{last}"
                          if disk_low(folder.path) else
                          f"the worker process ended unexpectedly (killed or out of memory) at iteration {at}{last}")
                try:
                    info = folder.end_session("interrupted", reason, ended=folder.last_sign_of_life() or time.time())
                except OSError as e:
                    if not is_disk_full(e):
                        raise
                    return {**info, "status": "interrupted", "reason": disk_full_reason(folder.path)}  # not saved
            with contextlib.suppress(OSError):  # run.json has it; a full disk may refuse the metric line
                folder.append_metric({"type": "status", "step": info.get("iteration", 0), "status": "interrupted",
                                      "reason": info["reason"]})
            self.version += 1
            # the worker could not tell anyone, nor hand over to the queue itself (a short wait: a CLI process ends)
            notify(self.workspace, run_event("interrupted", info), wait=5.0)
            self.start_next()
            return info

    def _run_paths(self) -> list[Path]:
        """The run folders under ``runs/``, newest first (a workspace being removed has none); those refused by
        :meth:`not_a_run_folder` are left out, with a warning."""
        try:
            paths = sorted(self.workspace.runs.iterdir(), reverse=True)
        except FileNotFoundError:
            return []
        out = []
        for path in paths:
            why = self.not_a_run_folder(path)
            if why:
                if path.name not in self._refused:  # once per process: the pages list runs every second
                    self._refused.add(path.name)
                    log.warning("%s; not listed", why)
            else:
                out.append(path)
        return out

    def list(self) -> list[dict[str, Any]]:
        """Every run in the workspace, newest first (and the workers this process started that have ended are
        reaped, so a long-lived app keeps no zombie processes)."""
        self.reap()
        out = []
        for path in self._run_paths():
            folder = RunFolder(path)
            if folder.exists():
                out.append(self.refresh(folder))
        return out

    def get(self, run_id: str) -> dict[str, Any]:
        return self.refresh(self.folder(run_id))

    def active(self) -> list[dict[str, Any]]:
        return [r for r in self.list() if r.get("status") in ACTIVE]

    def wait(self, run_id: str, timeout: float = 600.0, poll: float = 0.2) -> dict[str, Any]:
        """Block until the run is no longer active (for the CLI and tests)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            info = self.get(run_id)
            if info.get("status") not in ACTIVE:
                return info
            time.sleep(poll)
        raise TimeoutError(f"run {run_id} still {self.get(run_id).get('status')} after {timeout} s")


def _in_line(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The waiting runs among ``runs``, oldest first."""
    return sorted((r for r in runs if r.get("status") == WAITING), key=lambda r: (r.get("created") or 0, r["id"]))


@contextlib.contextmanager
def _queue_lock(workspace: Workspace) -> Iterator[None]:
    """An exclusive lock on ``.forgellm/queue.lock`` across processes (the app, the CLI and the workers)."""
    path = workspace.root / ".forgellm" / "queue.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # released when the file closes
        yield


def _last_iteration(folder: RunFolder) -> int:
    records, _ = folder.metrics()
    its = [r.get("iteration", 0) for r in records if r.get("type") == "train"]
    return max(its, default=0)


def dump(info: dict[str, Any]) -> str:
    return json.dumps(info, indent=2)
