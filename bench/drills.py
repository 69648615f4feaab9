#!/usr/bin/env python
"""Reliability drills (issue 15): kill -9s, concurrent resumes and full disks against real workers.

Not part of CI: it runs real training workers on the tiny test model for several minutes and prints a table.

1. **kill -9** (``--kills``, default 20): a run (``save_every: 2``, ``keep_checkpoints: 2``, so rotation runs
   all the time) is killed with SIGKILL at a random moment after its first checkpoint, or aimed: the moment a
   checkpoint is being built (``checkpoints/.tmp-*`` seen), or inside a ``rename`` (the commit of a checkpoint or
   of ``run.json``) or an ``unlinkat`` (the rotation's delete) through ``strace --inject``. Then the run must be
   marked *interrupted*, every checkpoint it counts must be complete (checksums against its manifest), no
   metrics line may be torn, and Resume must end bitwise equal to an uninterrupted run: the final checkpoint's
   adapters, optimizer and random state, the run's adapters, and the loss stream.
2. **concurrent resumes** (``--rounds``, default 20): four processes resume the same stopped run at the same
   instant; exactly one worker may train it (counted from the process table, and from ``resume`` records).
3. **disk full** (``--full``, default 3, root only): a run on an 8 MB tmpfs has its disk filled mid-run; it
   must fail with "the workspace disk is full", leave no torn or lost metrics record, and resume (after the
   space is freed) bitwise equal to the uninterrupted run.

Usage::

    python bench/drills.py                      # everything (about 8 minutes on a 2-core machine)
    python bench/drills.py --kills 4 --rounds 3 --full 1

Prints the table and writes it with every try's details to ``bench/results/drills.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("MLX_DISABLE_COMPILE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
import psutil  # noqa: E402

from services.config import ConfigError  # noqa: E402
from services.library.tiny_model import build_tiny_model  # noqa: E402
from services.training.folder import RunFolder, checkpoint_problem, history  # noqa: E402
from services.training.manager import RunManager  # noqa: E402
from services.workspace import Workspace  # noqa: E402

DONE = ("completed", "stopped", "early-stopped")
WORDS = "red green blue small large quick slow river stone cloud bread apple".split()


# ----------------------------------------------------------------------------------------------- fixtures


def make_data(root: Path) -> Path:
    """A chat dataset in the mlx-lm layout (train.jsonl, valid.jsonl)."""
    rng = random.Random(7)

    def row() -> str:
        q = " ".join(rng.choice(WORDS) for _ in range(5))
        a = " ".join(rng.choice(WORDS) for _ in range(9))
        return json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})

    root.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", 40), ("valid", 8)):
        (root / f"{split}.jsonl").write_text("".join(row() + "\n" for _ in range(n)))
    return root


def config(model: Path, data: Path, **over: Any) -> dict[str, Any]:
    cfg = {"model": str(model), "data": str(data), "mode": "ift", "fine_tune_type": "lora", "seed": 3,
           "num_layers": 2, "batch_size": 4, "iters": 30, "learning_rate": 1e-3, "val_batches": 1,
           "steps_per_report": 1, "steps_per_eval": 20, "save_every": 2, "keep_checkpoints": 2,
           "max_seq_length": 64, "lora_parameters": {"rank": 4, "dropout": 0.0, "scale": 10.0}}
    cfg.update(over)
    return cfg


def wait_status(manager: RunManager, run_id: str, statuses: tuple[str, ...], timeout: float = 300) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        info = manager.refresh(manager.folder(run_id))
        if info.get("status") in statuses:
            return info
        time.sleep(0.05)
    raise TimeoutError(f"{run_id} did not reach {statuses}: {manager.get(run_id)}")


def worker_pid(folder: RunFolder, timeout: float = 60) -> int:
    deadline = time.time() + timeout
    while time.time() < deadline:
        pid = folder.info().get("pid")
        if pid:
            return pid
        time.sleep(0.01)
    raise TimeoutError(f"{folder.id}: the worker never recorded its pid")


# ----------------------------------------------------------------------------------------------- checks


def same_file_tensors(a: Path, b: Path) -> bool:
    if not a.exists() or not b.exists():
        return a.exists() == b.exists()
    ta, tb = mx.load(str(a)), mx.load(str(b))
    return sorted(ta) == sorted(tb) and all(mx.array_equal(ta[k], tb[k]).item() for k in ta)


def same_rng(a: Path, b: Path) -> bool:
    with np.load(a) as za, np.load(b) as zb:
        return sorted(za.files) == sorted(zb.files) and all(np.array_equal(za[k], zb[k]) for k in za.files)


def loss_stream(folder: RunFolder) -> list[tuple[str, int, float]]:
    records, _ = folder.metrics()
    return [(r["type"], r["step"], r.get("train_loss", r.get("val_loss")))
            for r in history(records) if r["type"] in ("train", "val")]


def bitwise_equal(folder: RunFolder, ref: RunFolder, final: int) -> bool:
    a, b = folder.checkpoint_dir(final), ref.checkpoint_dir(final)
    return (all(same_file_tensors(a / n, b / n) for n in
                ("adapters.safetensors", "optimizer.safetensors", "grad_accum.safetensors"))
            and same_rng(a / "rng.npz", b / "rng.npz")
            and same_file_tensors(folder.path / "adapters.safetensors", ref.path / "adapters.safetensors")
            and loss_stream(folder) == loss_stream(ref))


def torn_lines(folder: RunFolder) -> int:
    n = 0
    for line in folder.metrics_path.read_bytes().splitlines():
        try:
            json.loads(line)
        except ValueError:
            n += 1
    return n


def partial_counted(folder: RunFolder) -> int:
    """Checkpoints the run counts (and would resume or fork from) that are not complete."""
    return sum(checkpoint_problem(folder.checkpoint_dir(it)) is not None for it in folder.checkpoint_iterations())


# ----------------------------------------------------------------------------------------------- 1. kill -9


def kill_at(folder: RunFolder, pid: int, how: str, rng: random.Random, duration: float) -> str:
    """SIGKILL the worker as ``how`` says; returns where the kill landed."""
    while not folder.checkpoint_iterations():  # before the first checkpoint there is nothing to resume from
        time.sleep(0.005)
    if how == "random":
        time.sleep(rng.uniform(0, duration * 0.7))
        os.kill(pid, signal.SIGKILL)
        return "random"
    if how == "checkpoint-write":
        deadline = time.time() + duration * 3
        while time.time() < deadline:
            try:
                if any(p.startswith(".tmp-") for p in os.listdir(folder.checkpoints)):
                    os.kill(pid, signal.SIGKILL)
                    return "checkpoint-write"
            except FileNotFoundError:
                pass
        os.kill(pid, signal.SIGKILL)
        return "random (no write seen)"
    syscall = "rename" if how == "rename" else "unlinkat"
    when = rng.randint(4, 40)
    subprocess.run(["strace", "-q", "-f", "-o", "/dev/null", "-p", str(pid), "-e", f"trace={syscall}",
                    "-e", f"inject={syscall}:signal=KILL:when={when}"], timeout=duration * 4,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return f"{how} #{when}"


def drill_kills(n: int, model: Path, data: Path, root: Path, rng: random.Random) -> dict[str, Any]:
    cfg = config(model, data)
    ref_mgr = RunManager(Workspace.resolve(root / "ref"))
    t0 = time.time()
    ref = ref_mgr.launch(cfg)
    wait_status(ref_mgr, ref.id, DONE)
    duration = time.time() - t0
    ways = ["random", "checkpoint-write", "rename", "rotation"]
    tries = []
    for i in range(n):
        how = ways[i % len(ways)] if shutil.which("strace") or ways[i % len(ways)] in ways[:2] else "random"
        manager = RunManager(Workspace.resolve(root / f"kill-{i:02d}"))
        folder = manager.launch(cfg)
        landed = kill_at(folder, worker_pid(folder), how, rng, duration)
        info = wait_status(manager, folder.id, ("interrupted", "failed", *DONE), timeout=60)
        t = {"try": i + 1, "aimed": how, "landed": landed, "status": info["status"],
             "checkpoints": folder.checkpoint_iterations(), "partial_counted": partial_counted(folder),
             "torn": torn_lines(folder)}
        if info["status"] in DONE:
            t.update(resumable=True, equal=bitwise_equal(folder, ref, cfg["iters"]), note="ended before the kill")
        else:
            try:
                manager.resume(folder.id)
                final = wait_status(manager, folder.id, ("failed", *DONE))
                t.update(resumable=final["status"] == "completed", equal=bitwise_equal(folder, ref, cfg["iters"]))
            except ConfigError as e:
                t.update(resumable=False, equal=False, note=str(e))
        t["leftovers"] = sorted(p.name for p in folder.checkpoints.iterdir() if p.name.startswith("."))
        tries.append(t)
        print(f"  kill {i + 1:2d}/{n}: {landed:<24} {t['status']:<12} resumable={t['resumable']} "
              f"equal={t['equal']} partial={t['partial_counted']} torn={t['torn']}", flush=True)
    interrupted = [t for t in tries if t["status"] == "interrupted"]
    return {"name": f"kill -9 (run of {duration:.1f} s)", "tries": n,
            "passed": sum(t["resumable"] and t["equal"] and not t["partial_counted"] and not t["torn"]
                          for t in tries),
            "detail": f"{len(interrupted)} marked interrupted; {sum(t['resumable'] for t in tries)} resumable; "
                      f"{sum(t['equal'] for t in tries)} bitwise equal; "
                      f"{sum(t['partial_counted'] for t in tries)} partial checkpoints counted; "
                      f"{sum(t['torn'] for t in tries)} torn lines; "
                      f"{sum('write' in t['landed'] or 'rename' in t['landed'] for t in tries)} in checkpoint "
                      f"writes/commits, {sum('rotation' in t['landed'] for t in tries)} in rotation",
            "runs": tries}


# ----------------------------------------------------------------------------------------------- 2. resume race

RACER = """
import sys, time
from pathlib import Path
from services.config import ConfigError
from services.training.manager import RunManager
from services.workspace import Workspace
manager = RunManager(Workspace(Path(sys.argv[1])))
at = float(sys.argv[3])
while time.time() < at:
    pass
try:
    manager.resume(sys.argv[2])
    print("started", flush=True)
except ConfigError as e:
    print("refused", e, flush=True)
"""


def workers_of(folder: RunFolder) -> int:
    n = 0
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info["cmdline"] or []
        if "services.training.worker" in cmd and str(folder.path) in cmd:
            n += 1
    return n


def drill_resumes(rounds: int, model: Path, data: Path, root: Path) -> dict[str, Any]:
    manager = RunManager(Workspace.resolve(root / "race"))
    folder = manager.launch(config(model, data, iters=100_000, save_every=50, keep_checkpoints=1,
                                   steps_per_eval=100_000, steps_per_report=10))
    while not folder.checkpoint_iterations():
        time.sleep(0.05)
    manager.stop(folder.id)
    wait_status(manager, folder.id, DONE)
    results = []
    for r in range(rounds):
        at = time.time() + 2.0  # every racer has imported the manager by then
        procs = [subprocess.Popen([sys.executable, "-c", RACER, str(manager.workspace.root), folder.id, f"{at:.3f}"],
                                  cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for _ in range(4)]
        outs = [p.communicate(timeout=120)[0] for p in procs]
        started = sum(o.startswith("started") for o in outs)
        time.sleep(1.0)  # a second worker, if any, has been spawned by now
        peak = workers_of(folder)
        manager.stop(folder.id)
        wait_status(manager, folder.id, DONE)
        results.append({"round": r + 1, "started": started, "workers": peak,
                        "tracebacks": sum("Traceback" in o for o in outs)})
        print(f"  resume race {r + 1:2d}/{rounds}: {started} started, {peak} worker(s)", flush=True)
    records, _ = folder.metrics()
    resumes = sum(x["type"] == "resume" for x in records)
    return {"name": "4 concurrent resumes", "tries": rounds,
            "passed": sum(x["started"] == 1 and x["workers"] == 1 and not x["tracebacks"] for x in results),
            "detail": f"workers per round {sorted({x['workers'] for x in results})}; {resumes} resume records "
                      f"for {rounds} rounds", "runs": results}


# ----------------------------------------------------------------------------------------------- 3. disk full


def fill(path: Path) -> None:
    """Write zeros to ``path`` until the disk takes no more, in ever smaller pieces down to 512 bytes."""
    with open(path, "wb", buffering=0) as f:
        for piece in (b"\0" * 65536, b"\0" * 512):
            with contextlib.suppress(OSError):
                while f.write(piece):
                    pass


def gapless(folder: RunFolder) -> bool:
    """Train records of steps 1..k with none missing or doubled, as they stand after resumes."""
    records, _ = folder.metrics()
    steps = [r["step"] for r in history(records) if r["type"] == "train"]
    return steps == list(range(1, len(steps) + 1))


def drill_full(n: int, model: Path, data: Path, root: Path) -> dict[str, Any]:
    if os.geteuid() != 0 or not shutil.which("mount"):
        return {"name": "disk full (8 MB tmpfs)", "tries": 0, "passed": 0, "detail": "skipped: needs root",
                "runs": []}
    cfg = config(model, data, iters=60, save_every=10, keep_checkpoints=None, steps_per_eval=20)
    ref_mgr = RunManager(Workspace.resolve(root / "full-ref"))
    ref = ref_mgr.launch(cfg)
    wait_status(ref_mgr, ref.id, DONE)
    tries = []
    for i in range(n):
        mnt = root / f"disk-{i}"
        mnt.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)], check=True)
        try:
            manager = RunManager(Workspace.resolve(mnt / "ws"))
            folder = manager.launch(cfg)
            target = 15 + 12 * i
            while len(folder.metrics()[0]) < target and manager.get(folder.id).get("status") in ("queued", "running"):
                time.sleep(0.01)
            fill(mnt / "filler")
            info = wait_status(manager, folder.id, ("failed", "interrupted", *DONE), timeout=120)
            t = {"try": i + 1, "filled_after_records": target, "status": info["status"],
                 "reason": info.get("reason"), "clear": "the workspace disk is full" in (info.get("reason") or ""),
                 "torn": torn_lines(folder), "gapless": gapless(folder), "listing_works": bool(manager.list())}
            (mnt / "filler").unlink()
            manager.resume(folder.id)
            final = wait_status(manager, folder.id, ("failed", *DONE))
            t.update(resumed=final["status"], equal=bitwise_equal(folder, RunFolder(ref.path), cfg["iters"]),
                     torn_after=torn_lines(folder), gapless_after=gapless(folder))
        finally:
            subprocess.run(["umount", "-l", str(mnt)])
        tries.append(t)
        print(f"  disk full {i + 1}/{n}: {t['status']} ({t['reason']}); torn={t['torn']} gapless={t['gapless']} "
              f"resumed={t['resumed']} equal={t['equal']}", flush=True)
    ok = [t["clear"] and not t["torn"] and not t["torn_after"] and t["gapless"] and t["gapless_after"]
          and t["resumed"] == "completed" and t["equal"] for t in tries]
    return {"name": "disk full (8 MB tmpfs)", "tries": n, "passed": sum(ok),
            "detail": f"clear reason {sum(t['clear'] for t in tries)}/{n}; torn lines "
                      f"{sum(t['torn'] + t['torn_after'] for t in tries)}; lost or doubled records "
                      f"{sum(not (t['gapless'] and t['gapless_after']) for t in tries)}; bitwise equal after "
                      f"resume {sum(t['equal'] for t in tries)}/{n}", "runs": tries}


# ----------------------------------------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--full", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "drills.json")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    root = Path(tempfile.mkdtemp(prefix="forgellm-drills-"))
    started = time.time()
    try:
        model = build_tiny_model(root / "model")
        data = make_data(root / "chat")
        rows = []
        for name, run in (("kills", lambda: drill_kills(args.kills, model, data, root, rng)),
                          ("resumes", lambda: drill_resumes(args.rounds, model, data, root)),
                          ("full", lambda: drill_full(args.full, model, data, root))):
            t0 = time.time()
            print(f"drill: {name}", flush=True)
            row = run()
            row["seconds"] = round(time.time() - t0, 1)
            rows.append(row)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print()
    print(f"{'drill':<32} {'tries':>5} {'passed':>6} {'time':>7}  detail")
    for r in rows:
        print(f"{r['name']:<32} {r['tries']:>5} {r['passed']:>6} {r['seconds']:>6.0f}s  {r['detail']}")
    total = time.time() - started
    print(f"total {total:.0f} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"seconds": round(total, 1), "drills": rows}, indent=1, default=str))
    return 0 if all(r["passed"] == r["tries"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
