"""Data preparation at scale (issue 14 items 2-4 and 6), in one invocation.

1. generates a multi-file text corpus (default 60 MB, 4,000 files) of sentences drawn from the words of the
   Python standard library's sources, in a few seconds;
2. **limit**: the SmolLM2 tokenizer's own ``encode_batch`` (all cores) over the same texts, in a child process;
3. **cold**: ForgeLLM's streaming preparation into an empty cache (``PreparedCache.prepare``), in a child process
   whose peak RSS (``VmHWM``) is compared with the token arrays it wrote plus the tokenizer's process (the RSS
   after loading the tokenizer, interpreter and MLX included);
4. **hit**: ``RunManager.launch`` of a CPT run on that corpus with the demo model (SmolLM2-135M-Instruct) on a
   warm cache, ``--hits`` times: time from the launch to the first training step (median and spread; when the
   step begins, after the validation of the initial weights, and when its report is written), and the
   validation pass (``val_batches: 1``) against one training step, from the run's own metrics.

Writes ``bench/results/data_prep.json``; prints every figure and the load of the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
RESULTS = REPO / "bench" / "results"
WORK = RESULTS / "data_prep-work"


def words() -> np.ndarray:
    """Distinct words of the standard library's sources (a vocabulary that tokenizes like real text and code)."""
    seen: set[str] = set()
    for f in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:200]:
        seen.update(re.findall(r"[A-Za-z]{2,}", f.read_text(errors="replace")))
    return np.array(sorted(seen))


def make_corpus(folder: Path, megabytes: int, files: int, seed: int = 0) -> dict:
    """``files`` text files of about ``megabytes`` MB in all, sentences of 6-20 Zipf-drawn words."""
    if (folder / "done.json").is_file():
        return json.loads((folder / "done.json").read_text())
    folder.mkdir(parents=True, exist_ok=True)
    vocab = words()
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, len(vocab) + 1)
    weights /= weights.sum()
    per_file = megabytes * 1_000_000 // files
    total = 0
    for i in range(files):
        n_words = per_file // 7
        picks = vocab[rng.choice(len(vocab), n_words, p=weights)]
        lens = rng.integers(6, 21, n_words // 6 + 1)
        ends = np.cumsum(lens)
        ends = ends[ends < n_words]
        picks[ends] = np.char.add(picks[ends], ".\n" if i % 3 == 0 else ".")
        text = " ".join(picks.tolist())
        sub = folder / f"part{i % 16:02d}"
        sub.mkdir(exist_ok=True)
        (sub / f"doc{i:05d}.txt").write_text(text)
        total += len(text.encode())
    info = {"files": files, "bytes": total}
    (folder / "done.json").write_text(json.dumps(info))
    return info


def child(code: str, *args: str) -> dict:
    """Run a phase in a fresh interpreter; its last stdout line is its JSON result (VmHWM included)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, cwd=REPO)
    if proc.returncode:
        raise SystemExit(f"phase failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


HWM = '''
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) * 1024
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) * 1024
'''

LIMIT = HWM + '''
import json, sys, time, os
from pathlib import Path
import services
from services.training.data import document_files
from mlx_lm.utils import load_tokenizer
tok = load_tokenizer(Path(sys.argv[1]))
texts = [f.read_text() for f in document_files(sys.argv[2])]
os.environ["TOKENIZERS_PARALLELISM"] = "true"
backend = tok._tokenizer.backend_tokenizer
t = time.perf_counter()
n = sum(len(e.ids) for e in backend.encode_batch(texts, add_special_tokens=False))
s = time.perf_counter() - t
t = time.perf_counter()
n_fast = sum(len(e.ids) for e in backend.encode_batch_fast(texts, add_special_tokens=False))
fast = time.perf_counter() - t
assert n_fast == n
print(json.dumps({"seconds": s, "fast_seconds": fast, "tokens": n, "bytes": sum(len(x.encode()) for x in texts)}))
'''

COLD = HWM + '''
import json, sys, time
from pathlib import Path
import services
from services.config import resolve
from services.training.prepared import PreparedCache
from mlx_lm.utils import load_tokenizer
tok = load_tokenizer(Path(sys.argv[1]))
base = rss()
cfg = resolve({"model": sys.argv[1], "data": sys.argv[2], "mode": "cpt", "max_seq_length": 128,
               "batch_size": 1, "iters": 1})
cache = PreparedCache(Path(sys.argv[3]))
t = time.perf_counter()
p = cache.prepare(cfg, tok)
s = time.perf_counter() - t
arrays = sum(f.stat().st_size for f in (cache.root / cache.last["key"]).iterdir() if f.suffix in
             (".tokens", ".index", ".mask"))
print(json.dumps({"seconds": s, "hit": cache.last["hit"], "tokens": p.stats["train"]["corpus_tokens"],
                  "arrays_bytes": arrays, "rss_after_tokenizer": base, "peak_rss": hwm()}))
'''


def load_avg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def first_step(ws_root: Path, model: Path, corpus: Path) -> dict:
    """Launch a run on a warm cache and time it to its first training step's report."""
    from services.training.folder import history
    from services.training.manager import RunManager
    from services.workspace import Workspace

    manager = RunManager(Workspace.resolve(ws_root))
    cfg = {"model": str(model), "data": str(corpus), "mode": "cpt", "max_seq_length": 128, "batch_size": 1,
           "iters": 5, "val_batches": 1, "steps_per_report": 1, "steps_per_eval": 1, "save_every": 1000,
           "fine_tune_type": "lora", "num_layers": 4, "learning_rate": 1e-4}
    t = time.time()
    folder = manager.launch(cfg)
    first = None
    while True:
        records, _ = folder.metrics()
        if first is None and any(r["type"] == "train" for r in records):
            first = time.time() - t
        if folder.info().get("status") not in ("running", "starting", "queued", None):
            break
        time.sleep(0.05)
    info = folder.info()
    hist = history(folder.metrics()[0])
    trains = [r for r in hist if r["type"] == "train"]
    vals = [r for r in hist if r["type"] == "val"]
    step = float(np.median([1 / r["iterations_per_second"] for r in trains[1:] or trains]))
    val = float(np.median([r["val_time"] for r in vals[1:] or vals]))
    return {"status": info["status"], "prepared": info.get("prepared"), "first_report": first,
            "time_to_first_step": info["loop_started"] - t, "worker_start": info["started"] - t,
            "setup_seconds": info.get("setup_seconds"), "val0_seconds": vals[0]["val_time"],
            "step_seconds": step, "val_seconds": val, "val_times": [r["val_time"] for r in vals],
            "log": folder.log_path.read_text()[-600:]}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--megabytes", type=int, default=60)
    p.add_argument("--files", type=int, default=4000)
    p.add_argument("--hits", type=int, default=3, help="runs on the warm cache (time to first step: median, spread)")
    args = p.parse_args()
    from services.library.gguf import ensure_demo_model

    RESULTS.mkdir(parents=True, exist_ok=True)
    model = ensure_demo_model(RESULTS / "cache" / "models-f32", dequantize=True)  # what `forgellm demo` imports
    t = time.perf_counter()
    corpus = RESULTS / "cache" / f"corpus-{args.megabytes}mb-{args.files}"
    made = make_corpus(corpus, args.megabytes, args.files)
    gen = time.perf_counter() - t
    print(f"corpus: {made['files']} files, {made['bytes'] / 1e6:.1f} MB ({gen:.1f} s); cores {os.cpu_count()}, "
          f"load {load_avg()}")
    ws = WORK / "ws"
    import shutil

    shutil.rmtree(WORK, ignore_errors=True)
    out: dict = {"corpus": made, "load_before": load_avg()}
    out["limit"] = lim = child(LIMIT, str(model), str(corpus))
    print(f"limit  encode_batch: {lim['tokens'] / lim['seconds']:,.0f} tok/s ({lim['tokens']:,} tokens in "
          f"{lim['seconds']:.1f} s); encode_batch_fast (no offsets, what ForgeLLM calls): "
          f"{lim['tokens'] / lim['fast_seconds']:,.0f} tok/s  load {load_avg()}")
    cache_dir = ws / ".forgellm" / "cache" / "prepared"
    out["cold"] = cold = child(COLD, str(model), str(corpus), str(cache_dir))
    ratio = lim["seconds"] / cold["seconds"]  # the same text: every document of both splits is tokenized
    budget = 2 * (cold["arrays_bytes"] + cold["rss_after_tokenizer"])
    print(f"cold   ForgeLLM:     {lim['tokens'] / cold['seconds']:,.0f} tok/s ({cold['seconds']:.1f} s: read, "
          f"split, tokenize, pack, write, checksum) = {ratio:.2f}x encode_batch (target >= 0.8), "
          f"{lim['fast_seconds'] / cold['seconds']:.2f}x encode_batch_fast  load {load_avg()}")
    print(f"memory peak RSS {cold['peak_rss'] / 1e6:.0f} MB; token arrays {cold['arrays_bytes'] / 1e6:.0f} MB, "
          f"process with tokenizer {cold['rss_after_tokenizer'] / 1e6:.0f} MB: {cold['peak_rss'] / budget * 2:.2f}x "
          f"their sum (target <= 2)")
    hits = []
    for i in range(args.hits):
        hits.append(hit := first_step(ws, model, corpus))
        print(f"hit {i + 1}  run {hit['status']}, prepared {hit['prepared']}: launch to the first step "
              f"{hit['time_to_first_step']:.1f} s: worker up {hit['worker_start']:.1f} s, model "
              f"{hit['setup_seconds']['model']:.1f} s, data {hit['setup_seconds']['data']:.2f} s, validation of "
              f"the initial weights {hit['val0_seconds']:.1f} s; first step reported at {hit['first_report']:.1f} s"
              f"  load {load_avg()}")
    out["hits"] = hits
    firsts = sorted(h["time_to_first_step"] for h in hits)
    reports = sorted(h["first_report"] for h in hits)
    out["time_to_first_step"] = {"median": statistics.median(firsts), "spread": [firsts[0], firsts[-1]],
                                 "first_report_median": statistics.median(reports)}
    print(f"hit    time from launch to the first step: median {statistics.median(firsts):.1f} s of {len(hits)} runs "
          f"(spread {firsts[0]:.1f}..{firsts[-1]:.1f} s; target <= 5); its report written at median "
          f"{statistics.median(reports):.1f} s")
    hit = hits[-1]
    print(f"val    val_batches 1: {hit['val_seconds']:.3f} s vs one step {hit['step_seconds']:.3f} s = "
          f"{hit['val_seconds'] / hit['step_seconds']:.2f}x (target <= 3); every val pass {hit['val_times']}")
    out.update(ratio=ratio, memory_ratio=cold["peak_rss"] / budget * 2, load_after=load_avg())
    (RESULTS / "data_prep.json").write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
