#!/usr/bin/env python
"""Eval throughput: suite cases per second on the base + 3 checkpoints of one run, ForgeLLM against mlx-lm's way,
in one invocation.

  (a) ``mlx-lm``    for each target, ``mlx_lm.load(base, adapter_path=...)`` fresh (the base alone for the base),
                    then ``mlx_lm.generate`` greedy for every case (what a script around mlx-lm does: its
                    ``evaluate`` takes no adapter, so each checkpoint is a fresh load)
  (b) ``forgellm``  ``ModelService.evaluate`` of the same suite on [base, c1, c2, c3]: one worker holding the base
                    (as the app's model worker does), adapters swapped; one base load (mlx_lm.load, timed in
                    this process) is added to its time

Same model (the ~20M llama of ``gen_throughput.py``), same cases, same ``max_tokens`` (EOS ends a case early on
both sides: greedy outputs are compared and must be equal).

Batched, as ``mlx_lm.evaluate`` generates (``batch_generate``, its default batch of 8):

  (c) ``mlx-lm-batched``    (a) with ``batch_generate`` of all cases per fresh load: the reference for (d)
  (d) ``forgellm-batched``  (b) with the suite's ``batch_size: 8``; its outputs must equal (c)'s exactly

A padded batch of 8 rows runs other BLAS kernels than one row (MKL's sgemm gives other low bits for 1-2 rows than
for 4 or more), so batched outputs can differ from one-at-a-time greedy on near ties; how many do is reported.
Sides alternate (a b c d a b c d ...) ``--repeats`` times; the figure per side is the median, the spread is
min..max. Target: forgellm / mlx-lm ≥ 2, where it is reached (batched, against one-at-a-time mlx-lm).

Usage::

    python bench/eval_throughput.py            # 20M model
    python bench/eval_throughput.py --quick    # tiny model: a smoke check of the bench itself

Writes ``bench/results/eval_throughput.json`` (``--quick``: ``eval_throughput-quick.json``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
import services  # noqa: F401 (loads MKL before anything imports MLX)

os.environ.setdefault("MLX_DISABLE_COMPILE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import gc
import json
import shutil
import statistics
import tempfile
import time

import mlx.core as mx
from gen_throughput import RESULTS, build_model
from mlx_lm import batch_generate, generate, load

from services.evaluation.suites import from_dict
from services.inference.service import ModelService
from services.training.manager import RunManager
from services.workspace import Workspace

PROMPTS = ["def parse_config(path):", "class Cache:", "import os\n", "for item in items:", "return self.",
           "with open(path) as f:", "if __name__ ==", "    def __init__(self"]


def make_run(model: Path, work: Path, quick: bool) -> list[str]:
    """A LoRA run on stdlib-like text with three checkpoints."""
    data = work / "data"
    data.mkdir(parents=True)
    rows = [{"text": p + " pass\n" * 8} for p in PROMPTS * 4]
    for split in ("train", "valid"):
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    manager = RunManager(Workspace.resolve(work / "ws"))
    folder = manager.launch({"model": str(model), "data": str(data), "fine_tune_type": "lora", "num_layers": -1,
                             "iters": 6, "save_every": 2, "steps_per_eval": 100, "batch_size": 2, "val_batches": 1,
                             "learning_rate": 1e-4, "max_seq_length": 64, "steps_per_report": 2, "seed": 0})
    info = manager.wait(folder.id, timeout=600)
    assert info["status"] == "completed", info.get("reason")
    return [str(folder.checkpoint_dir(i)) for i in folder.checkpoint_iterations()], folder.path


def run_mlx_lm(model: Path, run_dir: Path, ckpts: list[str], suite, max_tokens: int,
               batched: bool = False) -> tuple[float, list[str]]:
    outputs, t0 = [], time.perf_counter()
    for target in [None, *ckpts]:
        if target is None:
            m, tok = load(str(model))
        else:
            adapter = Path(tempfile.mkdtemp())
            shutil.copy(run_dir / "adapter_config.json", adapter)
            shutil.copy(Path(target) / "adapters.safetensors", adapter)
            m, tok = load(str(model), adapter_path=str(adapter))
        prompts = [tok.apply_chat_template([{"role": "user", "content": c.prompt}], add_generation_prompt=True)
                   for c in suite.cases]
        if batched:
            n = len(prompts)
            outputs += batch_generate(m, tok, prompts, max_tokens=[max_tokens] * n, prefill_batch_size=n,
                                      completion_batch_size=n).texts
        else:
            outputs += [generate(m, tok, p, max_tokens=max_tokens) for p in prompts]
        del m
        gc.collect()
        mx.clear_cache()
    return time.perf_counter() - t0, outputs


def base_load_seconds(model: Path) -> float:
    """One load of the base with the loader the worker uses (mlx_lm.load), added once to ForgeLLM's time."""
    t0 = time.perf_counter()
    m, _ = load(str(model))
    mx.eval(m.parameters())
    seconds = time.perf_counter() - t0
    del m
    gc.collect()
    mx.clear_cache()
    return seconds


def run_forgellm(svc: ModelService, model: Path, ckpts: list[str], suite) -> tuple[float, list[str]]:
    svc.load(model)  # the worker and its resident base, as in the app; the base load is added by the caller
    t0 = time.perf_counter()
    reply = svc.evaluate(model, [None, *ckpts], [suite.to_dict()])
    seconds = time.perf_counter() - t0
    return seconds, [c["output"] for r in reply["records"] for c in r["cases"]]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=16)
    args = ap.parse_args()
    model = build_model("quick" if args.quick else "20m")
    work = Path(tempfile.mkdtemp(prefix="eval-bench-"))
    ckpts, run_dir = make_run(model, work, args.quick)
    ckpts = ckpts[-3:]
    suites = {bs: from_dict({"name": "bench", "sampling": {"max_tokens": args.max_tokens, "temperature": 0},
                             "format": "chat", "batch_size": bs,
                             "cases": [{"prompt": p, "checks": [{"max_tokens": 1000}]} for p in PROMPTS]})
              for bs in (1, len(PROMPTS))}
    suite = suites[1]
    n_cases = len(suite.cases) * (1 + len(ckpts))
    svc = ModelService()
    times: dict[str, list[float]] = {"mlx-lm": [], "forgellm": [], "mlx-lm-batched": [], "forgellm-batched": []}
    same, same_batched, batched_differ = True, True, 0
    try:
        for _ in range(args.repeats):
            t, ref = run_mlx_lm(model, run_dir, ckpts, suite, args.max_tokens)
            times["mlx-lm"].append(t)
            t, ours = run_forgellm(svc, model, ckpts, suite)
            times["forgellm"].append(t + base_load_seconds(model))
            same = same and ref == ours
            t, ref_batched = run_mlx_lm(model, run_dir, ckpts, suite, args.max_tokens, batched=True)
            times["mlx-lm-batched"].append(t)
            t, batched = run_forgellm(svc, model, ckpts, suites[len(PROMPTS)])
            times["forgellm-batched"].append(t + base_load_seconds(model))
            same_batched = same_batched and ref_batched == batched
            batched_differ = max(batched_differ, sum(a != b for a, b in zip(ref, batched, strict=True)))
    finally:
        svc.unload()
        shutil.rmtree(work, ignore_errors=True)
    out = {"model": model.name, "targets": 1 + len(ckpts), "cases": n_cases, "max_tokens": args.max_tokens,
           "same_outputs": same, "same_batched_outputs": same_batched,
           "batched_outputs_differing_from_one_at_a_time": batched_differ}
    for side, ts in times.items():
        out[side] = {"cases_per_s": n_cases / statistics.median(ts),
                     "spread": [n_cases / max(ts), n_cases / min(ts)], "seconds": ts}
    out["ratio"] = out["forgellm"]["cases_per_s"] / out["mlx-lm"]["cases_per_s"]
    out["ratio_batched"] = out["forgellm-batched"]["cases_per_s"] / out["mlx-lm"]["cases_per_s"]
    out["ratio_batched_vs_batched"] = out["forgellm-batched"]["cases_per_s"] / out["mlx-lm-batched"]["cases_per_s"]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"eval_throughput{'-quick' if args.quick else ''}.json").write_text(json.dumps(out, indent=2))
    for side in times:
        lo, hi = out[side]["spread"]
        print(f"{side:>16}: {out[side]['cases_per_s']:7.2f} cases/s (spread {lo:.2f}..{hi:.2f}, {args.repeats} runs)")
    print(f"forgellm / mlx-lm, one case at a time: {out['ratio']:.2f}x (same greedy outputs: {same})")
    print(f"forgellm batched / mlx-lm one at a time: {out['ratio_batched']:.2f}x; forgellm batched / mlx-lm batched: "
          f"{out['ratio_batched_vs_batched']:.2f}x (same outputs as mlx-lm's batch_generate: {same_batched}; "
          f"{batched_differ}/{n_cases} differ from one-at-a-time greedy)")
    return 0 if same and same_batched and out["ratio_batched"] >= 2 else 1


if __name__ == "__main__":
    raise SystemExit(main())
