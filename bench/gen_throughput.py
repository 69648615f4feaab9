#!/usr/bin/env python
"""Generation throughput and UI responsiveness: ForgeLLM's ModelService against mlx-lm, in one invocation.

Same model (a ~20M-parameter llama with a stdlib-trained 8k BPE tokenizer), same prompt tokens, greedy,
256 new tokens with EOS ignored, on:

  (a) ``mlx-lm``    ``mlx_lm.stream_generate`` in this process (MKL preloaded, as ForgeLLM does)
  (b) ``forgellm``  ``ModelService.generate`` streaming from its worker process to this process

Tokens/s is measured where the tokens are consumed: (generated tokens - 1) / (time of the last token -
time of the first token), so it is decode speed including, for (b), the pipe to the UI-side process.
mlx-lm's own ``generation_tps`` and the worker's are recorded as well. Runs alternate (a b a b ...);
the figure per side is the median. Target: forgellm / mlx-lm >= 0.95.

Then event-loop lag: an asyncio loop in this (UI-side) process consumes the service's stream with
``async for`` while a 10 ms periodic task records how late it wakes up. Target: p99 <= 50 ms.

Usage::

    python bench/gen_throughput.py              # 20M model (about a minute)
    python bench/gen_throughput.py --quick      # tiny model: a smoke check of the bench itself

Writes ``bench/results/gen_throughput.json`` (``--quick``: ``gen_throughput-quick.json``); the model is
built once into ``bench/results/cache/``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import services  # noqa: F401 (loads MKL before anything imports MLX)

os.environ.setdefault("MLX_DISABLE_COMPILE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import asyncio
import json
import platform
import statistics
import time
from typing import Any

import mlx.core as mx
import mlx_lm
from mlx_lm import load, stream_generate

from services import blas
from services.inference.service import ModelService
from services.library.tiny_model import build_tiny_model

RESULTS = ROOT / "bench" / "results"
SPECS = {
    "20m": {"texts": "stdlib", "hidden": 512, "layers": 6, "intermediate": 1408, "heads": 8, "kv_heads": 4,
            "vocab": 8192},
    "quick": {"hidden": 64, "layers": 2, "intermediate": 128, "heads": 4, "kv_heads": 2, "vocab": 512},
}
PROMPT = (
    "def parse_config(path):\n    \"\"\"Read a configuration file and return a dictionary of its sections.\"\"\"\n"
    "    sections = {}\n    current = None\n    with open(path, encoding='utf-8') as f:\n"
    "        for line in f:\n            line = line.strip()\n            if not line or line.startswith('#'):\n"
    "                continue\n"
)


def build_model(name: str) -> Path:
    path = RESULTS / "cache" / f"gen-llama-{name}"
    if not (path / "model.safetensors").exists():
        build_tiny_model(path, **SPECS[name])
    return path


def decode_tps(times: list[float]) -> float:
    """Tokens/s between the first and the last token's arrival."""
    return (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 and times[-1] > times[0] else float("nan")


def run_mlx_lm(model: Any, tok: Any, prompt: list[int], n: int) -> dict[str, float]:
    eos = tok.eos_token_ids
    tok.eos_token_ids = set()
    times, last = [], None
    try:
        for r in stream_generate(model, tok, mx.array(prompt), max_tokens=n):
            times.append(time.perf_counter())
            last = r
    finally:
        tok.eos_token_ids = eos
    return {"tps": decode_tps(times), "tokens": last.generation_tokens, "own_tps": last.generation_tps,
            "prompt_tps": last.prompt_tps}


def run_service(svc: ModelService, prompt: str, n: int) -> dict[str, float]:
    stream = svc.generate({"prompt": prompt, "format": "completion", "max_tokens": n, "ignore_eos": True})
    times = []
    for chunk in stream:
        if chunk["type"] == "token":
            times.append(time.perf_counter())
    r = stream.result
    return {"tps": decode_tps(times), "tokens": r["generation_tokens"], "own_tps": r["generation_tps"],
            "prompt_tps": r["prompt_tps"]}


async def loop_lag(svc: ModelService, prompt: str, n: int, generations: int) -> dict[str, Any]:
    """Lag of a 10 ms periodic task while the same loop consumes ``generations`` streams."""
    lags: list[float] = []
    done = asyncio.Event()

    async def ticker() -> None:
        loop = asyncio.get_running_loop()
        while not done.is_set():
            t = loop.time()
            await asyncio.sleep(0.010)
            lags.append(loop.time() - t - 0.010)

    async def consume() -> int:
        count = 0
        for _ in range(generations):
            async for chunk in svc.generate({"prompt": prompt, "format": "completion", "max_tokens": n,
                                             "ignore_eos": True}):
                count += chunk["type"] == "token"
        done.set()
        return count

    tick = asyncio.create_task(ticker())
    tokens = await consume()
    await tick
    lags.sort()
    ms = [x * 1e3 for x in lags]
    return {"ticks": len(ms), "tokens": tokens, "p50_ms": ms[len(ms) // 2], "p99_ms": ms[int(len(ms) * 0.99) - 1],
            "max_ms": ms[-1], "mean_ms": statistics.fmean(ms)}


def host() -> dict[str, Any]:
    import psutil

    return {"platform": platform.platform(), "cpus": os.cpu_count(), "ram_gb": round(psutil.virtual_memory().total
                                                                                     / 1e9, 1),
            "python": platform.python_version(), "mlx": mx.__version__, "mlx_lm": mlx_lm.__version__,
            "blas": blas.active()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny model: a smoke check of the bench, not a measurement")
    p.add_argument("--runs", type=int, default=5, help="alternating runs per side (default 5)")
    p.add_argument("--tokens", type=int, default=256, help="new tokens per run (default 256)")
    p.add_argument("--lag-generations", type=int, default=3, help="generations during the event-loop lag test")
    args = p.parse_args()
    name = "quick" if args.quick else "20m"
    model_path = build_model(name)
    model, tok = load(str(model_path))
    prompt_tokens = tok.encode(PROMPT)
    svc = ModelService()
    try:
        svc.load(model_path)
        run_mlx_lm(model, tok, prompt_tokens, 16)  # warm-up both sides
        run_service(svc, PROMPT, 16)
        sides: dict[str, list[dict[str, float]]] = {"mlx-lm": [], "forgellm": []}
        for i in range(args.runs):
            order = (("mlx-lm", "forgellm") if i % 2 == 0 else ("forgellm", "mlx-lm"))
            for side in order:
                r = (run_mlx_lm(model, tok, prompt_tokens, args.tokens) if side == "mlx-lm"
                     else run_service(svc, PROMPT, args.tokens))
                sides[side].append(r)
                print(f"run {i + 1} {side:>8}: {r['tps']:7.1f} tok/s (own {r['own_tps']:.1f}), {r['tokens']} tokens",
                      flush=True)
        lag = asyncio.run(loop_lag(svc, PROMPT, args.tokens, args.lag_generations))
    finally:
        svc.unload()
    med = {side: statistics.median(r["tps"] for r in runs) for side, runs in sides.items()}
    ratio = med["forgellm"] / med["mlx-lm"]
    pairs = [f["tps"] / m["tps"] for f, m in zip(sides["forgellm"], sides["mlx-lm"], strict=True)]
    out = {"bench": "gen_throughput", "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "quick": args.quick,
           "host": host(), "model": {"path": str(model_path.relative_to(ROOT)), "spec": SPECS[name]},
           "prompt_tokens": len(prompt_tokens), "new_tokens": args.tokens, "runs": sides,
           "median_tps": med, "ratio": ratio, "pair_ratios": pairs,
           "median_pair_ratio": statistics.median(pairs), "ratio_target": 0.95, "ratio_ok": ratio >= 0.95,
           "event_loop_lag": lag, "lag_target_p99_ms": 50, "lag_ok": lag["p99_ms"] <= 50}
    RESULTS.mkdir(parents=True, exist_ok=True)
    dest = RESULTS / f"gen_throughput{'-quick' if args.quick else ''}.json"
    dest.write_text(json.dumps(out, indent=2) + "\n")
    print(f"\nmedian decode tok/s: mlx-lm {med['mlx-lm']:.1f}, forgellm {med['forgellm']:.1f}; "
          f"ratio {ratio:.3f} (target >= 0.95: {'ok' if out['ratio_ok'] else 'MISSED'}); "
          f"median of the per-pair ratios {statistics.median(pairs):.3f}")
    print(f"event-loop lag while streaming ({lag['ticks']} ticks of 10 ms, {lag['tokens']} tokens): "
          f"p50 {lag['p50_ms']:.2f} ms, p99 {lag['p99_ms']:.2f} ms, max {lag['max_ms']:.2f} ms "
          f"(target p99 <= 50 ms: {'ok' if out['lag_ok'] else 'MISSED'})")
    print(f"wrote {dest.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
