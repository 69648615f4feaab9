#!/usr/bin/env python
"""The OpenAI-compatible endpoint against ``mlx_lm.server`` (issue 16, serving): base → checkpoint → checkpoint →
base on SmolLM2-135M-Instruct (the embedded demo model, float32), one greedy chat completion each.

  (a) ``forgellm``  ``ServingServer`` (``forgellm serve``): one resident base in one model worker, adapters swapped
  (b) ``mlx-lm``    ``mlx_lm.server --model BASE`` with the request's ``adapters`` field: it reloads on a change

Per request: wall time seen by the client and the serving process's RSS after it (ForgeLLM: its model worker's;
mlx-lm: the server's). The texts of the two sides are compared as well. A short LoRA run (4 steps, checkpoints 2
and 4) is trained first. Usage: ``python bench/serving.py [--max-tokens 32]``; writes
``bench/results/serving.json``.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
import argparse
import json
import shutil
import socket
import subprocess
import tempfile
import time

import httpx
import psutil
from gen_throughput import RESULTS  # its header loads MKL and sets the MLX and Hub variables, as for every bench

from app.composition import build_serving
from services.library.gguf import ensure_demo_model
from services.library.samples import install_samples
from services.training.manager import RunManager
from services.workspace import Workspace

PROMPT = "Give me one tip for a rainy day."


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train(manager: RunManager, model: Path, data: Path) -> str:
    folder = manager.launch({"model": str(model), "data": str(data), "fine_tune_type": "lora", "num_layers": 4,
                             "iters": 4, "save_every": 2, "steps_per_eval": 100, "batch_size": 1, "val_batches": 1,
                             "learning_rate": 2e-4, "max_seq_length": 64, "steps_per_report": 2, "seed": 0,
                             "lora_parameters": {"rank": 8, "dropout": 0.0, "scale": 20.0}})
    info = manager.wait(folder.id, timeout=1200)
    assert info["status"] == "completed", info.get("reason")
    return folder.id


def ask(url: str, body: dict) -> tuple[float, str]:
    t0 = time.perf_counter()
    r = httpx.post(f"{url}/chat/completions", json=body, timeout=600)
    r.raise_for_status()
    return time.perf_counter() - t0, r.json()["choices"][0]["message"]["content"]


def rss_gb(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 1e9


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-tokens", type=int, default=32)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="serving-bench-"))
    ws = Workspace.resolve(work / "ws")
    model = ensure_demo_model(ws.models, dequantize=True)
    data = install_samples(ws.datasets)["ift"]
    manager = RunManager(ws)
    t0 = time.perf_counter()
    run = train(manager, model, data)
    print(f"trained {run} in {time.perf_counter() - t0:.0f} s", flush=True)
    folder = manager.folder(run)
    names = [model.name, f"{run}@2", f"{run}@4", model.name]
    common = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": args.max_tokens, "temperature": 0}
    out: dict = {"model": model.name, "max_tokens": args.max_tokens, "sequence": names}

    server = build_serving(manager)
    url = server.start(free_port())
    rows = []
    for name in names:
        seconds, text = ask(url, {**common, "model": name})
        (status,) = server.pool.resident().values()
        rows.append({"model": name, "seconds": seconds, "rss_gb": status["memory"]["rss_gb"], "pid": status["pid"],
                     "text": text})
    server.stop()
    out["forgellm"] = rows

    adapters = {}
    for it in (2, 4):  # mlx-lm wants the config next to the weights
        d = work / f"adapter-{it}"
        d.mkdir()
        shutil.copy(folder.path / "adapter_config.json", d)
        shutil.copy(folder.checkpoint_dir(it) / "adapters.safetensors", d)
        adapters[f"{run}@{it}"] = str(d)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "mlx_lm.server", "--model", str(model), "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=work)
    try:
        murl = f"http://127.0.0.1:{port}/v1"
        deadline = time.time() + 300
        while time.time() < deadline:
            try:
                httpx.get(f"{murl}/models", timeout=2)
                break
            except httpx.HTTPError:
                time.sleep(0.5)
        rows = []
        for name in names:
            body = {**common, "model": str(model), **({"adapters": adapters[name]} if name in adapters else {})}
            seconds, text = ask(murl, body)
            rows.append({"model": name, "seconds": seconds, "rss_gb": rss_gb(proc.pid), "text": text})
        out["mlx-lm"] = rows
    finally:
        proc.terminate()
        proc.wait(30)
    print(f"{'request':<34} {'forgellm s':>10} {'RSS GB':>7} {'mlx-lm s':>9} {'RSS GB':>7}  same text")
    for a, b in zip(out["forgellm"], out["mlx-lm"], strict=True):
        print(f"{a['model']:<34} {a['seconds']:>10.2f} {a['rss_gb']:>7.3f} {b['seconds']:>9.2f} {b['rss_gb']:>7.3f}"
              f"  {a['text'] == b['text']}")
    print(f"forgellm worker pids: {sorted({r['pid'] for r in out['forgellm']})}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "serving.json").write_text(json.dumps(out, indent=2))
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
