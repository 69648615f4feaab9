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
    "mixture": None,  # cpt: {"data": path, "ratio": 0.2} replay corpus, ratio of training tokens
    "mask_all_turns": True,  # ift: loss on every assistant turn (mlx-lm's mask_prompt: last only)
    "train_embeddings": False,  # full: also train embeddings, final norm and head
    "early_stopping": None,  # {"patience": 3, "min_delta": 0.0, "overfit_threshold": 0.2}
    "keep_checkpoints": None,  # rotation: keep the last K checkpoints plus the best; None keeps all
    "preference": None,  # dpo/orpo: {"beta", "loss_type", "label_smoothing", "best", "compat"}
}

EARLY_STOPPING_KEYS = {"patience", "min_delta", "overfit_threshold"}
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


class ConfigError(ForgeError, ValueError):
    """A config value that cannot run. ``field`` is a dotted path such as ``lora_parameters.rank``."""

    def __init__(self, field: str, value: Any, reason: str, source: str | None = None):
        self.field, self.value, self.reason, self.source = field, value, reason, source
        where = f"{source}: " if source else ""
        super().__init__(f"{where}{field} = {value!r}: {reason}")


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
    itself; this subclass leaves it alone), so a config means the same here as under ``mlx_lm.lora -c``."""


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
    """A config from an uploaded YAML file of at most :data:`MAX_YAML_BYTES`; raises ``UnicodeDecodeError``
    for a file that is not UTF-8 text."""
    check_yaml_size(len(data), source)
    return parse_yaml(data.decode("utf-8"), source)


def list_presets(configs_dir: Path) -> dict[str, Path]:
    """``name → path`` of the preset YAML files in ``configs/`` (not its ``samples/`` folder)."""
    if not configs_dir.is_dir():
        return {}
    return {p.stem: p for p in sorted(configs_dir.glob("*.yaml")) if p.is_file()}


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file; a syntax error names the file and line."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError("config", str(path), "file not found") from None
    return parse_yaml(text, str(path))


def with_defaults(user: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``user`` with defaults filled exactly as ``mlx_lm.lora`` does, then ForgeLLM's own."""
    cfg = copy.deepcopy(MLX_LM_DEFAULTS)
    cfg.update(copy.deepcopy(FORGE_DEFAULTS))
    for k, v in user.items():
        if v is not None or k not in cfg:
            cfg[k] = copy.deepcopy(v)
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

    def integer(self, field: str, minimum: int, allow: tuple = ()) -> None:
        v = self.cfg.get(field)
        if v in allow:
            return
        if not _is_int(v) or v < minimum:
            self.bad(field, f"must be an integer ≥ {minimum}" + (f" (or {allow[0]})" if allow else ""))


def _check_keys(r: _Report, user_keys: set[str] | None) -> None:
    for key in sorted(user_keys or r.cfg):
        if key not in KNOWN_KEYS:
            hint = difflib.get_close_matches(key, KNOWN_KEYS, n=1)
            r.errors.append(ConfigError(key, r.cfg[key], "unknown key" + (f"; did you mean {hint[0]!r}?" if hint
                                                                             else "")))


def _check_choices(r: _Report) -> None:
    cfg = r.cfg
    if not isinstance(cfg.get("model"), str) or not cfg["model"].strip():
        r.bad("model", "must be the path of a local model folder")
    if not isinstance(cfg.get("data"), str) or not cfg["data"].strip():
        r.bad("data", "must be the path of a dataset file or folder")
    if cfg.get("mode") not in (None, *MODES):
        r.bad("mode", f"must be one of {', '.join(MODES)} (or absent for plain mlx-lm behaviour)")
    if cfg.get("fine_tune_type") not in FINE_TUNE_TYPES:
        r.bad("fine_tune_type", f"must be one of {', '.join(FINE_TUNE_TYPES)}")
    if str(cfg.get("optimizer", "")).lower() not in OPTIMIZERS:
        r.bad("optimizer", f"must be one of {', '.join(OPTIMIZERS)}")


def _check_numbers(r: _Report) -> None:
    for field in ("batch_size", "steps_per_report", "steps_per_eval", "save_every", "grad_accumulation_steps"):
        r.integer(field, 1)
    r.integer("iters", 1)
    r.integer("seed", 0)
    r.integer("max_seq_length", 2)
    r.integer("num_layers", 1, allow=(-1,))
    r.integer("val_batches", 1, allow=(-1,))
    r.integer("test_batches", 1, allow=(-1,))
    e = r.cfg.get("epochs")
    if e is not None and (not _is_number(e) or e <= 0):
        r.bad("epochs", "must be a positive number of passes over the training set")
    lr = r.cfg.get("learning_rate")
    if not _is_number(lr) or not 0 < lr < 1:
        r.bad("learning_rate", "must be a number between 0 and 1 (typical: 1e-5 to 1e-3)")


def _check_lora(r: _Report) -> None:
    if r.cfg.get("fine_tune_type") not in ("lora", "dora"):
        return
    lp = r.cfg.get("lora_parameters")
    if not isinstance(lp, dict):
        r.bad("lora_parameters", "must be a mapping with rank, scale and dropout")
        return
    if "alpha" in lp:
        r.bad("lora_parameters.alpha", "mlx-lm calls this 'scale' (scale = alpha / rank)")
    rank = lp.get("rank")
    if not _is_int(rank) or rank < 1:
        r.bad("lora_parameters.rank", "must be an integer ≥ 1")
    s = lp.get("scale")
    if not _is_number(s) or s <= 0:
        r.bad("lora_parameters.scale", "must be a positive number")
    d = lp.get("dropout", 0.0)
    if not _is_number(d) or not 0 <= d < 1:
        r.bad("lora_parameters.dropout", "must be in [0, 1)")
    keys = lp.get("keys")
    if keys is not None and (not isinstance(keys, list) or not all(isinstance(k, str) for k in keys)):
        r.bad("lora_parameters.keys", "must be a list of module names such as self_attn.q_proj")


def _check_schedule(r: _Report) -> None:
    sched = r.mapping("lr_schedule", "must be a mapping with name, arguments, and optional warmup/warmup_init")
    if sched is None:
        return
    if sched.get("name") not in SCHEDULES:
        r.bad("lr_schedule.name", f"must be one of the mlx schedules {', '.join(SCHEDULES)}")
    args = sched.get("arguments")
    if not isinstance(args, list) or not args or not all(_is_number(a) for a in args):
        r.bad("lr_schedule.arguments", "must be a list of numbers, the first being the peak learning rate")
    elif not 0 < args[0] < 1:
        r.bad("lr_schedule.arguments", "the first argument (peak learning rate) must be between 0 and 1")
    w = sched.get("warmup", 0)
    if not _is_int(w) or w < 0:
        r.bad("lr_schedule.warmup", "must be an integer ≥ 0 (warm-up iterations)")
    unknown = set(sched) - {"name", "arguments", "warmup", "warmup_init"}
    if unknown:
        r.bad("lr_schedule", f"unknown keys {sorted(unknown)}")


def _check_data(r: _Report) -> None:
    cfg = r.cfg
    vf = cfg.get("valid_fraction")
    if not _is_number(vf) or not 0 <= vf < 1:
        r.bad("valid_fraction", "must be in [0, 1)")
    if cfg.get("mode") == "cpt" and cfg.get("mask_prompt"):
        r.bad("mask_prompt", "continued pre-training trains on every token; prompt masking needs mode: ift")
    mix = cfg.get("mixture")
    if mix is None:
        return
    if cfg.get("mode") != "cpt":
        r.bad("mixture", "a replay mixture needs mode: cpt")
    elif not isinstance(mix, dict) or not isinstance(mix.get("data"), str):
        r.bad("mixture", "must be a mapping {data: PATH, ratio: 0..1}")
    elif not _is_number(mix.get("ratio")) or not 0 < mix["ratio"] < 1:
        r.bad("mixture.ratio", "must be a share of training tokens between 0 and 1")


def _check_early_stopping(r: _Report) -> None:
    es = r.mapping("early_stopping", "must be a mapping with patience, min_delta, overfit_threshold")
    if es is None:
        return
    for k in sorted(set(es) - EARLY_STOPPING_KEYS):
        r.bad(f"early_stopping.{k}", f"unknown key; use {', '.join(sorted(EARLY_STOPPING_KEYS))}")
    p = es.get("patience", 3)
    if not _is_int(p) or p < 1:
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
    if kc is not None and (not _is_int(kc) or kc < 1):
        r.bad("keep_checkpoints", "must be an integer ≥ 1 (or absent to keep all)")
    if r.cfg.get("train_embeddings") and r.cfg.get("fine_tune_type") != "full":
        r.bad("train_embeddings", "only applies to fine_tune_type: full")


def validate(cfg: dict[str, Any], user_keys: set[str] | None = None) -> None:
    """Raise :class:`ConfigProblems` listing every invalid field with its value and the reason."""
    report = _Report(cfg)
    _check_keys(report, user_keys)
    for check in (_check_choices, _check_numbers, _check_lora, _check_schedule, _check_data, _check_early_stopping,
                  _check_preference, _check_rest):
        check(report)
    if report.errors:
        raise ConfigProblems(report.errors)


def check_against_model(cfg: dict[str, Any], model_config: dict[str, Any]) -> None:
    """Checks that need the model's ``config.json``: context length and layer count."""
    errors = []
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


def user_view(cfg: dict[str, Any]) -> dict[str, Any]:
    """The config without keys that equal their defaults (what a person would write)."""
    defaults = {**MLX_LM_DEFAULTS, **FORGE_DEFAULTS, "train": True}
    return {k: v for k, v in cfg.items() if k not in defaults or defaults[k] != v or k in ("model", "data")}


def to_mlx_lm(cfg: dict[str, Any], adapter_path: str) -> dict[str, Any]:
    """An ``mlx_lm.lora -c`` config for a ForgeLLM config that uses only mlx-lm features.

    Raises :class:`ConfigError` naming the first ForgeLLM-only feature that mlx-lm cannot express.
    """
    for key, default in FORGE_DEFAULTS.items():
        if key != "name" and cfg.get(key, default) != default:
            raise ConfigError(key, cfg.get(key), "is a ForgeLLM feature that mlx_lm.lora cannot run")
    out = {k: v for k, v in cfg.items() if k in MLX_LM_DEFAULTS or k in MLX_LM_FEATURE_KEYS}
    out["adapter_path"] = adapter_path
    out["train"] = True
    return out


def dump_yaml(cfg: dict[str, Any]) -> str:
    return yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True)
