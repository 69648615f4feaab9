"""Shared fixtures: a tiny random model with a locally trained tokenizer, small datasets, a workspace."""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

import services  # noqa: F401 (before any test module imports MLX: it loads the BLAS the workers use)

os.environ.setdefault("MLX_DISABLE_COMPILE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

NOUNS = ["cat", "dog", "bird", "fish", "horse", "cow", "baker", "miller"]
VERBS = ["eats", "sees", "likes", "finds", "bakes", "shapes"]
OBJECTS = ["an apple", "the ball", "a bone", "some water", "the bread", "a loaf"]


def sentence(rng: random.Random) -> str:
    return f"the {rng.choice(NOUNS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}."


def chat_row(rng: random.Random, turns: int = 1, system: bool = False) -> dict:
    messages = [{"role": "system", "content": "you answer in short sentences."}] if system else []
    for _ in range(turns):
        messages.append({"role": "user", "content": sentence(rng)})
        messages.append({"role": "assistant", "content": f"{sentence(rng)} {sentence(rng)}"})
    return {"messages": messages}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@contextlib.contextmanager
def mounted_tmpfs(folder: Path, size: str) -> Iterator[Path]:
    """A size-limited tmpfs at ``folder`` for the block (root only: the test is skipped where it cannot be mounted)."""
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a size-limited tmpfs needs root")
    folder.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)]).returncode:
        pytest.skip("this machine cannot mount a tmpfs")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)])


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from services.library.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def chat_data(tmp_path_factory) -> Path:
    """mlx-lm layout: train.jsonl (48 rows) and valid.jsonl (12 rows)."""
    rng = random.Random(0)
    d = tmp_path_factory.mktemp("chat")
    write_jsonl(d / "train.jsonl", [chat_row(rng) for _ in range(48)])
    write_jsonl(d / "valid.jsonl", [chat_row(rng) for _ in range(12)])
    return d


@pytest.fixture(scope="session")
def cpt_corpus(tmp_path_factory) -> Path:
    """A folder of 12 text documents of different lengths."""
    rng = random.Random(1)
    d = tmp_path_factory.mktemp("corpus")
    for i in range(12):
        (d / f"doc{i:02d}.txt").write_text(" ".join(sentence(rng) for _ in range(5 + 3 * i)))
    return d


@pytest.fixture
def workspace(tmp_path):
    from services.workspace import Workspace

    return Workspace.resolve(tmp_path / "ws")


@pytest.fixture
def manager(workspace):
    from services.training.manager import RunManager

    m = RunManager(workspace)
    yield m
    for info in m.active():
        m.stop(info["id"])


def base_config(model: Path, data: Path, **over) -> dict:
    cfg = {
        "model": str(model), "data": str(data), "fine_tune_type": "lora", "seed": 0, "num_layers": 2,
        "batch_size": 4, "iters": 30, "val_batches": 2, "learning_rate": 1e-3, "steps_per_report": 5,
        "steps_per_eval": 10, "save_every": 10, "max_seq_length": 128,
        "lora_parameters": {"rank": 8, "dropout": 0.0, "scale": 20.0},
    }
    cfg.update(over)
    return cfg


@pytest.fixture
def netns():
    """A network namespace ``ns`` at 10.231.N.2 reaching this host at 10.231.N.1 over a veth pair (needs root and
    iproute2): a client on the LAN for tests/test_lan.py and tests/test_serving.py."""
    n = random.randint(1, 250)
    name, host_if, ns_if = f"fltest{os.getpid()}", f"flh{os.getpid() % 100000}", f"fln{os.getpid() % 100000}"
    host_ip, ns_ip = f"10.231.{n}.1", f"10.231.{n}.2"
    cmds = [
        ["ip", "netns", "add", name],
        ["ip", "link", "add", host_if, "type", "veth", "peer", "name", ns_if],
        ["ip", "link", "set", ns_if, "netns", name],
        ["ip", "addr", "add", f"{host_ip}/24", "dev", host_if],
        ["ip", "link", "set", host_if, "up"],
        ["ip", "netns", "exec", name, "ip", "addr", "add", f"{ns_ip}/24", "dev", ns_if],
        ["ip", "netns", "exec", name, "ip", "link", "set", ns_if, "up"],
    ]
    try:
        for c in cmds:
            subprocess.run(c, check=True, capture_output=True)
        yield name, host_ip
    finally:
        subprocess.run(["ip", "link", "del", host_if], capture_output=True)
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
