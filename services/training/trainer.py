"""The training loop, run inside a worker process, built from mlx-lm's parts.

For a plain mlx-lm config it reproduces ``mlx_lm.lora``'s loss stream report for report (same
seeding, same batch order, same validation schedule). Every checkpoint holds what an exact resume
needs: weights, optimizer state, numpy's global RNG, the current epoch's batch order, the MLX key
and the loop counters, so stopping at k and resuming ends bitwise equal to an uninterrupted run.
"""

from __future__ import annotations

import math
import shutil
import threading
import time
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import psutil
from mlx.utils import tree_flatten, tree_map, tree_map_with_path, tree_unflatten
from mlx_lm.tuner.datasets import CacheDataset, create_dataset
from mlx_lm.tuner.trainer import default_loss, evaluate, grad_checkpoint, iterate_batches
from mlx_lm.tuner.utils import build_schedule, linear_to_lora_layers
from mlx_lm.utils import load, maybe_set_recommended_wired_limit

from services.errors import ForgeError
from services.evaluation.during import checkpoint_evals
from services.notify import notify, run_event
from services.training import data as data_mod
from services.training import preference
from services.training.batching import BatchSampler, eval_batches, masked_loss
from services.training.distributed import Group
from services.training.folder import RunFolder, fsync_path, write_manifest
from services.training.packing import PackedSampler, check_model, packed_eval_batches, packed_loss
from services.training.preference_loss import Objective, PairSampler
from services.training.prepared import PreparationStopped, PreparedCache, Progress, cacheable
from services.workspace import read_json, write_atomic, write_json

OPTIMIZERS = {"adam": optim.Adam, "adamw": optim.AdamW, "muon": optim.Muon, "sgd": optim.SGD,
              "adafactor": optim.Adafactor}


class TrainingFailed(ForgeError, RuntimeError):
    """The run cannot go on; the message says why in words a person can act on."""


@dataclass
class Outcome:
    status: str  # completed | stopped | early-stopped | failed
    reason: str
    iteration: int


# ----------------------------------------------------------------------------------------- set-up


def load_datasets(cfg: dict[str, Any], tokenizer: Any, splits: tuple[str, ...] = data_mod.SPLITS,
                  cache: PreparedCache | None = None, progress: Progress | None = None
                  ) -> tuple[Any, Any, Any, dict[str, Any]]:
    """Train/valid/test datasets and their stats. Plain mlx-lm configs use mlx-lm's own datasets (which
    tokenize lazily); CPT and IFT come memory-mapped from the ``cache`` (built on a miss, ``progress`` hearing of
    it), and without one tokenize only ``splits``."""
    if cfg.get("mode") is None:
        folder = Path(cfg["data"])
        if not folder.is_dir():
            raise data_mod.DataError(f"{folder}: a plain mlx-lm config needs a folder with train.jsonl (field 'data')")
        files = data_mod.split_files(folder)
        if "train" not in files:
            raise data_mod.DataError(f"{folder}: no train.jsonl in the data folder (field 'data')")
        ns = types.SimpleNamespace(**cfg)
        sets = {}
        for split in ("train", "valid", "test"):
            if split in files:
                _, rows = data_mod.read_rows(files[split], cfg)
                sets[split] = CacheDataset(create_dataset([r for _, r in rows], tokenizer, ns))
            else:
                sets[split] = []
        data_mod.check_trainable(sets["train"], sets["valid"], cfg["batch_size"], str(folder), full_valid_batches=True)
        stats = {"format": data_mod.row_format(sets["train"]._data[0], cfg), "mode": "mlx-lm",
                 "train": {"sequences": len(sets["train"])}, "valid": {"sequences": len(sets["valid"])},
                 "steps_per_epoch": len(sets["train"]) // cfg["batch_size"],
                 "fingerprint": data_mod.fingerprint([folder])}
        return sets["train"], sets["valid"], sets["test"], stats
    if cache is not None and cacheable(cfg):
        prepared = cache.prepare(cfg, tokenizer, splits, progress)
    else:
        prepared = data_mod.prepare(cfg, tokenizer, splits)
    return prepared.train, prepared.valid, prepared.test, prepared.stats


def apply_fine_tune_type(model: nn.Module, cfg: dict[str, Any]) -> None:
    """Freeze the model and make the chosen part trainable, as ``mlx_lm.lora.train_model`` does."""
    model.freeze()
    if cfg["num_layers"] > len(model.layers):
        raise TrainingFailed(f"num_layers = {cfg['num_layers']}: the model has only {len(model.layers)} layers")
    if cfg["fine_tune_type"] == "full":
        if cfg.get("train_embeddings"):
            model.unfreeze()
        else:
            for layer in model.layers[-max(cfg["num_layers"], 0) :]:
                layer.unfreeze()
    else:
        linear_to_lora_layers(model, cfg["num_layers"], cfg["lora_parameters"],
                              use_dora=cfg["fine_tune_type"] == "dora")


def build_optimizer(cfg: dict[str, Any]) -> optim.Optimizer:
    lr = build_schedule(cfg["lr_schedule"]) if cfg.get("lr_schedule") else cfg["learning_rate"]
    name = cfg["optimizer"].lower()
    return OPTIMIZERS[name](learning_rate=lr, **cfg["optimizer_config"].get(name, {}))


def adapter_config(cfg: dict[str, Any], run_path: Path) -> dict[str, Any]:
    """What mlx-lm writes as ``adapter_config.json`` (all args), so its loaders accept the run folder."""
    out = dict(sorted(cfg.items()), adapter_path=str(run_path))
    if cfg["fine_tune_type"] == "full":
        out["lora_parameters"] = None
    return out


def _rss_gb() -> float:
    return psutil.Process().memory_info().rss / 1e9


# ----------------------------------------------------------------------------------------- the loop


class Trainer:
    """One run in one process. ``stop`` may be set from another thread or a signal handler."""

    def __init__(self, folder: RunFolder, stop: threading.Event | None = None):
        self.folder = folder
        self.stop = stop or threading.Event()
        self.cfg = folder.config()
        self._overhead: dict[str, list[float]] = {"val": [], "save": []}  # seconds of each, this session
        self._initial_val = False

    # -- checkpoints ------------------------------------------------------------------------------

    def _snapshot(self) -> dict[str, Any]:
        """RNG and data-order state at the end of an iteration (what a resume from there needs)."""
        return {"np": np.random.get_state(), "sampler": self.sampler.state(), "key": mx.random.state[0],
                "fill": [self.sampler.filled, self.sampler.cells]}  # the report window's padding account

    def save_checkpoint(self, it: int, val_loss: float | None, snap: dict[str, Any]) -> None:
        ranks = self.dist.gather_state(self.losses, self.n_tokens, self.grad_accum)
        if not self.dist.is_main:  # every rank holds the same weights and RNG; rank 0 writes them
            return
        self._phase("saving", it)
        tic = time.perf_counter()
        folder = self.folder
        final, tmp = folder.checkpoint_dir(it), folder.checkpoints / f".tmp-{it:07d}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        adapters = dict(tree_flatten(self.model.trainable_parameters()))
        mx.save_safetensors(str(tmp / "adapters.safetensors"), adapters)
        mx.save_safetensors(str(tmp / "optimizer.safetensors"), dict(tree_flatten(self.opt.state)))
        if self.grad_accum is not None:
            pending = ranks["grad_accum"] if ranks else self.grad_accum
            mx.save_safetensors(str(tmp / "grad_accum.safetensors"), dict(tree_flatten(pending)))
        if self.pref:
            self.pref.save(tmp)
        name, keys, pos, has_gauss, cached = snap["np"]
        perm = snap["sampler"]["perm"]
        np.savez(tmp / "rng.npz", np_keys=keys, np_meta=np.array([pos, has_gauss], np.int64),
                 np_cached=np.array([cached], np.float64), mx_key=np.array(snap["key"]),
                 perm=perm if perm is not None else np.zeros(0, np.int64),
                 losses=np.array(ranks["losses"] if ranks else self.losses, np.float32),
                 n_tokens=np.array(ranks["n_tokens"] if ranks else self.n_tokens))
        write_json(tmp / "state.json", {
            "iteration": it, "val_loss": val_loss, "train_loss": self.last_train_loss,
            "trained_tokens": self.trained_tokens, "steps": self.steps, "has_perm": perm is not None,
            "pos": snap["sampler"]["pos"], "np_name": name, "best_val": self.best_val, "bad_evals": self.bad_evals,
            "time": time.time(), "world_size": self.dist.size, "fill": snap["fill"],
        })
        write_manifest(tmp)  # the sizes and checksums resume verifies; fsyncs every file and the folder
        folder.remove_checkpoint(it)  # a checkpoint of this iteration from an earlier session
        tmp.rename(final)
        fsync_path(folder.checkpoints)  # the rename is the commit point
        # top-level copy for `mlx_lm.generate --adapter-path RUN`
        write_atomic(folder.path / "adapters.safetensors", (final / "adapters.safetensors").read_bytes())
        self._overhead["save"].append(time.perf_counter() - tic)
        self._record_checkpoint(it, val_loss)
        self.eval_stop = self.evals.at(it) if self.evals else None  # services.evaluation.during

    def _record_checkpoint(self, it: int, val_loss: float | None) -> None:
        folder = self.folder
        size = sum(f.stat().st_size for f in folder.checkpoint_dir(it).iterdir())
        entry = {"iteration": it, "val_loss": val_loss, "train_loss": self.last_train_loss,
                 "epoch": self._epoch(it), "trained_tokens": self.trained_tokens, "bytes": size, "time": time.time()}
        if self.pref and val_loss is not None:
            entry["val_accuracy"] = self.pref.last_val.get("val_preference_accuracy")
        with folder.lock():  # read-modify-write of run.json: an edit from the app waits, and is kept
            on_disk = set(folder.checkpoint_iterations())
            ckpts = [c for c in folder.info().get("checkpoints", []) if c["iteration"] != it]
            known = {c["iteration"] for c in ckpts}
            # a checkpoint renamed into place by a worker killed before it recorded it
            ckpts += [self._entry_from_disk(i) for i in sorted(on_disk - known - {it})]
            ckpts.append(entry)
            ckpts.sort(key=lambda c: c["iteration"])
            best = self._best(ckpts)  # rotation below never removes it
            keep = self.cfg.get("keep_checkpoints")
            if keep:
                kept = {c["iteration"] for c in ckpts[-keep:]} | ({best["iteration"]} if best else set())
                for c in ckpts:
                    if c["iteration"] not in kept:
                        folder.remove_checkpoint(c["iteration"])
                ckpts = [c for c in ckpts if c["iteration"] in kept]
            folder.update(checkpoints=ckpts, best=best, iteration=it)
        folder.append_metric({"type": "checkpoint", "step": it, "iteration": it, "val_loss": val_loss,
                              "best": bool(best and best["iteration"] == it)})
        folder.log(f"checkpoint {it}" + (f" val {val_loss:.4f}" if val_loss is not None else ""))
        ws = folder.workspace()
        if best and best["iteration"] == it and val_loss is not None and ws is not None:
            notify(ws, run_event("best", folder.info()))

    def _best(self, ckpts: list[dict[str, Any]]) -> dict[str, Any] | None:
        """The best checkpoint by the run's ``best_by``: the eval table's best (``eval:SUITE``), else the lowest
        validation loss, or (``preference.best: accuracy``) the highest accuracy."""
        if self.evals is not None and self.evals.plan.best_by:
            return self.evals.best(ckpts)
        scored = [c for c in ckpts if c["val_loss"] is not None]
        if not scored:
            return None
        if self.pref and self.pref.pref["best"] == "accuracy":
            return max(scored, key=lambda c: (c.get("val_accuracy") or 0.0, -c["val_loss"], -c["iteration"]))
        return min(scored, key=lambda c: (c["val_loss"], c["iteration"]))

    def _entry_from_disk(self, it: int) -> dict[str, Any]:
        path = self.folder.checkpoint_dir(it)
        st = read_json(path / "state.json", {}) or {}
        return {"iteration": it, "val_loss": st.get("val_loss"), "train_loss": st.get("train_loss"),
                "epoch": self._epoch(it), "trained_tokens": st.get("trained_tokens"),
                "bytes": sum(f.stat().st_size for f in path.iterdir()), "time": st.get("time")}

    def restore(self, ckpt: Path, exact: bool = True) -> int:
        """Load a checkpoint's state (``exact``: RNG and data order too); return its iteration."""
        self.model.load_weights(str(ckpt / "adapters.safetensors"), strict=False)
        self.opt.state = tree_unflatten(list(mx.load(str(ckpt / "optimizer.safetensors")).items()))
        if (ckpt / "grad_accum.safetensors").exists():
            flat = mx.load(str(ckpt / "grad_accum.safetensors"))  # onto the full tree: flattening drops empty nodes
            if self._saved_ranks(ckpt) > 1:
                flat = self.dist.own(flat)
            self.grad_accum = tree_map_with_path(lambda p, x: flat.get(p, x), self.model.trainable_parameters())
        st = read_json(ckpt / "state.json")
        self.steps, self.trained_tokens = st["steps"], st["trained_tokens"]
        self.last_train_loss, self.best_val, self.bad_evals = st["train_loss"], st["best_val"], st["bad_evals"]
        rng = np.load(ckpt / "rng.npz")
        self.losses = mx.array(rng["losses"])
        self.n_tokens = mx.array(rng["n_tokens"])
        self.sampler.filled, self.sampler.cells = st.get("fill") or (0, 0)
        if self._saved_ranks(ckpt) > 1:  # each rank's own window so far
            self.losses, self.n_tokens = self.dist.own(self.losses), self.dist.own(self.n_tokens)
        if self.pref:
            self.pref.restore(ckpt)
        if not exact:  # a fork onto other data: same weights and optimizer, fresh data order
            return st["iteration"]
        pos, has_gauss = (int(x) for x in rng["np_meta"])
        np.random.set_state((st["np_name"], rng["np_keys"], pos, has_gauss, float(rng["np_cached"][0])))
        k0, k1 = (int(x) for x in rng["mx_key"])
        mx.random.seed((k0 << 32) | k1)
        self.sampler.restore({"perm": rng["perm"] if st["has_perm"] else None, "pos": st["pos"]})
        return st["iteration"]

    def _saved_ranks(self, ckpt: Path) -> int:
        """How many ranks wrote their accumulators into ``ckpt`` (1: plain ones)."""
        ranks = (read_json(ckpt / "state.json") or {}).get("world_size") or 1
        if ranks > 1 and ranks != self.dist.size:
            raise TrainingFailed(f"checkpoint {ckpt.name} was written by {ranks} processes; resume it with "
                                 f"distributed: {{processes: {ranks}}}")
        return ranks

    # -- evaluation and early stopping ------------------------------------------------------------

    def evaluate(self) -> float:
        if self.pref:  # preference runs train in one process (config refuses them with distributed)
            val = self.pref.evaluate()
            self.model.train()
            return val
        loss = self.dist.eval_loss(self.loss)
        val = evaluate(model=self.model, dataset=self.valid, batch_size=self.cfg["batch_size"],
                       num_batches=self.cfg["val_batches"], max_seq_length=self.cfg["max_seq_length"],
                       loss=loss, iterate_batches=self.eval_iter)
        self.model.train()
        return val

    def evaluate_quietly(self) -> float:
        """Validation that leaves numpy's RNG untouched, so it does not change the run it observes."""
        state = np.random.get_state()
        try:
            return self.evaluate()
        finally:
            np.random.set_state(state)

    def _report_val(self, step: int, iteration: int, val: float, seconds: float) -> str | None:
        """Record a validation; return an early-stop reason, if any."""
        self.val_at = (iteration, val)
        self._overhead["val"].append(seconds)
        self.folder.append_metric({"type": "val", "step": step, "iteration": iteration,
                                   "epoch": self._epoch(iteration), "val_loss": val,
                                   "val_perplexity": _ppl(val), "val_time": seconds,
                                   **(self.pref.last_val if self.pref else {})})
        if not math.isfinite(val):
            if iteration == 0:
                raise TrainingFailed(f"validation loss of the untrained model is {val}: the base model's weights "
                                     "are broken, or its dtype overflows (try a float32 copy of the model)")
            raise TrainingFailed(f"validation loss became {val} at iteration {iteration}; "
                                 f"lower the learning rate (now {self.cfg['learning_rate']})")
        es = self.cfg.get("early_stopping")
        if not es or es.get("by"):  # early_stopping.by: eval:SUITE stops on a suite score instead
            return None
        min_delta = es.get("min_delta") or 0.0
        if self.best_val is None or val < self.best_val - min_delta:
            self.best_val, self.bad_evals = val, 0
            return None
        self.bad_evals += 1
        threshold = es.get("overfit_threshold")
        if threshold is not None and val > self.best_val * (1 + threshold):
            return (f"overfitting: validation loss {val:.4f} is more than {threshold:.0%} above the best "
                    f"{self.best_val:.4f}")
        if self.bad_evals >= es.get("patience", 3):
            return (f"no improvement of validation loss beyond {min_delta} for {self.bad_evals} evaluations "
                    f"(best {self.best_val:.4f})")
        return None

    def _epoch(self, iteration: int) -> float:
        return round(iteration / max(self.steps_per_epoch, 1), 4)

    def _log_cache(self, last: dict[str, Any]) -> None:
        if last.get("problem"):
            self.folder.log(f"prepared data {last['key']} was damaged ({last['problem']}): prepared again")
        if last.get("note"):
            self.folder.log(f"prepared data {last['key']}: {last['note']}; prepared in memory")
            self.folder.update(preparing=None)
            return
        self.folder.log(f"prepared data {last['key']}: {'cache hit' if last.get('hit') else 'prepared'} in "
                        f"{last.get('seconds', 0):.1f} s")
        self.folder.update(preparing=None, prepared={"key": last["key"], "hit": bool(last.get("hit")),
                                                     "seconds": round(last.get("seconds", 0), 2)})

    # -- main -------------------------------------------------------------------------------------

    def setup(self, resume: Path | None = None) -> int:
        """Load model and data, build the optimizer, and restore ``resume`` if given; return the first iteration."""
        cfg = self.cfg
        np.random.seed(cfg["seed"])
        tic = time.perf_counter()
        self.model, self.tokenizer = load(cfg["model"])
        maybe_set_recommended_wired_limit()
        self.setup_seconds = {"model": round(time.perf_counter() - tic, 3)}
        tic = time.perf_counter()
        ws = self.folder.workspace()
        cache = PreparedCache.of(ws) if ws is not None else None
        self.train, self.valid, self.test, self.stats = load_datasets(cfg, self.tokenizer, cache=cache,
                                                                      progress=PrepProgress(self.folder, self.stop))
        self.setup_seconds["data"] = round(time.perf_counter() - tic, 3)
        if cache is not None and cache.last:
            self._log_cache(cache.last)
        packed = self._packed_sampler()
        self.steps_per_epoch = self.stats["steps_per_epoch"]
        self.iters = (math.ceil(cfg["epochs"] * self.steps_per_epoch) if cfg.get("epochs") else cfg["iters"])
        write_json(self.folder.stats_path, self.stats)
        for split in ("train", "valid"):
            n = (self.stats.get(split) or {}).get("left_out")
            if n and preference.is_preference(cfg):
                self.folder.log(f"{n} {split} pair(s) left out: " + "; ".join(self.stats[split]["left_out_examples"]))
            elif n:
                self.folder.log(f"{n} {split} sample(s) left out: no trained token within max_seq_length="
                                f"{cfg['max_seq_length']} (e.g. {', '.join(self.stats[split]['left_out_examples'])})")
        mx.random.seed(cfg["seed"])
        apply_fine_tune_type(self.model, cfg)
        write_json(self.folder.path / "adapter_config.json", adapter_config(cfg, self.folder.path))
        self.opt = build_optimizer(cfg)
        self.dist = Group.for_config(cfg)
        self.pref = (Objective(cfg, self.model, self.train, self.valid, self.folder.path)
                     if preference.is_preference(cfg) else None)
        self.compat = cfg.get("mode") is None or bool(self.pref and self.pref.compat)
        self.loss = (self.pref.loss if self.pref else default_loss if self.compat
                     else packed_loss if packed else masked_loss)
        self.eval_iter = iterate_batches if self.compat else packed_eval_batches if packed else eval_batches
        self.sampler = (PairSampler(self.pref, cfg["batch_size"], cfg["max_seq_length"], self.pref.compat)
                        if self.pref else packed or BatchSampler(self.train, cfg["batch_size"], cfg["max_seq_length"],
                                                                 **self.dist.sampler_options()))
        self.losses, self.n_tokens, self.steps, self.trained_tokens = 0, 0, 0, 0
        self.grad_accum = None
        self.last_train_loss, self.best_val, self.bad_evals = None, None, 0
        self.val_at: tuple[int, float] | None = None
        start = 1
        if resume is not None:
            parent = self.folder.info().get("parent") or {}
            start = self.restore(resume, exact=parent.get("same_data_order", True)) + 1
        self.evals, self.eval_stop = checkpoint_evals(self.folder, cfg, self.model, self.tokenizer), None
        if self.pref:
            self.pref.prepare_reference(resume, self.folder.path)
            write_json(self.folder.stats_path, {**self.stats, "reference": self.pref.reference})
        trainable = sum(v.size for _, v in tree_flatten(self.model.trainable_parameters()))
        total = sum(v.size for _, v in tree_flatten(self.model.parameters()))
        self.folder.update(iters=self.iters, steps_per_epoch=self.steps_per_epoch,
                           dataset_fingerprint=self.stats.get("fingerprint"), setup_seconds=self.setup_seconds,
                           parameters={"trainable": int(trainable), "total": int(total)})
        return start

    def _packed_sampler(self) -> PackedSampler | None:
        """With ``pack_samples``: the sampler of packed rows, once the model is seen to keep packed samples apart;
        the data's stats then count rows (``steps_per_epoch``) and hold the packing's figures."""
        cfg = self.cfg
        if not cfg.get("pack_samples"):
            return None
        sampler = PackedSampler(self.train, cfg["batch_size"], cfg["max_seq_length"])
        try:
            drift = check_model(self.model, self.train, cfg["max_seq_length"])
        except ValueError as e:
            raise TrainingFailed(str(e)) from None
        self.stats["steps_per_epoch"] = len(sampler)
        self.stats["train"]["packing"] = {**sampler.stats(), "loss_drift": drift}
        return sampler

    def run(self, start: int) -> Outcome:
        cfg, model, opt = self.cfg, self.model, self.opt
        if cfg["grad_checkpoint"]:
            grad_checkpoint(model.layers[0])
        loss_value_and_grad = (self.pref.value_and_grad(model) if self.pref
                               else nn.value_and_grad(model, self.dist.train_loss(self.loss)))
        accum_steps = cfg["grad_accumulation_steps"]
        state = [model.state, opt.state, mx.random.state]

        def step(batch, prev_grad, do_update):
            (lvalue, toks, *extra), grad = loss_value_and_grad(model, *batch)  # extra: a preference run's sums
            if prev_grad is not None:
                grad = tree_map(lambda x, y: x + y, grad, prev_grad)
            if do_update:
                grad = self.dist.reduce_grads(grad)
                if accum_steps > 1:
                    grad = tree_map(lambda x: x / accum_steps, grad)
                opt.update(model, grad)
                grad = None
            return lvalue, toks, extra, grad

        if not (self.pref and self.pref.two_pass):  # the two-pass step evaluates between its passes
            step = mx.compile(step, inputs=state, outputs=state)
        iters, has_val = self.iters, len(self.valid) > 0
        eval_every, report_every, save_every = cfg["steps_per_eval"], cfg["steps_per_report"], cfg["save_every"]
        model.train()
        self._overhead = {"val": [], "save": []}
        self._initial_val = not self.compat and has_val and start == 1  # before the clock of the step rate starts
        if self._initial_val:  # ForgeLLM runs validate the initial weights
            self._phase("validating", 0)
            tic = time.perf_counter()
            self._report_val(0, 0, self.evaluate(), time.perf_counter() - tic)
        if self.evals and start == 1:
            self.evals.at(0)  # the untrained adapter is the base model
        snap = self._snapshot()
        self.folder.update(loop_started=time.time())  # the time to the first step, for the Monitor and benches
        saved_at, train_time, wall0 = start - 1, 0.0, time.perf_counter()
        for it in range(start, iters + 1):
            batch = self.sampler.next()
            tic = time.perf_counter()
            if self.compat and has_val and (it == 1 or it % eval_every == 0 or it == iters):
                self._phase("validating", it)
                val = self.evaluate()
                reason = self._report_val(it, it - 1, val, time.perf_counter() - tic)
                if reason:  # weights are those of iteration it - 1, state is its snapshot
                    if saved_at != it - 1:
                        self.save_checkpoint(it - 1, val, snap)
                    return Outcome("early-stopped", reason, it - 1)
                tic = time.perf_counter()
            lvalue, toks, extra, self.grad_accum = step(batch, self.grad_accum, it % accum_steps == 0)
            self.losses += lvalue
            self.n_tokens += toks
            self.steps += 1
            if self.pref:
                self.pref.accumulate(extra[0])
            mx.eval(state, self.losses, self.n_tokens, self.grad_accum, self.pref.sums if self.pref else None)
            train_time += time.perf_counter() - tic
            if not math.isfinite(lvalue.item()):
                last = saved_at if saved_at >= 1 else None
                cure = (f"no token of batch {it} is trained: its prompts are longer than max_seq_length="
                        f"{cfg['max_seq_length']}; raise it" if toks.item() == 0 else
                        f"Lower the learning rate (now {cfg['learning_rate']}) or raise grad_accumulation_steps.")
                raise TrainingFailed(f"training loss became {lvalue.item()} at iteration {it}; "
                                     + (f"last good checkpoint is {last}. " if last else "") + cure)
            if it % report_every == 0 or it == iters:
                self._report_train(it, train_time, wall0, start)
                train_time = 0.0
            reason = None
            if not self.compat and has_val and (it % eval_every == 0 or it == iters):
                self._phase("validating", it)
                tic = time.perf_counter()
                reason = self._report_val(it, it, self.evaluate(), time.perf_counter() - tic)
            snap = self._snapshot()
            stop_now = self.dist.agree(self.stop.is_set())
            if it % save_every == 0 or it == iters or reason or stop_now:
                self.save_checkpoint(it, self._val_for(it), snap)
                saved_at = it
                reason = reason or self.eval_stop
            if reason:
                return Outcome("early-stopped", reason, it)
            if stop_now:
                return Outcome("stopped", f"stopped at iteration {it} of {iters}", it)
        self._test()
        return Outcome("completed", f"{iters} iterations", iters)

    def _val_for(self, it: int) -> float | None:
        if not len(self.valid):
            return None
        if self.val_at and self.val_at[0] == it:
            return self.val_at[1]
        self._phase("validating", it)
        val = self.evaluate_quietly()
        self.val_at = (it, val)
        return val

    def _report_train(self, it: int, train_time: float, wall0: float, start: int) -> None:
        local_tokens = int(self.n_tokens.item())
        train_loss, n_tokens = self.dist.train_report(self.losses, self.n_tokens, self.steps)
        self.trained_tokens += n_tokens
        self.last_train_loss = train_loss
        elapsed = time.perf_counter() - wall0
        done = it - start + 1
        self.folder.append_metric({
            "type": "train", "step": it, "iteration": it, "epoch": self._epoch(it), "train_loss": train_loss,
            "perplexity": _ppl(train_loss), "learning_rate": self.opt.learning_rate.item(),
            "iterations_per_second": self.steps / train_time if train_time else None,
            "tokens_per_second": n_tokens / train_time if train_time else None,
            "padding_share": self.sampler.padding_share(),
            "trained_tokens": self.trained_tokens, "peak_memory_gb": mx.get_peak_memory() / 1e9,
            "rss_gb": _rss_gb(), "eta_seconds": self._eta(it, elapsed, done),
            **self.dist.per_rank(local_tokens / train_time if train_time else None, mx.get_peak_memory() / 1e9,
                                 _rss_gb()),
            **(self.pref.train_report() if self.pref else {}),
        })
        self.losses, self.n_tokens, self.steps = 0, 0, 0

    def _phase(self, phase: str, it: int) -> None:
        """Say what the worker does between training reports (``validating``, ``saving``), for the Monitor."""
        if self.dist.is_main:
            self.folder.append_metric({"type": "phase", "step": it, "iteration": it, "phase": phase})

    def _eta(self, it: int, elapsed: float, done: int) -> float:
        """Seconds left: the remaining steps at this session's step rate (validations and saves taken out),
        plus the remaining validations and checkpoints at their measured mean length."""
        cfg, overhead = self.cfg, self._overhead
        spent = sum(overhead["val"][1 if self._initial_val else 0:]) + sum(overhead["save"])
        per_step = max(elapsed - spent, 0.0) / done

        def ahead(every: int) -> int:  # points still to come in (it, iters]: every `every` and the last one
            every = max(int(every or 1), 1)
            return self.iters // every - it // every + (self.iters % every != 0)

        vals, saves = overhead["val"], overhead["save"]
        left = per_step * (self.iters - it)
        if vals and len(self.valid):
            left += ahead(cfg["steps_per_eval"]) * sum(vals) / len(vals)
        if saves:
            left += ahead(cfg["save_every"]) * sum(saves) / len(saves)
        return left

    def _test(self) -> None:
        if self.pref or not (self.cfg.get("test") and len(self.test)):
            return
        state = np.random.get_state()
        loss = evaluate(model=self.model, dataset=self.test, batch_size=self.cfg["batch_size"],
                        num_batches=self.cfg["test_batches"], max_seq_length=self.cfg["max_seq_length"],
                        loss=self.dist.eval_loss(self.loss), iterate_batches=self.eval_iter)
        np.random.set_state(state)
        self.folder.append_metric({"type": "test", "step": self.iters, "iteration": self.iters, "test_loss": loss,
                                   "test_perplexity": _ppl(loss)})


class PrepProgress:
    """Data preparation's progress into ``run.json`` (``preparing``: documents, tokens, ETA) at most once a
    second; ``stop`` set (or the run's stop file, looked at as often) ends the preparation with
    :class:`PreparationStopped`."""

    def __init__(self, folder: RunFolder, stop: threading.Event, every: float = 1.0):
        self.folder, self.stop, self.every = folder, stop, every
        self.t0 = time.monotonic()
        self.last: float | None = None

    def __call__(self, documents: int, total: int, tokens: int) -> None:
        now = time.monotonic()
        due = self.last is None or now - self.last >= self.every or documents >= total
        if self.stop.is_set() or (due and self.folder.stop_path.exists()):
            raise PreparationStopped(f"stopped while preparing the data ({documents} of {total} documents)")
        if not due:
            return
        self.last = now
        rate = documents / (now - self.t0) if now > self.t0 else 0.0
        self.folder.update(preparing={"documents": documents, "total": total, "tokens": tokens,
                                      "eta_seconds": (total - documents) / rate if rate else None})


def _ppl(loss: float) -> float | None:
    try:
        return math.exp(loss)
    except OverflowError:
        return None
