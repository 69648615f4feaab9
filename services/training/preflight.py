"""Preflight for a training config: estimated peak memory and time before starting, and an optional probe
that runs a few real steps and measures them.

The estimate needs no MLX: parameter shapes come from the safetensors headers, the dataset's token lengths
from :mod:`services.library.checks`. Peak MLX memory is modelled as

    weights + trainable × (1 + 1 + optimizer states) × bytes
    + B × T × hidden × layers_with_grad × ACT_PER_HIDDEN × act bytes     (activations kept for backward)
    + B × heads × T² × layers_with_grad × 4                               (attention probabilities)
    + B × T × vocab × 4 × LOGIT_COPIES                                    (logits, log-softmax, their gradient)

with ``T`` the widest batch (``max_seq_length`` − 1 at most) and the constants calibrated on the tiny and the
20M-parameter model (``bench/preflight_memory.py``). A DPO/ORPO sample is two sequences: the two-pass step holds
one side's activations at a time (``B`` rows), the joint pass both (``2B``); the reference pass is a forward pass
without gradient (below the peak) that adds time, once per step (adapters off) or once before training
(precomputed). The probe is a three-iteration run through
:class:`~services.training.manager.RunManager` in a throw-away workspace; it reports real tokens/s, MLX peak and RSS.
"""

from __future__ import annotations

import math
import re
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from services.errors import ForgeError
from services.library.models import tensor_shapes, text_config, weight_files
from services.training import preference
from services.training.folder import ACTIVE
from services.workspace import Workspace, disk_free, files_stamp, read_json

GB = 1e9
ACT_PER_HIDDEN = 24.0  # fp32 copies of a hidden vector kept per token and layer (calibrated: 20 tiny, 26 20M)
ACT_CHECKPOINTED = 2.0  # with gradient checkpointing: the layer inputs, plus one layer's full set
LOGIT_COPIES = 3.0
ATTENTION_COPIES = 1.4  # calibrated: about 1 on the 20M model, 1.8 on the tiny one
RUNTIME_GB = 0.4  # Python, MLX, BLAS and tokenizer code and heap outside MLX's allocator (RSS − MLX peak)
OPTIMIZER_STATES = {"adam": 2, "adamw": 2, "muon": 1, "sgd": 0, "adafactor": 1}
EXP_PER_SECOND = 53e6  # CPU backend: transcendental ops dominate (softmax, cross-entropy), §4 of the MLX notes
FLOPS = {"mkl": 100e9, "accelerate": 200e9, "openblas": 40e9, "reference": 4.6e9}
PROBE_ITERS = 3
PROBE_SECONDS = 60.0  # the probe's wall-clock bound, stop included
PROBE_SEQ = 512  # the probe's max_seq_length unless asked for the full length
STARTUP_SECONDS = 10.0  # the worker's imports and data preparation before the first step
LOAD_BYTES_PER_SECOND = 200e6
CHECKPOINT_OVERHEAD = 20_000  # rng.npz (NumPy's and MLX's state), state.json, manifest.json
_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8}
_LAYER_RE = re.compile(r"^(?:model\.|language_model\.model\.)?layers\.(\d+)\.(.+)\.weight$")


class PreflightError(ForgeError, ValueError):
    """The estimate or probe cannot be made; the message says why."""


# ----------------------------------------------------------------------------------------- model facts


def model_facts(model: str | Path, cfg: dict[str, Any]) -> dict[str, Any]:
    """Shapes that drive memory: parameters, trainable parameters for the config, dims, dtype bytes."""
    folder = Path(model)
    mcfg = read_json(folder / "config.json") if (folder / "config.json").is_file() else None
    if not isinstance(mcfg, dict):
        raise PreflightError(f"{folder}: no config.json, not a model folder")
    if not weight_files(folder):
        raise PreflightError(f"{folder}: no .safetensors weights")
    tc = text_config(mcfg)
    shapes = tensor_shapes(folder, mcfg.get("quantization"))
    n_layers = int(tc.get("num_hidden_layers") or 1 + max(
        (int(m.group(1)) for m in map(_LAYER_RE.match, shapes) if m), default=0))
    nl = cfg.get("num_layers", 16)
    trained_layers = n_layers if nl is None or nl < 0 else min(int(nl), n_layers)
    first = n_layers - trained_layers
    floats = [d for _, d in shapes.values() if d in _BYTES]
    act_bytes = _BYTES.get(max(set(floats), key=floats.count), 4) if floats else 4
    total = sum(math.prod(s) for s, _ in shapes.values())
    fine = cfg.get("fine_tune_type", "lora")
    rank = int((cfg.get("lora_parameters") or {}).get("rank") or 8)
    keys = (cfg.get("lora_parameters") or {}).get("keys")
    trainable, train_dtype_bytes = 0, 4
    for name, (shape, dtype) in shapes.items():
        m = _LAYER_RE.match(name)
        if fine == "full":
            if m and int(m.group(1)) >= first:
                trainable += math.prod(shape)
                train_dtype_bytes = _BYTES.get(dtype, act_bytes)
            continue
        if not m or int(m.group(1)) < first or len(shape) != 2:
            continue
        if keys and m.group(2) not in keys:
            continue
        out_f, in_f = shape
        trainable += rank * (in_f + out_f) + (out_f if fine == "dora" else 0)
    if fine == "full" and cfg.get("train_embeddings"):
        trainable = total
    return {"params": total, "trainable": trainable, "layers": n_layers, "trained_layers": trained_layers,
            "hidden": int(tc.get("hidden_size") or 0), "heads": int(tc.get("num_attention_heads") or 1),
            "vocab": int(tc.get("vocab_size") or 0),
            "weights_bytes": sum(f.stat().st_size for f in weight_files(folder)),
            "act_bytes": act_bytes, "train_bytes": train_dtype_bytes if fine == "full" else 4,
            "intermediate": int(tc.get("intermediate_size") or 4 * (tc.get("hidden_size") or 0))}


def peak_bytes(facts: dict[str, Any], batch: int, seq: int, optimizer: str = "adam", grad_checkpoint: bool = False,
               grad_accumulation: int = 1) -> dict[str, float]:
    """The memory model (bytes per part and ``peak``) for a batch of ``batch`` sequences of ``seq`` inputs."""
    tb = facts["train_bytes"]
    states = OPTIMIZER_STATES.get(str(optimizer).lower(), 2)
    lora = facts["trainable"] < facts["params"] and tb == 4
    weights = facts["weights_bytes"]
    trainable_w = facts["trainable"] * tb if lora else 0  # full fine-tuning trains the weights in place
    grads = facts["trainable"] * tb * (2 if grad_accumulation > 1 else 1)
    optim = facts["trainable"] * tb * states
    layers = min(facts["trained_layers"] + 1, facts["layers"])  # the layer below the first trained one runs too
    tokens, vector = batch * seq, facts["hidden"] * facts["act_bytes"]
    if grad_checkpoint:  # layer inputs are kept; one layer's full set is rebuilt at a time in the backward pass
        activations = tokens * vector * (ACT_CHECKPOINTED * layers + ACT_PER_HIDDEN)
    else:
        activations = tokens * vector * ACT_PER_HIDDEN * layers
    attention = batch * facts["heads"] * seq * seq * 4 * ATTENTION_COPIES * (1 if grad_checkpoint else layers)
    logits = tokens * facts["vocab"] * 4 * LOGIT_COPIES
    parts = {"weights": weights + trainable_w, "gradients": grads, "optimizer": optim, "activations": activations,
             "attention": attention, "logits": logits}
    parts["peak"] = sum(parts.values())
    return parts


def tokens_per_second(facts: dict[str, Any], seq: int, blas: str) -> float:
    """Rough CPU throughput before any measurement: exp-type work (softmax, loss) plus matmul FLOPs."""
    exp_elems = 3 * (facts["vocab"] + facts["heads"] * seq * facts["layers"])
    flops = 4 * facts["params"] + 2 * facts["trainable"] + 6 * facts["hidden"] * facts["vocab"]
    seconds = exp_elems / EXP_PER_SECOND + flops / FLOPS.get(blas, FLOPS["reference"])
    return 1.0 / seconds


# ----------------------------------------------------------------------------------------- data facts


DATA_KEYS = ("model", "max_seq_length", "mode", "packing", "valid_fraction", "mask_all_turns", "mask_prompt")
_facts_cache: dict[tuple, dict[str, Any]] = {}
_facts_lock = threading.Lock()
FACTS_CACHED = 16


def data_facts(cfg: dict[str, Any], tokenizer: Any | None = None) -> dict[str, Any]:
    """Training samples, their token lengths and the widest batch, from the dataset and the model's tokenizer.

    Counting tokens reads the whole dataset, so the facts are kept (per dataset and model files and the config
    keys they depend on): estimating again after changing the batch size or the learning rate is instant."""
    data = Path(cfg["data"])
    key = (files_stamp(data, Path(cfg["model"])), *(str(cfg.get(k)) for k in DATA_KEYS))
    with _facts_lock:
        if key in _facts_cache:
            return dict(_facts_cache[key])
    facts = _count_data(cfg, tokenizer)
    with _facts_lock:
        while len(_facts_cache) >= FACTS_CACHED:
            _facts_cache.pop(next(iter(_facts_cache)))
        _facts_cache[key] = facts
    return dict(facts)


def _count_data(cfg: dict[str, Any], tokenizer: Any | None = None) -> dict[str, Any]:
    from services.library.checks import DatasetCheck, check_dataset, load_tokenizer, token_stats  # noqa: PLC0415

    data = Path(cfg["data"])
    check = check_dataset(data, cfg)
    tok = tokenizer or load_tokenizer(str(cfg["model"]))
    seq_cap = int(cfg["max_seq_length"])
    train = DatasetCheck(check.path, check.layout, check.fmt, [f for f in check.files if f.name == "train"],
                         check.tools) if check.layout == "splits" else check
    st = token_stats(train, tok, seq_cap, {k: cfg.get(k) for k in ("mask_all_turns", "mask_prompt")
                                            if cfg.get(k) is not None})
    vf = float(cfg.get("valid_fraction") or 0.0)
    held_out = 0.0 if check.layout == "splits" else vf
    if cfg.get("mode") == "cpt":  # documents, or text rows read as documents: packed into windows
        windows = st.get("windows") or math.ceil((st["tokens"] + st["samples"]) / max(seq_cap - 1, 1))
        samples = windows if cfg.get("packing", True) else st["samples"]
        width = seq_cap if cfg.get("packing", True) else min(st["max"] + 2, seq_cap)
        mean = min(st["mean"] + 2, seq_cap) if not cfg.get("packing", True) else seq_cap
    else:
        samples = st["samples"] - st.get("untrainable", 0)  # a run leaves out those with nothing to train
        width, mean = min(1 + 32 * math.ceil(st["max"] / 32), seq_cap), min(st["mean"], seq_cap)
    if "pairs" in st and st["pairs"]["pairs"]:  # a pair: both sides' tokens per sample
        mean = st["pairs"]["tokens"] / st["pairs"]["pairs"]
    n_valid = min(max(1, round(samples * held_out)), samples - 1) if held_out and samples > 1 else 0
    if check.layout == "splits":
        n_valid = sum(f.good for f in check.files if f.name == "valid")
        if cfg.get("mode") == "cpt" and cfg.get("packing", True) and st["samples"]:  # windows, as for train
            n_valid = math.ceil(n_valid * samples / st["samples"])
    return {"samples": samples - (n_valid if check.layout != "splits" else 0), "valid_samples": n_valid,
            "tokens": st["tokens"], "mean_length": mean, "max_length": st["max"], "p95_length": st["p95"],
            "seq": max(width - 1, 1), "bad_lines": len(check.bad), "truncated": st["truncated_samples"],
            "format": check.label, "fmt": check.fmt, "pairs": st.get("pairs")}


def cached_data_facts(cfg: dict[str, Any], tokenizer: Any | None, ws: Workspace) -> dict[str, Any] | None:
    """:func:`data_facts` read off the run's prepared data when the workspace's cache has it (exact, and no
    tokenizing); None when it has not."""
    import numpy as np  # noqa: PLC0415

    from services.library.checks import load_tokenizer  # noqa: PLC0415
    from services.training.batching import padded_width  # noqa: PLC0415 (MLX only when the cache has it)
    from services.training.prepared import PreparedCache, cacheable  # noqa: PLC0415

    if not cacheable(cfg):
        return None
    prepared = PreparedCache.of(ws).lookup(cfg, tokenizer or load_tokenizer(str(cfg["model"])))
    if prepared is None or not len(prepared.train):
        return None
    seq_cap = int(cfg["max_seq_length"])
    lengths = np.asarray(prepared.train.lengths)
    st = prepared.stats
    return {"samples": len(lengths), "tokens": st["train"]["tokens"] + st["valid"]["tokens"],
            "mean_length": float(np.minimum(lengths, seq_cap).mean()), "max_length": int(lengths.max()),
            "seq": max(padded_width([int(lengths.max())], seq_cap) - 1, 1), "bad_lines": 0,
            "truncated": st["train"].get("truncated_samples", 0), "format": st["format"], "pairs": None,
            "prepared": True}


# ----------------------------------------------------------------------------------------- the estimate


def rows_per_batch(cfg: dict[str, Any], batch: int) -> int:
    """Sequences whose activations a step holds at once: ``2 × batch`` for a DPO/ORPO joint pass (both sides),
    else ``batch`` (the two-pass step holds one side at a time)."""
    return 2 * batch if preference.is_preference(cfg) and not preference.two_pass(cfg) else batch


def preference_facts(cfg: dict[str, Any]) -> dict[str, Any] | None:
    """What a DPO/ORPO step does beyond an SFT step: two sequences per sample, its step kind, its reference and
    the forward passes without gradient per pair (the value pass of the two-pass step, the reference pass)."""
    if not preference.is_preference(cfg):
        return None
    ref = preference.reference_kind(cfg)
    two = preference.two_pass(cfg)
    return {"sequences_per_sample": 2, "step": "two-pass" if two else "joint", "reference": ref,
            "extra_forwards": 2 * two + 2 * (ref == "adapters-off"), "reference_once": ref == "precomputed"}


def fits_in(facts: dict, batch: int, seq: int, cfg: dict, free: float) -> tuple[bool, float]:
    """Whether a step of ``batch`` × ``seq`` fits ``free`` bytes with the runtime, and its MLX peak in bytes."""
    p = peak_bytes(facts, rows_per_batch(cfg, batch), seq, cfg.get("optimizer", "adam"),
                   bool(cfg.get("grad_checkpoint")), int(cfg.get("grad_accumulation_steps") or 1))["peak"]
    return p + RUNTIME_GB * GB <= free, p


def suggest(facts: dict[str, Any], cfg: dict[str, Any], seq: int, free: float) -> dict[str, Any] | None:
    """A change that fits ``free`` bytes: smaller batch (with accumulation), then shorter sequences, then
    gradient checkpointing; None when nothing small enough helps."""
    batch, accum = int(cfg["batch_size"]), int(cfg.get("grad_accumulation_steps") or 1)
    b = batch
    while b > 1:
        b //= 2
        if fits_in(facts, b, seq, cfg, free)[0]:
            return {"batch_size": b, "grad_accumulation_steps": accum * math.ceil(batch / b),
                    "text": f"batch_size {b} with grad_accumulation_steps {accum * math.ceil(batch / b)} "
                            f"(same effective batch)"}
    s = seq + 1
    while s > 64:
        s //= 2
        if fits_in(facts, 1, s - 1, cfg, free)[0]:
            return {"batch_size": 1, "max_seq_length": s, "text": f"batch_size 1 and max_seq_length {s}"}
    if not cfg.get("grad_checkpoint") and fits_in(facts, 1, seq, {**cfg, "grad_checkpoint": True}, free)[0]:
        return {"batch_size": 1, "grad_checkpoint": True, "text": "batch_size 1 with gradient checkpointing"}
    return None


def validations(iters: int, every: int) -> int:
    """How many validation passes a run of ``iters`` makes: the initial one, every ``every`` and the last."""
    return 1 + iters // every + (iters % every != 0)


def eval_seconds(cfg: dict[str, Any], data: dict[str, Any], iters: int, tps: float, work: float = 1.0) -> float:
    """Seconds of validation in a run: the initial one, every ``steps_per_eval`` and the last; a validation
    sequence is a forward pass, about a third of a training step's work."""
    if not data.get("valid_samples") or not tps:
        return 0.0
    evals = validations(iters, max(int(cfg.get("steps_per_eval") or iters or 1), 1))
    vb = int(cfg.get("val_batches") or -1)
    batch = int(cfg["batch_size"])
    sequences = data["valid_samples"] if vb < 0 else min(vb * batch, data["valid_samples"])
    return evals * sequences * data["mean_length"] * work / 3 / tps


def checkpoint_bytes(facts: dict[str, Any], cfg: dict[str, Any]) -> float:
    """Bytes of one checkpoint: the trained weights, the optimizer's state, the gradient accumulator (when
    accumulating), the random state and bookkeeping."""
    trained = facts["trainable"] * facts["train_bytes"]
    states = OPTIMIZER_STATES.get(str(cfg.get("optimizer", "adam")).lower(), 2)
    accum = trained if int(cfg.get("grad_accumulation_steps") or 1) > 1 else 0
    return trained * (1 + states) + accum + CHECKPOINT_OVERHEAD


def disk_need(facts: dict[str, Any], cfg: dict[str, Any], iters: int) -> float:
    """Bytes the run's checkpoints take at most: each one × how many are on disk at once (the kept ones, the
    best, the one being written; all of them without ``keep_checkpoints``), plus the run's latest weights."""
    every = max(int(cfg.get("save_every") or 1), 1)
    saved = iters // every + (iters % every != 0)  # the final checkpoint comes on top of the regular ones
    kept = cfg.get("keep_checkpoints")
    count = min(saved, int(kept) + 2) if kept else saved
    return count * checkpoint_bytes(facts, cfg) + facts["trainable"] * facts["train_bytes"]


def estimate(cfg: dict[str, Any], tokenizer: Any | None = None, free_bytes: float | None = None,
             blas: str | None = None, workspace: Path | None = None,
             disk_free_bytes: float | None = None, measured_tps: float | None = None) -> dict[str, Any]:
    """Peak memory and time for a resolved config (``RunManager.prepare_config``), against free RAM; with a
    ``workspace`` (or ``disk_free_bytes``), the checkpoints' disk space against what its disk has free.

    ``seconds`` is the training steps alone, ``total_seconds`` adds validation (``eval_seconds``) and loading
    (``startup_seconds``); ``measured_tps`` replaces the model's guess by a measured speed (a probe's)."""
    from services.system import installed_blas  # noqa: PLC0415

    facts = model_facts(cfg["model"], cfg)
    data = cached_data_facts(cfg, tokenizer, Workspace(Path(workspace))) if workspace else None
    data = data or data_facts(cfg, tokenizer)
    batch = int(cfg["batch_size"])
    pref = preference_facts(cfg)
    parts = peak_bytes(facts, rows_per_batch(cfg, batch), data["seq"], cfg.get("optimizer", "adam"),
                       bool(cfg.get("grad_checkpoint")), int(cfg.get("grad_accumulation_steps") or 1))
    free = float(free_bytes if free_bytes is not None else psutil.virtual_memory().available)
    process = parts["peak"] + RUNTIME_GB * GB
    steps_per_epoch = data["samples"] // batch
    iters = math.ceil(cfg["epochs"] * steps_per_epoch) if cfg.get("epochs") else int(cfg["iters"])
    tps = measured_tps or tokens_per_second(facts, data["seq"], blas or installed_blas())
    tokens_per_step = batch * data["mean_length"]  # a pair's mean length counts both sides
    # a training pass (forward and backward) costs about three forward passes of the same tokens
    work = 1.0 + (pref["extra_forwards"] / 2 / 3 if pref else 0.0)
    once = data["samples"] * data["mean_length"] / 3 if pref and pref["reference_once"] else 0.0
    out = {
        "parameters": facts["params"], "trainable": facts["trainable"], "layers": facts["layers"],
        "trained_layers": facts["trained_layers"], "seq": data["seq"], "batch_size": batch,
        "parts_gb": {k: v / GB for k, v in parts.items() if k != "peak"},
        "peak_gb": parts["peak"] / GB, "process_gb": process / GB, "free_gb": free / GB, "fits": process <= free,
        "samples": data["samples"], "steps_per_epoch": steps_per_epoch, "iters": iters,
        "tokens_per_step": tokens_per_step, "tokens_per_second": tps,
        "seconds": (iters * tokens_per_step * work + once) / tps if tps else None, "data": data,
        "suggestion": None, "preference": pref,
    }
    out["eval_seconds"] = eval_seconds(cfg, data, iters, tps, work)
    out["startup_seconds"] = STARTUP_SECONDS + facts["weights_bytes"] / LOAD_BYTES_PER_SECOND
    out["total_seconds"] = (out["seconds"] or 0.0) + out["eval_seconds"] + out["startup_seconds"]
    warnings = []
    if steps_per_epoch == 0:
        warnings.append(f"{data['samples']} training samples: fewer than batch_size {batch}")
    out["disk_gb"] = disk_need(facts, cfg, iters) / GB
    if disk_free_bytes is None and workspace is not None:
        disk_free_bytes = disk_free(workspace)
    if disk_free_bytes is not None:
        out["disk_free_gb"] = disk_free_bytes / GB
        if disk_free_bytes < out["disk_gb"] * GB:
            kept = f"{cfg['keep_checkpoints']} kept" if cfg.get("keep_checkpoints") else "all kept"
            warnings.append(f"the checkpoints need about {out['disk_gb'] * 1000:,.1f} MB ({kept}; "
                            f"{checkpoint_bytes(facts, cfg) / 1e6:,.1f} MB each) but the workspace disk has "
                            f"{disk_free_bytes / 1e6:,.1f} MB free: free space, save less often or set "
                            "keep_checkpoints")
    if warnings:
        out["warning"] = "; ".join(warnings)
    if not out["fits"]:
        out["suggestion"] = suggest(facts, cfg, data["seq"], free)
    return out


# ----------------------------------------------------------------------------------------- the probe


def probe_config(cfg: dict[str, Any], iters: int = PROBE_ITERS, full_length: bool = False) -> dict[str, Any]:
    """The config of a probe run: the same model, data and shapes; a few iterations, one validation batch;
    sequences cut at :data:`PROBE_SEQ` unless ``full_length``."""
    from services.config import user_view  # noqa: PLC0415

    user = user_view(cfg) if "train" in cfg else dict(cfg)
    for key in ("epochs", "lr_schedule", "early_stopping", "keep_checkpoints", "resume_adapter_file"):
        user.pop(key, None)
    accum = user.get("grad_accumulation_steps")
    iters = max(iters, accum) if isinstance(accum, int) else iters  # at least one optimizer update
    user.update(iters=iters, steps_per_report=1, steps_per_eval=10_000, save_every=10_000, val_batches=1,
                name="preflight-probe", test=False)
    if not full_length:
        user["max_seq_length"] = min(int(cfg.get("max_seq_length") or PROBE_SEQ), PROBE_SEQ)
    return user


def probes_dir(workspace: Workspace) -> Path:
    """Where a workspace's probes make their throw-away workspaces (each removed when its probe ends)."""
    return workspace.root / ".forgellm" / "probes"


class Probe:
    """Runs a few real training steps in a temporary workspace and measures them (plain attributes, thread-safe
    to read). ``state``: running | done | failed | cancelled; ``fraction`` the progress (steps or time, whichever
    is further). The probe ends within ``max_seconds`` (stop included): one measured step at least is a
    result (``bounded`` says it was cut short), none is a failure that says so."""

    STOP_GRACE = 8.0  # seconds kept for stopping the run within the bound

    def __init__(self, cfg: dict[str, Any], root: Path | None = None, iters: int = PROBE_ITERS,
                 max_seconds: float = PROBE_SECONDS, full_length: bool = False):
        self.cfg = probe_config(cfg, iters, full_length)
        self.root = root
        self.max_seconds = max_seconds
        self.state, self.message, self.fraction = "running", "starting the probe run", 0.0
        self.result: dict[str, Any] | None = None
        self.version = 0
        self._cancel = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> Probe:
        self._thread = threading.Thread(target=self._run, daemon=True, name="preflight-probe")
        self._thread.start()
        return self

    def cancel(self) -> None:
        self._cancel.set()

    def wait(self, timeout: float = 600.0) -> dict[str, Any] | None:
        if self._thread is not None:
            self._thread.join(timeout)
        return self.result

    def _set(self, state: str, message: str) -> None:
        self.state, self.message = state, message
        self.version += 1

    def _end(self, manager: Any, folder: Any, pid: int) -> None:
        """Stop the probe run; kill its worker if it has not ended within the grace."""
        import os  # noqa: PLC0415
        import signal  # noqa: PLC0415

        manager.stop(folder.id)
        try:
            manager.wait(folder.id, timeout=self.STOP_GRACE / 2)
        except TimeoutError:  # still loading, or in a long step: its results are not wanted
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    def _run(self) -> None:
        from services.training.manager import RunManager  # noqa: PLC0415

        if self.root is not None:
            self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix="probe-", dir=self.root))
        t0 = time.time()
        deadline = t0 + max(self.max_seconds - self.STOP_GRACE, self.max_seconds / 2)
        bounded = False
        try:
            manager = RunManager(Workspace.resolve(tmp))
            folder = manager.create(self.cfg)
            pid = manager.start(folder.id)
            while True:
                info = manager.get(folder.id)
                if info.get("status") not in ACTIVE:
                    break
                if self._cancel.is_set():
                    self._end(manager, folder, pid)
                    self._set("cancelled", "probe cancelled")
                    return
                records, _ = folder.metrics()
                done = max((r["iteration"] for r in records if r.get("type") == "train"), default=0)
                if time.time() >= deadline:
                    self._end(manager, folder, pid)
                    bounded = True
                    break
                elapsed = time.time() - t0
                self.fraction = min(max(done / self.cfg["iters"], elapsed / self.max_seconds), 1.0)
                self.message = (f"probe: loading the model and data ({elapsed:.0f} s of at most "
                                f"{self.max_seconds:.0f} s)" if not done
                                else f"probe: step {done} of {self.cfg['iters']} ({elapsed:.0f} s)")
                self.version += 1
                time.sleep(0.3)
            records, _ = folder.metrics()
            train = [r for r in records if r.get("type") == "train"]
            if not train:
                why = (f"no training step within {self.max_seconds:.0f} s (loading the model and data took "
                       "longer): this config is slow on this machine; lower max_seq_length or the batch size"
                       if bounded else f"probe run {info.get('status')}: {info.get('reason') or 'no training step'}")
                self._set("failed", why)
                return
            self.result = self._measure(train, bounded, time.time() - t0)
            self._set("done", f"measured over {len(train)} step(s) in {self.result['seconds']:.0f} s"
                      + (f" (stopped at the {self.max_seconds:.0f} s bound)" if bounded else ""))
        except Exception as e:  # noqa: BLE001 (reported to the person, with the config problem if any)
            self._set("failed", f"probe failed: {e}")
        finally:
            self.fraction = 1.0
            shutil.rmtree(tmp, ignore_errors=True)

    def _measure(self, train: list[dict[str, Any]], bounded: bool, seconds: float) -> dict[str, Any]:
        steady = train[1:] or train
        tps = [r["tokens_per_second"] for r in steady if r.get("tokens_per_second")]
        result = {
            "tokens_per_second": sorted(tps)[len(tps) // 2] if tps else None,
            "peak_gb": max(r.get("peak_memory_gb") or 0 for r in train),
            "rss_gb": max(r.get("rss_gb") or 0 for r in train),
            "seconds_per_step": None, "iterations": len(train), "bounded": bounded, "seconds": seconds,
            "max_seq_length": self.cfg["max_seq_length"],
        }
        if tps and train[-1].get("iterations_per_second"):
            result["seconds_per_step"] = 1.0 / train[-1]["iterations_per_second"]
        return result


def probe_advice(result: dict[str, Any], est: dict[str, Any], free_bytes: float | None = None) -> dict[str, Any]:
    """Compare a probe with the estimate; if the measured process does not fit, a batch size that should."""
    free = float(free_bytes if free_bytes is not None else psutil.virtual_memory().available)
    measured = max(result.get("rss_gb") or 0.0, (result.get("peak_gb") or 0.0) + RUNTIME_GB) * GB
    peak = result.get("peak_gb")
    out = {"estimate_error": (est["peak_gb"] - peak) / peak if peak else None, "fits": measured <= free,
           "suggestion": None}
    tps = result.get("tokens_per_second")
    if tps:
        out["seconds"] = est["iters"] * est["tokens_per_step"] / tps
    if not out["fits"]:
        per_sample = max(measured - RUNTIME_GB * GB - est["parts_gb"]["weights"] * GB, 1) / est["batch_size"]
        b = int((free - RUNTIME_GB * GB - est["parts_gb"]["weights"] * GB) // per_sample)
        if b >= 1:
            out["suggestion"] = {"batch_size": b, "text": f"batch_size {b} (measured {measured / GB:.2f} GB for "
                                                          f"{est['batch_size']}, {free / GB:.1f} GB free)"}
        else:
            out["suggestion"] = {"text": "even batch_size 1 does not fit: lower max_seq_length or use "
                                         "gradient checkpointing"}
    return out
