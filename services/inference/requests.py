"""Generation requests and adapter folders, in plain Python (no MLX): shared by the UI-side
:class:`services.inference.service.ModelService` and the :mod:`services.inference.worker` process.

A request is a plain dict::

    {"prompt": "text" | None, "messages": [{"role": ..., "content": ...}] | None, "system": str | None,
     "format": "auto" | "chat" | "completion", "temperature": 0.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0,
     "repetition_penalty": 1.0, "repetition_context_size": 20, "max_tokens": 256, "seed": None,
     "max_kv_size": None, "ignore_eos": False}

``format: auto`` uses the tokenizer's chat template when it has one, raw completion otherwise.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from services.errors import ForgeError

SAMPLING_DEFAULTS: dict[str, Any] = {
    "temperature": 0.0,
    "top_p": 1.0,
    "top_k": 0,
    "min_p": 0.0,
    "repetition_penalty": 1.0,
    "repetition_context_size": 20,
    "max_tokens": 256,
    "seed": None,
    "max_kv_size": None,
}


FORMATS = ("auto", "chat", "completion")


ROLES = ("system", "user", "assistant", "tool")


class RequestError(ForgeError, ValueError):
    """A request or a path is invalid; the message names the field or the path and what is wrong."""


def _number(req: dict[str, Any], key: str, kind: type, low: float | None = None, high: float | None = None,
            allow_none: bool = False) -> Any:
    value = req.get(key, SAMPLING_DEFAULTS.get(key))
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and int(value) != value):
        raise RequestError(f"{key}: expected {'an integer' if kind is int else 'a number'}, got {value!r}")
    value = kind(value)
    if low is not None and value < low:
        raise RequestError(f"{key}: must be >= {low}, got {value}")
    if high is not None and value > high:
        raise RequestError(f"{key}: must be <= {high}, got {value}")
    return value


def _messages(value: Any) -> list[dict[str, str]] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not value:
        raise RequestError("messages: expected a non-empty list of {'role', 'content'} objects")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in ROLES:
            raise RequestError(f"messages[{i}]: expected {{'role': one of {list(ROLES)}, 'content': str}}, got {m!r}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def normalize_request(request: dict[str, Any]) -> dict[str, Any]:
    """Check a generation request and fill in the defaults; raises :class:`RequestError` naming the field."""
    if not isinstance(request, dict):
        raise RequestError(f"request: expected a dict, got {type(request).__name__}")
    unknown = set(request) - set(SAMPLING_DEFAULTS) - {"prompt", "messages", "system", "format", "ignore_eos"}
    if unknown:
        raise RequestError(f"request: unknown field(s) {sorted(unknown)}")
    prompt, messages = request.get("prompt"), _messages(request.get("messages"))
    if prompt is not None and not isinstance(prompt, str):
        raise RequestError(f"prompt: expected a string, got {type(prompt).__name__}")
    if prompt is None and messages is None:
        raise RequestError("request: give a 'prompt' or 'messages'")
    system = request.get("system")
    if system is not None and not isinstance(system, str):
        raise RequestError(f"system: expected a string, got {type(system).__name__}")
    fmt = request.get("format") or "auto"
    if fmt not in FORMATS:
        raise RequestError(f"format: expected one of {list(FORMATS)}, got {fmt!r}")
    out = {"prompt": prompt, "messages": messages, "system": system or None, "format": fmt,
           "ignore_eos": bool(request.get("ignore_eos", False)),
           "temperature": _number(request, "temperature", float, 0.0),
           "top_p": _number(request, "top_p", float, 0.0, 1.0),
           "top_k": _number(request, "top_k", int, 0),
           "min_p": _number(request, "min_p", float, 0.0, 1.0),
           "repetition_penalty": _number(request, "repetition_penalty", float, 0.0),
           "repetition_context_size": _number(request, "repetition_context_size", int, 1),
           "max_tokens": _number(request, "max_tokens", int, 1),
           "seed": _number(request, "seed", int, 0, allow_none=True),
           "max_kv_size": _number(request, "max_kv_size", int, 1, allow_none=True)}
    if out["repetition_penalty"] == 0.0:
        raise RequestError("repetition_penalty: must be > 0 (1.0 turns it off)")
    return out


def adapter_files(path: str | os.PathLike) -> tuple[Path, Path, dict[str, Any]]:
    """(weights, adapter_config.json, its contents) of a run, checkpoint or mlx-lm adapter folder.

    A checkpoint folder (``RUN/checkpoints/NNNNNNN``) has no config of its own: it uses its run's.
    """
    p = Path(path).expanduser()
    if p.is_file() and p.suffix == ".safetensors":
        p = p.parent
    if not p.is_dir():
        raise RequestError(f"adapter folder {p} does not exist")
    weights = p / "adapters.safetensors"
    if not weights.is_file():
        raise RequestError(f"adapter folder {p} has no adapters.safetensors: not a run, checkpoint or adapter folder")
    candidates = [p / "adapter_config.json"]
    if p.parent.name == "checkpoints":
        candidates.append(p.parent.parent / "adapter_config.json")
    config_path = next((c for c in candidates if c.is_file()), None)
    if config_path is None:
        where = " or ".join(str(c.parent) for c in candidates)
        raise RequestError(f"adapter folder {p}: no adapter_config.json in {where}")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise RequestError(f"{config_path}: unreadable adapter config ({e})") from e
    kind = config.get("fine_tune_type", "lora")
    if kind not in ("lora", "dora", "full"):
        raise RequestError(f"{config_path}: fine_tune_type {kind!r} is not lora, dora or full")
    if kind != "full" and not isinstance(config.get("lora_parameters"), dict):
        raise RequestError(f"{config_path}: a {kind} adapter config needs lora_parameters")
    return weights.resolve(), config_path.resolve(), config


def adapter_label(path: str | os.PathLike | None) -> str:
    """``base``, ``RUN`` or ``RUN@ITER`` for display."""
    if path is None:
        return "base"
    p = Path(path)
    if p.parent.name == "checkpoints" and p.name.isdigit():
        return f"{p.parent.parent.name}@{int(p.name)}"
    return p.name
