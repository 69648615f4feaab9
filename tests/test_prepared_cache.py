"""The prepared-data cache: the same samples as in-memory preparation, invalidation by every input, damaged
entries rebuilt, bitwise-equal training on cached data, and Stop during preparation."""

from __future__ import annotations

import json
import os
import random
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import base_config, chat_row, mounted_tmpfs, sentence, write_jsonl

from services.config import resolve
from services.training import data as data_mod
from services.training.folder import RunFolder, history
from services.training.prepared import PreparationStopped, PreparedCache, cache_root
from services.training.trainer import PrepProgress, Trainer


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from mlx_lm.utils import load_tokenizer

    return load_tokenizer(tiny_model)


@pytest.fixture
def corpus(tmp_path) -> Path:
    rng = random.Random(5)
    d = tmp_path / "corpus"
    d.mkdir()
    for i in range(10):
        (d / f"doc{i:02d}.txt").write_text(" ".join(sentence(rng) for _ in range(4 + 5 * i)))
    write_jsonl(d / "more.jsonl", [{"text": " ".join(sentence(rng) for _ in range(6))} for _ in range(4)])
    return d


def as_lists(samples) -> list[tuple[list[int], list[bool]]]:
    return [(list(map(int, s.tokens)), list(map(bool, s.mask))) for s in samples]


def same_as_in_memory(cache: PreparedCache, cfg: dict, tokenizer) -> None:
    cached, plain = cache.prepare(cfg, tokenizer), data_mod.prepare(cfg, tokenizer)
    for split in ("train", "valid", "test"):
        assert as_lists(getattr(cached, split)) == as_lists(getattr(plain, split)), split
    assert json.dumps(cached.stats, sort_keys=True) == json.dumps(plain.stats, sort_keys=True)


@pytest.mark.parametrize("over", [{"packing": True}, {"packing": False}, {"max_seq_length": 16}])
def test_cpt_entry_holds_the_samples_and_stats_of_in_memory_preparation(tmp_path, tokenizer, tiny_model, corpus,
                                                                         over):
    cfg = resolve(base_config(tiny_model, corpus, mode="cpt", valid_fraction=0.25, **{"max_seq_length": 32, **over}))
    cache = PreparedCache(tmp_path / "cache")
    same_as_in_memory(cache, cfg, tokenizer)
    assert cache.last["hit"] is False
    same_as_in_memory(cache, cfg, tokenizer)
    assert cache.last["hit"] is True and isinstance(cache.prepare(cfg, tokenizer).train.tokens, np.memmap)


def test_ift_entry_holds_masks_left_out_rows_and_the_split_layout(tmp_path, tokenizer, tiny_model, chat_data):
    rng = random.Random(2)
    long = {"messages": [{"role": "user", "content": " ".join(sentence(rng) for _ in range(40))},
                         {"role": "assistant", "content": "yes."}]}
    single = write_jsonl(tmp_path / "one.jsonl", [chat_row(rng, turns=2) for _ in range(30)] + [long])
    cache = PreparedCache(tmp_path / "cache")
    for data, over in ((chat_data, {}), (single, {"valid_fraction": 0.2}), (single, {"mask_all_turns": False,
                                                                                    "mask_prompt": True})):
        cfg = resolve(base_config(tiny_model, data, mode="ift", max_seq_length=64, **over))
        same_as_in_memory(cache, cfg, tokenizer)
    assert len(cache.entries()) == 3


def test_changing_a_file_the_tokenizer_or_max_seq_length_makes_a_new_entry(tmp_path, tokenizer, tiny_model, corpus):
    from mlx_lm.utils import load_tokenizer

    cache = PreparedCache(tmp_path / "cache")
    cfg = resolve(base_config(tiny_model, corpus, mode="cpt", max_seq_length=32))
    cache.prepare(cfg, tokenizer)
    keys = {cache.last["key"]}
    doc = corpus / "doc03.txt"
    stat = doc.stat()
    doc.write_text("X" + doc.read_text()[1:])  # one letter: same size, and the mtime is put back
    os.utime(doc, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    changed = cache.prepare(cfg, tokenizer)
    assert cache.last["hit"] is False and cache.last["key"] not in keys
    assert as_lists(changed.train) == as_lists(data_mod.prepare(cfg, tokenizer).train)
    keys.add(cache.last["key"])
    cache.prepare({**cfg, "max_seq_length": 48}, tokenizer)
    assert cache.last["hit"] is False and cache.last["key"] not in keys
    keys.add(cache.last["key"])
    other = tmp_path / "other-model"
    shutil.copytree(tiny_model, other)
    tok = json.loads((other / "tokenizer.json").read_text())
    tok["added_tokens"] = [*tok.get("added_tokens", []), {"id": len(tok["model"]["vocab"]), "content": "<|x|>",
                                                          "single_word": False, "lstrip": False, "rstrip": False,
                                                          "normalized": False, "special": True}]
    (other / "tokenizer.json").write_text(json.dumps(tok))
    cache.prepare({**cfg, "model": str(other)}, load_tokenizer(other))
    assert cache.last["hit"] is False and cache.last["key"] not in keys
    cache.prepare(cfg, tokenizer)  # nothing changed back there: still the first rebuild's entry
    assert cache.last["hit"] is True


@pytest.mark.parametrize("damage", ["flip", "truncate", "no-manifest", "missing-file"])
def test_a_corrupt_or_partial_entry_is_detected_and_rebuilt(tmp_path, tokenizer, tiny_model, corpus, damage):
    cache = PreparedCache(tmp_path / "cache")
    cfg = resolve(base_config(tiny_model, corpus, mode="cpt", max_seq_length=32))
    good = as_lists(cache.prepare(cfg, tokenizer).train)
    entry = cache.root / cache.last["key"]
    tokens = entry / "train.tokens"
    if damage == "flip":
        raw = bytearray(tokens.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        tokens.write_bytes(bytes(raw))
    elif damage == "truncate":
        tokens.write_bytes(tokens.read_bytes()[:-8])
    elif damage == "no-manifest":  # a build that died before its last write
        (entry / "manifest.json").unlink()
    else:
        (entry / "train.index").unlink()
    again = cache.prepare(cfg, tokenizer)
    assert cache.last["hit"] is False and cache.last["problem"]
    assert as_lists(again.train) == good
    assert cache.problem(cache.last["key"]) is None


def test_entries_are_listed_with_their_size_and_deleted(tmp_path, tokenizer, tiny_model, corpus, workspace):
    cache = PreparedCache.of(workspace)
    assert cache.root == workspace.root / ".forgellm" / "cache" / "prepared"
    cfg = resolve(base_config(tiny_model, corpus, mode="cpt", max_seq_length=32))
    cache.prepare(cfg, tokenizer)
    [entry] = cache.entries()
    assert entry["key"] == cache.last["key"] and entry["data"] == str(corpus) and entry["complete"]
    assert entry["bytes"] == sum(f.stat().st_size for f in (cache.root / entry["key"]).iterdir())
    assert entry["tokens"] > 0
    cache.delete(entry["key"])
    assert cache.entries() == []
    with pytest.raises(data_mod.DataError, match="no such prepared-data entry"):
        cache.delete("../runs")


def test_a_probe_workspace_shares_its_owners_cache(workspace):
    from services.training.preflight import probes_dir
    from services.workspace import Workspace

    probe = Workspace.resolve(probes_dir(workspace) / "p1")
    assert cache_root(probe) == cache_root(workspace)


def losses(folder: RunFolder) -> tuple[list, list]:
    records, _ = folder.metrics()
    hist = history(records)
    return ([r["train_loss"] for r in hist if r["type"] == "train"],
            [r["val_loss"] for r in hist if r["type"] == "val"])


@pytest.mark.parametrize("mode", ["cpt", "ift"])
def test_training_on_cached_data_gives_bitwise_equal_losses(manager, tiny_model, cpt_corpus, chat_data, tmp_path,
                                                            mode):
    cfg = base_config(tiny_model, cpt_corpus if mode == "cpt" else chat_data, mode=mode, iters=20,
                      steps_per_eval=10, save_every=20, max_seq_length=64)
    cold = manager.launch(cfg)
    assert manager.wait(cold.id, timeout=300)["status"] == "completed"
    warm = manager.launch(cfg)
    assert manager.wait(warm.id, timeout=300)["status"] == "completed"
    assert warm.info()["prepared"]["hit"] is True and cold.info()["prepared"]["hit"] is False
    assert "cache hit" in warm.log_path.read_text()
    # the same config outside a workspace: no cache, prepared in memory as before
    plain = RunFolder(tmp_path / "outside" / "run")
    plain.path.mkdir(parents=True)
    shutil.copy(cold.config_path, plain.config_path)
    trainer = Trainer(plain)
    outcome = trainer.run(trainer.setup())
    assert outcome.status == "completed"
    assert isinstance(trainer.train, list)  # the reference really is the in-memory path
    assert losses(cold) == losses(warm) == losses(plain)
    assert losses(cold)[0] and losses(cold)[1]


def test_stop_during_preparation_ends_it_and_leaves_no_entry(tmp_path, tokenizer, tiny_model, corpus, monkeypatch):
    from services.training import prepared as prepared_mod

    monkeypatch.setattr(prepared_mod, "BATCH_CHARS", 200)  # many batches out of the small corpus
    cache = PreparedCache(tmp_path / "cache")
    cfg = resolve(base_config(tiny_model, corpus, mode="cpt", max_seq_length=32))
    folder = RunFolder(tmp_path / "run")
    folder.path.mkdir()
    stop = threading.Event()
    seen = []
    progress = PrepProgress(folder, stop, every=0.0)

    def tell(documents: int, total: int, tokens: int) -> None:
        seen.append(documents)
        progress(documents, total, tokens)
        if len(seen) == 2:
            stop.set()  # as SIGTERM or the stop file sets it

    with pytest.raises(PreparationStopped, match="stopped while preparing the data"):
        cache.prepare(cfg, tokenizer, progress=tell)
    assert len(seen) == 3 and seen[-1] < 14
    assert folder.info()["preparing"]["documents"] == seen[1] and folder.info()["preparing"]["total"] == 14
    assert not any(cache.root.iterdir())  # neither an entry nor a half-built folder
    cache.prepare(cfg, tokenizer)
    assert cache.last["hit"] is False


def test_stop_file_stops_a_worker_while_it_prepares(manager, tiny_model, corpus):
    from services.training import worker

    cfg = manager.prepare_config(base_config(tiny_model, corpus, mode="cpt", max_seq_length=32))
    folder = RunFolder(manager.workspace.runs / "stopped-early")
    folder.path.mkdir()
    folder.write_config(cfg)
    folder.stop_path.write_text("")
    assert worker.main([str(folder.path)]) == 0
    info = folder.info()
    assert info["status"] == "stopped" and "while preparing the data" in info["reason"], info
    assert info.get("preparing") is None and not folder.checkpoint_iterations()
    assert PreparedCache.of(manager.workspace).entries() == []


def preparing_run(manager, name: str = "prep") -> RunFolder:
    """A run folder whose worker (this very process, alive) is preparing its data."""
    import psutil

    folder = RunFolder(manager.workspace.runs / name)
    folder.path.mkdir()
    me = psutil.Process()
    folder.update(id=name, name=name, mode="cpt", created=time.time(), status="running", pid=me.pid,
                  pid_created=me.create_time(), iters=30,
                  preparing={"documents": 1234, "total": 4883, "tokens": 5_600_000, "eta_seconds": 83.0})
    return folder


class Console:
    """stdout for ``follow``: once the preparation line is printed, the run ends (as its worker would)."""

    def __init__(self, folder: RunFolder):
        self.folder, self.text = folder, ""

    def isatty(self) -> bool:
        return False

    def write(self, s: str) -> None:
        self.text += s
        if "preparing the data" in s:
            self.folder.update(status="stopped", reason="stopped while preparing the data", preparing=None)

    def flush(self) -> None:
        pass


def test_the_cli_prints_the_preparation_progress(manager):
    from app.cli import follow

    folder = preparing_run(manager)
    out = Console(folder)
    assert follow(manager, folder, out)["status"] == "stopped"
    assert "preparing the data: 1,234 / 4,883 documents · 5,600,000 tokens · ETA 0:01:23" in out.text


async def test_the_monitor_shows_the_preparation_progress(manager, workspace):
    from nicegui.testing import user_simulation
    from uihelpers import el, wait_for

    from app.composition import build_services
    from pages.shell import make_root

    services = build_services(workspace)
    folder = preparing_run(services.manager)
    try:
        async with user_simulation(make_root(services)) as user:
            await user.open(f"/monitor/{folder.id}")
            await wait_for(lambda: "preparing the data" in el(user, "progress-text").text)
            assert el(user, "progress-text").text.startswith("preparing the data: 1,234 / 4,883 documents")
            folder.update(preparing=None, iteration=3)
            await wait_for(lambda: el(user, "progress-text").text.startswith("iteration 3 / 30"))
    finally:
        services.model_imports.close()


def test_the_preflight_estimate_reads_the_prepared_data_when_it_is_cached(manager, tiny_model, cpt_corpus,
                                                                          chat_data, tokenizer):
    from services.training import preflight

    for data, mode in ((cpt_corpus, "cpt"), (chat_data, "ift")):
        cfg = manager.prepare_config(base_config(tiny_model, data, mode=mode, max_seq_length=64))
        assert preflight.cached_data_facts(cfg, tokenizer, manager.workspace) is None  # nothing cached yet
        prepared = PreparedCache.of(manager.workspace).prepare(cfg, tokenizer)
        facts = preflight.cached_data_facts(cfg, tokenizer, manager.workspace)
        assert facts["prepared"] and facts["samples"] == len(prepared.train)
        est = preflight.estimate(cfg, tokenizer, free_bytes=64e9, workspace=manager.workspace.root)
        assert est["data"]["prepared"] and est["steps_per_epoch"] == prepared.stats["steps_per_epoch"]
        assert est["seq"] <= 63 and est["fits"]


def test_the_parity_check_measures_the_cached_validation_data(tmp_path, tiny_model, cpt_corpus, tokenizer):
    from mlx_lm.utils import load

    from services.publishing.parity import ParityInputs, measure
    from services.training.prepared import TokenArrays

    cfg = resolve(base_config(tiny_model, cpt_corpus, mode="cpt", max_seq_length=32, valid_fraction=0.3))
    cache = PreparedCache(tmp_path / "cache")
    cache.prepare(cfg, tokenizer)
    cached = ParityInputs.of(cfg, {}, tokenizer, None, cache)
    assert cache.last["hit"] and isinstance(cached.valid, TokenArrays)
    plain = ParityInputs.of(cfg, {}, tokenizer, None)
    assert as_lists(cached.valid) == as_lists(plain.valid)
    model, _ = load(str(tiny_model))
    assert measure(model, tokenizer, cached)["loss"] == measure(model, tokenizer, plain)["loss"]


def test_a_validation_pass_reads_only_the_batches_it_evaluates(tmp_path, tiny_model, cpt_corpus, tokenizer):
    from mlx_lm.tuner.trainer import evaluate
    from mlx_lm.utils import load

    from services.training.batching import eval_batches, masked_loss
    from services.training.prepared import TokenArrays

    class Counted(TokenArrays):
        reads = 0

        def __getitem__(self, i):
            Counted.reads += 1
            return super().__getitem__(i)

    cfg = resolve(base_config(tiny_model, cpt_corpus, mode="cpt", max_seq_length=8, valid_fraction=0.5))
    valid = PreparedCache(tmp_path / "cache").prepare(cfg, tokenizer).valid
    counted = Counted(valid.tokens, valid.index, valid.mask)
    assert len(counted) > 100
    model, _ = load(str(tiny_model))
    for batches in (1, 3):
        Counted.reads = 0
        evaluate(model=model, dataset=counted, batch_size=2, num_batches=batches, max_seq_length=8, loss=masked_loss,
                 iterate_batches=eval_batches)
        assert Counted.reads == 2 * batches  # not the whole split, however large


def test_a_full_disk_leaves_the_data_uncached_but_prepared(tmp_path, tiny_model, corpus, tokenizer):
    with mounted_tmpfs(tmp_path / "disk", "1m") as disk:
        (disk / "cache").mkdir()
        with open(disk / "filler", "wb") as f:  # the disk says no
            with pytest.raises(OSError):
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
        cfg = resolve(base_config(tiny_model, corpus, mode="cpt", max_seq_length=32))
        cache = PreparedCache(disk / "cache")
        prepared = cache.prepare(cfg, tokenizer)
        assert "the workspace disk is full" in cache.last["note"]
        assert as_lists(prepared.train) == as_lists(data_mod.prepare(cfg, tokenizer).train)
        assert cache.entries() == [] and not any((disk / "cache").iterdir())


def test_the_folder_of_a_killed_build_is_swept_once_stale(tmp_path, tiny_model, corpus, tokenizer):
    cache = PreparedCache(tmp_path / "cache")
    killed, live = cache.root / ".abc.x1.tmp" / "data", cache.root / ".abc.x2.tmp" / "data"
    for folder in (killed, live):
        folder.mkdir(parents=True)
        (folder / "train.tokens").write_bytes(b"\0" * 64)
    old = time.time() - 2 * 86_400
    for p in (killed / "train.tokens", killed, killed.parent):
        os.utime(p, (old, old))
    cache.prepare(resolve(base_config(tiny_model, corpus, mode="cpt", max_seq_length=32)), tokenizer)
    assert not killed.parent.exists() and live.exists()  # a build still writing is left alone
    assert [e["key"] for e in cache.entries()] == [cache.last["key"]]


def test_the_sweep_skips_a_build_that_moves_under_it_and_removes_only_stale_ones(tmp_path):
    """Two runs starting on the same new data: one's sweep scans the other's build folder as it is published
    (renamed); a file gone mid-scan must not fail the run (a dangling link is such a file, deterministically)."""
    cache = PreparedCache(tmp_path / "prepared")
    live = cache.root / ".k1.abc.tmp" / "data"
    live.mkdir(parents=True)
    (live / "train.tokens").write_bytes(b"\0" * 8)
    os.symlink(live / "gone.index", live / "valid.index")  # stat() of it: FileNotFoundError, as mid-rename
    stale = cache.root / ".k2.def.tmp"
    stale.mkdir()
    (stale / "train.tokens").write_bytes(b"\0")
    old = time.time() - 3 * 86400
    os.utime(stale / "train.tokens", (old, old))
    os.utime(stale, (old, old))
    cache.sweep()
    assert live.exists() and not stale.exists()
