"""Model service and Playground backend, on real MLX with tiny models (no mocks).

References are computed in this process with mlx-lm's own Python API (``mlx_lm.load`` +
``stream_generate``/``generate``/``evaluate``), under the same BLAS as the worker.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import pytest

os.environ.setdefault("MLX_DISABLE_COMPILE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")



import mlx.core as mx
import numpy as np
import psutil
from conftest import base_config
from mlx_lm import generate as mlx_generate
from mlx_lm import load as mlx_load
from mlx_lm import stream_generate
from mlx_lm.sample_utils import make_sampler
from mlx_lm.tuner.datasets import CacheDataset, load_local_dataset
from mlx_lm.tuner.trainer import evaluate

from services.config import ConfigError
from services.errors import NotFound
from services.inference.service import CancelHandle, ModelError, ModelService
from services.library.datasets import save_preference, validation_datasets, validation_split
from services.library.models import LibraryError, model_size_bytes
from services.library.tiny_model import build_tiny_model
from services.training.folder import RunFolder
from services.training.index import RunNotFound, adapters_for, resolve_adapter, resolve_model, run_link
from services.training.manager import RunManager
from services.workspace import Workspace

PROMPT = "the cat eats"
MB = 1024 * 1024


# ----------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Workspace:
    return Workspace.resolve(tmp_path_factory.mktemp("model-service") / "ws")


def _train(ws: Workspace, model: Path, data: Path, **over) -> RunFolder:
    manager = RunManager(ws)
    folder = manager.launch(base_config(model, data, **over))
    info = manager.wait(folder.id, timeout=300)
    assert info["status"] == "completed", info.get("reason")
    return folder


@pytest.fixture(scope="module")
def run(ws, tiny_model, chat_data) -> RunFolder:
    """A LoRA run on the tiny model with checkpoints 10, 20, 30."""
    return _train(ws, tiny_model, chat_data)


@pytest.fixture(scope="module")
def medium(ws, tmp_path_factory, chat_data) -> tuple[Path, RunFolder]:
    """A ~27 MB model (big enough that a second copy of the base shows in RSS) and a LoRA run on it."""
    model = build_tiny_model(tmp_path_factory.mktemp("models") / "medium", hidden=384, layers=4, intermediate=1024,
                             heads=6, kv_heads=2)
    return model, _train(ws, model, chat_data, num_layers=4, iters=30, steps_per_eval=30, val_batches=1,
                         max_seq_length=96)


@pytest.fixture(scope="module")
def service():
    svc = ModelService()
    yield svc
    svc.unload()


# ----------------------------------------------------------------------------------------- helpers


def as_mlx_adapter(folder: Path | None, tmp: Path) -> Path | None:
    """An mlx-lm adapter folder for a run or checkpoint (a checkpoint has no adapter_config.json of its own)."""
    if folder is None or (folder / "adapter_config.json").exists():
        return folder
    out = tmp / f"ref-{folder.parent.parent.name}-{folder.name}"
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(folder.parent.parent / "adapter_config.json", out)
    shutil.copy(folder / "adapters.safetensors", out)
    return out


def reference(model: Path, adapter: Path | None, prompt: str | list[int], max_tokens: int,
              temp: float = 0.0, seed: int | None = None) -> tuple[list[int], str]:
    """Tokens from ``mlx_lm.stream_generate`` and text from ``mlx_lm.generate``, each on a fresh load."""
    m, tok = mlx_load(str(model), adapter_path=str(adapter) if adapter else None)
    if seed is not None:
        mx.random.seed(seed)
    tokens = [r.token for r in stream_generate(m, tok, prompt, max_tokens=max_tokens, sampler=make_sampler(temp))
              if r.finish_reason != "stop"]
    if seed is not None:
        mx.random.seed(seed)
    text = mlx_generate(m, tok, prompt, max_tokens=max_tokens, sampler=make_sampler(temp))
    return tokens, text


def chat_prompt(model: Path, messages: list[dict]) -> list[int]:
    _, tok = mlx_load(str(model))
    return tok.encode(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
                      add_special_tokens=False)


def run_stream(svc: ModelService, request: dict) -> tuple[list[int], dict]:
    stream = svc.generate(request)
    tokens = [c["token"] for c in stream if c["type"] == "token" and c["token"] is not None]
    return tokens, stream.result


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


# ----------------------------------------------------------------------------------------- tests


def test_greedy_output_equals_mlx_lm(service, tiny_model, run, tmp_path):
    messages = [{"role": "system", "content": "you answer in short sentences."},
                {"role": "user", "content": "the dog sees the ball."}]
    chat_tokens = chat_prompt(tiny_model, messages)
    ckpt = run.checkpoint_dir(20)
    outputs = []
    for adapter in (None, run.path, ckpt):
        status = service.load(tiny_model, adapter)
        assert status["state"] == "ready" and status["adapter"] == (str(adapter) if adapter else None)
        ref_adapter = as_mlx_adapter(adapter, tmp_path)
        tokens, result = run_stream(service, {"prompt": PROMPT, "format": "completion", "max_tokens": 24})
        ref_tokens, ref_text = reference(tiny_model, ref_adapter, PROMPT, 24)
        assert tokens == ref_tokens and result["text"] == ref_text, adapter
        assert result["prompt_tokens"] > 0 and result["generation_tps"] > 0
        assert result["context_used"] == result["prompt_tokens"] + result["generation_tokens"]
        # chat template with a system prompt (the default format when the tokenizer has a template)
        tokens, result = run_stream(service, {"messages": messages[1:], "system": messages[0]["content"],
                                              "max_tokens": 24})
        ref_tokens, ref_text = reference(tiny_model, ref_adapter, chat_tokens, 24)
        assert result["format"] == "chat" and result["prompt_tokens"] == len(chat_tokens)
        assert tokens == ref_tokens and result["text"] == ref_text, adapter
        outputs.append(tokens)
    assert service.status["adapter_label"] == f"{run.id}@20"
    assert outputs[0] != outputs[1]  # the adapter is really applied


def test_cancel_stops_within_one_token_step(service, tiny_model):
    service.load(tiny_model)
    stream = service.generate({"prompt": PROMPT, "format": "completion", "max_tokens": 20000, "ignore_eos": True})
    seen = after = 0
    tic = None
    for chunk in stream:
        if chunk["type"] != "token":
            continue
        if stream.cancelled:
            after += 1
        seen += 1
        if seen == 20:
            tic = time.perf_counter()
            stream.cancel()
    waited = time.perf_counter() - tic
    res = stream.result
    print(f"\ncancel: client saw {seen} tokens; worker generated {res['generation_tokens']} "
          f"({res['generation_tokens'] - seen} in flight); tokens after the cancel reached the worker: "
          f"{res['tokens_after_cancel']}; worker latency {res['cancel_latency_s'] * 1e3:.2f} ms; "
          f"client wait {waited * 1e3:.1f} ms")
    assert res["finish_reason"] == "cancelled" and after == 0 and seen == 20
    assert res["tokens_after_cancel"] <= 1
    assert res["generation_tokens"] < 20000 and waited < 5
    # the service-wide cancel (Ctrl-C in the CLI) does the same
    stream = service.generate({"prompt": PROMPT, "format": "completion", "max_tokens": 20000, "ignore_eos": True})
    next(iter(stream))
    service.cancel()
    assert [c for c in stream if c["type"] == "done"][0]["finish_reason"] == "cancelled"
    assert service.status["state"] == "ready"


async def test_async_stream_and_version(service, tiny_model):
    service.load(tiny_model)
    v0 = service.version
    chunks = [c async for c in service.generate({"prompt": PROMPT, "format": "completion", "max_tokens": 12,
                                                 "ignore_eos": True})]
    assert [c["type"] for c in chunks] == ["token"] * 12 + ["done"]
    assert service.version > v0 and service.status["state"] == "ready"


def test_bad_loads_give_clear_errors_and_the_service_recovers(tiny_model, tmp_path):
    svc = ModelService(ram_headroom=1e12)  # any model is "too big": the warning shows, the load still happens
    try:
        with pytest.raises(ModelError, match=r"model folder .*nope does not exist"):
            svc.load(tmp_path / "nope")
        assert svc.status["state"] == "error" and "does not exist" in svc.status["message"]
        corrupt = tmp_path / "corrupt"
        shutil.copytree(tiny_model, corrupt)
        (corrupt / "model.safetensors").write_bytes(os.urandom(4096))
        with pytest.raises(ModelError, match=f"could not load the model in {corrupt}"):
            svc.load(corrupt)
        assert svc.status["state"] == "error" and str(corrupt) in svc.status["message"]
        with pytest.raises(ModelError, match="has no adapters.safetensors"):
            svc.load(tiny_model, tmp_path)
        with pytest.raises(ModelError, match="no model is loaded"):
            svc.generate({"prompt": PROMPT})
        svc.load(tiny_model, wait=False)  # the UI's way: returns at once, status tells the rest
        deadline = time.time() + 60
        while svc.status["state"] == "loading" and time.time() < deadline:
            time.sleep(0.05)
        st = svc.status
        assert st["state"] == "ready" and st["memory"]["rss_gb"] > 0 and "GB of RAM is free" in st["warning"]
        assert svc.generate({"prompt": PROMPT, "max_tokens": 4}).text()
        with pytest.raises(ModelError, match="temperature: must be >= 0"):
            svc.generate({"prompt": PROMPT, "temperature": -1})
        # a crashed worker (killed, out of memory) is reported, and the next load starts a new one
        pid = svc.worker_pid
        os.kill(pid, signal.SIGKILL)
        deadline = time.time() + 10
        while svc.status["state"] != "error" and time.time() < deadline:
            time.sleep(0.05)
        st = svc.status
        assert st["state"] == "error" and f"pid {pid}) exited with code -9" in st["message"] and st["pid"] is None
        svc.load(tiny_model)
        assert svc.worker_pid not in (None, pid)
        assert svc.generate({"prompt": PROMPT, "max_tokens": 4}).text()
    finally:
        svc.unload()


def test_full_fine_tune_checkpoints_cannot_share_the_base(service, tiny_model, tmp_path):
    full = tmp_path / "full"
    full.mkdir()
    shutil.copy(tiny_model / "model.safetensors", full / "adapters.safetensors")
    (full / "adapter_config.json").write_text(json.dumps({"fine_tune_type": "full", "num_layers": 2}))
    service.load(tiny_model)
    with pytest.raises(ModelError, match="cannot compare full fine-tune"):
        service.compare(PROMPT, [None, full], {"max_tokens": 4})
    assert service.load(tiny_model, full)["fine_tune_type"] == "full"  # on its own it loads
    base_tokens, _ = run_stream(service, {"prompt": PROMPT, "format": "completion", "max_tokens": 8})
    assert base_tokens == reference(tiny_model, None, PROMPT, 8)[0]  # the same weights as the base


def test_compare_shares_one_base_and_matches_separate_loads(medium, tmp_path):
    model, run = medium
    ckpts = [run.checkpoint_dir(i) for i in run.checkpoint_iterations()]
    assert len(ckpts) == 3
    targets = [None, *ckpts]
    req = {"format": "completion", "max_tokens": 12}
    svc = ModelService()
    try:
        svc.load(model)
        svc.generate({**req, "prompt": PROMPT}).text()
        proc = psutil.Process(svc.worker_pid)
        rss_single = proc.memory_info().rss
        seen = []
        greedy = svc.compare(PROMPT, targets, req, on_result=seen.append)
        sampled = svc.compare(PROMPT, targets, {**req, "temperature": 0.9, "seed": 7})
        rss_compare = proc.memory_info().rss
        status = svc.status
    finally:
        svc.unload()
    adapters = sum((c / "adapters.safetensors").stat().st_size for c in ckpts)
    model_bytes, growth, slack = model_size_bytes(model), rss_compare - rss_single, 12 * MB
    print(f"\ncompare memory: worker RSS {rss_single / MB:.1f} MB with the base alone, {rss_compare / MB:.1f} MB "
          f"after compare(base + 3 checkpoints): +{growth / MB:.2f} MB; adapters {adapters / MB:.2f} MB; "
          f"bound {(adapters + slack) / MB:.2f} MB; one copy of the base {model_bytes / MB:.1f} MB")
    assert growth <= adapters + slack < model_bytes
    assert [r["index"] for r in seen] == [0, 1, 2, 3] and status["adapter"] is None
    assert [r["adapter_label"] for r in greedy] == ["base"] + [f"{run.id}@{i}" for i in (10, 20, 30)]
    for target, g, s in zip(targets, greedy, sampled, strict=True):
        ref = as_mlx_adapter(target, tmp_path)
        assert g["tokens"] == reference(model, ref, PROMPT, 12)[0], target
        assert s["tokens"] == reference(model, ref, PROMPT, 12, temp=0.9, seed=7)[0], target
    assert len({tuple(g["tokens"]) for g in greedy}) > 1  # the checkpoints really differ from each other


def test_compare_dora_checkpoints_and_base(service, ws, tiny_model, chat_data, tmp_path):
    """DoRA also learns magnitudes (``.m``): "base" must put the base's magnitudes back, not just zero the scale."""
    run = _train(ws, tiny_model, chat_data, fine_tune_type="dora", iters=20, steps_per_eval=20, val_batches=1)
    targets = [run.checkpoint_dir(10), None, run.checkpoint_dir(20)]
    service.load(tiny_model, targets[0])
    results = service.compare(PROMPT, targets, {"format": "completion", "max_tokens": 10})
    for target, r in zip(targets, results, strict=True):
        assert r["tokens"] == reference(tiny_model, as_mlx_adapter(target, tmp_path), PROMPT, 10)[0], target
    assert service.status["adapter"] == str(targets[0])  # compare puts the Playground's adapter back


def test_stopping_a_compare_leaves_other_requests_running(service, tiny_model, run):
    service.load(tiny_model)
    long = {"format": "completion", "max_tokens": 20000, "ignore_eos": True}
    # a chat answer is streaming while a compare waits behind it; stopping the compare must not touch the chat
    stream = service.generate({"prompt": PROMPT, "format": "completion", "max_tokens": 1000, "ignore_eos": True})
    queued, box = CancelHandle(), {}
    waiter = threading.Thread(target=lambda: box.update(r=service.compare(PROMPT, [None, run.path], long,
                                                                          cancel=queued)))
    waiter.start()
    next(iter(stream))
    queued.cancel()
    assert stream.result is None or stream.result["finish_reason"] == "length"
    stream.text()
    assert stream.result["finish_reason"] == "length" and stream.result["generation_tokens"] == 1000
    waiter.join(30)
    assert box["r"] == []  # cancelled before it started: nothing generated
    # a running compare stops within a token step and returns what it has
    running = CancelHandle()
    threading.Timer(0.5, running.cancel).start()
    results = service.compare(PROMPT, [None, run.path], long, cancel=running)
    assert len(results) == 1 and results[0]["finish_reason"] == "cancelled"
    assert results[0]["generation_tokens"] < 20000 and service.status["state"] == "ready"
    early = CancelHandle()
    early.cancel()  # raised before the request exists: it is cancelled as soon as it is submitted
    assert all(r["finish_reason"] == "cancelled" and not r["tokens"]
               for r in service.compare(PROMPT, [None, run.path], long, cancel=early))


def test_perplexity_equals_exp_of_mlx_lm_evaluate(service, tiny_model, run, chat_data):
    res = service.perplexity(tiny_model, run.path, chat_data, max_seq_length=128, batch_size=4)
    m, tok = mlx_load(str(tiny_model), adapter_path=str(run.path))
    _, valid, _ = load_local_dataset(Path(chat_data), tok, types.SimpleNamespace())
    np.random.seed(0)
    loss = evaluate(model=m, dataset=CacheDataset(valid), batch_size=4, num_batches=-1, max_seq_length=128)
    print(f"\nperplexity {res['perplexity']:.4f} (mlx-lm: exp({loss:.6f}) = {math.exp(loss):.4f}), "
          f"{res['tokens']} tokens in {res['batches']} batches")
    assert res["perplexity"] == pytest.approx(math.exp(loss), rel=1e-6)
    assert res["format"] == "chat" and res["rows"] == 12 and res["batches"] == 3
    base = service.perplexity(tiny_model, None, chat_data / "valid.jsonl", max_seq_length=128, batch_size=4)
    assert base["adapter"] is None and base["perplexity"] > res["perplexity"]  # training helped
    with pytest.raises(ModelError, match="has no valid.jsonl"):
        service.perplexity(tiny_model, None, tiny_model, 128, 4)


def test_save_preference(workspace):
    path = save_preference(workspace, "prefs", "the cat?", "the cat eats.", "cat cat cat")
    save_preference(workspace, "prefs", [{"role": "user", "content": "hi"}], "hello.", "...")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert path == workspace.datasets / "prefs" / "train.jsonl"
    assert rows[0] == {"prompt": "the cat?", "chosen": "the cat eats.", "rejected": "cat cat cat"}
    assert rows[1]["prompt"][0]["role"] == "user"
    for bad in ("../escape", "", "a/b", ".."):
        with pytest.raises(LibraryError, match="dataset name"):
            save_preference(workspace, bad, "p", "c", "r")
    with pytest.raises(ValueError, match="chosen"):
        save_preference(workspace, "prefs", "p", " ", "r")
    with pytest.raises(LibraryError, match="prompt"):
        save_preference(workspace, "prefs", [], "c", "r")
    assert len(path.read_text().splitlines()) == 2  # refused pairs write nothing


def test_validation_splits_are_what_perplexity_reads(workspace, chat_data, tiny_model):
    ds = workspace.datasets
    os.symlink(chat_data, ds / "chat")
    (ds / "train-only").mkdir()
    (ds / "train-only" / "train.jsonl").write_text('{"text": "a"}\n')
    (ds / "one.jsonl").write_text('{"text": "a"}\n')
    (ds / "notes.txt").write_text("just text\n")
    assert validation_split(ds / "chat") == ds / "chat" / "valid.jsonl"
    assert validation_split(ds / "one.jsonl") == ds / "one.jsonl"
    assert validation_split(ds / "train-only") is None and validation_split(ds / "notes.txt") is None
    assert [d["key"] for d in validation_datasets(workspace)] == ["chat", "one.jsonl"]
    svc = ModelService()  # the path is refused before any worker starts
    with pytest.raises(ModelError, match="has no valid.jsonl"):
        svc.perplexity(tiny_model, None, ds / "train-only")
    with pytest.raises(ModelError, match="is not a .jsonl file"):
        svc.perplexity(tiny_model, None, ds / "notes.txt")
    with pytest.raises(ModelError, match="does not exist"):
        svc.perplexity(tiny_model, None, ds / "nope")
    assert svc.worker_pid is None


def test_ram_need_is_the_weights_against_free_ram(tiny_model, run, tmp_path):
    need = ModelService(ram_headroom=1e12).ram_need(tiny_model, run.checkpoint_dir(20))
    adapter = (run.checkpoint_dir(20) / "adapters.safetensors").stat().st_size
    assert need.size == model_size_bytes(tiny_model) + adapter > adapter > 0
    assert need.free == pytest.approx(psutil.virtual_memory().available, rel=0.2) and need.short
    assert not ModelService(ram_headroom=0.0).ram_need(tiny_model).short
    with pytest.raises(OSError):
        ModelService().ram_need(tmp_path / "nope")


def test_run_adapters_and_links(ws, run, tiny_model):
    manager = RunManager(ws)
    assert resolve_model(manager, str(tiny_model)) == tiny_model.resolve()
    assert resolve_adapter(manager, run.id) == run.path
    assert resolve_adapter(manager, f"{run.id}@20") == run.checkpoint_dir(20)
    assert resolve_adapter(manager, str(run.checkpoint_dir(10))) == run.checkpoint_dir(10).resolve()
    with pytest.raises(RunNotFound, match=r"has checkpoints \[10, 20, 30\]") as missing:
        resolve_adapter(manager, f"{run.id}@7")
    assert isinstance(missing.value, NotFound) and isinstance(missing.value, ConfigError)
    with pytest.raises(NotFound, match="no such run"):
        resolve_adapter(manager, "no-such-run@10")
    assert run_link(manager, run.id, "20") == (tiny_model.resolve(), run.checkpoint_dir(20).resolve())
    assert run_link(manager, f"{run.id}@10") == (tiny_model.resolve(), run.checkpoint_dir(10).resolve())
    assert run_link(manager, run.id) == (tiny_model.resolve(), run.path.resolve())
    with pytest.raises(ConfigError, match="expected a checkpoint number"):
        run_link(manager, run.id, "x")
    with pytest.raises(RunNotFound, match="has checkpoints"):
        run_link(manager, run.id, "99")


def test_adapters_for_a_model(ws, run, tiny_model, workspace):
    best = run.info()["best"]["iteration"]
    expected = [f"{run.id} (latest)"] + [f"{run.id} @ {it}" + (" ★ best" if it == best else "") for it in (30, 20, 10)]
    choices = adapters_for(RunManager(ws), str(tiny_model.resolve()))
    mine = [label for path, label in choices.items() if Path(path).is_relative_to(run.path.resolve())]
    assert mine == expected
    assert str(run.checkpoint_dir(20).resolve()) in choices
    assert not [p for p in adapters_for(RunManager(ws), "/another/model") if Path(p).is_relative_to(run.path)]
    # full fine-tunes cannot share a base: lora_only leaves them out
    for name, kind in (("copy-lora", "lora"), ("copy-full", "full")):
        shutil.copytree(run.path, workspace.runs / name)
        info = json.loads((workspace.runs / name / "run.json").read_text())
        info.update(id=name, fine_tune_type=kind)
        (workspace.runs / name / "run.json").write_text(json.dumps(info))
    manager = RunManager(workspace)
    runs_of = lambda choices: sorted({Path(p).relative_to(workspace.runs.resolve()).parts[0] for p in choices})  # noqa: E731
    assert runs_of(adapters_for(manager, str(tiny_model.resolve()))) == ["copy-full", "copy-lora"]
    assert runs_of(adapters_for(manager, None, lora_only=True)) == ["copy-lora"]


def forgellm(ws: Workspace, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "app.cli", "--workspace", str(ws.root), *args], input=stdin,
                          capture_output=True, text=True, timeout=120)


def test_cli_generate_and_chat(ws, tiny_model, run, tmp_path):
    proc = forgellm(ws, "generate", "--model", str(tiny_model), "--adapter", f"{run.id}@20", "--prompt", PROMPT,
                    "--format", "completion", "--max-tokens", "16", "--stream")
    assert proc.returncode == 0, proc.stderr
    ref_tokens, ref_text = reference(tiny_model, as_mlx_adapter(run.checkpoint_dir(20), tmp_path), PROMPT, 16)
    assert proc.stdout == ref_text + "\n"
    assert "generated" in proc.stderr and "tok/s" in proc.stderr
    bad = forgellm(ws, "generate", "--model", str(tiny_model), "--adapter", f"{run.id}@7", "--prompt", "x")
    assert bad.returncode == 2 and "has checkpoints [10, 20, 30]" in bad.stderr
    chat = forgellm(ws, "chat", "--model", str(tiny_model), "--adapter", run.id, "--max-tokens", "8",
                    stdin="the cat eats.\nthe dog sees.\n/reset\nhello\n/quit\n")
    assert chat.returncode == 0, chat.stderr
    assert chat.stdout.count("assistant> ") == 3 and "history cleared" in chat.stdout


def test_unload_ends_the_worker(service, tiny_model):
    service.load(tiny_model)
    pid = service.worker_pid
    service.unload()
    assert gone(pid) and service.worker_pid is None
    assert service.status["state"] == "idle" and service.status["memory"]["rss_gb"] is None
    with pytest.raises(ModelError, match="no model is loaded"):
        service.generate({"prompt": PROMPT})
