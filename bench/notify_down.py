#!/usr/bin/env python
"""A webhook receiver that is down does not slow training or the queue (issue 16). One invocation.

The same tiny CPT LoRA run, twice in a row through the training queue (run A, then run B waiting for it), in a
fresh workspace for each receiver:

  ``none``     no webhook
  ``refused``  a webhook to a closed port on loopback (connection refused at once, retried with back-off)
  ``hanging``  a webhook to a socket that takes the connection and never answers (every try waits for the timeout)

For each: run A's training tokens/s (median of its report windows after the first), A's time from launch to
``completed``, and the gap from A's end to B's start (the hand-over of the queue). A new best checkpoint is told
at every validation, so webhooks are in flight while A trains. ``--repeats`` rounds, receivers alternating;
best (training) and worst (gap) of the rounds are printed with the spread.

Usage: ``python bench/notify_down.py [--iters 30] [--repeats 2]``; writes ``bench/results/notify_down.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLX_DISABLE_COMPILE", "1")

from services.library.samples import install_samples  # noqa: E402
from services.library.tiny_model import build_tiny_model  # noqa: E402
from services.settings import Webhook, set_webhooks  # noqa: E402
from services.training.folder import history  # noqa: E402
from services.training.manager import RunManager  # noqa: E402
from services.workspace import Workspace  # noqa: E402

RESULTS = REPO / "bench" / "results"


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when this returns: connecting is refused


def hanging_socket() -> socket.socket:
    """Listening, never accepting: the kernel completes the handshake and the request waits for its timeout."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(64)
    return s


def one_round(kind: str, url: str | None, model: str, tmp: Path, iters: int) -> dict[str, float]:
    ws = Workspace.resolve(tmp / f"ws-{kind}-{time.time_ns()}")
    data = install_samples(ws.datasets)["cpt"]
    if url:
        set_webhooks(ws, [Webhook(url)])
    manager = RunManager(ws)
    cfg = {"model": model, "data": str(data), "mode": "cpt", "fine_tune_type": "lora", "num_layers": -1,
           "batch_size": 4, "iters": iters, "max_seq_length": 128, "learning_rate": 1e-4, "seed": 0,
           "steps_per_report": 1, "steps_per_eval": 5, "save_every": 10, "val_batches": 1}
    t0 = time.time()
    a = manager.launch(cfg)
    b = manager.enqueue(cfg)
    info_a = manager.wait(a.id, timeout=1800)
    deadline = time.time() + 120
    while manager.get(b.id).get("status") == "waiting" and time.time() < deadline:
        time.sleep(0.1)  # A's worker hands the queue on a moment after it recorded its end
    info_b = manager.wait(b.id, timeout=1800)
    for info in (info_a, info_b):
        if info["status"] != "completed":
            raise SystemExit(f"{kind}: run {info['id']} ended {info['status']}: {info.get('reason')}")
    records, _ = a.metrics()
    tps = [r["tokens_per_second"] for r in history(records) if r["type"] == "train"][1:]
    return {"train_tokens_per_second": statistics.median(t for t in tps if t),
            "a_launch_to_completed_s": info_a["ended"] - t0,
            "queue_gap_s": info_b["started"] - info_a["ended"]}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    hang = hanging_socket()
    receivers = {"none": None, "refused": f"http://127.0.0.1:{closed_port()}/hook",
                 "hanging": f"http://127.0.0.1:{hang.getsockname()[1]}/hook"}
    rounds: dict[str, list[dict[str, float]]] = {k: [] for k in receivers}
    with tempfile.TemporaryDirectory(prefix="notify-down-") as tmp:
        model = str(build_tiny_model(Path(tmp) / "tiny"))
        for r in range(args.repeats):
            order = list(receivers) if r % 2 == 0 else list(reversed(receivers))
            for kind in order:
                rounds[kind].append(one_round(kind, receivers[kind], model, Path(tmp), args.iters))
                print(kind, json.dumps({k: round(v, 2) for k, v in rounds[kind][-1].items()}), flush=True)
    hang.close()
    out = {"load_average": os.getloadavg(), "rounds": rounds, "summary": {}}
    for kind, rs in rounds.items():
        tps = [x["train_tokens_per_second"] for x in rs]
        gaps = [x["queue_gap_s"] for x in rs]
        walls = [x["a_launch_to_completed_s"] for x in rs]
        out["summary"][kind] = {"train_tokens_per_second": max(tps), "tps_spread": [min(tps), max(tps)],
                                "queue_gap_s": max(gaps), "gap_spread": [min(gaps), max(gaps)],
                                "a_launch_to_completed_s": min(walls), "wall_spread": [min(walls), max(walls)]}
    base = out["summary"]["none"]
    for kind, s in out["summary"].items():
        s["train_vs_none"] = s["train_tokens_per_second"] / base["train_tokens_per_second"]
        print(f"{kind:>8}: train {s['train_tokens_per_second']:8.1f} tok/s ({s['train_vs_none']:.2f}x none; "
              f"spread {s['tps_spread'][0]:.0f}..{s['tps_spread'][1]:.0f}), A launch->completed "
              f"{s['a_launch_to_completed_s']:.1f} s, queue gap A->B {s['queue_gap_s']:.2f} s "
              f"(spread {s['gap_spread'][0]:.2f}..{s['gap_spread'][1]:.2f})")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "notify_down.json").write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
