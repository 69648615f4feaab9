"""Worker process for one training run: ``python -m services.training.worker RUN_DIR [--resume CHECKPOINT_DIR]``.

Started detached from the app (its own session), so it keeps training when the app exits. It writes
its status into the run folder, beats a heartbeat, and stops cleanly on SIGTERM or a ``stop`` file.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import signal
import threading
import time
import traceback
from pathlib import Path

import psutil

from services import __version__, blas
from services.config import ConfigProblems, world_size
from services.errors import ForgeError
from services.notify import notify, run_event, wait_for
from services.training import distributed
from services.training.data import DataError
from services.training.folder import RunFolder, checkpoint_problem
from services.training.prepared import PreparationStopped
from services.training.trainer import Outcome, Trainer, TrainingFailed
from services.workspace import disk_full_reason, disk_low, is_disk_full, write_atomic

HEARTBEAT_SECONDS = 2.0
NOTIFY_WAIT = 15.0  # seconds an ending worker gives its webhooks (retries included) before it exits


class CheckpointDamaged(ForgeError, ValueError):
    """The checkpoint to start from fails its manifest check; the message names the file."""


def environment() -> dict:
    """Versions and hardware recorded with every run, for reproducibility."""
    import mlx.core as mx
    import mlx_lm

    try:
        device = mx.device_info().get("device_name")
    except Exception:  # noqa: BLE001 (informational only)
        device = str(mx.default_device())
    return {
        "versions": {"forgellm": __version__, "mlx": mx.__version__, "mlx_lm": mlx_lm.__version__,
                     "python": platform.python_version()},
        "blas": blas.active(),
        "hardware": {"platform": platform.platform(), "machine": platform.machine(), "device": device,
                     "cpus": os.cpu_count(), "ram_gb": round(psutil.virtual_memory().total / 1e9, 1)},
    }


def _beat(folder: RunFolder, stop: threading.Event, done: threading.Event) -> None:
    while not done.wait(HEARTBEAT_SECONDS):
        with contextlib.suppress(OSError):  # a full disk: the training thread reports it
            write_atomic(folder.heartbeat_path, f"{time.time():.3f}\n")
        if folder.stop_path.exists():
            stop.set()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m services.training.worker")
    p.add_argument("run_dir")
    p.add_argument("--resume", help="checkpoint folder to restore before training")
    args = p.parse_args(argv)
    folder = RunFolder(args.run_dir)
    try:
        cfg = folder.config()
    except Exception:  # noqa: BLE001 (the trainer reads it again and reports what is wrong)
        cfg = {}
    rank = distributed.rank_of_process(cfg)
    if rank > 0:
        return _follow(distributed.RankFolder(folder.path, rank), world_size(cfg), args.resume)
    claim = folder.claim_worker()  # held until this process ends, however it ends
    if claim is None:
        folder.log(f"worker {os.getpid()} exits at once: another worker already trains this run")
        return 3
    stop, done = threading.Event(), threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    folder.reserve_space()
    try:
        _begin(folder, args.resume)
    except OSError as e:  # the disk may be full before the first step
        wait_for(_finish(folder, Outcome("failed", _reason(folder, e), 0)), NOTIFY_WAIT)
        return 1
    beat = threading.Thread(target=_beat, args=(folder, stop, done), daemon=True)
    beat.start()
    watchdog = _watch(folder, world_size(cfg), done)
    try:
        folder.sweep_leftovers()
        resume = verified_checkpoint(folder, Path(args.resume)) if args.resume else None
        trainer = Trainer(folder, stop)
        start = trainer.setup(resume)
        if resume is not None:
            folder.append_metric({"type": "resume", "step": start - 1, "iteration": start - 1,
                                  "from": str(resume)})
        outcome = trainer.run(start)
    except PreparationStopped as e:
        folder.update(preparing=None)
        outcome = Outcome("stopped", str(e), 0)
    except (ConfigProblems, DataError, TrainingFailed, FileNotFoundError, ValueError) as e:  # CheckpointDamaged too
        outcome = Outcome("failed", _reason(folder, e), _iteration(folder))
        _log(folder, "failed: " + traceback.format_exc())
    except Exception as e:  # noqa: BLE001 (any crash must still mark the run)
        lost = distributed.lost_reason(watchdog, e)
        outcome = (Outcome("interrupted", distributed.interrupted_reason(folder, lost), _iteration(folder)) if lost
                   else Outcome("failed", _reason(folder, e, f"{type(e).__name__}: {e}"), _iteration(folder)))
        _log(folder, "crashed: " + traceback.format_exc())
    done.set()
    if watchdog is not None:
        watchdog.done.set()
        if outcome.status == "interrupted":
            watchdog.stop_others()
    sending = _finish(folder, outcome)
    sending += _hand_over(folder, sending)  # the next run starts before the webhooks are waited for: a dead
    wait_for(sending, NOTIFY_WAIT)  # receiver delays only this worker's exit, never the queue
    return 0 if outcome.status != "failed" else 1


def _watch(folder: RunFolder, size: int, done: threading.Event) -> distributed.Watchdog | None:
    """Rank 0 of a distributed run: watch the other ranks; one that is gone while the training thread is stuck
    in a collective ends the run as interrupted (and every local rank with it) after a grace period."""
    if size <= 1:
        return None

    def give_up(why: str) -> None:
        if done.wait(distributed.GRACE_SECONDS):  # the training thread saw it and reports it itself
            return
        sending = _finish(folder, Outcome("interrupted", distributed.interrupted_reason(folder, why),
                                          _iteration(folder)))
        watchdog.stop_others()
        wait_for(sending, NOTIFY_WAIT)
        os._exit(1)

    watchdog = distributed.Watchdog(folder, 0, size, give_up)
    watchdog.start()
    return watchdog


def _follow(folder: distributed.RankFolder, size: int, resume: str | None) -> int:
    """Rank R ≥ 1: train in step with rank 0, which records the run; exit at once when another rank is gone."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())  # agreed with the others after the step
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    folder.log(f"rank {folder.rank} of {size}: pid {os.getpid()} started")
    distributed.Watchdog(folder, folder.rank, size, lambda why: (_log(folder, f"{why}: exiting"), os._exit(1))).start()
    try:
        trainer = Trainer(folder, stop)
        outcome = trainer.run(trainer.setup(verified_checkpoint(folder, Path(resume)) if resume else None))
    except Exception:  # noqa: BLE001 (rank 0 records the run's outcome)
        _log(folder, "ended: " + traceback.format_exc())
        return 1
    _log(folder, f"{outcome.status}: {outcome.reason}")
    return 0


def _begin(folder: RunFolder, resume: str | None) -> None:
    me = psutil.Process()
    write_atomic(folder.heartbeat_path, f"{time.time():.3f}\n")
    folder.update(status="running", reason=None, pid=me.pid, pid_created=me.create_time(), started=time.time(),
                  ended=None, **environment())
    folder.log(f"worker {me.pid} started" + (f", resuming from {resume}" if resume else ""))


def _reason(folder: RunFolder, error: BaseException, default: str | None = None) -> str:
    # MLX's own writers say "[save_safetensors] …" without an errno: judge those by the space left
    if is_disk_full(error) or (isinstance(error, (OSError, RuntimeError)) and disk_low(folder.path)):
        return disk_full_reason(folder.path)
    return default or str(error)


def _iteration(folder: RunFolder) -> int:
    try:
        return folder.info().get("iteration") or 0
    except (OSError, ValueError):
        return 0


def _log(folder: RunFolder, message: str) -> None:
    with contextlib.suppress(OSError):
        folder.log(message)


def _finish(folder: RunFolder, outcome: Outcome) -> list[threading.Thread]:
    """Record the outcome (on a full disk, with the space set aside at the start) and start telling it."""
    if disk_low(folder.path):  # asked of the disk, not read back out of the reason's wording
        folder.release_space()
    try:
        folder.end_session(outcome.status, outcome.reason)
        folder.append_metric({"type": "status", "step": outcome.iteration, "status": outcome.status,
                              "reason": outcome.reason})
    except OSError as e:
        if not is_disk_full(e):
            raise
        folder.release_space()  # the disk filled up as the session ended
        folder.end_session(outcome.status, disk_full_reason(folder.path))
    _log(folder, f"{outcome.status}: {outcome.reason}")
    folder.release_space()
    return _tell(folder, outcome.status)


def verified_checkpoint(folder: RunFolder, ckpt: Path) -> Path:
    """``ckpt`` if it is intact; for this run's own newest checkpoint, else the newest intact one before it
    (said in the log). A damaged checkpoint another run forks from is a :class:`CheckpointDamaged` error."""
    problem = checkpoint_problem(ckpt)
    if problem is None:
        return ckpt
    if ckpt.parent != folder.checkpoints:
        raise CheckpointDamaged(f"cannot start from checkpoint {ckpt.name} of run {ckpt.parent.parent.name}: "
                                f"{problem}")
    for it in reversed([i for i in folder.checkpoint_iterations() if i < int(ckpt.name)]):
        older = folder.checkpoint_dir(it)
        if checkpoint_problem(older) is None:
            folder.log(f"checkpoint {int(ckpt.name)} is damaged ({problem}): resuming from checkpoint {it}, the "
                       "newest intact one")
            return older
    raise CheckpointDamaged(f"checkpoint {int(ckpt.name)} is damaged ({problem}) and no earlier checkpoint is "
                            "intact: start the run again")


def _hand_over(folder: RunFolder, told: list[threading.Thread]) -> list[threading.Thread]:
    """Start the next run waiting in the workspace's training queue, if any; an empty queue is told after the
    run's own end (``told``: its sending threads), so receivers get the two in order."""
    ws = folder.workspace()
    if ws is None:  # not a workspace's run folder: no queue to serve
        return []
    try:
        # imported only as the worker ends (and inside the try: code may have moved on disk since it started)
        from services.training.manager import RunManager  # noqa: PLC0415

        manager = RunManager(ws)
        started = manager.start_next()
    except Exception:  # noqa: BLE001 (this run is finished either way; the app retries when it looks)
        with contextlib.suppress(OSError):  # the run folder itself may be gone (a probe's throw-away workspace)
            folder.log("could not start the next waiting run: " + traceback.format_exc())
        return []
    if started:
        folder.log(f"started the next run in the queue: {started}")
    elif folder.info().get("from_queue") and not manager.waiting():
        wait_for(told, NOTIFY_WAIT)
        return _tell(folder, "queue-empty")
    return []


def _tell(folder: RunFolder, kind: str) -> list[threading.Thread]:
    """Start sending a run event to the workspace's webhooks (a folder outside a workspace has none); never
    raises. Returns the sending threads."""
    ws = folder.workspace()
    if ws is None:
        return []
    try:
        return notify(ws, run_event(kind, folder.info()))
    except Exception:  # noqa: BLE001 (a notification must never fail a run)
        _log(folder, "could not send the notification: " + traceback.format_exc())
        return []


if __name__ == "__main__":
    raise SystemExit(main())
