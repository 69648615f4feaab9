#!/usr/bin/env python
"""Preflight: the peak-memory estimate against a measured probe, on the tiny and a 20M-parameter model.

For each case the estimate comes from ``services.training.preflight.estimate`` (safetensors headers, the dataset's
token lengths, the memory model); the measurement is ``services.training.preflight.Probe``: a three-iteration run
through ``RunManager`` in a temporary workspace, whose training reports carry MLX's peak memory
(``mx.get_peak_memory``) and the worker's RSS. Target: the estimate within ±30% of the measured MLX peak.

Cases: CPT (packed windows of ``max_seq_length``) and IFT (chat rows), LoRA rank 8 on every layer, Adam.
The 20M model is ``build_tiny_model(texts="stdlib", hidden=512, layers=6, intermediate=1408, heads=8,
kv_heads=4, vocab=8192)``, built once into ``bench/results/cache/``.

Usage::

    python bench/preflight_memory.py            # tiny and 20M (about 2 minutes on 2 cores)
    python bench/preflight_memory.py --quick    # tiny only
    python bench/preflight_memory.py --compile  # with MLX compilation on (as in production)

Writes ``bench/results/preflight_memory[-quick][-compile].json``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import services  # noqa: F401 (loads MKL before anything imports MLX)

if "--compile" in sys.argv:  # MLX compiles when the variable is absent, whatever its value
    os.environ.pop("MLX_DISABLE_COMPILE", None)
else:
    os.environ.setdefault("MLX_DISABLE_COMPILE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from services.training import preflight
from services.training.manager import RunManager
from services.workspace import Workspace

RESULTS = ROOT / "bench" / "results"
CACHE = RESULTS / "cache"
MODELS = {
    "tiny": {},
    "20m": {"texts": "stdlib", "hidden": 512, "layers": 6, "intermediate": 1408, "heads": 8, "kv_heads": 4,
            "vocab": 8192},
}
TARGET = 0.30


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def ensure_model(name: str) -> Path:
    from services.library.tiny_model import build_tiny_model

    spec = MODELS[name]
    path = CACHE / f"preflight-{name}"
    stamp = path / "bench_spec.json"
    if not stamp.exists() or json.loads(stamp.read_text()) != spec:
        log(f"building the {name} model in {path}")
        build_tiny_model(path, **spec)
        stamp.write_text(json.dumps(spec))
    return path


def make_data(root: Path) -> dict[str, Path]:
    """A CPT folder of stdlib source documents and an IFT folder of chat rows (train + valid)."""
    rng = random.Random(0)
    cpt = root / "cpt"
    cpt.mkdir(parents=True)
    sources = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:40]
    for i, src in enumerate(sources):
        (cpt / f"doc{i:02d}.txt").write_text(src.read_text(encoding="utf-8", errors="replace")[:6000])
    ift = root / "ift"
    ift.mkdir()
    words = "the cat dog bird eats sees likes an apple the ball a bone some water bread".split()

    def row() -> dict:
        msgs = []
        for _ in range(rng.randint(1, 3)):
            msgs.append({"role": "user", "content": " ".join(rng.choices(words, k=rng.randint(5, 30)))})
            msgs.append({"role": "assistant", "content": " ".join(rng.choices(words, k=rng.randint(10, 60)))})
        return {"messages": msgs}

    for split, n in (("train", 64), ("valid", 8)):
        (ift / f"{split}.jsonl").write_text("".join(json.dumps(row()) + "\n" for _ in range(n)))
    return {"cpt": cpt, "ift": ift}


def case_config(model: Path, data: Path, mode: str, seq: int, batch: int) -> dict:
    return {"model": str(model), "data": str(data), "mode": mode, "fine_tune_type": "lora", "num_layers": -1,
            "lora_parameters": {"rank": 8, "scale": 20.0, "dropout": 0.0}, "batch_size": batch, "iters": 100,
            "max_seq_length": seq, "learning_rate": 1e-4, "seed": 0, "val_batches": 1}


def run_case(name: str, model: Path, data: Path, mode: str, seq: int, batch: int, work: Path) -> dict:
    manager = RunManager(Workspace.resolve(work / "ws"))
    cfg = manager.prepare_config(case_config(model, data, mode, seq, batch))
    est = preflight.estimate(cfg)
    log(f"{name}: estimate {est['peak_gb'] * 1000:.1f} MB (batch {batch} × {est['seq']}); probing…")
    t0 = time.time()
    probe = preflight.Probe(cfg, root=work / "probes").start()
    probe.wait(900)
    if probe.state != "done":
        raise SystemExit(f"{name}: probe {probe.state}: {probe.message}")
    r = probe.result
    err = (est["peak_gb"] - r["peak_gb"]) / r["peak_gb"]
    log(f"{name}: measured MLX peak {r['peak_gb'] * 1000:.1f} MB, RSS {r['rss_gb'] * 1000:.0f} MB, "
        f"{r['tokens_per_second'] or 0:,.0f} tok/s ({time.time() - t0:.0f} s); estimate error {err:+.1%}")
    return {"case": name, "mode": mode, "batch_size": batch, "max_seq_length": seq, "seq": est["seq"],
            "parameters": est["parameters"], "trainable": est["trainable"],
            "estimate_mb": round(est["peak_gb"] * 1000, 2), "estimate_parts_mb": {k: round(v * 1000, 2) for k, v in
                                                                                  est["parts_gb"].items()},
            "measured_peak_mb": round(r["peak_gb"] * 1000, 2), "measured_rss_mb": round(r["rss_gb"] * 1000, 1),
            "estimate_process_mb": round(est["process_gb"] * 1000, 1), "error": round(err, 4),
            "within_target": abs(err) <= TARGET, "estimated_tokens_per_second": round(est["tokens_per_second"]),
            "measured_tokens_per_second": round(r["tokens_per_second"] or 0)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny model only")
    p.add_argument("--compile", action="store_true", help="let MLX compile the step (default: MLX_DISABLE_COMPILE=1)")
    args = p.parse_args(argv)
    cases = [("tiny cpt 4×256", "tiny", "cpt", 256, 4), ("tiny ift 8×128", "tiny", "ift", 128, 8)]
    if not args.quick:
        cases += [("20m cpt 4×256", "20m", "cpt", 256, 4), ("20m ift 4×256", "20m", "ift", 256, 4)]
    results = []
    with tempfile.TemporaryDirectory(prefix="preflight-bench-") as tmp:
        data = make_data(Path(tmp) / "data")
        for i, (name, model, mode, seq, batch) in enumerate(cases):
            results.append(run_case(name, ensure_model(model), data[mode], mode, seq, batch, Path(tmp) / f"c{i}"))
    print()
    print(f"{'case':<16} {'estimate MB':>12} {'measured MB':>12} {'error':>8} {'RSS MB':>8} {'tok/s est':>10} "
          f"{'tok/s meas':>10}")
    for r in results:
        print(f"{r['case']:<16} {r['estimate_mb']:>12.1f} {r['measured_peak_mb']:>12.1f} {r['error']:>+8.1%} "
              f"{r['measured_rss_mb']:>8.0f} {r['estimated_tokens_per_second']:>10,} "
              f"{r['measured_tokens_per_second']:>10,}")
    ok = all(r["within_target"] for r in results)
    print(f"\nall estimates within ±{TARGET:.0%} of the measured peak: {'yes' if ok else 'NO'}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / ("preflight_memory" + ("-quick" if args.quick else "") + ("-compile" if args.compile else "")
                     + ".json")
    out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M:%S"), "target": TARGET, "all_within": ok,
                               "compile": args.compile, "cases": results}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
