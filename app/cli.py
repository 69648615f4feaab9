"""``forgellm`` command line: train, runs, stop, demo and start (the browser app)."""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import time

from services.config import ConfigError, ConfigProblems, load_yaml
from services.data import DataError
from services.run_folder import ACTIVE, RunFolder
from services.runs import RunManager, parse_ref
from services.workspace import Workspace


def _bar(done: int, total: int, width: int = 28) -> str:
    filled = int(width * done / total) if total else 0
    return "█" * filled + "░" * (width - filled)


def _eta(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "--:--"
    seconds = int(seconds)
    return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def follow(manager: RunManager, folder: RunFolder, out=sys.stdout) -> dict:
    """Print a live progress line for a run until it ends; Ctrl-C asks the run to stop cleanly."""
    offset, last_train, last_val = 0, {}, {}
    tty = out.isatty()
    try:
        while True:
            records, offset = folder.metrics(offset)
            for r in records:
                if r["type"] == "train":
                    last_train = r
                elif r["type"] == "val":
                    last_val = r
                elif r["type"] == "checkpoint" and not tty:
                    print(f"checkpoint {r['iteration']}", file=out)
            info = manager.get(folder.id)
            total = info.get("iters") or 0
            it = last_train.get("iteration", 0)
            line = (f"{_bar(it, total)} {it}/{total or '?'}"
                    f"  loss {last_train.get('train_loss', float('nan')):.4f}"
                    f"  val {last_val.get('val_loss', float('nan')):.4f}"
                    f"  {last_train.get('tokens_per_second') or 0:,.0f} tok/s"
                    f"  ETA {_eta(last_train.get('eta_seconds'))}")
            if tty:
                print("\r" + line[: shutil.get_terminal_size().columns - 1], end="", file=out, flush=True)
            elif records and any(r["type"] == "train" for r in records):
                print(line, file=out, flush=True)
            if info.get("status") not in ACTIVE:
                if tty:
                    print(file=out)
                return info
            time.sleep(0.3)
    except KeyboardInterrupt:
        print("\nstopping (a final checkpoint is written)…", file=out)
        manager.stop(folder.id)
        return manager.wait(folder.id)


def cmd_train(args: argparse.Namespace, manager: RunManager) -> int:
    if args.resume:
        run_id, it = parse_ref(args.resume)
        overrides = load_yaml(args.config) if args.config else None
        folder = manager.resume(run_id, it, overrides)
    else:
        if not args.config:
            raise ConfigError("config", None, "give a YAML config, or --resume RUN[@ITER]")
        folder = manager.launch(load_yaml(args.config))
    print(f"run {folder.id}  ({folder.path})")
    if args.detach:
        return 0
    info = follow(manager, folder)
    print(f"{info['status']}: {info.get('reason') or ''}")
    best = info.get("best")
    if best:
        print(f"best checkpoint: {best['iteration']} (val loss {best['val_loss']:.4f})")
    return 0 if info["status"] in ("completed", "stopped", "early-stopped") else 1


def cmd_runs(args: argparse.Namespace, manager: RunManager) -> int:
    runs = manager.list()
    if not runs:
        print(f"no runs in {manager.workspace.runs}")
        return 0
    print(f"{'RUN':<40} {'STATUS':<14} {'MODE':<7} {'TYPE':<5} {'ITER':>11} {'BEST VAL':>9}")
    for r in runs:
        best = r.get("best") or {}
        it = f"{r.get('iteration', 0)}/{r.get('iters') or '?'}"
        val = f"{best['val_loss']:.4f}" if best.get("val_loss") is not None else "-"
        print(f"{r['id']:<40} {r.get('status', '?'):<14} {r.get('mode', ''):<7} {r.get('fine_tune_type', ''):<5} "
              f"{it:>11} {val:>9}")
        if args.verbose and r.get("reason"):
            print(f"    {r['reason']}")
    return 0


def cmd_stop(args: argparse.Namespace, manager: RunManager) -> int:
    manager.stop(args.run)
    info = manager.wait(args.run, timeout=args.timeout)
    print(f"{args.run}: {info['status']} ({info.get('reason') or ''})")
    return 0


def cmd_demo(args: argparse.Namespace, manager: RunManager) -> int:
    from services.gguf_import import ensure_demo_model
    from services.samples import install_samples

    ws = manager.workspace
    paths = install_samples(ws.datasets)
    for name, p in paths.items():
        print(f"dataset {name}: {p}")
    print(f"model: {ensure_demo_model(ws.models, dequantize=True)}")
    return 0


def cmd_start(args: argparse.Namespace, manager: RunManager) -> int:
    from app.main import run_app

    run_app(manager.workspace, host=args.host, port=args.port, native=args.native, lan=args.lan,
            show=not args.no_show)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="forgellm", description="Continued pre-training and fine-tuning with MLX.")
    p.add_argument("--workspace", help="workspace folder (default: $FORGELLM_WORKSPACE or ./workspace)")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="start a training run from a YAML config (mlx_lm.lora configs work too)")
    t.add_argument("config", nargs="?", help="YAML config; with --resume, keys that change the run (a fork)")
    t.add_argument("--resume", metavar="RUN[@ITER]", help="resume a run exactly, or fork it from checkpoint ITER")
    t.add_argument("--detach", action="store_true", help="start and return; the run keeps training")
    t.set_defaults(func=cmd_train)
    r = sub.add_parser("runs", help="list the runs in the workspace")
    r.add_argument("-v", "--verbose", action="store_true", help="show each run's status reason")
    r.set_defaults(func=cmd_runs)
    s = sub.add_parser("stop", help="stop a run cleanly after its current step")
    s.add_argument("run")
    s.add_argument("--timeout", type=float, default=300.0)
    s.set_defaults(func=cmd_stop)
    d = sub.add_parser("demo", help="import the embedded SmolLM2 model and the sample datasets (offline)")
    d.set_defaults(func=cmd_demo)
    a = sub.add_parser("start", help="open the app in the browser")
    a.add_argument("--port", type=int, default=8080)
    a.add_argument("--host", default=None, help="listen address (default 127.0.0.1; 0.0.0.0 with --lan)")
    a.add_argument("--native", action="store_true", help="open in a native window (pywebview)")
    a.add_argument("--lan", action="store_true", help="admit other devices on the LAN with an access token")
    a.add_argument("--no-show", action="store_true", help="do not open a browser")
    a.set_defaults(func=cmd_start)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    manager = RunManager(Workspace.resolve(args.workspace))
    try:
        return args.func(args, manager)
    except (ConfigError, ConfigProblems, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
