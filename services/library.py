"""The models and datasets catalogue: what is on disk, what it is, and getting things in and out.

Models come from the workspace's ``models/`` and ``published/`` and from the Hugging Face cache; each
entry says architecture, parameter count (read from the safetensors headers, nothing is loaded), dtype or
quantization, size on disk, context length and whether it has a chat template. Imports: a Hub repo id
(``snapshot_download`` into a hidden partial folder that a retry resumes), a local folder (copied or
linked) or a GGUF file (:func:`services.gguf_import.import_gguf`). The app runs an import in a child
process (:class:`ImportJob`, ``python -m services.library``) so it can be cancelled and never loads MLX
into the UI process. Only workspace entries can be deleted.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any

from services.child import REPO_ROOT, child_env
from services.workspace import Workspace, read_json, staged, write_atomic

Progress = Callable[[str, float | None, str], None]  # (phase, fraction 0..1 or None, message)

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
REPO_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model", "*.tiktoken", "*.txt"]
DATASET_SUFFIXES = (".jsonl", ".txt", ".md")
HUB_TIMEOUT = 3.0  # seconds to decide the Hub is unreachable
_DTYPE_NAMES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64", "U32": "uint32",
                "I64": "int64", "I32": "int32", "U8": "uint8", "I8": "int8", "BOOL": "bool"}


class LibraryError(ValueError):
    """An import, deletion or lookup that cannot be done; the message says what and where."""


# ------------------------------------------------------------------------------------------- helpers


def human_bytes(n: float | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def human_count(n: float | None) -> str:
    """``21.9M``, ``135M``, ``1.2B`` (parameters, tokens)."""
    if n is None:
        return "?"
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            v = n / div
            return f"{v:.3g}{unit}"
    return f"{n:.0f}"


def files_stamp(*paths: Path) -> tuple:
    """Names, sizes and modification times of the files at ``paths`` (files or folders): changes when any does."""
    out = []
    for path in map(Path, paths):
        for f in sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]:
            try:
                st = f.stat()
            except OSError:
                continue
            out.append((str(f), st.st_size, st.st_mtime_ns))
    return tuple(out)


def disk_size(path: Path) -> int:
    """Bytes on disk of a file or folder (links followed, each file counted once)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    seen, total = set(), 0
    for p in path.rglob("*"):
        try:
            st = p.stat()
        except OSError:
            continue
        if p.is_file() and (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            total += st.st_size
    return total


def check_name(name: str, what: str = "name") -> str:
    if not NAME_RE.match(name or ""):
        raise LibraryError(f"{what} {name!r}: use letters, digits, '.', '_' or '-' (at most 100, no leading dot)")
    return name


# ------------------------------------------------------------------------------------------- model facts


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


def weight_files(folder: Path) -> list[Path]:
    return sorted(p for p in Path(folder).glob("*.safetensors") if p.is_file())


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
    elif dtype == "?":
        dtype = str(cfg.get("torch_dtype") or cfg.get("dtype") or "?")
    arch = cfg.get("model_type") or (cfg.get("architectures") or ["?"])[0]
    size = disk_size(path)
    weights = sum(f.stat().st_size for f in weight_files(path))
    layers = tc.get("num_hidden_layers")
    detail = f"{arch}" + (f", {human_count(params)} params" if params else "") + f", {human_bytes(size)}"
    name = label or key
    return {
        "key": key, "name": name, "label": f"{name} ({detail})", "source": source, "path": str(path),
        "arch": arch, "architecture": (cfg.get("architectures") or [arch])[0], "params": params, "dtype": dtype,
        "size": weights, "disk_bytes": size, "layers": layers, "hidden": tc.get("hidden_size"),
        "vocab": tc.get("vocab_size"), "context": tc.get("max_position_embeddings"),
        "chat_template": has_chat_template(path), "safetensors": bool(weights),
        "deletable": source in ("workspace", "published"), "linked": path.is_symlink(),
    }


# ------------------------------------------------------------------------------------------- catalogue


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


def find_model(ws: Workspace, key: str) -> dict[str, Any]:
    for m in list_models(ws):
        if m["key"] == key or m["path"] == key:
            return m
    raise LibraryError(f"model {key!r}: not in the workspace's models/ or published/, nor in the HF cache")


def delete_model(ws: Workspace, key: str) -> Path:
    """Remove ``models/NAME`` or ``published/NAME`` (a linked import: only the link). Nothing outside."""
    base, name = (ws.published, key.split("/", 1)[1]) if key.startswith("published/") else (ws.models, key)
    if not NAME_RE.match(name):
        raise LibraryError(f"model {key!r}: not a folder of {ws.models} or {ws.published}; only workspace models "
                           "can be deleted")
    path = base / name
    if path.is_symlink():
        path.unlink()
        return path
    resolved = ws.inside(path)
    if resolved.parent != ws.inside(base) or not resolved.is_dir():
        raise LibraryError(f"model {key!r}: no such folder in {base}; only workspace models can be deleted")
    shutil.rmtree(resolved)
    return resolved


# ------------------------------------------------------------------------------------------- datasets


def _first_row(path: Path) -> dict | None:
    try:
        with path.open(encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    row = json.loads(line)
                    return row if isinstance(row, dict) else None
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return None


def dataset_format(path: Path) -> str:
    """A quick description from the first row: ``chat (train/valid)``, ``documents (12 files)``…"""
    from services.data import CPT_SUFFIXES, row_format, split_files  # noqa: PLC0415 (numpy only when needed)

    if path.is_dir():
        splits = split_files(path)
        if "train" in splits:
            row = _first_row(splits["train"])
            fmt = (row_format(row) if row else None) or "unknown rows"
            return f"{fmt} ({'/'.join(splits)})"
        docs = [p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in CPT_SUFFIXES]
        return f"documents ({len(docs)} files)" if docs else "empty"
    if path.suffix.lower() == ".jsonl":
        row = _first_row(path)
        return (row_format(row) if row else None) or "unknown rows"
    if path.suffix.lower() in (".txt", ".md"):
        return "text document"
    return "unsupported"


def list_datasets(ws: Workspace) -> list[dict[str, Any]]:
    """Entries of ``datasets/`` (folders, ``.jsonl``/``.txt``/``.md`` files): key, label, format, size."""
    out = []
    if not ws.datasets.is_dir():
        return out
    for p in sorted(ws.datasets.iterdir()):
        if p.name.startswith(".") or (p.is_file() and p.suffix.lower() not in DATASET_SUFFIXES):
            continue
        fmt, size = dataset_format(p), disk_size(p)
        out.append({"key": p.name, "label": f"{p.name} ({fmt}, {human_bytes(size)})", "format": fmt,
                    "size": size, "path": str(p)})
    return out


def dataset_path(ws: Workspace, key: str) -> Path:
    """``datasets/KEY`` (a direct entry, nothing outside the workspace)."""
    path = ws.inside(ws.datasets / key)
    if path.parent != ws.inside(ws.datasets) or not path.exists():
        raise LibraryError(f"dataset {key!r}: no such file or folder in {ws.datasets}")
    return path


def unique_path(folder: Path, name: str) -> Path:
    """``folder/name``, or ``stem-2.ext``, ``stem-3.ext``… if taken."""
    p = folder / name
    stem, suffix = (p.stem, p.suffix) if p.suffix in DATASET_SUFFIXES else (p.name, "")
    n = 2
    while p.exists() or p.is_symlink():
        p = folder / f"{stem}-{n}{suffix}"
        n += 1
    return p


def store_upload(ws: Workspace, filename: str, data: bytes, max_bytes: int) -> Path:
    """Write an uploaded dataset file into ``datasets/`` atomically, after checking its size, name and type."""
    if len(data) > max_bytes:
        raise LibraryError(f"{filename}: {human_bytes(len(data))} is over the upload limit of {human_bytes(max_bytes)}")
    base = Path(filename or "").name
    suffix = Path(base).suffix.lower()
    if suffix not in DATASET_SUFFIXES:
        raise LibraryError(f"{filename}: unsupported file type {suffix or '(none)'}; upload .jsonl, .txt or .md")
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(base).stem).strip("._-") or "dataset"
    target = unique_path(ws.datasets, stem[:90] + suffix)
    write_atomic(target, data)
    return target


def import_dataset(ws: Workspace, source: str | os.PathLike, name: str | None = None, link: bool = False) -> Path:
    """Copy (or link) a local dataset file or folder into ``datasets/``."""
    src = Path(source).expanduser()
    if not src.exists():
        raise LibraryError(f"{src}: no such file or folder")
    src = src.resolve()
    if src.is_file() and src.suffix.lower() not in DATASET_SUFFIXES:
        raise LibraryError(f"{src}: unsupported file type; use .jsonl, .txt, .md or a folder of them")
    name = check_name(name or src.name, "dataset name")
    if src.is_file() and Path(name).suffix.lower() != src.suffix.lower():
        name += src.suffix.lower()
    target = ws.datasets / name
    if target.exists() or target.is_symlink():
        raise LibraryError(f"dataset {name!r} already exists in {ws.datasets}; choose another name")
    if link:
        target.symlink_to(src, target_is_directory=src.is_dir())
        return target
    with staged(target) as tmp:
        if src.is_file():
            shutil.copyfile(src, tmp)
        else:
            shutil.copytree(src, tmp)
    return target


def delete_dataset(ws: Workspace, key: str) -> Path:
    path = ws.datasets / key
    if path.is_symlink():
        path.unlink()
        return path
    path = dataset_path(ws, key)
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink()
    return path


# ------------------------------------------------------------------------------------------- model imports


def source_kind(source: str) -> str:
    """``gguf``, ``folder`` or ``hub`` for an import source (an existing path wins over a repo id)."""
    p = Path(source).expanduser()
    if p.is_file():
        if p.suffix.lower() != ".gguf":
            raise LibraryError(f"{p}: a model file must be a .gguf file (or give a model folder or a Hub repo id)")
        return "gguf"
    if p.is_dir():
        return "folder"
    if REPO_RE.match(source) and not source.startswith((".", "/", "~")):
        return "hub"
    raise LibraryError(f"{source}: no such file or folder, and not a Hub repo id like 'org/name'")


def default_name(source: str, kind: str) -> str:
    if kind == "hub":
        base = source.split("/")[-1]
    else:
        p = Path(source).expanduser()
        base = p.stem if kind == "gguf" else p.resolve().name
    return re.sub(r"[^A-Za-z0-9._-]+", "-", base).strip(".-") or "model"


def _target(ws: Workspace, name: str) -> Path:
    check_name(name, "model name")
    target = ws.models / name
    if target.exists() or target.is_symlink():
        raise LibraryError(f"model {name!r} already exists in {ws.models}; choose another name or delete it first")
    return target


def _check_model_folder(folder: Path) -> None:
    if not (folder / "config.json").is_file():
        raise LibraryError(f"{folder}: no config.json, not a Hugging Face / mlx-lm model folder")
    if not weight_files(folder):
        raise LibraryError(f"{folder}: no .safetensors weights (MLX needs safetensors; convert other formats first)")


def import_folder(ws: Workspace, source: str | os.PathLike, name: str | None = None, link: bool = False,
                  progress: Progress | None = None) -> Path:
    """Copy a model folder into ``models/NAME`` (staged, then renamed), or link to it."""
    src = Path(source).expanduser().resolve()
    if not src.is_dir():
        raise LibraryError(f"{src}: no such folder")
    _check_model_folder(src)
    target = _target(ws, name or default_name(str(src), "folder"))
    if link:
        target.symlink_to(src, target_is_directory=True)
        return target
    files = [p for p in src.rglob("*") if p.is_file()]
    total, done = sum(p.stat().st_size for p in files) or 1, 0
    with staged(target) as tmp:
        for f in files:
            dst = tmp / f.relative_to(src)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, dst)
            done += f.stat().st_size
            if progress:
                progress("copy", done / total, f.name)
    return target


def import_gguf_file(ws: Workspace, source: str | os.PathLike, name: str | None = None, dequantize: bool = False,
                     progress: Progress | None = None) -> Path:
    """Convert a llama GGUF file with :func:`services.gguf_import.import_gguf` into ``models/NAME``."""
    from services.gguf_import import import_gguf  # noqa: PLC0415 (loads MLX: only in workers and the CLI)

    src = Path(source).expanduser().resolve()
    target = _target(ws, name or default_name(str(src), "gguf"))
    try:
        with staged(target) as tmp:
            if progress:
                progress("convert", None, f"converting {src.name}")
            import_gguf(src, tmp, dequantize=dequantize)
    except ValueError as e:
        raise LibraryError(str(e)) from None
    return target


def hub_offline_reason(timeout: float = HUB_TIMEOUT) -> str | None:
    """Why the Hub cannot be reached (``HF_HUB_OFFLINE``, no DNS, no answer) within ``timeout`` s, or None.

    The probe is a real request to ``$HF_ENDPOINT/api/models``; only a successful answer counts as online (an
    intercepting proxy or captive portal answers with an error status).
    """
    hub_constants = sys.modules.get("huggingface_hub.constants")  # read once, when huggingface_hub was imported
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "on", "yes", "true") \
            or getattr(hub_constants, "HF_HUB_OFFLINE", False):
        return "offline mode: HF_HUB_OFFLINE is set"
    endpoint = (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")
    result: list[str | None] = []

    def probe() -> None:
        try:
            urllib.request.urlopen(endpoint + "/api/models?limit=1", timeout=timeout).close()
            result.append(None)
        except urllib.error.HTTPError as e:
            result.append(f"{endpoint} answered HTTP {e.code} to a test request")
        except (OSError, ValueError) as e:
            reason = getattr(e, "reason", e)
            result.append(f"cannot reach {endpoint} ({getattr(reason, 'strerror', None) or reason})")

    t = threading.Thread(target=probe, daemon=True)  # DNS lookups ignore socket timeouts: bound it from outside
    t.start()
    t.join(timeout)
    return result[0] if result else f"no answer from {endpoint} within {timeout:.0f} s"


def _hub_total(repo: str, revision: str | None, patterns: list[str]) -> int | None:
    try:
        from huggingface_hub import HfApi  # noqa: PLC0415

        api = HfApi(endpoint=os.environ.get("HF_ENDPOINT"))
        info = api.model_info(repo, revision=revision, files_metadata=True, timeout=HUB_TIMEOUT * 3)
        sizes = [s.size or 0 for s in info.siblings or []
                 if any(fnmatch.fnmatch(s.rfilename, p) for p in patterns)]
        return sum(sizes) or None
    except Exception:  # noqa: BLE001 (progress is best effort; the download reports real errors)
        return None


def hub_partial_dir(ws: Workspace, repo: str, revision: str | None = None) -> Path:
    """Where a Hub download of ``repo`` at ``revision`` collects its files until it is complete."""
    rev = re.sub(r"[^A-Za-z0-9._-]", "_", revision or "main")  # a branch name may hold "/": keep one path part
    return ws.models / f".{repo.replace('/', '--')}@{rev}.download"


def import_hub(ws: Workspace, repo: str, name: str | None = None, revision: str | None = None,
               progress: Progress | None = None, offline_timeout: float = HUB_TIMEOUT) -> Path:
    """Download a Hub repo into ``models/NAME``; an earlier, cut-off download of the same repo and revision
    (kept in a hidden ``models/.ORG--REPO@REVISION.download`` folder) is resumed, whatever name it was given.

    Offline (``HF_HUB_OFFLINE`` or no connection within ``offline_timeout`` s) a repo in the local HF cache is
    copied from there; otherwise it fails at once with the reason.
    """
    if not REPO_RE.match(repo or ""):
        raise LibraryError(f"{repo!r} is not a Hub repo id like 'HuggingFaceTB/SmolLM2-135M-Instruct'")
    target = _target(ws, name or default_name(repo, "hub"))
    reason = hub_offline_reason(offline_timeout)
    from huggingface_hub import snapshot_download  # noqa: PLC0415
    from huggingface_hub.errors import (  # noqa: PLC0415
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
    )

    if reason:
        try:
            cached = snapshot_download(repo, revision=revision, local_files_only=True, allow_patterns=HUB_PATTERNS,
                                       cache_dir=hub_cache_dir())
        except (LocalEntryNotFoundError, OSError, ValueError):
            raise LibraryError(f"cannot download {repo} from the Hugging Face Hub: {reason}; it is not in the local "
                               f"HF cache ({hub_cache_dir()}) either. Import a local folder or GGUF file instead, "
                               "or retry when online.") from None
        if progress:
            progress("copy", None, f"offline: copying {repo} from the HF cache")
        return import_folder(ws, cached, target.name, progress=progress)
    partial = hub_partial_dir(ws, repo, revision)
    partial.mkdir(parents=True, exist_ok=True)
    total = _hub_total(repo, revision, HUB_PATTERNS)
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(0.5):
            if progress:
                done = disk_size(partial)
                progress("download", min(done / total, 0.99) if total else None,
                         f"{human_bytes(done)}" + (f" of {human_bytes(total)}" if total else ""))

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        snapshot_download(repo, revision=revision, local_dir=partial, allow_patterns=HUB_PATTERNS, etag_timeout=10,
                          endpoint=os.environ.get("HF_ENDPOINT"))
    except OfflineModeIsEnabled:
        raise LibraryError(f"cannot download {repo}: HF_HUB_OFFLINE was set when the Hub library loaded") from None
    except RepositoryNotFoundError:
        shutil.rmtree(partial, ignore_errors=True)  # nothing was fetched: leave nothing behind
        raise LibraryError(f"{repo}: no such model repo on the Hub (or it is private/gated: log in with "
                           "`hf auth login`)") from None
    except (HfHubHTTPError, OSError) as e:
        raise LibraryError(f"downloading {repo} failed: {e}; run the import again to resume") from None
    finally:
        stop.set()
        watcher.join()
    shutil.rmtree(partial / ".cache", ignore_errors=True)
    _check_model_folder(partial)
    os.rename(partial, target)
    if progress:
        progress("done", 1.0, str(target))
    return target


def import_model(ws: Workspace, source: str, name: str | None = None, *, link: bool = False,
                 dequantize: bool = False, revision: str | None = None, progress: Progress | None = None) -> Path:
    """Import a Hub repo id, a model folder or a GGUF file into ``models/``; returns the new folder."""
    kind = source_kind(source)
    if kind == "gguf":
        return import_gguf_file(ws, source, name, dequantize=dequantize, progress=progress)
    if kind == "folder":
        return import_folder(ws, source, name, link=link, progress=progress)
    return import_hub(ws, source, name, revision=revision, progress=progress)


class ImportJob:
    """A model import running in a child process; plain attributes for the UI to poll, ``cancel`` kills it.

    ``state``: running | done | failed | cancelled. A cancelled Hub download keeps its partial folder, so
    importing the same repo again (under any name) resumes it.
    """

    def __init__(self, ws: Workspace, source: str, name: str | None = None, *, link: bool = False,
                 dequantize: bool = False, revision: str | None = None):
        self.kind = source_kind(source)
        self.source, self.ws = source, ws
        self.name = name or default_name(source, self.kind)
        _target(ws, self.name)
        self.cmd = [sys.executable, "-m", "services.library", "--workspace", str(ws.root), source,
                    "--name", self.name] + (["--link"] if link else []) + (["--dequantize"] if dequantize else []) \
            + (["--revision", revision] if revision else [])
        self.state, self.phase, self.fraction, self.message = "running", "start", None, "starting"
        self.error: str | None = None
        self.result: str | None = None
        self.version = 0
        self._proc: subprocess.Popen | None = None
        self._cancelled = False

    def start(self) -> ImportJob:
        self._proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      cwd=REPO_ROOT, env=child_env(TOKENIZERS_PARALLELISM="false"),
                                      start_new_session=True)
        threading.Thread(target=self._read, daemon=True).start()
        return self

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        tail: list[str] = []
        for line in self._proc.stdout:
            try:
                msg = json.loads(line)
            except ValueError:
                tail = (tail + [line.rstrip()])[-5:]
                continue
            if "progress" in msg:
                self.phase, self.fraction, self.message = msg["progress"]
            elif "done" in msg:
                self.result = msg["done"]
            elif "error" in msg:
                self.error = msg["error"]
            self.version += 1
        rc = self._proc.wait()
        if self._cancelled:
            self.state, self.message = "cancelled", "cancelled" + (
                "; import the same repo again to resume the download" if self.kind == "hub" else "")
        elif rc == 0 and self.result:
            self.state, self.fraction, self.message = "done", 1.0, f"imported into {self.result}"
        else:
            self.state = "failed"
            self.error = self.error or f"the import process ended with code {rc}: {' | '.join(tail) or 'no output'}"
            self.message = self.error
        self.version += 1

    def cancel(self, grace: float = 10.0) -> None:
        """Stop the import: SIGTERM to its process group, SIGKILL after ``grace`` seconds if still there."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        self._cancelled = True

        def kill(sig: int) -> None:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    pass

        kill(signal.SIGTERM)
        timer = threading.Timer(grace, kill, args=(signal.SIGKILL,))
        timer.daemon = True
        timer.start()

    def wait(self, timeout: float = 600.0) -> str:
        deadline = time.time() + timeout
        while self.state == "running" and time.time() < deadline:
            time.sleep(0.05)
        return self.state

    def snapshot(self) -> dict[str, Any]:
        return {"state": self.state, "phase": self.phase, "fraction": self.fraction, "message": self.message,
                "error": self.error, "result": self.result, "kind": self.kind, "name": self.name,
                "source": self.source}


def _child_main(argv: list[str] | None = None) -> int:
    """``python -m services.library SOURCE --name NAME``: one import, JSON progress lines on stdout."""
    p = argparse.ArgumentParser(prog="python -m services.library")
    p.add_argument("source")
    p.add_argument("--workspace", required=True)
    p.add_argument("--name")
    p.add_argument("--link", action="store_true")
    p.add_argument("--dequantize", action="store_true")
    p.add_argument("--revision")
    args = p.parse_args(argv)

    def on_term(*_: Any) -> None:
        if source_kind(args.source) == "hub":
            os._exit(143)  # at once (download threads would be joined at exit); the partial folder stays
        raise SystemExit(143)  # unwinds, so temporary folders are removed

    signal.signal(signal.SIGTERM, on_term)

    def emit(obj: dict) -> None:
        print(json.dumps(obj), flush=True)

    try:
        path = import_model(Workspace.resolve(args.workspace), args.source, args.name, link=args.link,
                            dequantize=args.dequantize, revision=args.revision,
                            progress=lambda ph, fr, msg: emit({"progress": [ph, fr, msg]}))
    except LibraryError as e:
        emit({"error": str(e)})
        return 2
    emit({"done": str(path)})
    return 0


if __name__ == "__main__":
    raise SystemExit(_child_main())
