#!/usr/bin/env python
"""Padding-free IFT batches: loss-bearing tokens/s of mlx_lm.lora, ForgeLLM unpacked and ForgeLLM packed.

A chat set with lengths spread like real chat data (log-normal, 20–1,500 tokens with the bench model's tokenizer;
one user turn, one assistant turn, loss on the answer) trains for one epoch on each side, at equal loss-bearing
tokens per optimizer step:

  (a) ``mlx-lm``    ``mlx_lm.lora.main()`` (``mask_prompt: true``), MKL, driven as ``bench/train_throughput.py``
                    drives it (its ``--child-mlx-lm`` mode): batches of ``B`` length-sorted samples, padded
  (b) ``unpacked``  ``forgellm train`` with ``mode: ift``: the same batches of ``B`` samples
  (c) ``packed``    ``forgellm train`` with ``mode: ift, pack_samples: true``: batches of ``R`` rows of
                    ``max_seq_length`` tokens, several samples per row, none attending to another

``B`` = samples / packed steps (the set is cut to a multiple of ``B``), so a step trains about the same number of
loss-bearing tokens on every side (the table prints the measured figure). One epoch each, so every side trains on
every sample once (the packed side drops at most ``R - 1`` rows). mlx-lm's batches are not sorted by length for
chat data (``CacheDataset.itemlen`` is the length of the raw row, a constant 1), ForgeLLM's are. A run's figure is
its loss-bearing tokens over its training-step time, after the first (warm-up) step; the sides run ``--repeats``
times in rotating order and the spread of the repeats is printed. Children run with ``MLX_DISABLE_COMPILE=1`` as in
``bench/train_throughput.py``.

Usage::

    python bench/ift_packing.py              # a 0.5M llama, 80 chats, 2 repeats: a few minutes
    python bench/ift_packing.py --quick      # tiny model and data: a smoke check of the bench

Writes ``bench/results/ift_packing.json`` (``--quick``: ``ift_packing-quick.json``).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import train_throughput as tt  # the project's way to drive mlx_lm.lora and forgellm train, and watch them

# this checkout's CLI: the venv's `forgellm` script imports whichever checkout the venv was installed from
tt.forgellm_cmd = lambda: [sys.executable, "-m", "app.cli"]

ROOT, RESULTS = tt.ROOT, tt.RESULTS
MODEL = dict(hidden=128, layers=2, intermediate=352, heads=4, kv_heads=2, vocab=1024, max_position_embeddings=2048)
MODEL_QUICK = dict(hidden=64, layers=2, intermediate=128, heads=4, kv_heads=2, vocab=512, max_position_embeddings=2048)
SEQ, ROWS_PER_STEP, RANK, LR = 1536, 2, 8, 1e-4
LENGTHS = (20, 1500, math.log(220), 0.9)  # min, max, log-normal mu and sigma of a chat's token count
SIDES = {"mlx-lm": "mlx_lm.lora (MKL)", "unpacked": "ForgeLLM, unpacked", "packed": "ForgeLLM, pack_samples"}
WORDS = ("the", "cat", "dog", "river", "garden", "finds", "carries", "a", "small", "bright", "old", "map", "letter",
         "kitchen", "quickly", "and", "then", "because", "every", "morning", "market", "blue", "green", "stone")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def make_chats(model: Path, n: int, seed: int = 0) -> tuple[list[dict], list[int]]:
    """``n`` one-turn chats whose chat-template lengths follow :data:`LENGTHS` (and those lengths)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model / "tokenizer.json"))
    rng = random.Random(seed)
    lo, hi, mu, sigma = LENGTHS

    def words(k: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(k)) + "."

    rows, lengths = [], []
    per_word = len(tok.encode(words(400)).ids) / 400
    for _ in range(n):
        target = int(min(max(rng.lognormvariate(mu, sigma), lo), hi * 0.96))  # the template adds a few tokens
        prompt_words = max(2, int(target * rng.uniform(0.15, 0.5) / per_word))
        answer_words = max(2, int(target / per_word) - prompt_words - 6)
        row = {"messages": [{"role": "user", "content": words(prompt_words)},
                            {"role": "assistant", "content": words(answer_words)}]}
        text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in row["messages"])
        rows.append(row)
        lengths.append(len(tok.encode(text).ids))
    return rows, lengths


def plan_batches(model: Path, data: Path, rows_per_step: int) -> dict:
    """Samples per packed row and the unpacked batch size that trains as many loss-bearing tokens per step."""
    from mlx_lm.utils import load_tokenizer

    from services.config import resolve
    from services.training.batching import padded_width
    from services.training.data import prepare
    from services.training.packing import pack_rows, packing_stats

    tokenizer = load_tokenizer(model)
    cfg = resolve({"model": str(model), "data": str(data), "mode": "ift", "max_seq_length": SEQ, "batch_size": 1})
    samples = prepare(cfg, tokenizer).train
    rows = pack_rows([len(s.tokens) for s in samples], SEQ)
    stats = packing_stats(samples, rows, SEQ)
    batch = max(1, round(len(samples) / (len(rows) // rows_per_step)))  # as many samples per step as packed steps
    in_order = [min(len(s.tokens), SEQ) for s in samples]  # mlx-lm's batches: consecutive rows of the file
    groups = [in_order[i : i + batch] for i in range(0, len(in_order) - batch + 1, batch)]
    cells = sum(len(g) * padded_width(g, SEQ) for g in groups)
    mlx_lm_padding = round(1 - sum(map(sum, groups)) / cells, 4) if cells else None
    lengths = sorted(len(s.tokens) for s in samples)
    return {"samples": len(samples), "rows": len(rows), "batch_size": batch, "rows_per_step": rows_per_step,
            "packed_padding_share": stats["padding_share"], "mlx_lm_padding_share": mlx_lm_padding,
            "samples_per_row": stats["samples_per_row"],
            "trained_tokens": sum(s.trained for s in samples),
            "lengths": {"min": lengths[0], "median": lengths[len(lengths) // 2],
                        "p90": lengths[int(len(lengths) * 0.9)], "max": lengths[-1],
                        "mean": round(sum(lengths) / len(lengths), 1)}}


def base_config(model: Path, data: Path, batch: int, iters: int) -> dict:
    return {"model": str(model), "train": True, "data": str(data), "fine_tune_type": "lora", "optimizer": "adam",
            "seed": 0, "num_layers": -1, "batch_size": batch, "iters": iters, "val_batches": 1, "learning_rate": LR,
            "steps_per_report": 1, "steps_per_eval": iters + 1000, "save_every": iters + 1000,
            "max_seq_length": SEQ, "grad_checkpoint": False,
            "lora_parameters": {"rank": RANK, "dropout": 0.0, "scale": 20.0}}


def side_config(side: str, model: Path, data: Path, plan: dict) -> dict:
    if side == "packed":
        rows = plan["rows_per_step"]
        return {**base_config(model, data, rows, plan["rows"] // rows), "mode": "ift", "pack_samples": True}
    cfg = base_config(model, data, plan["batch_size"], plan["samples"] // plan["batch_size"])
    return {**cfg, "mask_prompt": True} if side == "mlx-lm" else {**cfg, "mode": "ift"}


def rate(res: dict) -> dict:
    """Loss-bearing tokens over step time, the first step left out; tokens per step; padding share."""
    tps, toks = res["windows"], res["tokens_per_window"]
    pairs = [(n, n / t) for n, t in zip(toks, tps, strict=False) if t][1:]
    tokens, seconds = sum(n for n, _ in pairs), sum(s for _, s in pairs)
    return {"trained_tokens_per_second": round(tokens / seconds, 1) if seconds else None,
            "trained_tokens_per_step": round(statistics.mean(toks), 1) if toks else None,
            "step_seconds": round(seconds, 2)}


def run(side: str, cfg: dict, work: Path, tag: str) -> dict:
    timeout = 300.0 + cfg["iters"] * 30.0
    if side == "mlx-lm":
        res = tt.run_mlx_lm(side, "mkl", cfg, work, tag, timeout)
    else:
        res = tt.run_forgellm(cfg, work, tag, timeout)
    res.update(rate(res) if res.get("ok") else {}, side=side)
    if res.get("ok") and side != "mlx-lm":
        metrics = ROOT / res["run_folder"] / "metrics.jsonl"
        shares = [json.loads(x).get("padding_share") for x in metrics.read_text().splitlines()]
        shares = [s for s in shares if s is not None]
        res["padding_share"] = round(statistics.mean(shares), 4) if shares else None
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny model and data: a smoke check, not a measurement")
    p.add_argument("--repeats", type=int, default=2, help="runs of each side, in rotating order (default 2)")
    p.add_argument("--chats", type=int, default=None, help="chats in the set (default 80; --quick: 24)")
    p.add_argument("--settle", type=float, default=20.0, help="wait up to this long for a quiet CPU before a run")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    spec, name = (MODEL_QUICK, "ift-llama-quick") if args.quick else (MODEL, "ift-llama-small")
    model = tt.ensure_model(spec, name)
    params = tt.safetensors_params(model / "model.safetensors")
    n = args.chats or (24 if args.quick else 80)
    data = tt.CACHE / f"ift-chats-{name}-{n}"
    if not (data / "train.jsonl").exists():
        rows, _ = make_chats(model, n)
        data.mkdir(parents=True, exist_ok=True)
        (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    plan = plan_batches(model, data, ROWS_PER_STEP)
    kept = plan["samples"] // plan["batch_size"] * plan["batch_size"]
    if kept < plan["samples"]:  # every unpacked batch full, so an epoch drops no sample (ForgeLLM would drop the
        lines = (data / "train.jsonl").read_text().splitlines(keepends=True)  # longest, mlx-lm the last ones)
        (data / "train.jsonl").write_text("".join(lines[:kept]))
        plan = plan_batches(model, data, ROWS_PER_STEP)
    log(f"model {model.name} ({params / 1e6:.2f}M parameters); {plan['samples']} chats, lengths {plan['lengths']}; "
        f"{plan['rows']} packed rows of {SEQ} ({plan['samples_per_row']} samples/row, padding "
        f"{plan['packed_padding_share']:.1%}); unpacked batch {plan['batch_size']} ≈ packed batch "
        f"{plan['rows_per_step']} rows")
    work = RESULTS / ("ift_packing-work-quick" if args.quick else "ift_packing-work")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    order = list(SIDES)
    runs = []
    for rep in range(args.repeats):
        for side in order[rep % 3:] + order[: rep % 3]:  # a side goes first, middle and last in turn
            quiet = tt.wait_quiet(args.settle) if args.settle > 0 else None
            res = run(side, side_config(side, model, data, plan), work, f"{side}-{rep + 1}")
            res.update(repeat=rep + 1, settle=quiet)
            runs.append(res)
            log(f"{side}#{rep + 1}: " + (f"{res['trained_tokens_per_second']} trained tok/s, "
                                          f"{res['trained_tokens_per_step']} trained tokens/step, wall "
                                          f"{res['wall_s']} s, other CPU {res['foreign_cpu_share']:.0%}"
                                          if res.get("ok") else f"FAILED, see {res['log']}"))
    summary = {}
    for side in SIDES:
        figs = [r["trained_tokens_per_second"] for r in runs if r["side"] == side and r.get("ok")]
        steps = [r["trained_tokens_per_step"] for r in runs if r["side"] == side and r.get("ok")]
        pad = [r.get("padding_share") for r in runs if r["side"] == side and r.get("padding_share") is not None]
        summary[side] = {"label": SIDES[side], "runs": figs, "best": max(figs, default=None),
                         "median": statistics.median(figs) if figs else None,
                         "spread": round((max(figs) - min(figs)) / max(figs), 3) if figs else None,
                         "trained_tokens_per_step": steps[0] if steps else None,
                         "padding_share": pad[0] if pad else plan["mlx_lm_padding_share"] if side == "mlx-lm"
                         else None}
    base = summary["mlx-lm"]["median"]
    print()
    print(f"IFT packing: {params / 1e6:.2f}M llama, {plan['samples']} chats of {plan['lengths']['min']}–"
          f"{plan['lengths']['max']} tokens (median {plan['lengths']['median']}), max_seq_length {SEQ}, LoRA r{RANK} "
          "all layers, one epoch per run")
    hdr = f"{'side':<26} {'trained tok/s (runs)':>30} {'median':>8} {'spread':>7} {'tok/step':>9} {'padding':>8} " \
          f"{'× mlx-lm':>9}"
    print(hdr)
    print("-" * len(hdr))
    for s in summary.values():
        if s["median"] is None:
            print(f"{s['label']:<26} FAILED")
            continue
        ratio = f"{s['median'] / base:.2f}" if base else "-"
        pad = f"{s['padding_share']:.1%}" if s["padding_share"] is not None else "-"
        print(f"{s['label']:<26} {' / '.join(f'{x:.0f}' for x in s['runs']):>30} {s['median']:>8.0f} "
              f"{s['spread']:>7.1%} {s['trained_tokens_per_step']:>9.0f} {pad:>8} {ratio:>9}")
    packed, unpacked = summary["packed"]["median"], summary["unpacked"]["median"]
    if packed and unpacked:
        print(f"\npacked / unpacked (medians): {packed / unpacked:.2f}×")
    out = RESULTS / ("ift_packing-quick.json" if args.quick else "ift_packing.json")
    out.write_text(json.dumps({"host": tt.host_info(), "model": {"spec": spec, "params": params}, "plan": plan,
                               "seq": SEQ, "runs": runs, "summary": summary,
                               "wall_time_s": round(time.perf_counter() - t0, 1)}, indent=1, default=str))
    print(f"\nwall time {time.perf_counter() - t0:.0f} s; results: {out.relative_to(ROOT)}")
    return 0 if all(s["median"] for s in summary.values()) else 2


if __name__ == "__main__":
    sys.exit(main())
