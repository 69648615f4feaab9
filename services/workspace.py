"""Workspace layout and crash-safe file writes.

A workspace holds ``models/``, ``datasets/``, ``runs/`` and ``published/``. Every file ForgeLLM writes
goes through :func:`write_atomic` (temp file + fsync + rename) or :func:`append_jsonl`, so a crash or
``kill -9`` never leaves a half-written file behind.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.errors import ForgeError, NotFound

log = logging.getLogger("forgellm")

ENV_VAR = "FORGELLM_WORKSPACE"
NAME_MAX = 100


class BadName(ForgeError, ValueError):
    """A name that is not one plain, portable folder or file name."""


def safe_name(name: str, what: str = "name", *, max_len: int = NAME_MAX,
              error: type[ForgeError] = BadName) -> str:
    """``name`` if it is one plain folder or file name (letters, digits, ``.``, ``_``, ``-``; first a letter or
    digit; at most ``max_len``): the one rule for every name ForgeLLM makes a folder or file of. Otherwise
    ``error`` (a :class:`ForgeError` that is also a ``ValueError``) says what ``what`` may be."""
    if not isinstance(name, str) or not name:
        raise error(f"{what}: give a name")
    if "/" in name or "\\" in name or name in (".", "..") or "\0" in name:
        raise error(f"{what} {name!r}: give a plain folder name, not a path (no '/', '\\', '..')")
    if not re.fullmatch(rf"[A-Za-z0-9][A-Za-z0-9._-]{{0,{max_len - 1}}}", name):
        raise error(f"{what} {name!r}: use letters, digits, '.', '_' or '-' (at most {max_len}, first a letter or "
                    "digit)")
    return name


def suggest_name(text: str, fallback: str, *, sep: str = "-", max_len: int = NAME_MAX) -> str:
    """A name :func:`safe_name` accepts, made from ``text`` (a file name, a repo id): runs of other characters
    become ``sep``; ``fallback`` when nothing is left."""
    name = re.sub(r"[^A-Za-z0-9._-]+", sep, text).strip("._-")[:max_len].rstrip("._-")
    return name or fallback


@dataclass(frozen=True)
class Workspace:
    root: Path

    @classmethod
    def resolve(cls, path: str | os.PathLike | None = None) -> Workspace:
        """Workspace from an explicit path, else ``$FORGELLM_WORKSPACE``, else ``./workspace``."""
        root = Path(path or os.environ.get(ENV_VAR) or "workspace").expanduser().resolve()
        ws = cls(root)
        for sub in (ws.models, ws.datasets, ws.runs, ws.published, ws.evals):
            sub.mkdir(parents=True, exist_ok=True)
        return ws

    models = property(lambda self: self.root / "models")
    datasets = property(lambda self: self.root / "datasets")
    runs = property(lambda self: self.root / "runs")
    published = property(lambda self: self.root / "published")
    evals = property(lambda self: self.root / "evals")  # eval suites written in the app

    def inside(self, path: str | os.PathLike) -> Path:
        """Resolve ``path`` (relative to the workspace) and refuse anything that escapes it."""
        p = Path(path)
        resolved = (p if p.is_absolute() else self.root / p).resolve()
        if resolved != self.root and self.root not in resolved.parents:
            raise BadName(f"path {str(path)!r} is outside the workspace {self.root}")
        return resolved

    def find(self, value: str | os.PathLike, kind: str) -> Path:
        """A file or folder given as a path (a relative one: from the current folder), as a name under
        ``kind`` (``models``, ``datasets``), or relative to the workspace root; resolved.
        :class:`NotFound` says where it looked."""
        p = Path(value).expanduser()
        candidates = [p] if p.is_absolute() else [Path.cwd() / p, self.root / kind / p, self.root / p]
        for c in candidates:
            if c.exists():
                return c.resolve()
        raise NotFound(f"not found (looked in {', '.join(str(c.parent) for c in candidates)})")


def write_atomic(path: str | os.PathLike, data: bytes | str) -> None:
    """Write ``data`` to ``path`` so readers see either the old or the new file, never a partial one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def staged(target: str | os.PathLike) -> Iterator[Path]:
    """A hidden path next to ``target`` to build a file or folder in; it becomes ``target`` by one rename when
    the block ends without error, and nothing is left behind when it does not."""
    target = Path(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp / "data"
        os.rename(tmp / "data", target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike, default: Any = None) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        return default


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    """Append one JSON record as one whole line, or nothing: a write the disk cannot take (ENOSPC) is cut
    back off before the error is raised, and a torn line left by a crash is closed first, so the next
    record is never glued onto it."""
    line = (json.dumps(record) + "\n").encode()
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            line = b"\n" + line
        done = 0
        try:
            while done < len(line):
                done += os.write(fd, line[done:])
        except OSError:
            if done:
                os.ftruncate(fd, size)
            raise
    finally:
        os.close(fd)


def read_jsonl_tail(path: str | os.PathLike, offset: int = 0) -> tuple[list[dict], int]:
    """Complete records from byte ``offset`` on, and the offset to continue from next time."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read()
    except FileNotFoundError:
        return [], offset
    end = data.rfind(b"\n") + 1
    records = []
    at = offset
    for line in data[:end].split(b"\n"):
        if line.strip():
            try:
                records.append(json.loads(line))
            except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
                # a line torn by a crash mid-write is skipped, not fatal, and said
                log.warning("%s: skipped a torn record at byte %d (%d bytes)", path, at, len(line))
        at += len(line) + 1
    return records, offset + end


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


def is_disk_full(error: BaseException | None) -> bool:
    """Whether ``error`` (or what caused it) is the disk or quota being full."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        error = error.__cause__ or error.__context__
    return False


def disk_free(path: str | os.PathLike) -> int:
    """Free bytes on the disk holding ``path`` (0 if it cannot be read)."""
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return 0


def disk_low(path: str | os.PathLike, below: int = 1_000_000) -> bool:
    """Whether under ``below`` bytes are free at ``path``: after a failed write (or a worker found dead), the disk
    filled up."""
    return disk_free(path) < below


def disk_full_reason(path: str | os.PathLike) -> str:
    """What to tell a person whose workspace disk filled up."""
    return f"the workspace disk is full ({disk_free(path) / 1e6:.1f} MB free at {path}): free space and Resume"
