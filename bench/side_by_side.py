#!/usr/bin/env python
"""A training run and the Playground side by side on one CPU: does either starve the other? One invocation.

For each thread policy -- ``before`` (``FORGELLM_THREADS=off``: MKL's defaults, its OpenMP threads spin 200 ms
after every call) and ``after`` (ForgeLLM's policy: ``services.blas.thread_policy`` before MKL loads, and
``services.blas.fit_threads`` before each request of the model worker) -- first ``--alone-pairs`` runs alone, the
policies back to back in ABBA order (a single run loses nothing?), then ``--repeats`` times each, ABBA:

  1. ``train alone``       a LoRA run of the ~20M llama (``forgellm`` worker process) with nothing beside it
  2. ``generate alone``    the Playground's model worker (``ModelService``) generating ``--tokens`` tokens, greedy
  3. ``side by side``      the same run again, and while it trains the model worker generates without pause

Training tokens/s = median of the run's report windows (one step each) after the first; with generation beside it,
only the windows that ended while a generation was running count. Generation tokens/s = median decode speed of
the streams (first to last token). A repeat measures alone and side by side back to back, so its ratios are
paired; per policy the ratio is the median of its repeats', printed with each repeat's.

Targets (issue 14): after, training while generating ≥ 0.6× training alone, generation while training ≥ 0.4×
generation alone, and training alone after ≥ before (a single run loses nothing).

Usage: ``python bench/side_by_side.py [--iters 24] [--repeats 3] [--alone-pairs 4] [--tokens 48]``;
writes ``bench/results/side_by_side.json``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
os.environ.setdefault("MLX_DISABLE_COMPILE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import json
import statistics
import tempfile
import threading
import time
from typing import Any

from gen_throughput import RESULTS, build_model, decode_tps
from train_throughput import ensure_data, wait_quiet

from services.inference.service import ModelService
from services.training.folder import history
from services.training.manager import RunManager
from services.workspace import Workspace

PROMPT = "def parse_config(path):\n    sections = {}\n    with open(path) as f:\n"
POLICIES = {"before": "off", "after": "auto"}


def train(manager: RunManager, cfg: dict[str, Any], busy: threading.Event | None = None,
          windows: list[tuple[float, float]] | None = None) -> float:
    """Launch the run, wait for it, return the median tokens/s of its windows (those overlapping ``windows``)."""
    folder = manager.launch(cfg)
    if busy is not None:
        busy.set()
    info = manager.wait(folder.id, timeout=1800)
    if busy is not None:
        busy.clear()
    if info["status"] != "completed":
        raise SystemExit(f"run {folder.id} ended {info['status']}: {info.get('reason')}")
    records, _ = folder.metrics()
    train_reports = [r for r in history(records) if r["type"] == "train"][1:]
    tps = [r["tokens_per_second"] for r in train_reports if r.get("tokens_per_second")]
    if windows is not None:  # a report's window is its step; keep those that ended while generating
        ended = [r.get("time") for r in train_reports]
        kept = [t for t, e in zip(tps, ended, strict=False) if e is None or any(a <= e <= b for a, b in windows)]
        tps = kept or tps
    return statistics.median(tps)


def generate(svc: ModelService, tokens: int) -> float:
    times = []
    stream = svc.generate({"prompt": PROMPT, "format": "completion", "max_tokens": tokens, "ignore_eos": True})
    for chunk in stream:
        if chunk["type"] == "token":
            times.append(time.perf_counter())
    return decode_tps(times)


def one_policy(policy: str, model: Path, cfg: dict[str, Any], work: Path, tokens: int) -> dict[str, float]:
    os.environ["FORGELLM_THREADS"] = POLICIES[policy]  # read by every child this process starts
    manager = RunManager(Workspace.resolve(work / f"ws-{policy}-{time.time_ns()}"))
    alone = train(manager, cfg)
    svc = ModelService()
    try:
        svc.load(model)
        generate(svc, 8)  # warm-up
        gen_alone = statistics.median(generate(svc, tokens) for _ in range(3))
        busy, windows, speeds = threading.Event(), [], []
        runner = threading.Thread(target=lambda: speeds.append(train(manager, cfg, busy, windows)))
        runner.start()
        busy.wait(60)
        time.sleep(2.0)  # past the worker's start-up: generate beside training steps
        while busy.is_set():
            t0 = time.time()
            tps = generate(svc, tokens)
            if busy.is_set():
                windows.append((t0, time.time()))
                speeds.append(("gen", tps))
        runner.join()
    finally:
        svc.unload()
    gen_side = [s[1] for s in speeds if isinstance(s, tuple)]
    train_side = [s for s in speeds if not isinstance(s, tuple)]
    return {"train_alone": alone, "generate_alone": gen_alone, "train_side_by_side": train_side[0],
            "generate_side_by_side": statistics.median(gen_side) if gen_side else float("nan")}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=3, help="runs of each policy, in ABBA order")
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--alone-pairs", type=int, default=4, help="back-to-back (before, after) runs alone, ABBA")
    ap.add_argument("--settle", type=float, default=60.0, help="wait up to this long for a quiet machine")
    args = ap.parse_args()
    model = build_model("20m")
    data = ensure_data(model, rows=64, min_tokens=128)
    cfg = {"model": str(model), "data": str(data), "mode": "cpt", "fine_tune_type": "lora", "num_layers": -1,
           "batch_size": 2, "iters": args.iters, "max_seq_length": 128, "learning_rate": 1e-4, "seed": 0,
           "steps_per_report": 1, "steps_per_eval": 100000, "save_every": 100000, "val_batches": 1}
    quiet = wait_quiet(args.settle)
    order = ["before", "after", "after", "before"] * max(args.repeats, args.alone_pairs)
    runs: dict[str, list[dict[str, float]]] = {"before": [], "after": []}
    alone: dict[str, list[float]] = {"before": [], "after": []}
    with tempfile.TemporaryDirectory(prefix="side-by-side-") as tmp:
        for policy in order[: 2 * args.alone_pairs]:  # a single run alone, the two policies back to back
            os.environ["FORGELLM_THREADS"] = POLICIES[policy]
            alone[policy].append(train(RunManager(Workspace.resolve(Path(tmp) / f"alone-{time.time_ns()}")), cfg))
            print(f"alone {policy} {alone[policy][-1]:.1f}", flush=True)
        for policy in order[: 2 * args.repeats]:
            runs[policy].append(one_policy(policy, model, cfg, Path(tmp), args.tokens))
            print(policy, json.dumps({k: round(v, 1) for k, v in runs[policy][-1].items()}), flush=True)
    med = {p: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for p, rs in runs.items()}
    spread = {p: {k: [min(r[k] for r in rs), max(r[k] for r in rs)] for k in rs[0]} for p, rs in runs.items()}
    # each repeat measures alone and side by side back to back: its ratios are paired, and the median counts
    per_run = {p: [{"train_while_generating": r["train_side_by_side"] / r["train_alone"],
                    "generate_while_training": r["generate_side_by_side"] / r["generate_alone"]} for r in rs]
               for p, rs in runs.items()}
    ratios = {p: {k: statistics.median(x[k] for x in xs) for k in xs[0]} for p, xs in per_run.items()}
    pairs = [a / b for a, b in zip(alone["after"], alone["before"], strict=True)]
    alone_after_vs_before = statistics.median(pairs)
    out = {"quiet": quiet, "load_average": os.getloadavg(), "cpus": os.cpu_count(), "runs": runs, "median": med,
           "spread": spread, "per_run_ratios": per_run, "ratios": ratios,
           "alone_runs": alone, "train_alone_after_vs_before": alone_after_vs_before, "train_alone_pairs": pairs}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "side_by_side.json").write_text(json.dumps(out, indent=2))
    for p in ("before", "after"):
        b, r = med[p], ratios[p]
        tw = ", ".join(f"{x['train_while_generating']:.2f}" for x in per_run[p])
        gw = ", ".join(f"{x['generate_while_training']:.2f}" for x in per_run[p])
        print(f"{p:>6} (medians of {len(runs[p])}): train alone {b['train_alone']:7.1f} tok/s, beside generation "
              f"{b['train_side_by_side']:7.1f} ({r['train_while_generating']:.2f}x; runs {tw}); generate alone "
              f"{b['generate_alone']:5.1f} tok/s, beside training {b['generate_side_by_side']:5.1f} "
              f"({r['generate_while_training']:.2f}x; runs {gw})")
    print(f"train alone, after / before: {alone_after_vs_before:.2f}x (median of {len(pairs)} back-to-back pairs: "
          f"{', '.join(f'{x:.2f}' for x in pairs)}; load average {os.getloadavg()[0]:.1f})")
    print("targets (after): train beside generation >= 0.6x, generation beside training >= 0.4x, alone >= 0.97x")
    ok = (ratios["after"]["train_while_generating"] >= 0.6 and ratios["after"]["generate_while_training"] >= 0.4
          and alone_after_vs_before >= 0.97)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
