#!/usr/bin/env python
"""Training throughput: ForgeLLM against stock mlx-lm, on one config, in one invocation.

The same config (a ~20M-parameter llama with a stdlib-trained 8k BPE tokenizer, max_seq_length 512,
batch 4, LoRA rank 8 on every layer, Adam, fixed learning rate, no validation split) runs through:

  (a) ``stock``      ``mlx_lm.lora -c cfg.yaml`` exactly as installed: MLX's bundled reference BLAS
  (b) ``mlx-lm-mkl`` the same CLI, with Intel MKL preloaded as ForgeLLM does (``services.blas.preload``)
  (c) ``forgellm``   ``forgellm --workspace TMP train cfg.yaml`` (worker process, MKL)

(a) and (b) run ``mlx_lm.lora.main()`` with ``sys.argv = ["mlx_lm.lora", "-c", cfg]``, which is what the
``mlx_lm.lora`` console script does; the only change is that its reporting callback (a no-op without
``report_to``) is replaced by one that writes mlx-lm's own ``on_train_loss_report`` payloads as JSON lines.
(c) reads the run's ``metrics.jsonl``. Nothing parses console output.

Steady-state tokens/s of a run = median of its report windows after the first (warm-up) one
(``steps_per_report: 1``, so one window is one step). (b) and (c) run ``--repeats`` times in ABBA
order (b c c b ...), so a drift in machine load does not favour one side; each side's figure is the
best of its runs' medians (noise on a shared box only ever slows a run down). Peak RSS is the largest
``VmHWM``/RSS of any process in the child's tree, polled every 0.2 s. All children get
``MLX_DISABLE_COMPILE=1`` and ``HF_HUB_OFFLINE=1``.

Usage::

    python bench/train_throughput.py                 # full bench (several minutes; the stock run is ~1 min/step)
    python bench/train_throughput.py --quick         # tiny model, a smoke check of the bench itself
    python bench/train_throughput.py --skip-stock --iters 30

Writes ``bench/results/train_throughput.json`` (``--quick``: ``train_throughput-quick.json``); the 20M
model and the dataset are built once into ``bench/results/cache/``.
"""

from __future__ import annotations

import sys

# ----------------------------------------------------------------------------------------------------------
# Child mode: run mlx_lm.lora's CLI with a JSON-lines training callback. Must run before anything imports MLX.
# ``python bench/train_throughput.py --child-mlx-lm {reference|mkl} EVENTS.jsonl CONFIG.yaml``
# ----------------------------------------------------------------------------------------------------------

if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "--child-mlx-lm":
    import json
    import os
    import resource
    import time
    from pathlib import Path

    _blas, _events, _cfg = sys.argv[2:5]
    if _blas == "mkl":
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        from services import blas as _blas_mod

        if _blas_mod.preload() != "mkl":
            sys.exit("child: could not preload MKL (pip install mkl into the venv)")
    elif _blas != "reference":
        sys.exit(f"child: unknown BLAS {_blas!r}")

    import mlx_lm.lora as _lora
    from mlx_lm.tuner.callbacks import TrainingCallback

    _out = open(_events, "a", buffering=1)  # noqa: SIM115

    def _emit(kind: str, info: dict) -> None:
        _out.write(json.dumps({"type": kind, **info, "time": round(time.time(), 3)}) + "\n")

    def _mapped_blas() -> list[str]:
        try:
            with open("/proc/self/maps") as f:
                names = {Path(line.split()[-1]).name for line in f if ".so" in line}
        except OSError:
            return []
        return sorted(n for n in names if any(k in n for k in ("blas", "mkl", "iomp")))

    class _Recorder(TrainingCallback):
        def on_train_loss_report(self, info):
            _emit("train", info)

        def on_val_loss_report(self, info):
            _emit("val", info)

    _lora.get_reporting_callbacks = lambda *a, **k: _Recorder()  # run() ignores its own callback argument
    _emit("start", {"pid": os.getpid(), "requested_blas": _blas})
    sys.argv = ["mlx_lm.lora", "-c", _cfg]
    _lora.main()
    _libs = _mapped_blas()
    _emit("end", {"maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "blas_libs": _libs,
                  "blas": "mkl" if any("libmkl_rt" in n for n in _libs) else "reference"})
    _out.close()
    sys.exit(0)

# ----------------------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------------------

import argparse
import datetime as dt
import importlib.metadata as md
import json
import os
import platform
import shutil
import statistics
import struct
import subprocess
import time
from pathlib import Path

import psutil
import yaml

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
CACHE = RESULTS / "cache"

MODEL_20M = dict(texts="stdlib", hidden=512, layers=6, intermediate=1408, heads=8, kv_heads=4, vocab=8192)
MODEL_QUICK = dict(texts="stdlib", hidden=64, layers=2, intermediate=128, heads=4, kv_heads=2, vocab=1024)
SEQ, BATCH, RANK, LR = 512, 4, 8, 1e-4
TARGET_SAME_BLAS, TARGET_VS_STOCK = 1.00, 5.0
CHILD_ENV = {"MLX_DISABLE_COMPILE": "1", "HF_HUB_OFFLINE": "1"}
POLL_S = 0.2

SIDES = {
    "stock": "mlx_lm.lora, reference BLAS (stock)",
    "mlx-lm-mkl": "mlx_lm.lora, MKL (same BLAS as ForgeLLM)",
    "forgellm": "ForgeLLM (forgellm train), MKL",
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- model and data ----------------------------------------------------------------------------------------


def safetensors_params(path: Path) -> int:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    total = 0
    for k, v in header.items():
        if k != "__metadata__":
            size = 1
            for d in v["shape"]:
                size *= d
            total += size
    return total


def ensure_model(spec: dict, name: str) -> Path:
    """Build the model once (in a subprocess, so this process never loads MLX); reuse it while the spec matches."""
    out = CACHE / name
    stamp = out / "bench_spec.json"
    if stamp.exists() and json.loads(stamp.read_text()) == spec and (out / "model.safetensors").exists():
        return out
    shutil.rmtree(out, ignore_errors=True)
    log(f"building model {name} {spec} into {out}")
    code = ("import json, sys; from services.library.tiny_model import build_tiny_model; "
            "build_tiny_model(sys.argv[1], **json.loads(sys.argv[2]))")
    subprocess.run([sys.executable, "-c", code, str(out), json.dumps(spec)], cwd=ROOT, check=True,
                   env={**os.environ, **CHILD_ENV})
    stamp.write_text(json.dumps(spec))
    return out


def stdlib_text() -> str:
    import sysconfig

    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    return "\n".join(f.read_text(encoding="utf-8", errors="replace") for f in files)


def ensure_data(model: Path, rows: int, min_tokens: int) -> Path:
    """``train.jsonl`` of ``rows`` text rows of Python stdlib source, each at least ``min_tokens`` tokens long.

    No valid split: mlx-lm trains without validation when ``valid.jsonl`` is absent, and so does ForgeLLM
    for a plain mlx-lm config, so no validation cost enters either side.
    """
    from tokenizers import Tokenizer

    out = CACHE / f"data-{model.name}-{rows}x{min_tokens}"
    if (out / "train.jsonl").exists():
        return out
    tok = Tokenizer.from_file(str(model / "tokenizer.json"))
    text = stdlib_text()
    made, pos, chunk = [], 0, 2000
    while len(made) < rows:
        if pos >= len(text):
            raise RuntimeError("the stdlib corpus is too short for the requested dataset")
        end = pos + chunk
        while end < len(text) and len(tok.encode(text[pos:end]).ids) < min_tokens + 8:
            end += 500
        made.append(text[pos:end])
        pos = end
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "train.jsonl.tmp"
    with open(tmp, "w") as f:
        for row in made:
            f.write(json.dumps({"text": row}) + "\n")
    tmp.rename(out / "train.jsonl")
    return out


def make_config(model: Path, data: Path, iters: int, adapter_path: Path) -> dict:
    return {
        "model": str(model),
        "train": True,
        "data": str(data),
        "fine_tune_type": "lora",
        "optimizer": "adam",
        "seed": 0,
        "num_layers": -1,
        "batch_size": BATCH,
        "iters": iters,
        "val_batches": 1,
        "learning_rate": LR,
        "steps_per_report": 1,
        "steps_per_eval": iters + 1000,
        "save_every": iters + 1000,
        "adapter_path": str(adapter_path),
        "max_seq_length": SEQ,
        "grad_checkpoint": False,
        "lora_parameters": {"rank": RANK, "dropout": 0.0, "scale": 20.0},
    }


# -- running a child and watching its process tree ---------------------------------------------------------


def _vm_hwm_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _has_mkl(pid: int) -> bool | None:
    try:
        with open(f"/proc/{pid}/maps") as f:
            return any("libmkl_rt" in line for line in f)
    except OSError:
        return None


def _busy_cpu_s() -> float:
    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0)


def wait_quiet(max_wait: float, threshold: float = 0.15, sample: float = 3.0) -> dict:
    """Wait (up to ``max_wait`` s) until other processes use less than ``threshold`` of the machine's CPU."""
    ncpu = psutil.cpu_count() or 1
    t0 = time.perf_counter()
    while True:
        b0 = _busy_cpu_s()
        time.sleep(sample)
        share = (_busy_cpu_s() - b0) / (sample * ncpu)
        waited = time.perf_counter() - t0
        if share < threshold or waited >= max_wait:
            return {"waited_s": round(waited, 1), "cpu_share_at_start": round(share, 3)}


def run_child(cmd: list[str], env: dict, log_path: Path, timeout: float) -> dict:
    """Run ``cmd``; return rc, wall time, peak RSS (largest process and whole tree) and CPU contention."""
    load_before = os.getloadavg()
    busy0 = _busy_cpu_s()
    t0 = time.perf_counter()
    with open(log_path, "w") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                cwd=ROOT)
    root = psutil.Process(proc.pid)
    peak: dict[int, float] = {}
    names: dict[int, str] = {}
    cpu: dict[int, float] = {}
    mkl: dict[int, bool] = {}
    peak_tree, last_maps = 0.0, 0.0
    rc = None
    while rc is None:
        try:
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            procs = []
        tree = 0.0
        check_maps = time.perf_counter() - last_maps > 2.0
        for p in procs:
            try:
                with p.oneshot():
                    rss = p.memory_info().rss / 2**20
                    ct = p.cpu_times()
                    cpu[p.pid] = ct.user + ct.system
                    names.setdefault(p.pid, " ".join(p.cmdline()[1:4])[:80])
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            tree += rss
            peak[p.pid] = max(peak.get(p.pid, 0.0), rss, _vm_hwm_mb(p.pid))
            if check_maps and not mkl.get(p.pid):
                m = _has_mkl(p.pid)
                if m is not None:
                    mkl[p.pid] = m
        if check_maps:
            last_maps = time.perf_counter()
        peak_tree = max(peak_tree, tree)
        if time.perf_counter() - t0 > timeout:
            for p in procs[::-1]:
                try:
                    p.kill()
                except psutil.NoSuchProcess:
                    pass
            proc.wait()
            rc = "timeout"
            break
        try:
            rc = proc.wait(timeout=POLL_S)
        except subprocess.TimeoutExpired:
            rc = None
    wall = time.perf_counter() - t0
    busy = _busy_cpu_s() - busy0
    ours = sum(cpu.values())
    ncpu = psutil.cpu_count() or 1
    main_pid = max(peak, key=peak.get) if peak else None
    return {
        "rc": rc, "wall_s": round(wall, 1), "log": str(log_path.relative_to(ROOT)),
        "peak_rss_mb": round(peak[main_pid], 1) if main_pid else None,
        "peak_rss_tree_mb": round(peak_tree, 1),
        "trainer_process": names.get(main_pid),
        "mkl_mapped_in_trainer": mkl.get(main_pid) if main_pid else None,
        "processes": {str(pid): {"cmd": names.get(pid), "peak_rss_mb": round(v, 1)} for pid, v in peak.items()},
        "loadavg_before": [round(x, 2) for x in load_before],
        # CPU time spent by processes outside this run's tree, as a share of the machine: >0.05 means
        # something else competed for the cores during the run.
        "foreign_cpu_share": round(max(busy - ours, 0.0) / (wall * ncpu), 3) if wall else None,
    }


def steady(records: list[dict]) -> dict:
    """Throughput summary from train reports: the first window is warm-up, the median of the rest counts."""
    tps = [r["tokens_per_second"] for r in records if r.get("tokens_per_second")]
    windows = tps[1:] if len(tps) > 1 else tps
    its = [r["iteration"] for r in records]
    toks = [r["trained_tokens"] for r in records if "trained_tokens" in r]
    return {
        "windows": [round(x, 2) for x in tps],
        "iterations": its,
        "tokens_per_window": [b - a for a, b in zip([0, *toks[:-1]], toks, strict=True)],
        "steady_tokens_per_second": round(statistics.median(windows), 2) if windows else None,
        "steady_min": round(min(windows), 2) if windows else None,
        "steady_max": round(max(windows), 2) if windows else None,
        "warmup_skipped": len(tps) > 1,
        "losses": [r["train_loss"] for r in records],  # exact: the bitwise check compares them
    }


def run_mlx_lm(side: str, blas: str, cfg: dict, work: Path, tag: str, timeout: float) -> dict:
    d = work / tag
    d.mkdir(parents=True)
    cfg = {**cfg, "adapter_path": str(d / "adapters")}
    cfg_path = d / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    events = d / "events.jsonl"
    env = {**os.environ, **CHILD_ENV}
    env.pop("LD_PRELOAD", None)
    if blas == "mkl":
        env.pop("FORGELLM_BLAS", None)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child-mlx-lm", blas, str(events), str(cfg_path)]
    res = run_child(cmd, env, d / "console.log", timeout)
    recs = [json.loads(x) for x in events.read_text().splitlines()] if events.exists() else []
    end = next((r for r in recs if r["type"] == "end"), {})
    res.update(steady([r for r in recs if r["type"] == "train"]))
    res["blas"] = end.get("blas")
    res["blas_libs"] = end.get("blas_libs")
    res["maxrss_self_mb"] = round(end["maxrss_mb"], 1) if "maxrss_mb" in end else None
    res["ok"] = res["rc"] == 0 and bool(end) and res["steady_tokens_per_second"] is not None
    return res


def forgellm_cmd() -> list[str]:
    exe = Path(sys.executable).parent / "forgellm"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "app.cli"]


def run_forgellm(cfg: dict, work: Path, tag: str, timeout: float) -> dict:
    d = work / tag
    ws = d / "workspace"
    ws.mkdir(parents=True)
    cfg = {**cfg, "adapter_path": str(d / "adapters"), "name": "bench"}
    cfg_path = d / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    env = {**os.environ, **CHILD_ENV}
    env.pop("LD_PRELOAD", None)
    env.pop("FORGELLM_BLAS", None)
    res = run_child([*forgellm_cmd(), "--workspace", str(ws), "train", str(cfg_path)], env, d / "console.log", timeout)
    runs = sorted((ws / "runs").glob("*/run.json"))
    info = json.loads(runs[-1].read_text()) if runs else {}
    metrics = runs[-1].parent / "metrics.jsonl" if runs else None
    recs = [json.loads(x) for x in metrics.read_text().splitlines()] if metrics and metrics.exists() else []
    res.update(steady([r for r in recs if r.get("type") == "train"]))
    res["blas"] = info.get("blas")
    res["status"] = info.get("status")
    res["reason"] = info.get("reason")
    res["run_folder"] = str(runs[-1].parent.relative_to(ROOT)) if runs else None
    rss = [r["rss_gb"] for r in recs if r.get("rss_gb")]
    res["worker_reported_rss_mb"] = round(max(rss) * 1024, 1) if rss else None
    res["ok"] = res["rc"] == 0 and info.get("status") == "completed" and res["steady_tokens_per_second"] is not None
    return res


# -- report ------------------------------------------------------------------------------------------------


def summarize(runs: list[dict], side: str) -> dict | None:
    mine = [r for r in runs if r["side"] == side and r.get("ok")]
    if not mine:
        return None
    meds = [r["steady_tokens_per_second"] for r in mine]
    pooled = [w for r in mine for w in (r["windows"][1:] if r["warmup_skipped"] else r["windows"])]
    return {
        "label": SIDES[side],
        "tokens_per_second": max(meds),  # best of the runs' steady-state medians
        "run_medians": meds,
        "pooled_median": round(statistics.median(pooled), 2),
        "peak_rss_mb": max(r["peak_rss_mb"] for r in mine),
        "s_per_step": round(BATCH * (SEQ - 1) / max(meds), 2),
        "blas": sorted({str(r.get("blas")) for r in mine}),
        "runs": len(mine),
    }


def judged(value: float | None, target: float, quick: bool) -> dict:
    """A ratio against its target: PASS, FAIL or SKIPPED (no value)."""
    if value is None:
        return {"value": None, "target": target, "pass": None, "verdict": "SKIPPED"}
    ok = value >= target
    word = ("PASS" if ok else "FAIL") + (" (quick: informational)" if quick else "")
    return {"value": round(value, 3), "target": target, "pass": ok, "verdict": word}


def verdict(num: dict | None, den: dict | None, target: float, quick: bool) -> dict:
    return judged(num["tokens_per_second"] / den["tokens_per_second"] if num and den else None, target, quick)


def pair_verdict(runs: list[dict], target: float, quick: bool) -> dict:
    """ForgeLLM / mlx-lm per ABBA pair (the two runs of one repeat, back to back); the verdict is the median of
    the pairs' ratios, with their spread: a drift of the machine's load hits both runs of a pair alike."""
    by = {(r["side"], r["repeat"]): r["steady_tokens_per_second"] for r in runs if r.get("ok")}
    pairs = [by[("forgellm", k)] / by[("mlx-lm-mkl", k)] for (side, k) in sorted(by)
             if side == "forgellm" and ("mlx-lm-mkl", k) in by]
    out = judged(statistics.median(pairs) if pairs else None, target, quick)
    out["pairs"] = [round(x, 3) for x in pairs]
    if pairs:
        out["spread"] = [round(min(pairs), 3), round(max(pairs), 3)]
    return out


def host_info() -> dict:
    def ver(name: str) -> str | None:
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return None

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return {"platform": platform.platform(), "cpu": cpu, "cpus": psutil.cpu_count(),
            "ram_gb": round(psutil.virtual_memory().total / 1e9, 1), "python": platform.python_version(),
            "mlx": ver("mlx"), "mlx_lm": ver("mlx-lm"), "mkl": ver("mkl"), "forgellm": ver("forgellm")}


def print_report(result: dict) -> None:
    print()
    print(f"Training throughput — {result['model']['params'] / 1e6:.1f}M-parameter llama, seq {SEQ}, batch {BATCH}, "
          f"LoRA r{RANK} on all layers, Adam, lr {LR:g}, no validation")
    print(f"children ran with {' '.join(f'{k}={v}' for k, v in CHILD_ENV.items())} (compile off on every side)")
    print()
    hdr = (f"{'run':<44} {'iters':>5} {'tok/s':>9} {'windows (min..max)':>20} {'peak RSS MB':>12} {'wall s':>7} "
           f"{'other CPU':>9}")
    print(hdr)
    print("-" * len(hdr))
    for r in result["runs"]:
        name = f"{r['side']}#{r['repeat']} [{r.get('blas')}]"
        if not r.get("ok"):
            print(f"{name:<44} {r['iters']:>5}  FAILED (rc {r['rc']}; see {r['log']})")
            continue
        span = f"{r['steady_min']:.0f}..{r['steady_max']:.0f}"
        print(f"{name:<44} {r['iters']:>5} {r['steady_tokens_per_second']:>9.1f} {span:>20} "
              f"{r['peak_rss_mb']:>12.0f} {r['wall_s']:>7.0f} {r['foreign_cpu_share']:>9.0%}")
    print()
    hdr = f"{'summary (best of runs)':<44} {'tok/s':>9} {'s/step':>7} {'peak RSS MB':>12}"
    print(hdr)
    print("-" * len(hdr))
    for side, s in result["summary"].items():
        if s:
            print(f"{s['label']:<44} {s['tokens_per_second']:>9.1f} {s['s_per_step']:>7.2f} {s['peak_rss_mb']:>12.0f}")
        else:
            print(f"{SIDES[side]:<44} {'skipped' if side == 'stock' and result['skip_stock'] else 'no data':>9}")
    print()
    for key, text in (("forgellm_vs_mlx_lm_same_blas", "ForgeLLM / mlx-lm, same BLAS, median of pairs"),
                      ("forgellm_vs_mlx_lm_best_of", "  (best of each side, informational)"),
                      ("forgellm_vs_stock_reference", "ForgeLLM / stock mlx-lm, reference BLAS")):
        v = result["ratios"][key]
        val = f"{v['value']:.3f}" if v["value"] is not None else "-"
        extra = (f"   pairs {v['pairs']} (spread {v['spread'][0]:.3f}..{v['spread'][1]:.3f})"
                 if v.get("spread") else "")
        verdict = "" if key.endswith("best_of") else f"   target ≥ {v['target']:g}   {v['verdict']}"
        print(f"{text:<46} {val:>9}{verdict}{extra}")
    print()
    print(f"wall time {result['wall_time_s']:.0f} s; results: {result['results_file']}")


# -- main --------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--iters", type=int, default=None, help="iterations of the MKL runs (default 20; --quick: 8)")
    p.add_argument("--stock-iters", type=int, default=3, help="iterations of the stock reference-BLAS run")
    p.add_argument("--repeats", type=int, default=3, help="runs of each MKL side, in ABBA order (default 3)")
    p.add_argument("--quick", action="store_true", help="tiny model: a smoke check of the bench, not a measurement")
    p.add_argument("--skip-stock", action="store_true", help="leave out the slow stock reference-BLAS run")
    p.add_argument("--settle", type=float, default=60.0,
                   help="before each run, wait up to this many seconds for other processes to leave the CPU "
                        "(busy < 15%%); 0 disables (default 60)")
    args = p.parse_args(argv)
    iters = args.iters or (8 if args.quick else 20)
    if iters < 2 or args.stock_iters < 1 or args.repeats < 1:
        p.error("--iters must be ≥ 2, --stock-iters and --repeats ≥ 1")

    t_start = time.perf_counter()
    RESULTS.mkdir(parents=True, exist_ok=True)
    spec, name = (MODEL_QUICK, "llama-quick") if args.quick else (MODEL_20M, "llama-20m")
    model = ensure_model(spec, name)
    params = safetensors_params(model / "model.safetensors")
    data = ensure_data(model, rows=128, min_tokens=SEQ)
    log(f"model {model.relative_to(ROOT)} ({params / 1e6:.2f}M parameters), data {data.relative_to(ROOT)}")

    work = RESULTS / ("train_throughput-work-quick" if args.quick else "train_throughput-work")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)

    # ABBA: b c | c b | b c ...; the stock run last (it is the slow one and its figure only needs ~5x accuracy).
    plan: list[tuple[str, int]] = []
    for r in range(args.repeats):
        pair = [("mlx-lm-mkl", r + 1), ("forgellm", r + 1)]
        plan += pair if r % 2 == 0 else pair[::-1]
    if not args.skip_stock:
        plan.append(("stock", 1))

    runs = []
    for side, rep in plan:
        n = args.stock_iters if side == "stock" else iters
        cfg = make_config(model, data, n, work / "unused")
        per_step = 600.0 if side == "stock" else 60.0
        timeout = 300.0 + n * per_step
        tag = f"{side}-{rep}"
        quiet = wait_quiet(args.settle) if args.settle > 0 else None
        log(f"run {tag}: {SIDES[side]}, {n} iterations"
            + (f" (waited {quiet['waited_s']:.0f} s for a quiet CPU; busy {quiet['cpu_share_at_start']:.0%})"
               if quiet else ""))
        if side == "forgellm":
            res = run_forgellm(cfg, work, tag, timeout)
        else:
            res = run_mlx_lm(side, "reference" if side == "stock" else "mkl", cfg, work, tag, timeout)
        res.update(side=side, repeat=rep, iters=n, settle=quiet)
        runs.append(res)
        if res["ok"]:
            log(f"  {res['steady_tokens_per_second']:.1f} tok/s steady, peak RSS {res['peak_rss_mb']:.0f} MB, "
                f"blas {res['blas']}, wall {res['wall_s']:.0f} s, other CPU {res['foreign_cpu_share']:.0%}")
        else:
            log(f"  FAILED (rc {res['rc']}); log: {res['log']}")
            try:
                tail = (ROOT / res["log"]).read_text().splitlines()[-15:]
                print("\n".join("    " + ln for ln in tail), flush=True)
            except OSError:
                pass

    summary = {side: summarize(runs, side) for side in ("stock", "mlx-lm-mkl", "forgellm")}
    # Sanity: (b) and (c) should do the same work. In compat mode ForgeLLM reproduces mlx-lm's batch order,
    # so the per-step losses should agree (up to MKL's run-to-run rounding).
    b = next((r for r in runs if r["side"] == "mlx-lm-mkl" and r.get("ok")), None)
    c = next((r for r in runs if r["side"] == "forgellm" and r.get("ok")), None)
    checks = {}
    if b and c:
        n = min(len(b["losses"]), len(c["losses"]))
        diffs = [abs(x - y) for x, y in zip(b["losses"][:n], c["losses"][:n], strict=True)]
        checks["max_loss_diff_mlx_lm_vs_forgellm"] = max(diffs) if diffs else None
        streams = {tuple(r["losses"]) for r in runs if r["side"] in ("mlx-lm-mkl", "forgellm") and r.get("ok")}
        checks["losses_bitwise_equal"] = len(streams) == 1  # every MKL run of both sides: one loss stream
        checks["tokens_per_step"] = {"mlx-lm-mkl": sorted(set(b["tokens_per_window"])),
                                     "forgellm": sorted(set(c["tokens_per_window"]))}
    result = {
        "bench": "train_throughput",
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "quick": args.quick,
        "skip_stock": args.skip_stock,
        "host": host_info(),
        "child_env": CHILD_ENV,
        "model": {"path": str(model.relative_to(ROOT)), "spec": spec, "params": params},
        "config": {k: v for k, v in make_config(model, data, iters, Path("-")).items()
                   if k not in ("model", "data", "adapter_path")},
        "stock_iters": args.stock_iters,
        "method": "steady-state tok/s = median of mlx-lm/ForgeLLM report windows (1 step each) after the first; "
                  "runs of b and c in ABBA order; same-BLAS verdict = median of the pairs' ratios (a side's "
                  "best-of figure alongside, informational); peak RSS = max "
                  "VmHWM/RSS of any process in the child's tree, polled every 0.2 s",
        "runs": runs,
        "summary": summary,
        "ratios": {
            "forgellm_vs_mlx_lm_same_blas": pair_verdict(runs, TARGET_SAME_BLAS, args.quick),
            "forgellm_vs_mlx_lm_best_of": verdict(summary["forgellm"], summary["mlx-lm-mkl"], TARGET_SAME_BLAS,
                                                  args.quick),
            "forgellm_vs_stock_reference": verdict(summary["forgellm"], summary["stock"], TARGET_VS_STOCK,
                                                   args.quick),
        },
        "checks": checks,
    }
    result["wall_time_s"] = round(time.perf_counter() - t_start, 1)
    out = RESULTS / ("train_throughput-quick.json" if args.quick else "train_throughput.json")
    result["results_file"] = str(out.relative_to(ROOT))
    out.write_text(json.dumps(result, indent=2) + "\n")
    print_report(result)
    if checks:
        diff = checks["max_loss_diff_mlx_lm_vs_forgellm"]
        print(f"check: max |loss(mlx-lm) - loss(ForgeLLM)| per step = {diff:.2e}; every run's loss stream "
              f"{'bitwise equal' if checks['losses_bitwise_equal'] else 'NOT bitwise equal'}; "
              f"tokens/step {checks['tokens_per_step']}")
        if not checks["losses_bitwise_equal"] and not args.quick:
            return 1
    if any(not r.get("ok") for r in runs):
        return 2
    if args.quick:
        return 0
    return 0 if all(v["pass"] is not False for v in result["ratios"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
