"""``forgellm`` command line: train, runs, stop, demo and start (the browser app)."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from typing import Any

from services.config import MODES, ConfigError, load_yaml
from services.errors import ForgeError
from services.publishing.handoff import LMSTUDIO_DEFAULT
from services.publishing.rules import GGUF_TYPES
from services.training.folder import ACTIVE, WAITING, RunFolder
from services.training.manager import RunManager, parse_ref
from services.training.prepared import progress_line
from services.units import clock
from services.workspace import Workspace, disk_full_reason, is_disk_full


def _bar(done: int, total: int, width: int = 28) -> str:
    filled = int(width * done / total) if total else 0
    return "█" * filled + "░" * (width - filled)




def follow(manager: RunManager, folder: RunFolder, out=sys.stdout) -> dict:
    """Print a live progress line for a run until it ends; Ctrl-C asks the run to stop cleanly."""
    offset, last_train, last_val, shown = 0, {}, {}, ""
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
            preparing = info.get("preparing") if info.get("status") in ACTIVE else None
            line = progress_line(preparing) if preparing else (
                f"{_bar(it, total)} {it}/{total or '?'}"
                f"  loss {last_train.get('train_loss', float('nan')):.4f}"
                f"  val {last_val.get('val_loss', float('nan')):.4f}"
                f"  {last_train.get('tokens_per_second') or 0:,.0f} tok/s"
                f"  ETA {clock(last_train.get('eta_seconds'))}")
            if tty:
                print("\r" + line[: shutil.get_terminal_size().columns - 1], end="", file=out, flush=True)
            elif (preparing and line != shown) or any(r["type"] == "train" for r in records):
                print(line, file=out, flush=True)
            shown = line
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
        folder = manager.enqueue(load_yaml(args.config)) if args.queue else manager.launch(load_yaml(args.config))
    print(f"run {folder.id}  ({folder.path})")
    if folder.info().get("status") == WAITING:
        print(f"waiting in the training queue ({len(manager.waiting())} waiting); it starts when the runs ahead end")
        return 0
    if args.detach or args.queue:
        return 0
    info = follow(manager, folder)
    print(f"{info['status']}: {info.get('reason') or ''}")
    best = info.get("best")
    if best:
        print(f"best checkpoint: {best['iteration']} (val loss {best['val_loss']:.4f})")
    return 0 if info["status"] in ("completed", "stopped", "early-stopped") else 1


def cmd_propose(args: argparse.Namespace, manager: RunManager) -> int:
    """``propose``: a config fitted to the data and this machine (the Train page's "Fit to data and machine")."""
    from services.config import dump_yaml
    from services.training import defaults
    from services.units import duration

    user = load_yaml(args.config) if args.config else {}
    for key in ("model", "data", "mode"):
        if getattr(args, key):
            user[key] = getattr(args, key)
    if "max_seq_length" not in user:  # the proposal decides it; a placeholder the model's context allows
        user["max_seq_length"] = defaults.MIN_SEQ
    proposal = defaults.propose(manager.prepare_config(user), budget_seconds=args.budget_minutes * 60)
    out = defaults.apply_to_config(user, proposal)
    for line in proposal["reasons"]:
        print(f"# {line}", file=sys.stderr)
    print(f"# estimated ≈ {duration(proposal['seconds'])} on this machine (validation included)", file=sys.stderr)
    if args.output:
        from pathlib import Path

        Path(args.output).write_text(dump_yaml(out))
        print(f"wrote {args.output}", file=sys.stderr)
    else:
        print(dump_yaml(out), end="")
    return 0


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
    from services.library.gguf import ensure_demo_model
    from services.library.samples import install_samples

    ws = manager.workspace
    paths = install_samples(ws.datasets)
    for name, p in paths.items():
        print(f"dataset {name}: {p}")
    print(f"model: {ensure_demo_model(ws.models, dequantize=True)}")
    return 0


def cmd_start(args: argparse.Namespace, manager: RunManager) -> int:
    from app.main import run_app
    from services.settings import SettingsError, add_settings, load_settings

    try:
        if args.allow_host or args.import_root:
            add_settings(manager.workspace, args.allow_host or [], args.import_root or [])
        load_settings(manager.workspace)  # a broken settings file is named before anything is served
    except SettingsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    run_app(manager.workspace, host=args.host, port=args.port, native=args.native, lan=args.lan,
            show=not args.no_show)
    return 0


def cmd_serve(args: argparse.Namespace, manager: RunManager) -> int:
    """Serve until Ctrl-C; the base URL (and on the LAN the API key) is printed first."""
    from app.composition import build_serving
    from services.serving.server import ServingServer
    from services.settings import check_port, load_settings

    port = check_port(args.port, "--port") if args.port is not None else load_settings(manager.workspace).serving.port
    def ready(server: ServingServer) -> None:
        for url in server.urls():
            print(f"OpenAI-compatible endpoint: {url}", flush=True)
        if server.api_key:
            print(f"API key for other devices: {server.api_key}", flush=True)
        print(f"try: curl {server.base_url}/models", flush=True)

    server = build_serving(manager)
    try:
        server.serve(port, args.lan, ready)
    except KeyboardInterrupt:
        pass
    return 0


WORKSPACE_HELP = "workspace folder (default: $FORGELLM_WORKSPACE or ./workspace)"


class _Subparsers:
    """``add_parser`` with the options every sub-command shares (``--workspace``)."""

    def __init__(self, action: Any, common: argparse.ArgumentParser) -> None:
        self.action, self.common = action, common

    def add_parser(self, name: str, **kw: Any) -> argparse.ArgumentParser:
        return self.action.add_parser(name, parents=[self.common], **kw)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="forgellm", description="Continued pre-training and fine-tuning with MLX.")
    p.add_argument("--workspace", help=WORKSPACE_HELP)
    # every sub-command takes --workspace too (`forgellm start --workspace W`); given there, it wins
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--workspace", default=argparse.SUPPRESS, help=WORKSPACE_HELP)
    sub = _Subparsers(p.add_subparsers(dest="command", required=True), common)
    t = sub.add_parser("train", help="start a training run from a YAML config (mlx_lm.lora configs work too)")
    t.add_argument("config", nargs="?", help="YAML config; with --resume, keys that change the run (a fork)")
    t.add_argument("--resume", metavar="RUN[@ITER]", help="resume a run exactly, or fork it from checkpoint ITER")
    t.add_argument("--detach", action="store_true", help="start and return; the run keeps training")
    t.add_argument("--queue", action="store_true",
                   help="start when no other run is training (queued runs start one after another) and return")
    t.set_defaults(func=cmd_train)
    pr = sub.add_parser("propose", help="print a config fitted to the data and this machine: max_seq_length, "
                                        "batch size, length and validation (start from a YAML config or a preset)")
    pr.add_argument("config", nargs="?", help="YAML config to start from (a preset in configs/, say)")
    pr.add_argument("--model", help="model folder, or a name under the workspace's models/")
    pr.add_argument("--data", help="dataset folder or file, or a name under the workspace's datasets/")
    pr.add_argument("--mode", choices=list(MODES), help="training mode")
    pr.add_argument("--budget-minutes", type=float, default=20.0, help="time the run should fit in (default 20)")
    pr.add_argument("-o", "--output", help="write the config here instead of printing it")
    pr.set_defaults(func=cmd_propose)
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
    a.add_argument("--allow-host", action="append", metavar="NAME",
                   help="also answer to this host name (kept in .forgellm/settings.json; repeatable)")
    a.add_argument("--import-root", action="append", metavar="DIR",
                   help="let browsers on other devices import datasets from this server folder (kept in "
                        ".forgellm/settings.json; repeatable)")
    a.set_defaults(func=cmd_start)
    sv = sub.add_parser("serve", help="serve the workspace's models, run checkpoints (RUN@ITER, RUN = its best) and "
                                      "published models on an OpenAI-compatible endpoint (/v1)")
    sv.add_argument("--port", type=int, default=None, help="port (default: the Settings page's, else 8090)")
    sv.add_argument("--lan", action="store_true", help="listen on the LAN too; other devices send the access "
                                                       "token as the API key")
    sv.set_defaults(func=cmd_serve)
    g = sub.add_parser("generate", help="generate text with a model, optionally with a run's adapter")
    _add_model_args(g)
    g.add_argument("--prompt", required=True, help="the prompt ('-' reads it from stdin)")
    g.add_argument("--stream", action="store_true", help="print the text as it is generated")
    g.set_defaults(func=cmd_generate)
    c = sub.add_parser("chat", help="chat with a model in the terminal (/reset, /system TEXT, /quit)")
    _add_model_args(c)
    c.set_defaults(func=cmd_chat)
    pb = sub.add_parser("publish", help="fuse a run's checkpoint into a standalone model in published/NAME "
                                        "(parity check and model card included)")
    pb.add_argument("run", metavar="RUN[@ITER]", help="a run (its best checkpoint, else the latest) or RUN@ITER")
    pb.add_argument("--name", required=True, help="folder name under the workspace's published/")
    pb.add_argument("--quantize", type=int, choices=[4, 8], metavar="BITS", help="quantize to 4 or 8 bits")
    pb.add_argument("--group-size", type=int, choices=[32, 64, 128], default=64, help="quantization group size")
    pb.add_argument("--gguf", nargs="?", const="f16", choices=list(GGUF_TYPES), metavar="TYPE",
                    help="also write GGUF for llama.cpp, Ollama and LM Studio, with an Ollama Modelfile: f16 (the "
                         "default) or q8_0 (llama/mistral, float weights)")
    pb.add_argument("--lmstudio", metavar="DIR", nargs="?", const=LMSTUDIO_DEFAULT,
                    help=f"with --gguf: place the GGUF in this LM Studio models folder (default {LMSTUDIO_DEFAULT})")
    pb.add_argument("--dequantize", action="store_true", help="write float weights from a quantized base model")
    pb.add_argument("--license", help="license for the model card (default: the base model's)")
    pb.add_argument("--overwrite", action="store_true", help="replace an existing published/NAME")
    pb.add_argument("--json", action="store_true", help="machine-readable output: one JSON object per line "
                                                        "(progress events, then a result or an error)")
    pb.set_defaults(func=cmd_publish)
    ed = sub.add_parser("export-dashboard", help="write a run's charts as one offline HTML file (and a PNG)")
    ed.add_argument("run")
    ed.add_argument("--out", metavar="DIR", help="output folder (default: the run's dashboard/ folder)")
    ed.add_argument("--no-png", action="store_true", help="skip the PNG screenshot (needs Chromium)")
    ed.set_defaults(func=cmd_export_dashboard)
    up = sub.add_parser("upload", help="upload a published model to the Hugging Face Hub")
    up.add_argument("name", help="a model in workspace/published")
    up.add_argument("--repo", required=True, metavar="OWNER/NAME", help="Hub repository (created if missing)")
    up.add_argument("--token", help="Hub token (default: $HF_TOKEN or the cached login)")
    up.add_argument("--public", action="store_true", help="make a new repository public (default: private)")
    up.set_defaults(func=cmd_upload)
    mo = sub.add_parser("models", help="list the models: workspace, published and the Hugging Face cache")
    mo.set_defaults(func=cmd_models)
    im = sub.add_parser("import", help="import a model: a Hub repo id, a model folder or a GGUF file")
    im.add_argument("source", help="org/name on the Hub, a folder with config.json + safetensors, or a .gguf file")
    im.add_argument("--name", help="folder name under the workspace's models/ (default: from the source)")
    im.add_argument("--link", action="store_true", help="folder: link to it instead of copying")
    im.add_argument("--dequantize", action="store_true", help="GGUF: write float32 weights")
    im.add_argument("--revision", help="Hub: branch, tag or commit")
    im.set_defaults(func=cmd_import)
    ds = sub.add_parser("dataset", help="dataset tools")
    dsub = _Subparsers(ds.add_subparsers(dest="dataset_command", required=True), common)
    dc = dsub.add_parser("check", help="detect the format, check every line, print statistics and every bad line")
    dc.add_argument("path", help="a .jsonl/.txt/.md file or a folder (a name under the workspace's datasets/ works)")
    dc.add_argument("--model", help="count tokens with this model's tokenizer and chat template")
    dc.add_argument("--max-seq-length", type=int, default=2048, help="truncation length for the statistics")
    dc.add_argument("--json", action="store_true", help="print one JSON object")
    dc.set_defaults(func=cmd_dataset)
    ev = sub.add_parser("eval", help="evaluate a model, a run (base + every checkpoint) or RUN@ITER with suites and "
                                     "lm-eval tasks; exit 1 when a suite is below its min_pass_rate")
    ev.add_argument("target", metavar="TARGET", help="a model, a published model, a run or RUN@ITER")
    ev.add_argument("--suite", action="append", default=[], metavar="FILE",
                    help="a suite file (.yaml/.jsonl; a name under the workspace's evals/ works); repeatable")
    ev.add_argument("--tasks", metavar="T1,T2", help="lm-eval tasks from --task-dir")
    ev.add_argument("--task-dir", metavar="DIR", help="a local lm-eval task folder (YAML tasks over local files)")
    ev.add_argument("--limit", type=int, help="lm-eval: at most N samples per task")
    ev.add_argument("--num-fewshot", type=int, help="lm-eval: few-shot examples")
    ev.add_argument("--chat-template", choices=["on", "off"], help="lm-eval: apply the chat template "
                                                                  "(default: when the tokenizer has one)")
    ev.add_argument("--json", action="store_true", help="print one JSON object (records, failures)")
    ev.set_defaults(func=cmd_eval)
    return p


def cmd_eval(args: argparse.Namespace, manager: RunManager) -> int:
    """Evaluate TARGET in one model worker; records of a run go to its evals.jsonl."""
    from services.errors import ForgeError
    from services.evaluation.plan import suite_path
    from services.evaluation.results import metric_names, table
    from services.evaluation.service import Evaluations
    from services.evaluation.suites import load_suite, threshold_failures
    from services.evaluation.tasks import task_spec
    from services.inference.service import ModelService

    models = ModelService()
    try:
        suites = [load_suite(suite_path(s, manager.workspace)) for s in args.suite]
        tasks = (task_spec(args.tasks, args.task_dir or ".", args.limit, args.num_fewshot,
                           None if args.chat_template is None else args.chat_template == "on") if args.tasks else None)
        if not suites and not tasks:
            raise ConfigError("eval", None, "give at least one --suite FILE or --tasks T1,T2 --task-dir DIR")
        records = Evaluations(manager.workspace, manager, models).run(args.target, suites, tasks)
    except ForgeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        models.unload()
    failures = threshold_failures(records)
    if args.json:
        print(json.dumps({"records": records, "failures": failures}, default=str))
    else:
        names = metric_names(records)
        print("  ".join([f"{'target':<28}"] + [f"{n:>14}" for n in names]))
        for row in table(records):
            print("  ".join([f"{row['label']:<28}"] + [f"{row.get(n, float('nan')):>14.4g}" for n in names]))
        for f in failures:
            print(f"FAIL {f}", file=sys.stderr)
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    manager = RunManager(Workspace.resolve(args.workspace))
    try:
        return args.func(args, manager)
    except ForgeError as e:  # every service's error: a bad config, run name, path, dataset or model
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if not is_disk_full(e):
            raise
        print(f"error: {disk_full_reason(manager.workspace.root)}", file=sys.stderr)
        return 2


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model folder, or a name under the workspace's models/")
    p.add_argument("--adapter", metavar="RUN[@ITER]", help="a run (its latest weights), RUN@ITER (that checkpoint) "
                                                          "or an adapter folder")
    p.add_argument("--system", help="system prompt (chat format)")
    p.add_argument("--format", choices=["auto", "chat", "completion"], default="auto",
                   help="chat template or raw completion (default: chat if the tokenizer has a template)")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temp", type=float, default=0.0, help="temperature (0: greedy)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--max-kv-size", type=int, default=None, help="rotating KV cache size (tokens)")


def _sampling(args: argparse.Namespace) -> dict:
    return {"format": args.format, "system": args.system, "max_tokens": args.max_tokens, "temperature": args.temp,
            "top_p": args.top_p, "top_k": args.top_k, "min_p": args.min_p,
            "repetition_penalty": args.repetition_penalty, "seed": args.seed, "max_kv_size": args.max_kv_size}


def _open_model(args: argparse.Namespace, manager: RunManager):
    """A ModelService with --model/--adapter loaded; warnings go to stderr."""
    from services.inference.service import ModelService
    from services.training.index import resolve_adapter, resolve_model

    model = resolve_model(manager, args.model)
    adapter = resolve_adapter(manager, args.adapter) if args.adapter else None
    svc = ModelService()
    status = svc.load(model, adapter)
    if status.get("warning"):
        print(f"warning: {status['warning']}", file=sys.stderr)
    return svc


def _stream_reply(svc, request: dict, out=sys.stdout, stream_text: bool = True) -> tuple[str, dict]:
    """Print one generation (as it comes, or at the end); Ctrl-C cancels it. Returns (text, stats)."""
    stream = svc.generate(request)
    parts: list[str] = []
    try:
        for chunk in stream:
            if chunk["type"] == "token":
                parts.append(chunk["text"])
                if stream_text:
                    print(chunk["text"], end="", file=out, flush=True)
    except KeyboardInterrupt:
        stream.cancel()
        for _ in stream:
            pass
    text = "".join(parts)
    if not stream_text:
        print(text, end="", file=out)
    print(file=out, flush=True)
    return text, stream.result or {}


def _stats_line(r: dict) -> str:
    ctx = f"{r.get('context_used')}/{r.get('context_max') or '?'}"
    return (f"[prompt {r.get('prompt_tokens')} tokens, generated {r.get('generation_tokens')} tokens, "
            f"{r.get('generation_tps') or 0:.1f} tok/s, context {ctx}, {r.get('finish_reason')}]")


def _with_model(args: argparse.Namespace, manager: RunManager, body: Callable[[Any], int]) -> int:
    """Open the model named by ``args``, run ``body(service)``, unload; a ModelError exits 2 with its message."""
    from services.inference.service import ModelError

    svc = None
    try:
        svc = _open_model(args, manager)
        return body(svc)
    except ModelError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if svc is not None:
            svc.unload()


def cmd_generate(args: argparse.Namespace, manager: RunManager) -> int:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt

    def body(svc: Any) -> int:
        _, result = _stream_reply(svc, {**_sampling(args), "prompt": prompt}, stream_text=args.stream)
        print(_stats_line(result), file=sys.stderr)
        return 0

    return _with_model(args, manager, body)


def _chat_command(line: str, history: list[dict], args: argparse.Namespace) -> bool:
    """Handle a /command; return False to quit."""
    cmd, _, rest = line.partition(" ")
    if cmd in ("/quit", "/exit"):
        return False
    if cmd == "/reset":
        history.clear()
        print("(history cleared)")
    elif cmd == "/system":
        args.system = rest.strip() or None
        history.clear()
        print(f"(system prompt {'set' if args.system else 'cleared'}; history cleared)")
    else:
        print("commands: /reset (clear the history), /system TEXT, /quit")
    return True


def cmd_chat(args: argparse.Namespace, manager: RunManager) -> int:
    tty = sys.stdin.isatty()
    history: list[dict] = []

    def body(svc: Any) -> int:
        st = svc.status
        print(f"chatting with {st['model']}" + (f" + {st['adapter_label']}" if st["adapter"] else "")
              + ("" if st["has_chat_template"] else " (no chat template: plain completion)")
              + "; /reset clears the history, /quit ends")
        while True:
            if tty:
                print("you> ", end="", flush=True)
            try:
                line = sys.stdin.readline()
            except KeyboardInterrupt:
                print()
                return 0
            if not line:
                return 0
            line = line.strip()
            if not line:
                continue
            if line.startswith("/"):
                if not _chat_command(line, history, args):
                    return 0
                continue
            history.append({"role": "user", "content": line})
            print("assistant> ", end="", flush=True)
            text, result = _stream_reply(svc, {**_sampling(args), "messages": history})
            history.append({"role": "assistant", "content": text})
            if tty:
                print(_stats_line(result), file=sys.stderr)

    return _with_model(args, manager, body)


def _progress_line(line: str, tty: bool) -> None:
    """A progress line: rewritten in place on a terminal, one line each otherwise (logs, pipes)."""
    if tty:
        print("\r" + line[: shutil.get_terminal_size().columns - 1].ljust(60), end="", flush=True)
    else:
        print(line, flush=True)


def cmd_publish(args: argparse.Namespace, manager: RunManager) -> int:
    """Publish RUN[@ITER]; exit 0 (parity passed), 2 (refused or failed), 3 (published, parity failed).

    With ``--json`` stdout is the publish worker's JSON lines (:mod:`services.publishing.worker`):
    ``{"type": "progress", "phase", "fraction", "message"}`` while it works, then
    ``{"type": "result", ...PublishResult, "summary"}`` or ``{"type": "error", "message"}``.
    """
    from services.publishing import worker
    from services.publishing.parity import parity_summary
    from services.publishing.publish import publish
    from services.publishing.rules import PublishError

    if getattr(args, "json", False):
        options = {"dequantize": args.dequantize, "quantize_bits": args.quantize, "group_size": args.group_size,
                   "gguf": args.gguf, "lmstudio": args.lmstudio, "license": args.license,
                   "overwrite": args.overwrite}
        fields = worker.run(manager.workspace, args.run, args.name, options)
        return 2 if fields is None else 0 if fields["parity"]["passed"] else 3
    tty = sys.stdout.isatty()

    def progress(phase: str, fraction: float, message: str) -> None:
        _progress_line(f"[{fraction:4.0%}] {phase}: {message}", tty)

    try:
        run_id, iteration = parse_ref(args.run)
        result = publish(manager.workspace, run_id, iteration, args.name, dequantize=args.dequantize,
                         quantize_bits=args.quantize, group_size=args.group_size, gguf=args.gguf,
                         lmstudio=args.lmstudio,
                         license=args.license, overwrite=args.overwrite, progress=progress)
    except (PublishError, ConfigError) as e:
        print(("\n" if tty else "") + f"error: {e}", file=sys.stderr)
        return 2
    parity = result.parity
    if tty:
        print()
    print(f"published {result.path} ({result.size_bytes / 1e6:.1f} MB, {result.seconds:.1f} s)")
    print(f"checkpoint {result.run_id}@{result.iteration}: {result.reason}")
    if result.gguf:
        print(f"GGUF: {result.gguf}")
    print(f"parity check: {parity_summary(parity)}")
    for c in parity["checks"]:
        print(f"  {'ok  ' if c['ok'] else 'FAIL'} {c['check']}: {c['detail']}")
    for w in result.warnings:
        print(f"warning: {w}", file=sys.stderr)
    return 0 if parity["passed"] else 3


def cmd_export_dashboard(args: argparse.Namespace, manager: RunManager) -> int:
    from pathlib import Path

    from services.training.dashboard import DashboardError, export_dashboard, render_png

    folder = manager.folder(args.run)
    out = Path(args.out) if args.out else folder.path / "dashboard"
    try:
        html_path, _ = export_dashboard(folder, out, png=False)
    except DashboardError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"dashboard: {html_path} (self-contained; opens offline)")
    if not args.no_png:
        try:
            print(f"screenshot: {render_png(html_path, out / 'dashboard.png')}")
        except DashboardError as e:
            print(f"warning: {e}", file=sys.stderr)
    return 0


def cmd_upload(args: argparse.Namespace, manager: RunManager) -> int:
    from services.publishing.hub import UploadError, upload
    from services.publishing.rules import published_folder

    path = published_folder(manager.workspace, args.name)
    if path is None:
        print(f"error: no published model {args.name!r} in {manager.workspace.published}", file=sys.stderr)
        return 2
    try:
        url = upload(path, args.repo, args.token or os.environ.get("HF_TOKEN"), private=not args.public)
    except UploadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"uploaded {path} to {url}")
    return 0


def cmd_models(args: argparse.Namespace, manager: RunManager) -> int:
    from services.library.models import list_models
    from services.units import human_bytes, human_count

    models = list_models(manager.workspace)
    if not models:
        print(f"no models in {manager.workspace.models} (try `forgellm import` or `forgellm demo`)")
        return 0
    print(f"{'MODEL':<44} {'SOURCE':<10} {'ARCH':<12} {'PARAMS':>7} {'DTYPE':<18} {'SIZE':>9} {'CONTEXT':>8} CHAT")
    for m in models:
        name = m["name"] if len(m["name"]) <= 44 else "…" + m["name"][-43:]
        print(f"{name:<44} {m['source']:<10} {str(m['arch'])[:12]:<12} {human_count(m['params']):>7} "
              f"{str(m['dtype'])[:18]:<18} {human_bytes(m['disk_bytes']):>9} {str(m['context'] or '?'):>8} "
              f"{'yes' if m['chat_template'] else 'no'}")
    return 0


def cmd_import(args: argparse.Namespace, manager: RunManager) -> int:
    from services.library.imports import import_model, quantized_gguf_warning, source_kind
    from services.library.models import LibraryError
    from services.system import mlx_backend

    tty = sys.stdout.isatty()

    def progress(phase: str, fraction: float | None, message: str) -> None:
        _progress_line(f"[{fraction:4.0%}] {phase}: {message}" if fraction is not None else f"{phase}: {message}", tty)

    try:
        if source_kind(args.source) == "gguf" and not args.dequantize:
            warning = quantized_gguf_warning(args.source, mlx_backend())
            if warning:
                print(f"warning: {warning}", file=sys.stderr)
        path = import_model(manager.workspace, args.source, args.name, link=args.link, dequantize=args.dequantize,
                            revision=args.revision, progress=progress)
    except LibraryError as e:
        print(("\n" if tty else "") + f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ncancelled; a Hub download resumes when the same import is run again", file=sys.stderr)
        return 130
    print(("\n" if tty else "") + f"imported {path}")
    return 0


def cmd_dataset(args: argparse.Namespace, manager: RunManager) -> int:
    """``dataset check``: exit 0 when every line is valid, 1 when some are bad, 2 when unusable."""
    import json
    from pathlib import Path

    from services.library import checks as dc

    path = Path(args.path).expanduser()
    if not path.exists() and (manager.workspace.datasets / args.path).exists():
        path = manager.workspace.datasets / args.path
    check = dc.check_dataset(path)
    out = check.summary()
    if args.model:
        tok = dc.load_tokenizer(str(manager.resolve_path(args.model, "models", "model")))
        out["tokens"] = dc.token_stats(check, tok, args.max_seq_length)
    out["bad"] = check.bad
    if args.json:
        print(json.dumps(out, indent=2))
        return 1 if check.bad else 0
    print(f"{check.path}: {check.label} ({check.layout}), {check.good:,} usable samples, {len(check.bad):,} bad")
    for name, counts in out["files"].items():
        print(f"  {name}: {counts['good']:,} usable, {counts['bad']:,} bad")
    st = out.get("tokens")
    if st:
        print(f"tokens: {st['tokens']:,} in {st['samples']:,} samples (min {st['min']:,}, mean {st['mean']:,}, "
              f"p95 {st['p95']:,}, max {st['max']:,}); trained {st['trained_tokens']:,}")
        if check.fmt == "documents":
            print(f"packed: {st['windows']:,} windows of {args.max_seq_length:,} tokens")
        else:
            print(f"truncated at {args.max_seq_length:,}: {st['truncated_samples']:,} samples "
                  f"({st['truncated_tokens']:,} tokens)")
            if st["untrainable"]:
                print(f"nothing to train: {st['untrainable']:,} samples have no trained token within "
                      f"{args.max_seq_length:,} (a run leaves them out)")
        print(f"duplicates: {st['duplicates']:,}")
        for err in st["errors"]:
            print(f"not renderable: {err}")
    for b in check.bad:
        print(b)
    return 1 if check.bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
