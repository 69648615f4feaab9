"""Train-form logic without UI: form values ↔ engine config, field tooltips and visibility, the problems the
form shows, the LR schedule preview.

The form is a flat dict (one key per widget); :func:`form_to_config` builds the engine config
(a ``services.config`` user config) from it and :func:`config_to_form` goes back, keeping keys the
form has no widget for in ``extra`` so that a YAML round trip loses nothing.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from services.config import (
    FORGE_DEFAULTS,
    MLX_LM_DEFAULTS,
    ConfigError,
    ConfigProblems,
    parse_yaml_bytes,
    read_schedule,
    schedule,
)
from services.training import preference

# the form's keys of a dpo/orpo run's `preference` block (form key → config key)
PREFERENCE_FIELDS = {"beta": "beta", "loss_type": "loss_type", "label_smoothing": "label_smoothing",
                     "best_by": "best", "compat": "compat"}

SCHEDULE_KINDS = {"constant": "constant", "linear": "linear decay", "cosine": "cosine decay"}

FORM_DEFAULTS: dict[str, Any] = {
    "name": "", "model": None, "data": None, "mode": "cpt", "fine_tune_type": "lora",
    "length_mode": "iters", "iters": MLX_LM_DEFAULTS["iters"], "epochs": 3,
    "batch_size": MLX_LM_DEFAULTS["batch_size"], "learning_rate": MLX_LM_DEFAULTS["learning_rate"],
    "schedule": "constant", "warmup": 0, "final_lr": 0.0, "schedule_steps": None, "custom_schedule": None,
    "optimizer": MLX_LM_DEFAULTS["optimizer"], "num_layers": MLX_LM_DEFAULTS["num_layers"],
    "rank": 8, "scale": 20.0, "dropout": 0.0,
    "max_seq_length": MLX_LM_DEFAULTS["max_seq_length"], "steps_per_report": MLX_LM_DEFAULTS["steps_per_report"],
    "steps_per_eval": MLX_LM_DEFAULTS["steps_per_eval"], "save_every": MLX_LM_DEFAULTS["save_every"],
    "val_batches": MLX_LM_DEFAULTS["val_batches"], "grad_checkpoint": False,
    "grad_accumulation_steps": 1, "seed": 0, "packing": FORGE_DEFAULTS["packing"],
    "mask_all_turns": FORGE_DEFAULTS["mask_all_turns"], "pack_samples": FORGE_DEFAULTS["pack_samples"],
    "valid_fraction": FORGE_DEFAULTS["valid_fraction"],
    "early_stopping": False, "patience": 3, "min_delta": 0.0, "overfit_threshold": None,
    "keep_checkpoints": None, "train_embeddings": False, "processes": 1, "hosts": "", "backend": "ring",
    "extra": {}, "extra_lora": {},
    **{k: preference.DEFAULTS[c] for k, c in PREFERENCE_FIELDS.items()},
}

TIPS = {
    "name": "Run name shown in the run list; also used in the run folder's name.",
    "model": "An mlx-lm model folder (with config.json) from the workspace's models/ or published/, or a path.",
    "data": "A dataset from the workspace's datasets/, or a path. CPT: text documents; IFT: chat, "
            "prompt/completion or text rows; DPO/ORPO: prompt/chosen/rejected pairs (train.jsonl + valid.jsonl, "
            "or one file that is split).",
    "mode": "CPT: continued pre-training on raw text. IFT: instruction fine-tuning on chats. DPO/ORPO: preference "
            "tuning on pairs of a better and a worse answer. Plain mlx-lm: exactly mlx_lm.lora's behaviour.",
    "fine_tune_type": "LoRA: low-rank adapters. DoRA: weight-decomposed LoRA. Full: train the weights themselves "
                      "(most memory).",
    "preset": "Fill every field from a preset in configs/.",
    "length_mode": "Train a fixed number of iterations, or a number of passes over the training set.",
    "iters": "Optimizer iterations (batches) to train.",
    "epochs": "Passes over the training set; the iteration count follows from the data size.",
    "batch_size": "Sequences per iteration.",
    "grad_accumulation_steps": "Batches whose gradients are summed before one optimizer update "
                               "(effective batch = batch size × this).",
    "learning_rate": "Peak learning rate (typical: 1e-5 full, 1e-4 to 2e-4 LoRA).",
    "schedule": "How the learning rate changes over the run (after warm-up).",
    "warmup": "Iterations of linear warm-up from 0 to the peak learning rate.",
    "final_lr": "Learning rate at the end of the decay.",
    "schedule_steps": "Total length of the schedule in iterations (warm-up + decay). Blank: the run's iterations.",
    "optimizer": "mlx optimizer: adam, adamw (decoupled weight decay), muon, sgd, adafactor.",
    "num_layers": "How many of the last transformer blocks get adapters / are trained (-1: all).",
    "rank": "LoRA rank: size of the low-rank update (higher: more capacity, more memory).",
    "scale": "LoRA scale (mlx-lm's name for alpha / rank): how strongly the adapter update is applied.",
    "dropout": "Dropout on the adapter input, in [0, 1).",
    "train_embeddings": "Full fine-tuning: also train the embeddings, final norm and output head.",
    "max_seq_length": "Longest sequence in tokens; longer samples are cut (CPT packs documents into windows "
                      "of this length).",
    "packing": "CPT: join documents with EOS and cut the stream into full windows (no padding).",
    "mask_all_turns": "IFT: loss on every assistant turn (off: only the last, like mlx-lm's mask_prompt).",
    "pack_samples": "IFT: several samples in each row of max sequence length tokens, none attending to another "
                    "(no padding; the batch size then counts rows).",
    "valid_fraction": "Share of documents/rows held out for validation when the data has no valid split.",
    "seed": "Random seed for data order, dropout and initialisation.",
    "steps_per_report": "Iterations between training-loss reports.",
    "steps_per_eval": "Iterations between validation runs.",
    "save_every": "Iterations between checkpoints.",
    "val_batches": "Validation batches per evaluation (-1: the whole validation set).",
    "keep_checkpoints": "Keep only the last K checkpoints plus the best one (blank: keep all).",
    "early_stopping": "Stop when the validation loss stops improving or rises (overfitting).",
    "patience": "Evaluations without improvement before stopping.",
    "min_delta": "Smallest drop of validation loss that counts as improvement.",
    "overfit_threshold": "Stop when validation loss is this fraction above the best (0.2 = 20%); blank: off.",
    "grad_checkpoint": "Recompute activations in the backward pass: less memory, about 30% slower.",
    "processes": "Processes on this machine that train together (mx.distributed, ring over loopback); the batch "
                 "size is the global batch and must divide by it. Several Macs: list them under Hosts instead.",
    "hosts": "Several Macs, one per line, rank 0 (this one) first: its ssh name and its IP on the bridge or LAN "
             "(\"mac-studio.local 10.0.0.1\"), or just the IP. Blank: this machine only.",
    "backend": "How the hosts talk: ring (TCP over a Thunderbolt bridge or LAN), jaccl (Thunderbolt RDMA) or mpi.",
    "beta": "DPO: how far the model may move from its reference (typical 0.1; lower: further). "
            "ORPO: lambda, the weight of the odds-ratio term.",
    "loss_type": "DPO loss: sigmoid (the paper's), ipo (squared, length-normalised) or hinge.",
    "label_smoothing": "DPO sigmoid: the share of pairs assumed to be labelled the wrong way round (0: none).",
    "best_by": "Which checkpoint is the best: lowest validation loss, or highest validation preference accuracy.",
    "compat": "mlx-lm-lora's batching and validation, for report-for-report comparison with it (off: every pair "
              "once per epoch, every validation pair counted once).",
}

# Form fields that must hold a number (None = left blank → "required").
REQUIRED_NUMBERS = ("batch_size", "learning_rate", "num_layers", "max_seq_length", "steps_per_report",
                    "steps_per_eval", "save_every", "val_batches", "grad_accumulation_steps", "seed",
                    "valid_fraction", "warmup", "processes")
INTEGER_FIELDS = ("iters", "batch_size", "num_layers", "max_seq_length", "steps_per_report", "steps_per_eval",
                  "save_every", "val_batches", "grad_accumulation_steps", "seed", "warmup", "schedule_steps",
                  "rank", "patience", "keep_checkpoints", "processes")

# Config error field (dotted) → form field that shows it.
ERROR_FIELDS = {
    "lora_parameters.rank": "rank", "lora_parameters.scale": "scale", "lora_parameters.dropout": "dropout",
    "lora_parameters.alpha": "scale", "lr_schedule.warmup": "warmup", "lr_schedule.arguments": "learning_rate",
    "lr_schedule.name": "schedule", "lr_schedule": "schedule", "early_stopping.patience": "patience",
    "early_stopping.min_delta": "min_delta", "early_stopping.overfit_threshold": "overfit_threshold",
    "early_stopping": "early_stopping", "grad_accumulation_steps": "grad_accumulation_steps", "preference": "beta",
    **{f"preference.{c}": k for k, c in PREFERENCE_FIELDS.items()},
    "distributed": "processes", "distributed.processes": "processes", "distributed.backend": "backend",
}


def form_field(error_field: str) -> str:
    """The form field that shows a config error for ``error_field`` (``lora_parameters.rank`` → ``rank``,
    ``distributed.hosts.1`` → ``hosts``)."""
    if error_field.startswith("distributed.hosts"):
        return "hosts"
    return ERROR_FIELDS.get(error_field, error_field)


def default_form() -> dict[str, Any]:
    """A fresh copy of :data:`FORM_DEFAULTS`."""
    return copy.deepcopy(FORM_DEFAULTS)


def _int(v: Any) -> Any:
    """A whole float (what a number input gives) as int; anything else unchanged, for validation to judge."""
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return v


def form_problems(form: dict[str, Any]) -> list[ConfigError]:
    """What the form itself can tell is missing (blank fields), before the engine validates the rest."""
    errors = []
    if not form.get("model"):
        errors.append(ConfigError("model", form.get("model"), "choose a model"))
    if not form.get("data"):
        errors.append(ConfigError("data", form.get("data"), "choose a dataset"))
    required = list(REQUIRED_NUMBERS) + ["iters" if form.get("length_mode") == "iters" else "epochs"]
    if form.get("fine_tune_type") in ("lora", "dora"):
        required += ["rank", "scale", "dropout"]
    if form.get("early_stopping"):
        required += ["patience", "min_delta"]
    if form.get("schedule") in ("linear", "cosine"):
        required.append("final_lr")
        if form.get("length_mode") == "epochs" and not form.get("schedule_steps"):
            errors.append(ConfigError("schedule_steps", form.get("schedule_steps"),
                                      "a decaying schedule needs its length in iterations when training by epochs"))
    for key in required:
        if form.get(key) is None or form.get(key) == "":
            errors.append(ConfigError(key, None, "required"))
    return errors


def check_form(form: dict[str, Any], prepare: Callable[[dict[str, Any]], Any]) -> tuple[dict[str, Any],
                                                                                   list[ConfigError]]:
    """The engine config of ``form`` and every problem found: the form's blanks, then what ``prepare`` (the run
    manager's ``prepare_config``: schema, model and data paths) reports; one problem per form field."""
    errors = form_problems(form)
    cfg = form_to_config(form)
    try:
        prepare(cfg)
    except ConfigProblems as e:
        errors += e.errors
    except ConfigError as e:
        errors.append(e)
    seen: set[str] = set()
    unique = []
    for e in errors:
        f = form_field(e.field)
        if f not in seen:
            seen.add(f)
            unique.append(e)
    return cfg, unique


# Problems of an uploaded config that the person fixes in the form after loading it: its model and dataset
# (a config written on another machine names paths this one does not have).
FIXED_IN_FORM = ("model", "data", "mixture.data")


def load_upload(data: bytes, name: str, prepare: Callable[[dict[str, Any]], Any]
                ) -> tuple[dict[str, Any] | None, list[ConfigError]]:
    """The form for an uploaded YAML file and its problems: exactly what ``forgellm train FILE`` reports
    (``prepare`` is the run manager's ``prepare_config``, the CLI's validation). A file with any problem but
    its model or data paths is not loaded (``None``): the form cannot show a value it cannot hold, and Start
    must never launch what the CLI would refuse."""
    try:
        cfg = parse_yaml_bytes(data, name)
        prepare(cfg)
        errors: list[ConfigError] = []
    except ConfigProblems as e:
        errors = e.errors
    except ConfigError as e:
        return None, [e]
    if any(e.field not in FIXED_IN_FORM for e in errors):
        return None, errors
    return config_to_form(cfg), errors


def visible_fields(form: dict[str, Any]) -> dict[str, bool]:
    """Which optional fields apply to the form's choices (LoRA settings for LoRA/DoRA, packing for CPT…)."""
    lora = form.get("fine_tune_type") in ("lora", "dora")
    pref, dpo = form.get("mode") in preference.MODES, form.get("mode") == "dpo"
    decaying = form.get("schedule") in ("linear", "cosine")
    stopping = bool(form.get("early_stopping"))
    return {
        "iters": form.get("length_mode") != "epochs", "epochs": form.get("length_mode") == "epochs",
        "rank": lora, "scale": lora, "dropout": lora, "train_embeddings": form.get("fine_tune_type") == "full",
        "packing": form.get("mode") == "cpt", "mask_all_turns": form.get("mode") == "ift",
        "pack_samples": form.get("mode") == "ift",
        "warmup": form.get("schedule") != "custom", "final_lr": decaying, "schedule_steps": decaying,
        "patience": stopping, "min_delta": stopping, "overfit_threshold": stopping,
        "beta": pref, "best_by": pref, "compat": pref, "loss_type": dpo,
        "label_smoothing": dpo and form.get("loss_type") == "sigmoid",
        "backend": bool(str(form.get("hosts") or "").strip()),
    }


def schedule_choices(form: dict[str, Any]) -> dict[str, str]:
    """The schedule toggle's options: the three kinds, plus ``custom (NAME)`` for a schedule the form cannot edit."""
    kinds = dict(SCHEDULE_KINDS)
    if form.get("schedule") == "custom":
        kinds["custom"] = f"custom ({(form.get('custom_schedule') or {}).get('name', '?')})"
    return kinds


def form_schedule(form: dict[str, Any]) -> dict[str, Any] | None:
    """The ``lr_schedule`` the form describes (``None`` for a constant rate without warm-up)."""
    kind = form.get("schedule") or "constant"
    if kind == "custom":
        return copy.deepcopy(form.get("custom_schedule"))
    lr = form.get("learning_rate")
    if not isinstance(lr, (int, float)):
        return None
    steps = form.get("schedule_steps") or (form.get("iters") if form.get("length_mode") == "iters" else None)
    steps = _int(steps) if isinstance(steps, (int, float)) else 1
    warmup = _int(form.get("warmup") or 0)
    final = form.get("final_lr") or 0.0
    try:
        return schedule(kind, lr, max(int(steps), 1), warmup if isinstance(warmup, int) else 0, final)
    except ConfigError:
        return None


def form_to_config(form: dict[str, Any]) -> dict[str, Any]:
    """The engine config (user keys) for the form's values; blanks stay ``None`` (see :func:`form_problems`)."""
    f = {k: (_int(v) if k in INTEGER_FIELDS else v) for k, v in form.items()}
    mode = None if f.get("mode") == "mlx-lm" else f.get("mode")
    cfg: dict[str, Any] = {}
    if f.get("name"):
        cfg["name"] = f["name"]
    if mode is not None:
        cfg["mode"] = mode
    cfg.update(model=f.get("model"), data=f.get("data"), fine_tune_type=f.get("fine_tune_type"),
               num_layers=f.get("num_layers"))
    if f.get("fine_tune_type") in ("lora", "dora"):
        cfg["lora_parameters"] = {"rank": f.get("rank"), "dropout": f.get("dropout"), "scale": f.get("scale"),
                                  **copy.deepcopy(f.get("extra_lora") or {})}
    cfg["optimizer"] = f.get("optimizer")
    cfg["learning_rate"] = f.get("learning_rate")
    sched = form_schedule(f)
    if sched is not None:
        cfg["lr_schedule"] = sched
    if f.get("length_mode") == "epochs":
        cfg["epochs"] = f.get("epochs")
    else:
        cfg["iters"] = f.get("iters")
    for key in ("batch_size", "grad_accumulation_steps", "grad_checkpoint", "max_seq_length"):
        cfg[key] = f.get(key)
    if mode == "cpt":
        cfg["packing"] = bool(f.get("packing"))
    if mode == "ift":
        cfg["mask_all_turns"] = bool(f.get("mask_all_turns"))
        if f.get("pack_samples"):
            cfg["pack_samples"] = True
    if mode in preference.MODES:
        cfg["preference"] = _form_preference(f, mode)
    for key in ("valid_fraction", "val_batches", "steps_per_report", "steps_per_eval", "save_every"):
        cfg[key] = f.get(key)
    if f.get("keep_checkpoints") is not None:
        cfg["keep_checkpoints"] = f["keep_checkpoints"]
    if f.get("early_stopping"):
        es = {"patience": f.get("patience"), "min_delta": f.get("min_delta")}
        if f.get("overfit_threshold") is not None:
            es["overfit_threshold"] = f["overfit_threshold"]
        cfg["early_stopping"] = es
    if f.get("fine_tune_type") == "full" and f.get("train_embeddings"):
        cfg["train_embeddings"] = True
    cfg["seed"] = f.get("seed")
    hosts = parse_hosts(f.get("hosts"))
    # processes other than 1 go to validation as they are (0 or 2.5 is named there); blank is "required"
    procs = {"processes": f["processes"]} if f.get("processes") not in (None, 1) else {}
    if hosts:  # with processes as well, validation says to give one or the other
        cfg["distributed"] = {**procs, "hosts": hosts, "backend": f.get("backend") or "ring"}
    elif procs:
        cfg["distributed"] = procs
    for k, v in (f.get("extra") or {}).items():
        cfg.setdefault(k, copy.deepcopy(v))
    return cfg


def parse_hosts(text: Any) -> list[Any]:
    """The Hosts field as ``distributed.hosts``: one host a line, ``NAME IP …`` (→ ``{ssh, ips}``) or a bare
    name or IP (→ the string; validation says what a bare name lacks). Blank lines and commas are ignored."""
    out: list[Any] = []
    for line in str(text or "").splitlines():
        words = line.replace(",", " ").split()
        if words:
            out.append(words[0] if len(words) == 1 else {"ssh": words[0], "ips": words[1:]})
    return out


def hosts_text(hosts: Any) -> str:
    """``distributed.hosts`` as the Hosts field's text; "" when an entry is more than the field can hold."""
    lines = []
    for h in hosts if isinstance(hosts, list) else []:
        if isinstance(h, dict) and set(h) <= {"ssh", "ips"} and isinstance(h.get("ssh"), str) \
                and isinstance(h.get("ips"), list) and h["ips"] and all(isinstance(i, str) for i in h["ips"]):
            lines.append(" ".join([h["ssh"], *h["ips"]]))
        elif isinstance(h, str) and h.strip() and len(h.split()) == 1:
            lines.append(h)
        else:
            return ""
    return "\n".join(lines)


def _form_preference(f: dict[str, Any], mode: str) -> dict[str, Any]:
    """The ``preference`` block: the keys that apply to ``mode`` (ORPO has no loss type or label smoothing)."""
    shown = visible_fields(f)
    kept = (f.get("extra") or {}).get("preference")
    return {**(kept if isinstance(kept, dict) else {}),
            **{c: (bool(f.get(k)) if k == "compat" else f.get(k)) for k, c in PREFERENCE_FIELDS.items() if shown[k]}}


def _schedule_to_form(s: Any, form: dict[str, Any]) -> None:
    """Recognise ``services.config.schedule`` output (constant/linear/cosine + linear warm-up), else keep it as is."""
    form.update(schedule="constant", warmup=0, final_lr=0.0, schedule_steps=None, custom_schedule=None)
    if s is None:
        return
    known = read_schedule(s)
    if known is None:
        form.update(schedule="custom", custom_schedule=copy.deepcopy(s))
        args = s.get("arguments") if isinstance(s, dict) else None
        if isinstance(args, list) and args and isinstance(args[0], (int, float)):
            form["learning_rate"] = args[0]
        return
    form.update(schedule=known["kind"], learning_rate=known["lr"], final_lr=known["final_lr"],
                warmup=known["warmup"])
    total = known["steps"]
    if total is not None and not (form["length_mode"] == "iters" and total == form.get("iters")):
        form["schedule_steps"] = int(total)


def config_to_form(cfg: dict[str, Any]) -> dict[str, Any]:
    """Form values for a config (preset, upload or a run's config); unknown keys go to ``extra``."""
    form = default_form()
    cfg = copy.deepcopy(cfg)
    form["name"] = cfg.pop("name", None) or ""
    mode = cfg.pop("mode", None)
    form["mode"] = "mlx-lm" if mode is None else mode
    for key in ("model", "data", "fine_tune_type", "optimizer", "num_layers", "batch_size", "grad_accumulation_steps",
                "grad_checkpoint", "max_seq_length", "packing", "mask_all_turns", "pack_samples", "valid_fraction",
                "val_batches", "steps_per_report", "steps_per_eval", "save_every", "keep_checkpoints",
                "train_embeddings", "seed", "learning_rate"):
        if key in cfg and cfg[key] is not None:
            form[key] = cfg.pop(key)
        else:
            cfg.pop(key, None)
    if isinstance(form["model"], Path) or isinstance(form["data"], Path):
        form["model"], form["data"] = str(form["model"]), str(form["data"])
    if cfg.get("epochs") is not None:
        form.update(length_mode="epochs", epochs=cfg.pop("epochs"))
        if cfg.get("iters") is not None:
            form["iters"] = cfg.pop("iters")
    else:
        cfg.pop("epochs", None)
        form["length_mode"] = "iters"
        if cfg.get("iters") is not None:
            form["iters"] = cfg.pop("iters")
    cfg.pop("iters", None)
    lp = cfg.pop("lora_parameters", None)
    if isinstance(lp, dict):
        lp = dict(lp)
        for key in ("rank", "scale", "dropout"):
            if key in lp:
                form[key] = lp.pop(key)
        form["extra_lora"] = lp
    _schedule_to_form(cfg.pop("lr_schedule", None), form)
    pref = cfg.pop("preference", None)
    if isinstance(pref, dict):
        pref = dict(pref)
        form.update({k: pref.pop(c) for k, c in PREFERENCE_FIELDS.items() if c in pref})
        if pref:  # keys the form has no widget for: validation names them
            cfg["preference"] = pref
    es = cfg.pop("early_stopping", None)
    if isinstance(es, dict):
        form.update(early_stopping=True, patience=es.get("patience", 3), min_delta=es.get("min_delta", 0.0),
                    overfit_threshold=es.get("overfit_threshold"))
    dist = cfg.get("distributed")
    if isinstance(dist, dict) and set(dist) <= {"processes", "backend"} and dist.get("backend", "ring") == "ring":
        form["processes"] = cfg.pop("distributed").get("processes", 1)
    elif isinstance(dist, dict) and set(dist) <= {"hosts", "backend"} and hosts_text(dist.get("hosts")):
        form.update(hosts=hosts_text(cfg.pop("distributed")["hosts"]), backend=dist.get("backend", "ring"))
    # anything else (a python path, rdma devices, a bad value) stays YAML (extra), for validation to judge
    form["extra"] = cfg
    return form


# ---------------------------------------------------------------------------------------- LR preview


def _sched_fn(name: str, args: list[float]):
    """Python versions of mlx.optimizers.schedulers (same formulas)."""
    if name == "cosine_decay":
        init, decay_steps, end = args[0], args[1], (args[2] if len(args) > 2 else 0.0)

        def f(step: int) -> float:
            s = min(step, decay_steps)
            return end + 0.5 * (1.0 + math.cos(math.pi * s / max(decay_steps, 1))) * (init - end)
    elif name == "linear_schedule":
        init, end, steps = args[0], args[1], args[2]

        def f(step: int) -> float:
            return min(step, steps) * ((end - init) / max(steps, 1)) + init
    elif name == "exponential_decay":
        def f(step: int) -> float:
            return args[0] * args[1] ** step
    elif name == "step_decay":
        def f(step: int) -> float:
            return args[0] * args[1] ** (step // max(int(args[2]), 1))
    else:
        raise ValueError(name)
    return f


def lr_function(sched: dict[str, Any] | None, lr: float):
    """Learning rate at optimizer step ``n`` (0-based), as mlx-lm's ``build_schedule`` computes it."""
    if not sched:
        return lambda step: lr
    body = _sched_fn(sched["name"], list(sched["arguments"]))
    warmup = int(sched.get("warmup", 0) or 0)
    if not warmup:
        return body
    warm = _sched_fn("linear_schedule", [sched.get("warmup_init", 0.0) or 0.0, sched["arguments"][0], warmup])
    return lambda step: warm(step) if step < warmup + 1 else body(step - warmup - 1)


def lr_preview(form: dict[str, Any], cfg: dict[str, Any]) -> tuple[list[tuple[int, float]], str]:
    """The schedule chart's points for the form's config (see :func:`lr_curve`) and a note under it."""
    lr = cfg.get("learning_rate")
    epochs = form.get("length_mode") == "epochs"
    iters = form.get("schedule_steps") if epochs else cfg.get("iters")
    note = ""
    if epochs and not iters:
        iters, note = 100, "Training by epochs: the iteration count follows from the data (first 100 shown)."
    if not isinstance(lr, (int, float)) or not isinstance(iters, (int, float)) or iters < 1:
        return [], "Set a learning rate and a length to see the schedule."
    return lr_curve(cfg.get("lr_schedule"), lr, int(iters), int(cfg.get("grad_accumulation_steps") or 1)), note


def lr_curve(sched: dict[str, Any] | None, lr: float, iters: int, grad_accumulation: int = 1,
             max_points: int = 400) -> list[tuple[int, float]]:
    """``(iteration, learning rate)`` over a run: iteration ``i`` uses optimizer step ``ceil(i / accum) - 1``."""
    try:
        fn = lr_function(sched, lr)
    except (ValueError, KeyError, TypeError, IndexError):
        return []
    iters, accum = max(int(iters), 1), max(int(grad_accumulation), 1)
    stride = max(1, math.ceil(iters / max_points))
    its = list(range(1, iters + 1, stride))
    if its[-1] != iters:
        its.append(iters)
    out = []
    for i in its:
        try:
            out.append((i, float(fn(max(math.ceil(i / accum) - 1, 0)))))
        except (ArithmeticError, TypeError, ValueError):
            return []
    return out
