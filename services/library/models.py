"""The model catalogue: what is on disk and what it is.

Models come from the workspace's ``models/`` and ``published/`` and from the Hugging Face cache; each
entry says architecture, parameter count (read from the safetensors headers, nothing is loaded), dtype or
quantization, size on disk, context length and whether it has a chat template. Only workspace entries can
be deleted, and not while a run trains on them. :func:`check_model_folder` is the one test of "is this a
model folder" and :func:`find_model` the one lookup of a model by name or path."""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
from collections import Counter
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path
from typing import Any

from services.errors import ForgeError, NotFound
from services.units import human_bytes, human_count
from services.workspace import Workspace, disk_size, files_stamp, read_json, safe_name

_DTYPE_NAMES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64", "U32": "uint32",
                "I64": "int64", "I32": "int32", "U8": "uint8", "I8": "int8", "BOOL": "bool"}


class LibraryError(ForgeError, ValueError):
    """An import, deletion or lookup that cannot be done; the message says what and where."""


class LibraryNotFound(LibraryError, NotFound):
    """A model or dataset that is not there; the message names it and where it was looked for."""


def check_name(name: str, what: str = "name") -> str:
    """``name`` if :func:`services.workspace.safe_name` accepts it, else :class:`LibraryError`."""
    return safe_name(name, what, error=LibraryError)


def safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file: ``{tensor: {"dtype", "shape", "data_offsets"}}``."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise LibraryError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", raw)
        if n > 100_000_000:
            raise LibraryError(f"{path}: not a safetensors file (header length {n})")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise LibraryError(f"{path}: unreadable safetensors header ({e})") from None
    header.pop("__metadata__", None)
    return header


def weight_names(folder: Path) -> set[str]:
    """The tensor names of a model folder's weights; a weight file that is cut short (or not safetensors) is a
    :class:`LibraryError` naming it, before anything tries to load it."""
    names: set[str] = set()
    for f in weight_files(folder):
        header = safetensors_header(f)
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
        end = max((h["data_offsets"][1] for h in header.values() if isinstance(h, dict) and "data_offsets" in h),
                  default=0)
        if f.stat().st_size < 8 + n + end:
            raise LibraryError(f"{f}: cut short ({f.stat().st_size:,} of {8 + n + end:,} bytes): copy the model again")
        names.update(header)
    return names


def weight_files(folder: Path) -> list[Path]:
    """The ``*.safetensors`` files of a model folder (the only weights mlx-lm loads)."""
    return sorted(p for p in Path(folder).glob("*.safetensors") if p.is_file())


def model_size_bytes(folder: str | os.PathLike) -> int:
    """Bytes of the weight files in a model folder (what loading it puts in memory, roughly); ``OSError`` when
    there is no such folder."""
    if not Path(folder).is_dir():
        raise FileNotFoundError(f"model folder {folder} does not exist")
    return sum(f.stat().st_size for f in weight_files(Path(folder)))


def check_model_folder(path: str | os.PathLike) -> Path:
    """The resolved model folder at ``path`` if it has a ``config.json`` and safetensors weights; otherwise
    :class:`LibraryError` (:class:`LibraryNotFound` when nothing is there) saying what is missing where."""
    p = Path(path).expanduser()
    if not p.exists():
        raise LibraryNotFound(f"model folder {p} does not exist")
    if not p.is_dir():
        raise LibraryError(f"model path {p} is a file; give the model's folder (with config.json)")
    if not (p / "config.json").is_file():
        raise LibraryError(f"model folder {p} has no config.json: not an MLX / Hugging Face model folder")
    if not weight_files(p):
        raise LibraryError(f"model folder {p} has no .safetensors weights (MLX needs safetensors; convert other "
                           "formats first)")
    return p.resolve()


def find_model(ws: Workspace, value: str | os.PathLike) -> Path:
    """The model folder named by ``value``: a path, a name under ``models/``, or ``published/NAME``
    (see :meth:`Workspace.find`), checked by :func:`check_model_folder`."""
    try:
        path = ws.find(value, "models")
    except NotFound as e:
        raise LibraryNotFound(f"model {str(value)!r}: {e}") from None
    return check_model_folder(path)


def context_limit(model_config: dict[str, Any]) -> int | None:
    """The model's context length from its config.json, if it states one."""
    for key in ("max_position_embeddings", "max_seq_len", "n_positions", "max_sequence_length", "seq_length"):
        value = model_config.get(key)
        if isinstance(value, int) and value > 0:
            return value
    text = model_config.get("text_config")
    return context_limit(text) if isinstance(text, dict) else None


def tensor_shapes(folder: Path, quantization: dict | None = None) -> dict[str, tuple[tuple[int, ...], str]]:
    """``name → (logical shape, dtype)`` of every weight; quantized (packed) weights get their real shape."""
    headers: dict[str, dict] = {}
    for f in weight_files(folder):
        headers.update(safetensors_header(f))
    q = quantization or {}
    out: dict[str, tuple[tuple[int, ...], str]] = {}
    for name, h in headers.items():
        if name.endswith((".scales", ".biases")) and name.rsplit(".", 1)[0] + ".weight" in headers:
            continue
        shape = tuple(h["shape"])
        scales = headers.get(name.rsplit(".", 1)[0] + ".scales") if name.endswith(".weight") else None
        if scales is not None and shape:
            module = name[: -len(".weight")]
            mq = q.get(module) if isinstance(q.get(module), dict) else {}
            group = mq.get("group_size") or q.get("group_size") or 64
            shape = (*shape[:-1], scales["shape"][-1] * group)
            out[name] = (shape, f"q{mq.get('bits') or q.get('bits') or '?'}")
        else:
            out[name] = (shape, h["dtype"])
    return out


@lru_cache(maxsize=256)
def _param_facts(folder: str, stamp: tuple, quant_json: str) -> tuple[int, str]:
    shapes = tensor_shapes(Path(folder), json.loads(quant_json) or None)
    params = sum(math.prod(s) for s, _ in shapes.values())
    dtypes = Counter()
    for s, d in shapes.values():
        dtypes[d] += math.prod(s)
    main = dtypes.most_common(1)[0][0] if dtypes else "?"
    return params, _DTYPE_NAMES.get(main, main)


def parameter_facts(folder: Path, cfg: dict | None = None) -> tuple[int | None, str]:
    """(parameter count, main dtype) from the safetensors headers; (None, "?") when there are no weights."""
    files = weight_files(folder)
    if not files:
        return None, "?"
    cfg = cfg if cfg is not None else (read_json(Path(folder) / "config.json") or {})
    quant = cfg.get("quantization") or cfg.get("quantization_config")
    try:
        return _param_facts(str(folder), files_stamp(*files), json.dumps(quant if isinstance(quant, dict) else None))
    except (LibraryError, OSError, KeyError, TypeError):
        return None, "?"


def has_chat_template(folder: Path) -> bool:
    folder = Path(folder)
    if (folder / "chat_template.jinja").is_file() or (folder / "chat_template.json").is_file():
        return True
    tc = read_json(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").is_file() else None
    return bool(isinstance(tc, dict) and tc.get("chat_template"))


def text_config(cfg: dict) -> dict:
    """The language-model part of a config (multimodal configs nest it in ``text_config``)."""
    inner = cfg.get("text_config")
    return {**cfg, **inner} if isinstance(inner, dict) else cfg


def model_info(path: Path, key: str, source: str, label: str | None = None) -> dict[str, Any] | None:
    """Catalogue entry of a model folder, or None if it has no ``config.json``."""
    path = Path(path)
    cfg = read_json(path / "config.json") if (path / "config.json").is_file() else None
    if not isinstance(cfg, dict):
        return None
    tc = text_config(cfg)
    params, dtype = parameter_facts(path, cfg)
    quant = cfg.get("quantization") or cfg.get("quantization_config")
    if isinstance(quant, dict) and (quant.get("bits") or quant.get("quant_method")):
        gs = quant.get("group_size")
        dtype = f"{quant.get('bits') or quant.get('quant_method')}-bit" + (f" (group {gs})" if gs else "")
        other = sorted({int(v["bits"]) for v in quant.values()
                        if isinstance(v, dict) and v.get("bits") and v["bits"] != quant.get("bits")})
        if other:  # per-layer bits (a GGUF import keeps each tensor's own): say the others too
            dtype += f", some layers {'/'.join(map(str, other))}-bit"
    elif dtype == "?":
        dtype = str(cfg.get("torch_dtype") or cfg.get("dtype") or "?")
    arch = cfg.get("model_type") or (cfg.get("architectures") or ["?"])[0]
    size = disk_size(path)
    weights = model_size_bytes(path)
    layers = tc.get("num_hidden_layers")
    detail = f"{arch}" + (f", {human_count(params)} params" if params else "") + f", {human_bytes(size)}"
    name = label or key
    return {
        "key": key, "name": name, "label": f"{name} ({detail})", "source": source, "path": str(path),
        "arch": arch, "architecture": (cfg.get("architectures") or [arch])[0], "params": params, "dtype": dtype,
        "size": weights, "disk_bytes": size, "layers": layers, "hidden": tc.get("hidden_size"),
        "vocab": tc.get("vocab_size"), "context": context_limit(cfg),
        "chat_template": has_chat_template(path), "safetensors": bool(weights),
        "deletable": source in ("workspace", "published"), "linked": path.is_symlink(),
    }


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache: ``$HF_HUB_CACHE``, ``$HF_HOME/hub`` or ``~/.cache/huggingface/hub``."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return Path(home).expanduser() / "hub"


def hub_cached_models(cache: Path | None = None) -> list[tuple[str, Path]]:
    """``(repo id, snapshot folder)`` of cached model repos (the ``main`` ref, else the newest snapshot)."""
    cache = cache or hub_cache_dir()
    out = []
    if not cache.is_dir():
        return out
    for repo in sorted(cache.glob("models--*")):
        snaps = repo / "snapshots"
        if not snaps.is_dir():
            continue
        ref = repo / "refs" / "main"
        snap = snaps / ref.read_text().strip() if ref.is_file() else None
        if snap is None or not snap.is_dir():
            dirs = sorted((p for p in snaps.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)
            snap = dirs[-1] if dirs else None
        if snap is not None and (snap / "config.json").exists():
            out.append((repo.name[len("models--"):].replace("--", "/"), snap))
    return out


def list_models(ws: Workspace, hub: bool = True) -> list[dict[str, Any]]:
    """Every model: ``models/`` (key: name), ``published/`` (key: ``published/NAME``), the Hub cache (key: path)."""
    out = []
    for base, prefix, source in ((ws.models, "", "workspace"), (ws.published, "published/", "published")):
        if not base.is_dir():
            continue
        for p in sorted(base.iterdir()):
            if p.name.startswith(".") or not p.is_dir():
                continue
            info = model_info(p, prefix + p.name, source)
            if info:
                out.append(info)
    if hub:
        for repo, snap in hub_cached_models():
            info = model_info(snap, str(snap), "hf-cache", label=f"{repo} [HF cache]")
            if info:
                out.append(info)
    return out


def runs_using(model: str | os.PathLike, runs: Iterable[dict[str, Any]]) -> list[str]:
    """Ids of the runs (``run.json`` records) whose model is the folder ``model``."""
    target = Path(model).resolve()
    return [r["id"] for r in runs if r.get("model") and Path(r["model"]).resolve() == target]


def check_deletable(ws: Workspace, key: str, active_runs: Iterable[dict[str, Any]] = ()) -> Path:
    """The folder (a link is not followed) of ``models/NAME`` or ``published/NAME`` if it may be deleted: not
    outside those folders, and no run of ``active_runs`` (running runs' ``run.json`` records) trains on it."""
    base, name = (ws.published, key.split("/", 1)[1]) if key.startswith("published/") else (ws.models, key)
    try:
        check_name(name)
    except LibraryError:
        raise LibraryError(f"model {key!r}: not a folder of {ws.models} or {ws.published}; only workspace models "
                           "can be deleted") from None
    users = runs_using(base / name, active_runs)
    if users:
        raise LibraryError(f"{key} is used by the running run {users[0]}; stop it first")
    return base / name


def delete_model(ws: Workspace, key: str, active_runs: Iterable[dict[str, Any]] = ()) -> Path:
    """Remove ``models/NAME`` or ``published/NAME`` (a linked import: only the link) if :func:`check_deletable`
    allows it."""
    path = check_deletable(ws, key, active_runs)
    base = path.parent
    if path.is_symlink():
        path.unlink()
        return path
    resolved = ws.inside(path)
    if resolved.parent != ws.inside(base) or not resolved.is_dir():
        raise LibraryError(f"model {key!r}: no such folder in {base}; only workspace models can be deleted")
    shutil.rmtree(resolved)
    return resolved
