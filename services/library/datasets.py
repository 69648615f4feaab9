"""The dataset catalogue: formats, listing, upload, import and delete of ``workspace/datasets``, the validation
split that perplexity reads, and the preference pairs that the Playground's blind A/B ratings append."""

from __future__ import annotations

import collections
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.library.models import LibraryError, LibraryNotFound, check_name
from services.settings import load_settings, settings_path
from services.units import human_bytes
from services.workspace import (
    Workspace,
    append_jsonl,
    disk_size,
    read_jsonl_tail,
    staged,
    suggest_name,
    write_atomic,
)

DATASET_SUFFIXES = (".jsonl", ".txt", ".md")
SCAN_LIMIT = 5000  # entries of a dataset folder looked at: a link to a huge tree must not slow every listing


@dataclass(frozen=True)
class FolderScan:
    """The dataset files of a folder (``.jsonl``/``.txt``/``.md``, symlinks not followed below the top), their
    total size, the symlinks met, and whether the scan stopped at :data:`SCAN_LIMIT` entries."""
    files: tuple[Path, ...]
    size: int
    links: tuple[Path, ...]
    truncated: bool


def scan_folder(path: Path, limit: int = SCAN_LIMIT) -> FolderScan:
    """One bounded walk of a dataset folder (see :class:`FolderScan`)."""
    files, links, size, seen = [], [], 0, 0
    for top, dirs, names in os.walk(path):
        for name in sorted(dirs) + sorted(names):
            seen += 1
            if seen > limit:
                return FolderScan(tuple(files), size, tuple(links), True)
            p = Path(top) / name
            if p.is_symlink():
                links.append(p)
            elif name in names and p.suffix.lower() in DATASET_SUFFIXES:
                files.append(p)
                try:
                    size += p.stat().st_size
                except OSError:
                    pass
        dirs[:] = [d for d in sorted(dirs) if not (Path(top) / d).is_symlink()]
    return FolderScan(tuple(files), size, tuple(links), False)


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
    from services.training.data import CPT_SUFFIXES, row_format, split_files  # noqa: PLC0415 (numpy only when needed)

    if path.is_dir():
        splits = split_files(path)
        if "train" in splits:
            row = _first_row(splits["train"])
            fmt = (row_format(row) if row else None) or "unknown rows"
            return f"{fmt} ({'/'.join(splits)})"
        scan = scan_folder(path)
        docs = [p for p in scan.files if p.suffix.lower() in CPT_SUFFIXES]
        more = "+" if scan.truncated else ""
        return f"documents ({len(docs)}{more} files)" if docs else "empty"
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
        fmt, size = dataset_format(p), scan_folder(p).size if p.is_dir() else disk_size(p)
        out.append({"key": p.name, "label": f"{p.name} ({fmt}, {human_bytes(size)})", "format": fmt,
                    "size": size, "path": str(p)})
    return out


def validation_split(path: str | os.PathLike) -> Path | None:
    """The file perplexity reads from a dataset: a folder's ``valid.jsonl`` or a single ``.jsonl`` file (else None)."""
    p = Path(path).expanduser()
    if p.is_dir():
        split = p / "valid.jsonl"
        return split if split.is_file() else None
    return p if p.is_file() and p.suffix == ".jsonl" else None


def validation_datasets(ws: Workspace) -> list[dict[str, Any]]:
    """The :func:`list_datasets` entries that have a :func:`validation_split`."""
    return [d for d in list_datasets(ws) if validation_split(d["path"]) is not None]


# A dataset's format (the first word of :func:`dataset_format`) → the training modes it is meant for.
MODE_FORMATS = {"cpt": ("documents", "text"), "ift": ("chat", "completions", "tools"), "dpo": ("preference",),
                "orpo": ("preference",)}


def suggested_dataset(datasets: list[dict[str, Any]], mode: str) -> str | None:
    """The first dataset (of :func:`list_datasets`) whose format fits ``mode``: documents for CPT, chats for IFT,
    pairs for DPO/ORPO."""
    kinds = MODE_FORMATS.get(mode, ())
    return next((d["key"] for d in datasets if d["format"].split(" ")[0] in kinds), None)


def dataset_path(ws: Workspace, key: str) -> Path:
    """``datasets/KEY`` (a direct entry, nothing outside the workspace)."""
    path = ws.inside(ws.datasets / key)
    if path.parent != ws.inside(ws.datasets) or not path.exists():
        raise LibraryNotFound(f"dataset {key!r}: no such file or folder in {ws.datasets}")
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


def check_upload_size(filename: str, size: int, max_bytes: int) -> None:
    """Refuse an upload over ``max_bytes`` (the browser's limit can be bypassed); callers check before reading it."""
    if size > max_bytes:
        raise LibraryError(f"{filename}: {human_bytes(size)} is over the upload limit of {human_bytes(max_bytes)}")


def store_upload(ws: Workspace, filename: str, data: bytes, max_bytes: int) -> Path:
    """Write an uploaded dataset file into ``datasets/`` atomically, after checking its size, name and type."""
    check_upload_size(filename, len(data), max_bytes)
    base = Path(filename or "").name
    suffix = Path(base).suffix.lower()
    if suffix not in DATASET_SUFFIXES:
        raise LibraryError(f"{filename}: unsupported file type {suffix or '(none)'}; upload .jsonl, .txt or .md")
    target = unique_path(ws.datasets, suggest_name(Path(base).stem, "dataset", sep="_", max_len=90) + suffix)
    write_atomic(target, data)
    return target


@dataclass(frozen=True)
class ServerPathAccess:
    """Which files of the server machine a client may import or link as datasets: any, for a browser on this
    machine (``local``); only those under the owner's ``import_roots`` (``.forgellm/settings.json``) for others,
    who upload instead."""
    local: bool
    roots: tuple[Path, ...]
    settings: Path

    @property
    def allowed(self) -> bool:
        """Whether this client may import server paths at all (the page hides the field otherwise)."""
        return self.local or bool(self.roots)

    def note(self) -> str:
        """One sentence for the page: where this client may import from, and why not elsewhere."""
        if self.local:
            return "or from a file or folder on this machine"
        if self.roots:
            return ("or from a folder the owner allowed on the server: "
                    + ", ".join(str(r) for r in self.roots))
        return ("Importing files of the server is only for a browser on that machine (or folders its owner "
                f"lists under import_roots in {self.settings}); upload your file instead.")

    def check(self, source: str | os.PathLike) -> Path:
        """``source`` resolved, if this client may read it; else a :class:`LibraryError` saying why."""
        src = Path(source).expanduser()
        if not self.local:
            if not self.roots:
                raise LibraryError(f"{source}: {self.note()}")
            if not src.is_absolute():
                raise LibraryError(f"{source}: give an absolute path under {', '.join(map(str, self.roots))}")
        if not src.exists():
            raise LibraryError(f"{src}: no such file or folder")
        src = src.resolve()
        if not self.local and not any(src == r or r in src.parents for r in self.roots):
            raise LibraryError(f"{source}: not under a folder the owner allowed ({', '.join(map(str, self.roots))})"
                               "; upload the file instead")
        return src

    def check_links(self, scan: FolderScan) -> None:
        """Refuse a folder whose symlinks lead where this client may not read."""
        if self.local:
            return
        for link in scan.links:
            try:
                self.check(link.resolve())
            except LibraryError:
                raise LibraryError(f"{link}: a symlink that leaves the allowed folders; not imported") from None


def server_path_access(ws: Workspace, local: bool) -> ServerPathAccess:
    """The :class:`ServerPathAccess` of a client (``local``: a browser on this machine, or the CLI)."""
    return ServerPathAccess(local, () if local else load_settings(ws).import_roots, settings_path(ws))


def _dataset_files(src: Path) -> FolderScan:
    """The scan of a folder that is a dataset: some dataset files within :data:`SCAN_LIMIT` entries."""
    scan = scan_folder(src)
    if scan.truncated:
        raise LibraryError(f"{src}: over {SCAN_LIMIT} files and folders; not a dataset folder (import the folder "
                           "that holds the .jsonl/.txt/.md files)")
    if not scan.files:
        raise LibraryError(f"{src}: no .jsonl, .txt or .md files; not a dataset folder")
    return scan


def import_dataset(ws: Workspace, source: str | os.PathLike, name: str | None = None, link: bool = False, *,
                   local: bool) -> Path:
    """Copy (or link) a dataset file or folder of the server machine into ``datasets/``, if the client may
    (:func:`server_path_access`; ``local``: a browser on this machine, or the CLI). A folder must hold dataset
    files (:data:`SCAN_LIMIT`); a copy takes only those (``.jsonl``, ``.txt``, ``.md``)."""
    access = server_path_access(ws, local)
    src = access.check(source)
    if src.is_file() and src.suffix.lower() not in DATASET_SUFFIXES:
        raise LibraryError(f"{src}: unsupported file type; use .jsonl, .txt, .md or a folder of them")
    if src.is_dir():
        access.check_links(_dataset_files(src))
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
            shutil.copytree(src, tmp, ignore=lambda d, names: [
                n for n in names if os.path.isfile(os.path.join(d, n)) and not n.lower().endswith(DATASET_SUFFIXES)])
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


def save_preference(workspace: Workspace, dataset_name: str, prompt: str | list[dict[str, str]], chosen: str,
                    rejected: str) -> Path:
    """Append ``{"prompt", "chosen", "rejected"}`` to ``workspace/datasets/NAME/train.jsonl`` (DPO/ORPO format)."""
    for field, value in (("chosen", chosen), ("rejected", rejected)):
        if not isinstance(value, str) or not value.strip():
            raise LibraryError(f"{field}: expected a non-empty string")
    if not (isinstance(prompt, str) and prompt.strip()) and not (isinstance(prompt, list) and prompt):
        raise LibraryError("prompt: expected a non-empty string or a list of messages")
    path = save_preference_folder(workspace, dataset_name) / "train.jsonl"
    append_jsonl(path, {"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return path


# ----------------------------------------------------------------------------------------- blind ratings

RATINGS_FILE = "ratings.jsonl"  # every blind rating of a session's dataset, pairs or not (not a training split)
VERDICTS = {"A": "A is better", "B": "B is better", "tie": "tie", "both_bad": "both bad"}


def session_dataset_name(now: float | None = None) -> str:
    """The dataset a Playground session's ratings go to: one per session, named by its start."""
    return time.strftime("ratings-%Y%m%d-%H%M%S", time.localtime(now))


def record_rating(workspace: Workspace, dataset_name: str, prompt: str | list[dict[str, str]],
                  shown: dict[str, dict[str, Any]], verdict: str, model: str | None = None,
                  sampling: dict[str, Any] | None = None) -> Path:
    """Record one blind rating in ``datasets/NAME/ratings.jsonl``: which target (``None``: the base) was shown as
    A and as B (``shown[letter] = {"target", "label", "text"}``), the verdict, the model and the sampling. A verdict
    for A or B also appends the pair (:func:`save_preference`); a tie or "both bad" teaches no preference, so it is
    only counted. Returns the dataset folder."""
    if verdict not in VERDICTS:
        raise LibraryError(f"verdict: expected one of {', '.join(VERDICTS)}, got {verdict!r}")
    if set(shown) != {"A", "B"}:
        raise LibraryError(f"shown: expected the sides A and B, got {sorted(shown)}")
    if verdict in ("A", "B"):
        other = "B" if verdict == "A" else "A"
        path = save_preference(workspace, dataset_name, prompt, shown[verdict]["text"], shown[other]["text"])
    else:
        path = save_preference_folder(workspace, dataset_name) / "train.jsonl"
    append_jsonl(path.parent / RATINGS_FILE, {
        "time": time.time(), "prompt": prompt, "model": model, "sampling": sampling or {}, "verdict": verdict,
        "shown": {k: {"target": v.get("target"), "label": v.get("label"), "text": v.get("text")}
                  for k, v in shown.items()}})
    return path.parent


def save_preference_folder(workspace: Workspace, dataset_name: str) -> Path:
    """``datasets/NAME`` for preference pairs (made if missing); a name outside the workspace is refused."""
    name = check_name((dataset_name or "").strip(), "dataset name")
    folder = workspace.inside(workspace.datasets / name)
    if folder.parent != workspace.datasets.resolve():
        raise LibraryError(f"dataset name {dataset_name!r} resolves outside {workspace.datasets}")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def ratings(workspace: Workspace, dataset_name: str) -> list[dict[str, Any]]:
    """The blind ratings recorded for ``datasets/NAME`` (none for a name not rated yet)."""
    folder = workspace.datasets / (dataset_name or "").strip()
    if not dataset_name or folder.parent != workspace.datasets:
        return []
    return read_jsonl_tail(folder / RATINGS_FILE)[0]


def rating_tally(records: list[dict[str, Any]]) -> dict[str, int]:
    """``{"pairs", "ties", "both_bad", "ratings"}``: pairs are what training gets; ties and "both bad" are left out."""
    n = collections.Counter(r.get("verdict") for r in records)
    return {"pairs": n["A"] + n["B"], "ties": n["tie"], "both_bad": n["both_bad"], "ratings": len(records)}


def rated_checkpoint(records: list[dict[str, Any]]) -> str | None:
    """The checkpoint a session rated: the non-base side shown most often, then the one chosen most often, then
    the one rated last; ``None`` when only the base was shown."""
    seen: collections.Counter[str] = collections.Counter()
    won: collections.Counter[str] = collections.Counter()
    last: dict[str, int] = {}
    for i, r in enumerate(records):
        for letter, side in (r.get("shown") or {}).items():
            target = side.get("target") if isinstance(side, dict) else None
            if target:
                seen[target] += 1
                won[target] += r.get("verdict") == letter
                last[target] = i
    return max(seen, key=lambda t: (seen[t], won[t], last[t], t)) if seen else None
