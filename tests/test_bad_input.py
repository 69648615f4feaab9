"""Bad input gets a clear message naming what and where, through the CLI and the Train page alike (issue 15:
W2, the config fuzz, U1–U5, the alias bomb, the dataset findings, the run-id race, the preflight disk warning).

The fuzz: broken configs generated from the schema (every key of ``services.config`` with values of the wrong
type, out of range, huge, NaN, wrongly nested) plus hand-written edge cases, each through ``forgellm train``
(``app.cli.main`` in-process, a fresh workspace) and through the Train page's upload path
(``pages.train.form.load_upload``): no traceback, no invalid value accepted, every message names the field.
Nothing trains.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import base_config

from app.cli import main
from pages.train.form import check_form, form_to_config, load_upload
from services import config as config_mod
from services.library import checks
from services.training import preflight
from services.training.data import DataError, read_rows
from services.training.manager import RunManager
from services.workspace import Workspace

REPO = Path(__file__).resolve().parent.parent
NAN, INF = float("nan"), float("inf")

# Wrong values by the kind of a key (each is wrong for every key of that kind).
WRONG = {
    "count": ["four", 1.5, 1.0e30, 10**30, 2**64, True, -5, [1], {"a": 1}, NAN, INF],
    "number": ["x", True, -5, NAN, [1]],
    "fraction": ["x", True, -1.0, NAN, INF, 1.0e30, [0.1]],
    "bool": ["yes", 1, 0.5, [True], {"a": 1}],
    "choice": ["banana", 5, True, ["lora"]],
    "text": [12345, ["a", "b"], {"x": 1}, "x" * 5000],
    "mapping": ["x", 5, [1, 2], True],
}
KIND = {
    "seed": "count", "num_layers": "count", "batch_size": "count", "iters": "count", "val_batches": "count",
    "steps_per_report": "count", "steps_per_eval": "count", "save_every": "count", "test_batches": "count",
    "max_seq_length": "count", "grad_accumulation_steps": "count", "keep_checkpoints": "count",
    "clear_cache_threshold": "number", "learning_rate": "fraction", "valid_fraction": "fraction",
    "epochs": "fraction", "train": "bool", "test": "bool", "grad_checkpoint": "bool", "mask_prompt": "bool",
    "trust_remote_code": "bool", "packing": "bool", "mask_all_turns": "bool", "train_embeddings": "bool",
    "pack_samples": "bool",
    "fine_tune_type": "choice", "optimizer": "choice", "mode": "choice", "name": "text", "report_to": "text",
    "project_name": "text", "resume_adapter_file": "text", "adapter_path": "text", "config": "text",
    "text_feature": "text", "prompt_feature": "text", "completion_feature": "text", "chat_feature": "text",
    "model": "text", "data": "text", "optimizer_config": "mapping", "lr_schedule": "mapping",
    "lora_parameters": "mapping", "mixture": "mapping", "early_stopping": "mapping", "eval": "mapping",
    "distributed": "mapping", "best_by": "choice", "preference": "mapping",
}
# Wrong nesting and values inside the mappings: (the key's value, the field the message must name).
NESTED: list[tuple[str, Any, str]] = [
    ("lora_parameters", {"rank": "8", "scale": 20.0}, "lora_parameters.rank"),
    ("lora_parameters", {"rank": 1.5, "scale": 20.0}, "lora_parameters.rank"),
    ("lora_parameters", {"rank": 10**30, "scale": 20.0}, "lora_parameters.rank"),
    ("lora_parameters", {"rank": 8, "scale": NAN}, "lora_parameters.scale"),
    ("lora_parameters", {"rank": 8, "scale": 20.0, "dropout": 1.5}, "lora_parameters.dropout"),
    ("lora_parameters", {"rank": 8, "alpha": 16}, "lora_parameters.alpha"),
    ("lora_parameters", {"rank": 8, "scale": 20.0, "rnak": 4}, "lora_parameters.rnak"),
    ("lora_parameters", {"rank": 8, "scale": 20.0, "keys": "self_attn.q_proj"}, "lora_parameters.keys"),
    ("lora_parameters", {"rank": 8, "scale": 20.0, "keys": [1, 2]}, "lora_parameters.keys"),
    ("lr_schedule", "cosine", "lr_schedule"),
    ("lr_schedule", {"name": "banana", "arguments": [1e-3]}, "lr_schedule.name"),
    ("lr_schedule", {"name": "cosine_decay", "arguments": [1e-3]}, "lr_schedule.arguments"),
    ("lr_schedule", {"name": "linear_schedule", "arguments": [1e-3, 0.0]}, "lr_schedule.arguments"),
    ("lr_schedule", {"name": "step_decay", "arguments": [1e-3, 0.5, 0]}, "lr_schedule.arguments"),
    ("lr_schedule", {"name": "cosine_decay", "arguments": "x"}, "lr_schedule.arguments"),
    ("lr_schedule", {"name": "cosine_decay", "arguments": [1e-3, NAN]}, "lr_schedule.arguments"),
    ("lr_schedule", {"name": "cosine_decay", "arguments": [1e-3, 10], "warmup": -1}, "lr_schedule.warmup"),
    ("lr_schedule", {"name": "cosine_decay", "arguments": [1e-3, 10], "warmup": 1000}, "lr_schedule.warmup"),
    ("lr_schedule", {"name": "cosine_decay", "arguments": [1e-3, 10], "warmup_init": 2}, "lr_schedule.warmup_init"),
    ("lr_schedule", {"name": "cosine_decay", "arguments": [1e-3, 10], "steps": 5}, "lr_schedule"),
    ("optimizer_config", {"adamw": {"betas": "x"}}, "optimizer_config.adamw.betas"),
    ("optimizer_config", {"adamw": {"betas": [0.9]}}, "optimizer_config.adamw.betas"),
    ("optimizer_config", {"adam": {"eps": NAN}}, "optimizer_config.adam.eps"),
    ("optimizer_config", {"adam": {"lr": 0.1}}, "optimizer_config.adam.lr"),
    ("optimizer_config", {"sgd": {"nesterov": 1}}, "optimizer_config.sgd.nesterov"),
    ("optimizer_config", {"lion": {}}, "optimizer_config.lion"),
    ("optimizer_config", {"adam": [1]}, "optimizer_config.adam"),
    ("early_stopping", {"patience": 0}, "early_stopping.patience"),
    ("early_stopping", {"patience": 2, "patinece": 3}, "early_stopping.patinece"),
    ("early_stopping", {"patience": 2, "min_delta": -1}, "early_stopping.min_delta"),
    ("early_stopping", {"patience": 2.5}, "early_stopping.patience"),
]


def bomb(levels: int = 7) -> str:
    """A YAML alias bomb: ``levels`` levels of 10 aliases each (10^levels leaves in a few hundred bytes)."""
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, levels + 1):
        lines.append(f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 10) + "]")
    return "\n".join(lines)


def generated(model: Path, data: Path) -> list[tuple[str, str, str]]:
    """``(case, YAML text, field the message must name)`` for every key and each wrong value of its kind."""
    valid = base_config(model, data)
    cases = []
    for key in [*config_mod.MLX_LM_DEFAULTS, *config_mod.MLX_LM_FEATURE_KEYS, *config_mod.FORGE_DEFAULTS]:
        for i, value in enumerate(WRONG[KIND[key]]):
            cfg = {**valid, key: value}
            if key == "mixture":
                cfg["mode"] = "cpt"
            cases.append((f"{key}-{i}", yaml.safe_dump(cfg), key))
    for i, (key, value, field) in enumerate(NESTED):
        cases.append((f"{field}-{i}", yaml.safe_dump({**valid, key: value}), field))
    return cases


def hand_written(model: Path, data: Path, tmp: Path) -> list[tuple[str, str | bytes, str]]:
    head = f"model: {model}\ndata: {data}\n"
    no_json = tmp / "no-json-model"
    no_json.mkdir(exist_ok=True)
    broken = tmp / "broken-model"
    broken.mkdir(exist_ok=True)
    for f in model.iterdir():
        if f.suffix == ".safetensors":
            (no_json / f.name).write_bytes(f.read_bytes())
            (broken / f.name).write_bytes(f.read_bytes())
    (broken / "config.json").write_text('{"model_type": "llama", ')
    cut = tmp / "cut-model"
    cut.mkdir(exist_ok=True)
    for f in model.iterdir():
        if f.is_file():
            (cut / f.name).write_bytes(f.read_bytes()[: -1000] if f.suffix == ".safetensors" else f.read_bytes())
    return [
        ("iters-huge-int", head + "iters: 1000000000000000000000000000000\n", "iters"),
        ("iters-1e30", head + "iters: 1.0e30\n", "iters"),
        ("iters-2^64", head + f"iters: {2**64}\n", "iters"),
        ("iters-zero", head + "iters: 0\n", "iters"),
        ("batch-zero", head + "batch_size: 0\n", "batch_size"),
        ("batch-10^12", head + "batch_size: 1000000000000\n", "batch_size"),
        ("seed-2^64", head + f"seed: {2**64}\n", "seed"),
        ("lr-nan", head + "learning_rate: .nan\n", "learning_rate"),
        ("lr-string", head + "learning_rate: fast\n", "learning_rate"),
        ("lr-negative", head + "learning_rate: -0.001\n", "learning_rate"),
        ("typo", head + "lerning_rate: 1e-4\n", "lerning_rate"),
        ("duplicate-key", head + "iters: 10\niters: 20\n", "config"),
        ("grad-accum-beyond-iters", head + "iters: 3\ngrad_accumulation_steps: 1000\n", "grad_accumulation_steps"),
        ("epochs-zero", head + "epochs: 0\n", "epochs"),
        ("val-batches-zero", head + "val_batches: 0\n", "val_batches"),
        ("valid-fraction", head + "valid_fraction: 1.5\n", "valid_fraction"),
        ("name-int", head + "name: 12345\n", "name"),
        ("mode-sft", head + "mode: sft\n", "mode"),
        ("qlora", head + "fine_tune_type: qlora\n", "fine_tune_type"),
        ("mixture-without-cpt", head + "mixture: {data: x, ratio: 0.2}\n", "mixture"),
        ("mixture-ratio", head + f"mode: cpt\nmixture: {{data: {data}, ratio: 2}}\n", "mixture.ratio"),
        ("bomb-known-key", head + bomb() + "\nproject_name: *a7\n", "project_name"),
        ("bomb-report-to", head + bomb() + "\nreport_to: *a7\n", "report_to"),
        ("bomb-unknown-key", head + bomb() + "\nmy_notes: *a7\n", "my_notes"),
        ("bomb-lora-keys", head + bomb() + "\nlora_parameters: {rank: 8, scale: 20.0, keys: *a7}\n",
         "lora_parameters"),
        ("huge-string", head + "project_name: " + "x" * 20000 + "\n", "project_name"),
        ("no-model", f"data: {data}\n", "model"),
        ("no-data", f"model: {model}\n", "data"),
        ("empty-file", "", "model"),
        ("model-missing", f"model: {tmp / 'no-such-model'}\ndata: {data}\n", "model"),
        ("model-without-config", f"model: {no_json}\ndata: {data}\n", "model"),
        ("model-broken-config", f"model: {broken}\ndata: {data}\n", "model"),
        ("model-weights-cut-short", f"model: {cut}\ndata: {data}\n", "model"),
        ("lora-keys-match-nothing", head + "lora_parameters: {rank: 8, scale: 20.0, keys: [no_such.proj]}\n",
         "lora_parameters.keys"),
        ("data-missing", f"model: {model}\ndata: {tmp / 'no-such-data'}\n", "data"),
        ("max-seq-beyond-context", head + "max_seq_length: 1000000\n", "max_seq_length"),
        ("num-layers-beyond-model", head + "num_layers: 5\n", "num_layers"),
        ("tab-syntax", head + "iters:\t\t[1,\n", "config"),
        ("top-level-list", "- model: x\n", "config"),
        ("python-tag", head + "x: !!python/object/apply:os.system ['true']\n", "config"),
        ("deep-yaml", head + "x: " + "[" * 5000 + "]" * 5000 + "\n", "config"),
        ("binary", b"\x00\xff\xfe" * 100, "config"),
        ("scalar-file", "just some text\n", "config"),
    ]


def cli(ws: Path, *argv: str, capsys) -> tuple[int, str]:
    try:
        rc = main(["--workspace", str(ws), *argv])
    except SystemExit as e:  # argparse
        rc = e.code
    out = capsys.readouterr()
    return rc, out.out + out.err


def test_fuzz_broken_configs_are_refused_naming_the_field_by_the_cli_and_the_upload(tiny_model, chat_data,
                                                                                      tmp_path, capsys):
    ws = tmp_path / "ws"
    manager = RunManager(Workspace.resolve(ws))
    cases = generated(tiny_model, chat_data) + hand_written(tiny_model, chat_data, tmp_path)
    assert len(cases) >= 250 and len({c[0] for c in cases}) == len(cases)
    failures = []
    for case, text, field in cases:
        path = tmp_path / f"{case}.yaml"
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        rc, out = cli(ws, "train", str(path), "--detach", capsys=capsys)
        problems = []
        if rc != 2 or not out.startswith("error: ") or "Traceback" in out:
            problems.append(f"CLI exit {rc}: {out[:300]!r}")
        elif f"{field} = " not in out and f"{field}." not in out:
            problems.append(f"CLI message does not name {field}: {out[:300]!r}")
        if len(out) > 5000:
            problems.append(f"CLI message of {len(out)} characters")
        form, errors = load_upload(path.read_bytes(), path.name, manager.prepare_config)
        if not errors:
            problems.append("upload accepted it")
        elif not any(e.field == field or e.field.startswith(field + ".") for e in errors):
            problems.append(f"upload does not name {field}: {[str(e)[:100] for e in errors]}")
        if form is not None:  # loaded for the person to pick a model or dataset: Start stays blocked
            if field not in ("model", "data"):
                problems.append("upload loaded it into the form")
            if not check_form(form, manager.prepare_config)[1]:
                problems.append("the loaded form would start")
        if problems:
            failures.append((case, problems))
    assert not failures, "\n".join(f"{c}: {p}" for c, p in failures)
    assert not manager.list()  # nothing was created


def test_a_valid_config_is_accepted_the_same_by_the_cli_and_the_upload(tiny_model, chat_data, tmp_path):
    """The control of the fuzz: what both accept, they accept unchanged (the form adds nothing silently)."""
    manager = RunManager(Workspace.resolve(tmp_path / "ws"))
    user = base_config(tiny_model, chat_data, mode="ift", lr_schedule={"name": "cosine_decay",
                                                                       "arguments": [1e-3, 30, 1e-5]},
                       optimizer="adamw", optimizer_config={"adamw": {"betas": [0.9, 0.95], "weight_decay": 0.1}},
                       early_stopping={"patience": 2, "min_delta": 0.0}, keep_checkpoints=2, grad_accumulation_steps=2,
                       name="control", project_name="notes")
    data = b"\xef\xbb\xbf" + yaml.safe_dump(user).encode()  # a BOM, as some editors write it
    form, errors = load_upload(data, "control.yaml", manager.prepare_config)
    assert errors == [] and form is not None
    cfg, form_errors = check_form(form, manager.prepare_config)
    assert form_errors == []
    assert manager.prepare_config(cfg) == manager.prepare_config(config_mod.parse_yaml_bytes(data))
    assert form_to_config(form)["iters"] == 30


def test_the_cli_refuses_in_a_subprocess_without_a_traceback(tmp_path):
    cfg = tmp_path / "huge.yaml"
    cfg.write_text("model: m\ndata: d\niters: 1.0e30\n")
    for argv in (["train", str(cfg)], ["train", str(tmp_path)], ["stop", "../../../tmp"],
                 ["train", "--resume", "../../../tmp"], ["export-dashboard", "../../../tmp"]):
        p = subprocess.run([sys.executable, "-m", "app.cli", "--workspace", str(tmp_path / "ws"), *argv],
                           cwd=REPO, capture_output=True, text=True, timeout=120)
        assert p.returncode == 2 and p.stderr.startswith("error: ") and "Traceback" not in p.stderr, (argv, p.stderr)
    assert "iters = 1e+30: must be an integer" in subprocess.run(
        [sys.executable, "-m", "app.cli", "train", str(cfg), "--workspace", str(tmp_path / "ws")],
        cwd=REPO, capture_output=True, text=True, timeout=120).stderr


# -- the CLI: bad run names, the model the user named, --workspace anywhere ------------------------------------

def test_every_command_refuses_a_bad_run_ref_with_an_error_line(tiny_model, tmp_path, capsys):
    ws = tmp_path / "ws"
    for argv in (["stop", "../../../tmp"], ["train", "--resume", "../../../tmp"], ["train", "--resume", "x@y"],
                 ["export-dashboard", "../../../tmp"], ["publish", "../../x", "--name", "p"],
                 ["generate", "--model", str(tiny_model), "--prompt", "hi", "--adapter", "../../../tmp@1"],
                 ["stop", "no-such-run"]):
        rc, out = cli(ws, *argv, capsys=capsys)
        assert rc == 2 and out.startswith("error: ") and "Traceback" not in out, (argv, out)


def test_a_missing_model_is_named_as_the_user_wrote_it(chat_data, tmp_path, capsys):
    ws = tmp_path / "ws"
    for text, named in ((f"data: {chat_data}\n", "model = None: missing"),
                        (f"model: my/own-model\ndata: {chat_data}\n", "model = 'my/own-model': not found")):
        (tmp_path / "c.yaml").write_text(text)
        rc, out = cli(ws, "train", str(tmp_path / "c.yaml"), capsys=capsys)
        assert rc == 2 and named in out and "Qwen" not in out, out


def test_workspace_is_accepted_after_the_sub_command(tmp_path, capsys):
    ws = tmp_path / "after"
    rc, out = cli(tmp_path / "before", "runs", "--workspace", str(ws), capsys=capsys)
    assert rc == 0 and f"no runs in {ws / 'runs'}" in out
    args = __import__("app.cli", fromlist=["build_parser"]).build_parser().parse_args(
        ["start", "--port", "1", "--workspace", str(ws)])
    assert args.workspace == str(ws) and args.port == 1
    assert __import__("app.cli", fromlist=["build_parser"]).build_parser().parse_args(
        ["--workspace", "w", "dataset", "check", "p"]).workspace == "w"


def test_twenty_simultaneous_creates_all_succeed(tiny_model, chat_data, tmp_path):
    """Separate managers (as separate processes have) creating runs in the same second never collide."""
    ws = Workspace.resolve(tmp_path / "ws")
    cfg = base_config(tiny_model, chat_data, name="race")
    barrier, made, errors = threading.Barrier(20), [], []

    def create() -> None:
        manager = RunManager(ws)
        barrier.wait()
        try:
            made.append(manager.create(cfg).id)
        except Exception as e:  # noqa: BLE001 (the test reports any failure)
            errors.append(repr(e))

    threads = [threading.Thread(target=create) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(set(made)) == 20
    assert all(json.loads((ws.runs / r / "run.json").read_text())["id"] == r for r in made)


# -- the data: deep rows, assistant-first chats, a BOM ----------------------------------------------------------

def test_dataset_check_names_deep_rows_and_assistant_first_chats_and_accepts_a_bom(tmp_path, tiny_model, capsys):
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    lines = [
        "\ufeff" + json.dumps(good),  # line 1 with a BOM: valid
        json.dumps({"messages": [{"role": "assistant", "content": "I start"}, {"role": "user", "content": "ok"},
                                 {"role": "assistant", "content": "fine"}]}),
        '{"messages": ' + "[" * 200_000 + "]" * 200_000 + "}",
        json.dumps({"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}]}),
        json.dumps(good),
    ]
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    check = checks.check_dataset(path)
    assert check.good == 2 and len(check.bad) == 3
    assert check.bad[0].startswith(f"{path}:2: the chat starts with 'assistant'")
    assert check.bad[1] == f"{path}:3: too deeply nested (JSON arrays or objects inside each other)"
    assert check.bad[2].startswith(f"{path}:4: no user message")
    rc, out = cli(tmp_path / "ws", "dataset", "check", str(path), "--model", str(tiny_model), capsys=capsys)
    assert rc == 1 and "Traceback" not in out and f"{path}:3: too deeply nested" in out
    with pytest.raises(DataError, match=rf"^{path}:3: too deeply nested"):
        read_rows(path)  # what a run reads: it stops at the first bad row, naming it
    shallow = tmp_path / "shallow.jsonl"
    shallow.write_text("\n".join(lines[:2] + lines[3:]) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"^{shallow}:2: the chat starts with 'assistant'"):
        read_rows(shallow)
    text = tmp_path / "doc.txt"
    text.write_text("\ufeffa document", encoding="utf-8")
    assert checks.check_dataset(text).files[0].document.text == "a document"


# -- preflight: the checkpoints' disk space -----------------------------------------------------------------

def test_preflight_warns_when_the_checkpoints_will_not_fit_on_the_disk(manager, tiny_model, chat_data):
    cfg = manager.prepare_config(base_config(tiny_model, chat_data, iters=4, save_every=2, steps_per_eval=4))
    folder = manager.launch(cfg)
    assert manager.wait(folder.id, timeout=120)["status"] == "completed"
    real = sum(f.stat().st_size for f in folder.checkpoint_dir(2).iterdir())
    facts = preflight.model_facts(cfg["model"], cfg)
    assert 0.8 < preflight.checkpoint_bytes(facts, cfg) / real < 1.25  # the estimate is a checkpoint's size
    need = preflight.disk_need(facts, cfg, 4)
    assert need > 2 * real  # two checkpoints and the run's weights
    roomy = preflight.estimate(cfg, free_bytes=64e9, disk_free_bytes=need * 2)
    assert "warning" not in roomy and roomy["disk_gb"] == pytest.approx(need / 1e9)
    short = preflight.estimate(cfg, free_bytes=64e9, disk_free_bytes=need / 2)
    assert "the checkpoints need about" in short["warning"] and "workspace disk has" in short["warning"]
    kept = preflight.disk_need(facts, {**cfg, "iters": 1000, "save_every": 1, "keep_checkpoints": 2}, 1000)
    assert kept < preflight.disk_need(facts, {**cfg, "iters": 1000, "save_every": 1}, 1000) / 100
    assert "disk_free_gb" in preflight.estimate(cfg, free_bytes=64e9, workspace=manager.workspace.root)
