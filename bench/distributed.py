#!/usr/bin/env python
"""Distributed scaling: one process against two (mx.distributed, ring over loopback), same config, one invocation.

The same CPT LoRA config (the tiny test model, or ``--model PATH``; global batch ``--batch``) trains with
``distributed: {processes: 2}`` and without, ``--repeats`` times each in ABBA order. Steady-state tokens/s of a
run = median of its report windows after the first; each side's figure is the best of its runs (noise on a
shared box only slows a run down). Scaling efficiency = tokens/s(2) / (2 × tokens/s(1)). On a 2-core machine
shared with others expect little gain: the figure is for the record; correctness is ``tests/test_distributed.py``.

Usage: ``python bench/distributed.py [--iters 40] [--repeats 2] [--model PATH]``; writes
``bench/results/distributed.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from services.library.samples import install_samples  # noqa: E402
from services.library.tiny_model import build_tiny_model  # noqa: E402
from services.training.folder import history  # noqa: E402
from services.training.manager import RunManager  # noqa: E402
from services.workspace import Workspace  # noqa: E402


def one_run(manager: RunManager, cfg: dict) -> dict:
    folder = manager.launch(cfg)
    info = manager.wait(folder.id, timeout=1800)
    if info["status"] != "completed":
        raise SystemExit(f"run {folder.id} ended {info['status']}: {info.get('reason')}")
    records, _ = folder.metrics()
    train = [r for r in history(records) if r["type"] == "train"]
    tps = [r["tokens_per_second"] for r in train[1:] if r.get("tokens_per_second")]
    per_rank = [[x["tokens_per_second"] for x in r["ranks"]] for r in train[1:] if r.get("ranks")]
    return {"tokens_per_second": statistics.median(tps), "per_rank": per_rank[-1] if per_rank else None,
            "final_loss": train[-1]["train_loss"]}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--iters", type=int, default=40)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--model")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ws = Workspace.resolve(Path(tmp) / "ws")
        data = install_samples(ws.datasets)["cpt"]
        model = args.model or str(build_tiny_model(Path(tmp) / "tiny"))
        cfg = {"model": model, "data": str(data), "mode": "cpt", "fine_tune_type": "lora", "num_layers": -1,
               "batch_size": args.batch, "iters": args.iters, "max_seq_length": 128, "learning_rate": 1e-4,
               "steps_per_report": 5, "steps_per_eval": 10_000, "save_every": 10_000, "val_batches": 1}
        manager = RunManager(ws)
        runs: dict[str, list[dict]] = {"1": [], "2": []}
        order = (["1", "2", "2", "1"] * args.repeats)[: 2 * args.repeats]
        for n in order:
            run_cfg = {**cfg, **({"distributed": {"processes": 2}} if n == "2" else {})}
            runs[n].append(one_run(manager, run_cfg))
            print(f"{n} process(es): {runs[n][-1]['tokens_per_second']:.0f} tokens/s", flush=True)
    best = {n: max(r["tokens_per_second"] for r in rs) for n, rs in runs.items()}
    spread = {n: [round(r["tokens_per_second"], 1) for r in rs] for n, rs in runs.items()}
    result = {"config": {k: v for k, v in cfg.items() if k not in ("model", "data")}, "cpus": os.cpu_count(),
              "tokens_per_second": best, "runs": spread, "per_rank_last_report": runs["2"][-1]["per_rank"],
              "speedup": best["2"] / best["1"], "scaling_efficiency": best["2"] / (2 * best["1"])}
    out = REPO / "bench" / "results" / "distributed.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"1 process {best['1']:.0f} tokens/s (runs {spread['1']}), 2 processes {best['2']:.0f} tokens/s "
          f"(runs {spread['2']}): speedup {result['speedup']:.2f}x, scaling efficiency "
          f"{result['scaling_efficiency']:.0%} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
