"""One training-config schema for CPT and IFT: a superset of ``mlx_lm.lora``'s YAML.

A plain ``mlx_lm.lora`` config (no ``mode`` key) runs with mlx-lm's own behaviour, report for report.
ForgeLLM's own behaviour (packing, all-turn masking, replay mixture, epochs, early stopping, rotation)
is switched on by keys of its own; the presets in ``configs/`` turn them on.
"""

from __future__ import annotations

import copy
import difflib
import math
import re
import reprlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from services.errors import ForgeError

# mlx_lm.lora.CONFIG_DEFAULTS for mlx-lm 0.32.2 (a test checks they stay equal). Kept as a copy so that
# validating a config in the UI process does not import mlx-lm and transformers.
MLX_LM_DEFAULTS: dict[str, Any] = {
    "model": "Qwen/Qwen3-0.6b",
    "train": False,
    "fine_tune_type": "lora",
    "optimizer": "adam",
    "optimizer_config": {"adam": {}, "adamw": {}, "muon": {}, "sgd": {}, "adafactor": {}},
    "data": "mlx-community/WikiSQL",
    "seed": 0,
    "num_layers": 16,
    "batch_size": 4,
    "iters": 1000,
    "val_batches": 25,
    "learning_rate": 1e-5,
    "steps_per_report": 10,
    "steps_per_eval": 200,
    "resume_adapter_file": None,
    "adapter_path": "adapters",
    "save_every": 100,
    "test": False,
    "test_batches": 500,
    "max_seq_length": 2048,
    "config": None,
    "grad_checkpoint": False,
    "grad_accumulation_steps": 1,
    "clear_cache_threshold": 0,
    "lr_schedule": None,
    "lora_parameters": {"rank": 8, "dropout": 0.0, "scale": 20.0},
    "mask_prompt": False,
    "report_to": None,
    "project_name": None,
    "trust_remote_code": False,
}

# Data-key remapping that mlx-lm reads with getattr() (not in its defaults).
MLX_LM_FEATURE_KEYS = ("text_feature", "prompt_feature", "completion_feature", "chat_feature")

FORGE_DEFAULTS: dict[str, Any] = {
    "mode": None,  # "cpt" | "ift" | "dpo" | "orpo"; None keeps mlx-lm's behaviour exactly
    "name": None,  # run name shown in the UI
    "epochs": None,  # train for N epochs instead of `iters`
    "valid_fraction": 0.1,  # share of documents/samples held out when no valid file exists
    "packing": True,  # cpt: join documents with EOS and pack into max_seq_length windows
    "pack_samples": False,  # ift: several samples per max_seq_length row, each attending only to itself
    "mixture": None,  # cpt: {"data": path, "ratio": 0.2} replay corpus, ratio of training tokens
    "mask_all_turns": True,  # ift: loss on every assistant turn (mlx-lm's mask_prompt: last only)
    "train_embeddings": False,  # full: also train embeddings, final norm and head
    "early_stopping": None,  # {"patience": 3, "min_delta": 0.0, "overfit_threshold": 0.2}
    "keep_checkpoints": None,  # rotation: keep the last K checkpoints plus the best; None keeps all
    "eval": None,  # {"suites": [...], "tasks": [...], "task_dir": DIR, "every": "checkpoint"}: services.evaluation.plan
    "best_by": None,  # None/"val_loss", or "eval:SUITE"
    "distributed": None,  # {"processes": N} on this machine, or {"hosts": [...], "backend": ..., "python": PATH}
    "preference": None,  # dpo/orpo: {"beta", "loss_type", "label_smoothing", "best", "compat"}
}

EARLY_STOPPING_KEYS = {"patience", "min_delta", "overfit_threshold", "by"}
BACKENDS = ("ring", "jaccl", "mpi")  # mx.distributed backends that mlx.launch starts on Macs
LOCAL_HOSTS = ("127.0.0.1", "localhost")
OPTIMIZERS = ("adam", "adamw", "muon", "sgd", "adafactor")
FINE_TUNE_TYPES = ("lora", "dora", "full")
MODES = ("cpt", "ift", "dpo", "orpo")
# the keys of a dpo/orpo run's `preference` block, and the choices of those that have some
PREFERENCE_KEYS = {"beta": None, "loss_type": ("sigmoid", "ipo", "hinge"), "label_smoothing": None,
                   "best": ("val_loss", "accuracy"), "compat": None}
# mlx.optimizers.schedulers that take (init, ...) arguments and so work with mlx-lm's build_schedule.
SCHEDULES = ("cosine_decay", "linear_schedule", "exponential_decay", "step_decay")
KNOWN_KEYS = set(MLX_LM_DEFAULTS) | set(MLX_LM_FEATURE_KEYS) | set(FORGE_DEFAULTS)
MAX_YAML_BYTES = 1_000_000  # a config file is a few hundred bytes; anything near this is not one
# What one key's value may expand to (YAML aliases share one object, which a dump writes out in full): a
# config's largest legitimate values are short lists of module names.
MAX_VALUE_ITEMS = 1_000
MAX_VALUE_CHARS = 10_000
# Upper bounds of the counts: far above any real run, low enough that a typo (10^30) is refused up front and
# every value fits the 64-bit integers the browser, NumPy and MLX use.
MAX_COUNT = 10**9
MAX_SEED = 2**32 - 1  # NumPy's RandomState takes seeds below 2^32
BOOL_KEYS = ("train", "test", "grad_checkpoint", "mask_prompt", "trust_remote_code", "packing", "mask_all_turns",
             "train_embeddings", "pack_samples")
TEXT_KEYS = ("name", "report_to", "project_name", "resume_adapter_file", "adapter_path", "config",
             *MLX_LM_FEATURE_KEYS)
# (fewest, most) arguments of each schedule, and which ones count steps (must be ≥ 1)
SCHEDULE_ARGS = {"cosine_decay": (2, 3, (1,)), "linear_schedule": (3, 3, (2,)), "exponential_decay": (2, 2, ()),
                 "step_decay": (3, 3, (2,))}
# The keyword arguments of each mlx optimizer (mlx 0.32) and the kind of value each takes.
OPTIMIZER_ARGS: dict[str, dict[str, str]] = {
    "adam": {"betas": "betas", "eps": "number", "bias_correction": "bool"},
    "adamw": {"betas": "betas", "eps": "number", "weight_decay": "number", "bias_correction": "bool"},
    "muon": {"momentum": "number", "weight_decay": "number", "nesterov": "bool", "ns_steps": "count"},
    "sgd": {"momentum": "number", "weight_decay": "number", "dampening": "number", "nesterov": "bool"},
    "adafactor": {"eps": "pair", "clip_threshold": "number", "decay_rate": "signed", "beta_1": "optional",
                  "weight_decay": "number", "scale_parameter": "bool", "relative_step": "bool",
                  "warmup_init": "bool"},
}
_SHORT = reprlib.Repr()
_SHORT.maxstring, _SHORT.maxother, _SHORT.maxlong, _SHORT.maxlist, _SHORT.maxdict, _SHORT.maxlevel = 80, 80, 40, 5, 5, 2


class ConfigError(ForgeError, ValueError):
    """A config value that cannot run. ``field`` is a dotted path such as ``lora_parameters.rank``."""

    def __init__(self, field: str, value: Any, reason: str, source: str | None = None):
        self.field, self.value, self.reason, self.source = field, value, reason, source
        where = f"{source}: " if source else ""
        super().__init__(f"{where}{field} = {_SHORT.repr(value)}: {reason}")  # a huge value is shown cut


@dataclass
class ConfigProblems(ForgeError, ValueError):
    """All problems found in one config, so a person can fix them in one pass."""

    errors: list[ConfigError]

    def __str__(self) -> str:
        return "\n".join(str(e) for e in self.errors)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


class YamlLoader(yaml.SafeLoader):
    """SafeLoader that reads ``1e-5`` as a float, with ``mlx_lm.lora``'s resolver (mlx-lm patches SafeLoader
    itself; this subclass leaves it alone), so a config means the same here as under ``mlx_lm.lora -c``.
    A key written twice in one mapping is an error (PyYAML would keep the last one without a word)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                key = self.construct_object(key_node)
                if key in seen:
                    raise yaml.constructor.ConstructorError(None, None, f"found the key {key!r} twice",
                                                            key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep)


YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        """^(?:
     [-+]?(?:[0-9][0-9_]*)\\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\\.[0-9_]+(?:[eE][-+][0-9]+)?
    |[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+\\.[0-9_]*
    |[-+]?\\.(?:inf|Inf|INF)
    |\\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def parse_yaml(text: str, source: str = "config") -> dict[str, Any]:
    """A config from YAML text; a syntax error names the source and line."""
    try:
        data = yaml.load(text, YamlLoader) or {}
    except RecursionError:
        raise ConfigError("config", source, "nested too deeply to be a config") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise ConfigError("config", f"{source}{line}", f"invalid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(data, dict):
        raise ConfigError("config", source, "top level must be a mapping of keys to values")
    return data


def check_yaml_size(size: int, source: str = "config") -> None:
    """Refuse a config file larger than :data:`MAX_YAML_BYTES` (an upload is checked before it is read)."""
    if size > MAX_YAML_BYTES:
        raise ConfigError("config", source, "file is larger than 1 MB")


def parse_yaml_bytes(data: bytes, source: str = "config") -> dict[str, Any]:
    """A config from a YAML file's bytes (an upload, or a file the CLI read): at most :data:`MAX_YAML_BYTES`
    of UTF-8 text (a BOM is allowed); every problem is a :class:`ConfigError` naming the source."""
    check_yaml_size(len(data), source)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConfigError("config", source, f"not UTF-8 text (byte {e.start}): not a YAML file") from None
    return parse_yaml(text, source)


def list_presets(configs_dir: Path) -> dict[str, Path]:
    """``name → path`` of the preset YAML files in ``configs/`` (not its ``samples/`` folder)."""
    if not configs_dir.is_dir():
        return {}
    return {p.stem: p for p in sorted(configs_dir.glob("*.yaml")) if p.is_file()}


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file; a syntax error names the file and line."""
    path = Path(path)
    try:
        check_yaml_size(path.stat().st_size, str(path))
        return parse_yaml_bytes(path.read_bytes(), str(path))
    except FileNotFoundError:
        raise ConfigError("config", str(path), "file not found") from None
    except IsADirectoryError:
        raise ConfigError("config", str(path), "is a folder; give a YAML file") from None
    except OSError as e:
        raise ConfigError("config", str(path), f"cannot be read ({e.strerror})") from None


def with_defaults(user: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``user`` with defaults filled exactly as ``mlx_lm.lora`` does, then ForgeLLM's own."""
    cfg = copy.deepcopy(MLX_LM_DEFAULTS)
    cfg.update(copy.deepcopy(FORGE_DEFAULTS))
    for k, v in user.items():
        if v is not None or k not in cfg:
            cfg[k] = copy.deepcopy(v)
    if isinstance(cfg["train"], bool):  # ForgeLLM always trains; anything but true/false is left for validate
        cfg["train"] = True
    return cfg


def resolve(user: dict[str, Any]) -> dict[str, Any]:
    """Fill defaults (:func:`with_defaults`), validate, and return the full config."""
    cfg = with_defaults(user)
    validate(cfg, user_keys=set(user))
    return cfg


class _Report:
    """The problems found so far in one config; each check below adds to it and none stops the others."""

    def __init__(self, cfg: dict[str, Any]):
        self.cfg, self.errors = cfg, []

    def bad(self, field: str, reason: str) -> None:
        """Record ``field`` (dotted) as bad, with its value read from the config."""
        value: Any = self.cfg
        for part in field.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        self.errors.append(ConfigError(field, value, reason))

    def mapping(self, field: str, reason: str) -> dict[str, Any] | None:
        """The mapping at ``field``: ``None`` when it is absent, or when it is no mapping (recorded as bad)."""
        value = self.cfg.get(field)
        if value is not None and not isinstance(value, dict):
            self.bad(field, reason)
        return value if isinstance(value, dict) else None

    def integer_at(self, field: str, v: Any, minimum: int, maximum: int = MAX_COUNT) -> None:
        if not _is_int(v) or not minimum <= v <= maximum:
            self.bad(field, f"must be an integer ≥ {minimum} and ≤ {maximum:,}")

    def integer(self, field: str, minimum: int, allow: tuple = (), maximum: int = MAX_COUNT) -> None:
        v = self.cfg.get(field)
        if _is_int(v) and v in allow:
            return
        if not _is_int(v) or not minimum <= v <= maximum:
            self.bad(field, f"must be an integer ≥ {minimum}" + (f" (or {allow[0]})" if allow else "")
                     + f" and ≤ {maximum:,}")


def _check_keys(r: _Report, user_keys: set[str] | None) -> None:
    for key in sorted(user_keys or r.cfg):
        if key not in KNOWN_KEYS:
            hint = difflib.get_close_matches(key, KNOWN_KEYS, n=1)
            r.errors.append(ConfigError(key, r.cfg[key], "unknown key" + (f"; did you mean {hint[0]!r}?" if hint
                                                                             else "")))


def _too_large(value: Any) -> bool:
    """Whether ``value`` expands (aliases written out in full) beyond :data:`MAX_VALUE_ITEMS` items or
    :data:`MAX_VALUE_CHARS` characters; stops counting as soon as it does."""
    items, chars, stack = 0, 0, [value]
    while stack:
        v = stack.pop()
        items += 1
        if isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, (list, tuple)):
            stack.extend(v)
        elif isinstance(v, str):
            chars += len(v)
        if items > MAX_VALUE_ITEMS or chars > MAX_VALUE_CHARS:
            return True
    return False


def _check_size(r: _Report, user_keys: set[str] | None) -> set[str]:
    """Keys whose value is too large to be a setting (a YAML alias bomb): refused before anything expands them."""
    huge = {k for k in sorted(user_keys or r.cfg) if _too_large(r.cfg.get(k))}
    for k in sorted(huge):
        r.bad(k, f"is too large for a setting (more than {MAX_VALUE_ITEMS:,} values or {MAX_VALUE_CHARS:,} "
                 "characters once YAML aliases are expanded)")
    return huge


def _check_required(r: _Report, user_keys: set[str] | None) -> None:
    """``model`` and ``data`` name what this config trains: mlx-lm's defaults (a Hub model, a Hub dataset) are
    never silently used for them."""
    for field, what in (("model", "the path of a local model folder, or a name under the workspace's models/"),
                        ("data", "the path of a dataset file or folder, or a name under the workspace's datasets/")):
        given = r.cfg.get(field) if user_keys is None or field in user_keys else None
        if given is None:
            r.errors.append(ConfigError(field, None, f"missing: give {what}"))
        elif not isinstance(given, str) or not given.strip():
            r.bad(field, f"must be {what}")


def _check_choices(r: _Report) -> None:
    cfg = r.cfg
    if cfg.get("mode") not in (None, *MODES):
        r.bad("mode", f"must be one of {', '.join(MODES)} (or absent for plain mlx-lm behaviour)")
    if cfg.get("fine_tune_type") not in FINE_TUNE_TYPES:
        r.bad("fine_tune_type", f"must be one of {', '.join(FINE_TUNE_TYPES)}")
    if not isinstance(cfg.get("optimizer"), str) or cfg["optimizer"].lower() not in OPTIMIZERS:
        r.bad("optimizer", f"must be one of {', '.join(OPTIMIZERS)}")


def _check_types(r: _Report) -> None:
    """Switches are true/false; names and paths are short text."""
    for key in BOOL_KEYS:
        if not isinstance(r.cfg.get(key, False), bool):
            r.bad(key, "must be true or false")
    for key in TEXT_KEYS:
        v = r.cfg.get(key)
        if v is not None and (not isinstance(v, str) or len(v) > 1000):
            r.bad(key, "must be text (at most 1000 characters)")
    c = r.cfg.get("clear_cache_threshold", 0)
    if not _is_number(c) or c < 0:
        r.bad("clear_cache_threshold", "must be a number ≥ 0")


def _check_numbers(r: _Report) -> None:
    for field in ("batch_size", "steps_per_report", "steps_per_eval", "save_every", "grad_accumulation_steps"):
        r.integer(field, 1)
    r.integer("iters", 1)
    r.integer("seed", 0, maximum=MAX_SEED)
    r.integer("max_seq_length", 2)
    r.integer("num_layers", 1, allow=(-1,))
    r.integer("val_batches", 1, allow=(-1,))
    r.integer("test_batches", 1, allow=(-1,))
    e = r.cfg.get("epochs")
    if e is not None and (not _is_number(e) or not 0 < e <= 10_000):
        r.bad("epochs", "must be a positive number of passes over the training set (at most 10,000)")
    lr = r.cfg.get("learning_rate")
    if not _is_number(lr) or not 0 < lr < 1:
        r.bad("learning_rate", "must be a number between 0 and 1 (typical: 1e-5 to 1e-3)")


def _check_lengths(r: _Report, user_keys: set[str] | None) -> None:
    """Settings that cannot take effect within the run's length: no optimizer update, a warm-up never ended."""
    cfg = r.cfg
    iters, accum = cfg.get("iters"), cfg.get("grad_accumulation_steps")
    if cfg.get("epochs") is not None or not _is_int(iters) or not _is_int(accum):
        return  # by epochs the worker counts the iterations; bad values are reported by _check_numbers
    if accum > iters and (user_keys is None or {"iters", "grad_accumulation_steps"} & user_keys):
        r.bad("grad_accumulation_steps", f"exceeds iters = {iters}: the run would end without one optimizer update")
    sched = cfg.get("lr_schedule")
    warmup = sched.get("warmup") if isinstance(sched, dict) else None
    if _is_int(warmup) and warmup >= iters:
        r.bad("lr_schedule.warmup", f"must be shorter than the run (iters = {iters}): the learning rate would never "
                                    "reach its peak")


def _check_lora(r: _Report) -> None:
    if r.cfg.get("fine_tune_type") not in ("lora", "dora"):
        return
    lp = r.cfg.get("lora_parameters")
    if not isinstance(lp, dict):
        r.bad("lora_parameters", "must be a mapping with rank, scale and dropout")
        return
    for k in sorted(set(lp) - {"rank", "scale", "dropout", "keys", "alpha"}, key=str):
        r.bad(f"lora_parameters.{k}", "unknown key; use rank, scale, dropout or keys")
    if "alpha" in lp:
        r.bad("lora_parameters.alpha", "mlx-lm calls this 'scale' (scale = alpha / rank)")
    rank = lp.get("rank")
    if not _is_int(rank) or not 1 <= rank <= 65_536:
        r.bad("lora_parameters.rank", "must be an integer ≥ 1 and ≤ 65,536")
    s = lp.get("scale")
    if not _is_number(s) or not 0 < s <= 1e6:
        r.bad("lora_parameters.scale", "must be a positive number (at most 1e6)")
    d = lp.get("dropout", 0.0)
    if not _is_number(d) or not 0 <= d < 1:
        r.bad("lora_parameters.dropout", "must be in [0, 1)")
    keys = lp.get("keys")
    if keys is not None and (not isinstance(keys, list) or not keys or not all(isinstance(k, str) and k
                                                                                 for k in keys)):
        r.bad("lora_parameters.keys", "must be a list of module names such as self_attn.q_proj")


def _check_schedule(r: _Report) -> None:
    sched = r.mapping("lr_schedule", "must be a mapping with name, arguments, and optional warmup/warmup_init")
    if sched is None:
        return
    name = sched.get("name")
    if name not in SCHEDULES:
        r.bad("lr_schedule.name", f"must be one of the mlx schedules {', '.join(SCHEDULES)}")
    args = sched.get("arguments")
    if not isinstance(args, list) or not args or not all(_is_number(a) for a in args):
        r.bad("lr_schedule.arguments", "must be a list of numbers, the first being the peak learning rate")
    elif not 0 < args[0] < 1:
        r.bad("lr_schedule.arguments", "the first argument (peak learning rate) must be between 0 and 1")
    elif name in SCHEDULE_ARGS:
        fewest, most, steps = SCHEDULE_ARGS[name]
        if not fewest <= len(args) <= most:
            count = str(fewest) if fewest == most else f"{fewest} or {most}"
            r.bad("lr_schedule.arguments", f"{name} takes {count} arguments, got {len(args)}")
        elif any(not 1 <= args[i] <= MAX_COUNT for i in steps if i < len(args)):
            r.bad("lr_schedule.arguments", f"{name}'s step count must be from 1 to {MAX_COUNT:,}")
    w = sched.get("warmup", 0)
    if not _is_int(w) or not 0 <= w <= MAX_COUNT:
        r.bad("lr_schedule.warmup", f"must be an integer ≥ 0 and ≤ {MAX_COUNT:,} (warm-up iterations)")
    wi = sched.get("warmup_init", 0.0)
    if not _is_number(wi) or not 0 <= wi < 1:
        r.bad("lr_schedule.warmup_init", "must be a learning rate in [0, 1)")
    unknown = set(sched) - {"name", "arguments", "warmup", "warmup_init"}
    if unknown:
        r.bad("lr_schedule", f"unknown keys {sorted(map(str, unknown))}")


def _optimizer_value_ok(kind: str, v: Any) -> bool:
    if kind == "bool":
        return isinstance(v, bool)
    if kind == "count":
        return _is_int(v) and 1 <= v <= 1000
    if kind == "optional":
        return v is None or (_is_number(v) and 0 <= v < 1)
    if kind == "signed":
        return _is_number(v)
    if kind in ("betas", "pair"):
        return (isinstance(v, list) and len(v) == 2 and all(_is_number(x) and x >= 0 for x in v)
                and (kind == "pair" or all(x < 1 for x in v)))
    return _is_number(v) and v >= 0


_OPTIMIZER_KINDS = {"bool": "true or false", "count": "an integer from 1 to 1000", "optional": "a number in [0, 1) "
                    "or null", "signed": "a number", "betas": "a list of two numbers in [0, 1)",
                    "pair": "a list of two numbers ≥ 0", "number": "a number ≥ 0"}


def _check_optimizer_config(r: _Report) -> None:
    oc = r.mapping("optimizer_config", f"must be a mapping of optimizer name ({', '.join(OPTIMIZERS)}) to its "
                                       "arguments")
    for name in sorted(oc or {}, key=str):
        args, field = oc[name], f"optimizer_config.{name}"
        if name not in OPTIMIZER_ARGS:
            r.bad(field, f"unknown optimizer; use {', '.join(OPTIMIZERS)}")
            continue
        if args is None:
            continue
        if not isinstance(args, dict):
            r.bad(field, "must be a mapping of argument names to values")
            continue
        for key in sorted(args, key=str):
            kind = OPTIMIZER_ARGS[name].get(key)
            if kind is None:
                r.bad(f"{field}.{key}", f"unknown argument of {name}; use {', '.join(OPTIMIZER_ARGS[name])}")
            elif not _optimizer_value_ok(kind, args[key]):
                r.bad(f"{field}.{key}", f"must be {_OPTIMIZER_KINDS[kind]}")


def _check_data(r: _Report) -> None:
    cfg = r.cfg
    vf = cfg.get("valid_fraction")
    if not _is_number(vf) or not 0 <= vf < 1:
        r.bad("valid_fraction", "must be in [0, 1)")
    if cfg.get("mode") == "cpt" and cfg.get("mask_prompt"):
        r.bad("mask_prompt", "continued pre-training trains on every token; prompt masking needs mode: ift")
    if cfg.get("pack_samples") is True:
        if cfg.get("mode") != "ift":
            r.bad("pack_samples", "packs chat, completions and text samples of mode: ift"
                  + ("; mode: cpt packs its documents with packing: true" if cfg.get("mode") == "cpt" else ""))
        elif world_size(cfg) > 1:
            r.bad("pack_samples", "runs in one process for now; remove distributed or set pack_samples: false")
    mix = cfg.get("mixture")
    if mix is None:
        return
    if cfg.get("mode") != "cpt":
        r.bad("mixture", "a replay mixture needs mode: cpt")
    elif not isinstance(mix, dict) or not isinstance(mix.get("data"), str) or not mix["data"].strip():
        r.bad("mixture", "must be a mapping {data: PATH, ratio: 0..1}")
    elif not _is_number(mix.get("ratio")) or not 0 < mix["ratio"] < 1:
        r.bad("mixture.ratio", "must be a share of training tokens between 0 and 1")
    elif set(mix) - {"data", "ratio"}:
        r.bad("mixture", f"unknown keys {sorted(map(str, set(mix) - {'data', 'ratio'}))}; use data and ratio")


def _check_early_stopping(r: _Report) -> None:
    es = r.mapping("early_stopping", "must be a mapping with patience, min_delta, overfit_threshold")
    if es is None:
        return
    for k in sorted(set(es) - EARLY_STOPPING_KEYS, key=str):
        r.bad(f"early_stopping.{k}", f"unknown key; use {', '.join(sorted(EARLY_STOPPING_KEYS))}")
    p = es.get("patience", 3)
    if not _is_int(p) or not 1 <= p <= MAX_COUNT:
        r.bad("early_stopping.patience", "must be an integer ≥ 1 (evaluations without improvement)")
    for k in ("min_delta", "overfit_threshold"):
        v = es.get(k, 0.0)
        if v is not None and (not _is_number(v) or v < 0):
            r.bad(f"early_stopping.{k}", "must be a number ≥ 0")


def _check_preference(r: _Report) -> None:
    pref = r.mapping("preference", "must be a mapping with beta, loss_type, label_smoothing, best, compat")
    if pref is None:
        return
    if r.cfg.get("mode") not in ("dpo", "orpo"):
        r.bad("preference", "preference settings need mode: dpo or orpo")
    for k in sorted(set(pref) - set(PREFERENCE_KEYS)):
        r.bad(f"preference.{k}", f"unknown key; use {', '.join(PREFERENCE_KEYS)}")
    beta = pref.get("beta", 0.1)
    if not _is_number(beta) or beta <= 0:
        r.bad("preference.beta", "must be a positive number (typical: 0.1; ORPO's lambda)")
    for k in ("loss_type", "best"):
        if k in pref and pref[k] not in PREFERENCE_KEYS[k]:
            r.bad(f"preference.{k}", f"must be one of {', '.join(PREFERENCE_KEYS[k])}")
    if r.cfg.get("mode") == "orpo" and pref.get("loss_type", "sigmoid") != "sigmoid":
        r.bad("preference.loss_type", "is a DPO setting; ORPO has one loss")
    ls = pref.get("label_smoothing", 0.0)
    if not _is_number(ls) or not 0 <= ls < 0.5:
        r.bad("preference.label_smoothing", "must be in [0, 0.5) (the assumed share of flipped pairs)")
    elif ls and (r.cfg.get("mode") != "dpo" or pref.get("loss_type", "sigmoid") != "sigmoid"):
        r.bad("preference.label_smoothing", "applies to mode: dpo with loss_type: sigmoid only")
    if not isinstance(pref.get("compat", False), bool):
        r.bad("preference.compat", "must be true or false")


def _check_rest(r: _Report) -> None:
    kc = r.cfg.get("keep_checkpoints")
    if kc is not None and (not _is_int(kc) or not 1 <= kc <= MAX_COUNT):
        r.bad("keep_checkpoints", "must be an integer ≥ 1 (or absent to keep all)")
    if r.cfg.get("train_embeddings") and r.cfg.get("fine_tune_type") != "full":
        r.bad("train_embeddings", "only applies to fine_tune_type: full")


def world_size(cfg: dict[str, Any]) -> int:
    """How many processes train the run (1 without ``distributed``)."""
    dist = cfg.get("distributed") or {}
    if not isinstance(dist, dict):
        return 1
    if dist.get("hosts") is not None:
        return len(dist["hosts"]) if isinstance(dist["hosts"], list) else 1
    return dist["processes"] if _is_int(dist.get("processes")) else 1


def host_entry(entry: Any) -> dict[str, Any]:
    """A ``distributed.hosts`` entry as ``{"ssh": NAME, "ips": [...]}`` (a bare string is both when it is an IP)."""
    if isinstance(entry, str):
        return {"ssh": entry, "ips": [entry] if re.fullmatch(r"[0-9.]+|[0-9a-fA-F:]+", entry) else []}
    ips = entry.get("ips", [entry["ip"]] if "ip" in entry else [])
    return {"ssh": entry.get("ssh"), "ips": list(ips), **({"rdma": entry["rdma"]} if "rdma" in entry else {})}


def _check_hosts(r: _Report, hosts: Any, backend: str) -> None:
    if not isinstance(hosts, list) or len(hosts) < 2:
        r.bad("distributed.hosts", "must list at least two hosts (ssh names or IP addresses), rank 0 first")
        return
    for i, h in enumerate(hosts):
        field = f"distributed.hosts.{i}"
        if not isinstance(h, (str, dict)) or (isinstance(h, dict) and not isinstance(h.get("ssh"), str)):
            r.errors.append(ConfigError(field, h, "must be a host name or {ssh: NAME, ips: [IP, ...]}"))
        elif backend == "ring" and not host_entry(h)["ips"]:
            r.errors.append(ConfigError(field, h, "the ring backend needs the host's IP address "
                                                  "({ssh: NAME, ips: [IP]}, e.g. its Thunderbolt bridge address)"))


def _check_distributed(r: _Report) -> None:
    dist = r.mapping("distributed", "must be a mapping {processes: N} or {hosts: [...], backend: ring|jaccl|mpi}")
    if dist is None:
        return
    for k in sorted(set(dist) - {"processes", "hosts", "backend", "python"}):
        r.bad(f"distributed.{k}", "unknown key; use processes, or hosts, backend and python")
    if r.cfg.get("mode") in ("dpo", "orpo") and world_size(r.cfg) > 1:
        r.bad("distributed", "preference training (dpo, orpo) runs in one process for now")
    backend = dist.get("backend", "ring")
    if backend not in BACKENDS:
        r.bad("distributed.backend", f"must be one of {', '.join(BACKENDS)}")
    if ("processes" in dist) == ("hosts" in dist):
        r.bad("distributed", "give either processes (on this machine) or hosts (several machines)")
    elif "processes" in dist:
        r.integer_at("distributed.processes", dist.get("processes"), 1)
        if backend != "ring":
            r.bad("distributed.backend", "processes on one machine use the ring backend over loopback")
    else:
        _check_hosts(r, dist.get("hosts"), backend)
    py = dist.get("python")
    if py is not None and (not isinstance(py, str) or not py.startswith("/")):
        r.bad("distributed.python", "must be the absolute path of the Python interpreter on every host")
    n, bs = world_size(r.cfg), r.cfg.get("batch_size")
    if n > 1 and _is_int(bs) and bs % n:
        r.bad("batch_size", f"is the global batch and must divide by the {n} processes of distributed")


def validate(cfg: dict[str, Any], user_keys: set[str] | None = None) -> None:
    """Raise :class:`ConfigProblems` listing every invalid field with its value and the reason.

    ``user_keys`` are the keys the person wrote (the rest are defaults): unknown ones are named, and
    ``model``/``data`` must be among them."""
    report = _Report(cfg)
    huge = _check_size(report, user_keys)
    if huge:  # nothing else looks into values that large
        raise ConfigProblems(report.errors)
    _check_keys(report, user_keys)
    _check_required(report, user_keys)
    for check in (_check_choices, _check_types, _check_numbers, _check_lora, _check_schedule,
                  _check_optimizer_config, _check_data, _check_early_stopping, _check_preference, _check_rest,
                  _check_distributed):
        check(report)
    _check_lengths(report, user_keys)
    if report.errors:
        raise ConfigProblems(report.errors)


def check_against_model(cfg: dict[str, Any], model_config: dict[str, Any], weight_names: set[str] = frozenset()
                        ) -> None:
    """Checks that need the model's ``config.json``: context length and layer count; with the names of its
    weights, that every ``lora_parameters.keys`` entry names a module of its blocks (as mlx-lm matches them)."""
    errors = []
    keys = (cfg.get("lora_parameters") or {}).get("keys") if cfg.get("fine_tune_type") in ("lora", "dora") else None
    modules = {n.rsplit(".", 1)[0] for n in weight_names if ".layers." in n}
    for k in keys or []:
        if modules and not any(m.endswith("." + k) for m in modules):
            near = sorted({m.split(".layers.", 1)[1].split(".", 1)[-1] for m in modules})[:8]
            errors.append(ConfigError("lora_parameters.keys", keys, f"{k!r} is no module of this model's layers "
                                                                  f"(they have {', '.join(near)})"))
    ctx = model_config.get("max_position_embeddings")
    if isinstance(ctx, int) and cfg["max_seq_length"] > ctx:
        errors.append(ConfigError("max_seq_length", cfg["max_seq_length"], f"exceeds the model's context of {ctx}"))
    layers = model_config.get("num_hidden_layers")
    if isinstance(layers, int) and cfg["num_layers"] > layers:
        errors.append(ConfigError("num_layers", cfg["num_layers"], f"the model has only {layers} layers"))
    if errors:
        raise ConfigProblems(errors)


def schedule(kind: str, lr: float, iters: int, warmup: int = 0, final_lr: float = 0.0) -> dict | None:
    """mlx-lm ``lr_schedule`` for a ``constant``/``linear``/``cosine`` schedule with linear warm-up."""
    decay = max(iters - warmup, 1)
    if kind == "constant":
        body = {"name": "linear_schedule", "arguments": [lr, lr, 1]} if warmup else None
    elif kind == "linear":
        body = {"name": "linear_schedule", "arguments": [lr, final_lr, decay]}
    elif kind == "cosine":
        body = {"name": "cosine_decay", "arguments": [lr, decay, final_lr]}
    else:
        raise ConfigError("lr_schedule", kind, "must be constant, linear or cosine")
    if body and warmup:
        body.update(warmup=warmup, warmup_init=0.0)
    return body



def read_schedule(s: Any) -> dict[str, Any] | None:
    """What :func:`schedule` made a ``lr_schedule`` from: ``kind``, ``lr``, ``final_lr``, ``warmup`` and ``steps``
    (the schedule's length, warm-up included; None for a constant rate); None for any other schedule."""
    args = s.get("arguments") if isinstance(s, dict) else None
    ok = (isinstance(s, dict) and isinstance(args, list) and set(s) <= {"name", "arguments", "warmup", "warmup_init"}
          and not s.get("warmup_init") and all(isinstance(a, (int, float)) for a in args)
          and isinstance(s.get("warmup", 0), int))
    if not ok:
        return None
    warmup = s.get("warmup", 0)
    if s.get("name") == "linear_schedule" and len(args) == 3:
        lr, end, steps = args
        if lr == end:
            return {"kind": "constant", "lr": lr, "final_lr": 0.0, "warmup": warmup, "steps": None}
        return {"kind": "linear", "lr": lr, "final_lr": end, "warmup": warmup, "steps": steps + warmup}
    if s.get("name") == "cosine_decay" and len(args) in (2, 3):
        return {"kind": "cosine", "lr": args[0], "final_lr": args[2] if len(args) == 3 else 0.0, "warmup": warmup,
                "steps": args[1] + warmup}
    return None


def user_view(cfg: dict[str, Any]) -> dict[str, Any]:
    """The config without keys that equal their defaults (what a person would write)."""
    defaults = {**MLX_LM_DEFAULTS, **FORGE_DEFAULTS, "train": True}
    return {k: v for k, v in cfg.items() if k not in defaults or defaults[k] != v or k in ("model", "data")}


def to_mlx_lm(cfg: dict[str, Any], adapter_path: str) -> dict[str, Any]:
    """An ``mlx_lm.lora -c`` config for a ForgeLLM config that uses only mlx-lm features.

    Raises :class:`ConfigError` naming the first ForgeLLM-only feature that mlx-lm cannot express.
    """
    for key, default in FORGE_DEFAULTS.items():
        if key not in ("name", "distributed") and cfg.get(key, default) != default:  # distributed: how it launches
            raise ConfigError(key, cfg.get(key), "is a ForgeLLM feature that mlx_lm.lora cannot run")
    out = {k: v for k, v in cfg.items() if k in MLX_LM_DEFAULTS or k in MLX_LM_FEATURE_KEYS}
    out["adapter_path"] = adapter_path
    out["train"] = True
    return out


def dump_yaml(cfg: dict[str, Any]) -> str:
    return yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True)
