"""Model imports: a Hub repo id (``snapshot_download`` into a hidden partial folder that a retry
resumes), a local folder (copied or linked) or a GGUF file (:func:`services.library.gguf.import_gguf`). The app
runs an import in a child process (:class:`ImportJob`, ``python -m services.library.imports``) so it can be
cancelled and never loads MLX into the UI process; :class:`ImportJobs` admits one import at a time."""

from __future__ import annotations

import argparse
import fnmatch
import os
import re
import shutil
import signal
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from services.jobs import ChildJob, emit
from services.library.datasets import server_path_access
from services.library.models import LibraryError, check_model_folder, check_name, hub_cache_dir, hub_cached_models
from services.units import human_bytes
from services.workspace import Workspace, disk_size, staged, suggest_name

Progress = Callable[[str, float | None, str], None]  # (phase, fraction 0..1 or None, message)


REPO_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model", "*.tiktoken", "*.txt"]


HUB_TIMEOUT = 3.0  # seconds to decide the Hub is unreachable


SOURCE_KINDS = {"hub": "Hugging Face Hub", "folder": "Local folder", "gguf": "GGUF file"}


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
    """The name in ``models/`` an import of ``source`` gets when none is given."""
    if kind == "hub":
        base = source.split("/")[-1]
    else:
        p = Path(source).expanduser()
        base = p.stem if kind == "gguf" else p.resolve().name
    return suggest_name(base, "model")


def _target(ws: Workspace, name: str) -> Path:
    check_name(name, "model name")
    target = ws.models / name
    if target.exists() or target.is_symlink():
        raise LibraryError(f"model {name!r} already exists in {ws.models}; choose another name or delete it first")
    return target


def import_folder(ws: Workspace, source: str | os.PathLike, name: str | None = None, link: bool = False,
                  progress: Progress | None = None) -> Path:
    """Copy a model folder into ``models/NAME`` (staged, then renamed), or link to it."""
    src = check_model_folder(source)
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
    """Convert a llama GGUF file with :func:`services.library.gguf.import_gguf` into ``models/NAME``."""
    from services.library.gguf import import_gguf  # noqa: PLC0415 (loads MLX: only in workers and the CLI)

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


# What quantized weights cost on MLX's CPU backend, measured on this project's 2-core Linux machine (MKL BLAS,
# shared, so both figures are slow; their ratio is the point): one forward pass of SmolLM2-135M over 4x128 tokens
QUANTIZED_CPU_COST = ("on MLX's CPU backend quantized matmul is far slower than float: one forward pass of "
                      "SmolLM2-135M over 4x128 tokens took 438 s with its Q4 weights against 13 s with float32 "
                      "weights (33x)")


_GGUF_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # fixed-size value types
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def gguf_weight_types(path: str | os.PathLike) -> dict[str, int]:
    """``{GGML type name: tensor count}`` of a GGUF file, read from its header only (fast: the metadata values,
    the vocabulary among them, are skipped, not parsed)."""
    import struct

    from gguf.constants import GGMLQuantizationType  # noqa: PLC0415

    p = Path(path).expanduser()

    def fail(why: str) -> LibraryError:
        return LibraryError(f"{p}: cannot read it as GGUF ({why})")

    try:
        with p.open("rb") as f:
            def unpack(fmt: str) -> tuple:
                data = f.read(struct.calcsize(fmt))
                if len(data) != struct.calcsize(fmt):
                    raise fail("the header is cut short")
                return struct.unpack(fmt, data)

            def skip(kind: int) -> None:
                if kind == _GGUF_STRING:
                    f.seek(unpack("<Q")[0], 1)
                elif kind == _GGUF_ARRAY:
                    elem, count = unpack("<IQ")
                    if elem in _GGUF_SIZES:
                        f.seek(_GGUF_SIZES[elem] * count, 1)
                    else:
                        for _ in range(count):
                            skip(elem)
                elif kind in _GGUF_SIZES:
                    f.seek(_GGUF_SIZES[kind], 1)
                else:
                    raise fail(f"unknown metadata value type {kind}")

            magic, version = f.read(4), unpack("<I")[0]
            if magic != b"GGUF" or version < 2:
                raise fail("not a GGUF v2/v3 file")
            n_tensors, n_kv = unpack("<QQ")
            for _ in range(n_kv):
                f.seek(unpack("<Q")[0], 1)
                skip(unpack("<I")[0])
            counts: dict[str, int] = {}
            for _ in range(n_tensors):
                f.seek(unpack("<Q")[0], 1)
                f.seek(8 * unpack("<I")[0], 1)
                kind = unpack("<IQ")[0]
                try:
                    name = GGMLQuantizationType(kind).name
                except ValueError:
                    name = f"type {kind}"
                counts[name] = counts.get(name, 0) + 1
    except OSError as e:
        raise fail(e.strerror or str(e)) from None
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def describe_weight_types(types: dict[str, int]) -> str:
    """``Q4_1 × 120, F32 × 61`` for :func:`gguf_weight_types`."""
    return ", ".join(f"{k} × {n}" for k, n in types.items())


def quantized_model_warning(entry: dict[str, Any], device: str) -> str | None:
    """What training the model ``entry`` (a :func:`services.library.models.list_models` entry) costs with its
    quantized weights on ``device``, and the offer of float weights; None for float weights or a fast backend."""
    dtype = str(entry.get("dtype") or "")
    if "-bit" not in dtype or not device.startswith("cpu"):
        return None
    return (f"{entry.get('name') or entry.get('key')} has quantized weights ({dtype}), and {QUANTIZED_CPU_COST}: "
            "each training step can take minutes here. For training on this machine, import it with float weights "
            "(Models page: Import float weights, or `forgellm import SOURCE --dequantize`).")


def quantized_gguf_warning(path: str | os.PathLike, device: str) -> str | None:
    """What importing the GGUF ``path`` with its quantized weights costs on ``device`` (``cpu``, ``gpu (Metal)``,
    ...) and the offer of float weights; None when its weights are float."""
    types = gguf_weight_types(path)
    quantized = {k: n for k, n in types.items() if k not in ("F32", "F16", "BF16", "F64")}
    if not quantized:
        return None
    what = f"{Path(path).name} holds quantized weights ({describe_weight_types(types)}); imported as they are they " \
           "stay quantized (QuantizedLinear)"
    if device.startswith("cpu"):
        return (f"{what}, and {QUANTIZED_CPU_COST}, so every training step takes "
                "minutes. Import float weights instead (--dequantize, 'Dequantize to float32'): float32, several "
                "times larger on disk, at float speed.")
    return (f"{what}; on {device} quantized matmul is fast, so they are fine for generation and LoRA; import "
            "float weights (--dequantize) for full fine-tuning.")


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
    check_model_folder(partial)
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


class ImportJob(ChildJob):
    """A model import running in a child process (a :class:`services.jobs.ChildJob`); ``name`` is its folder
    in ``models/``, ``result["path"]`` the imported folder once done.

    A cancelled Hub download keeps its partial folder, so importing the same repo again (under any name)
    resumes it.
    """

    def __init__(self, ws: Workspace, source: str, name: str | None = None, *, link: bool = False,
                 dequantize: bool = False, revision: str | None = None):
        self.kind = source_kind(source)
        self.source, self.ws = source, ws
        self.name = name or default_name(source, self.kind)
        _target(ws, self.name)
        args = ["--workspace", str(ws.root), source, "--name", self.name] + (["--link"] if link else []) \
            + (["--dequantize"] if dequantize else []) + (["--revision", revision] if revision else [])
        super().__init__("services.library.imports", args, what="import", cancelled_message="cancelled" + (
            "; import the same repo again to resume the download" if self.kind == "hub" else ""))


class ImportBusy(LibraryError):
    """Another import is running: the app runs one at a time."""


class ImportJobs:
    """The app's model imports, newest last, one running at a time; held by the composition root so an import
    goes on while the person browses elsewhere."""

    def __init__(self) -> None:
        self.jobs: list[ImportJob] = []
        self._lock = threading.Lock()

    @property
    def current(self) -> ImportJob | None:
        """The newest import (running or ended), or None."""
        return self.jobs[-1] if self.jobs else None

    @property
    def running(self) -> bool:
        return self.current is not None and self.current.running

    def start(self, ws: Workspace, source: str, name: str | None = None, *, local: bool, kind: str | None = None,
              link: bool = False, dequantize: bool = False, revision: str | None = None) -> ImportJob:
        """Admit and start an import: none other running (:class:`ImportBusy`), ``source`` of ``kind`` when
        given, a folder or GGUF file of the server only for a client that may read it (``local``: a browser on
        this machine; others only under the owner's import roots, as for datasets), and a Hub repo refused at
        once when the Hub cannot be reached and the HF cache lacks it. It can take the Hub probe's few seconds:
        call it off the event loop."""
        with self._lock:
            if self.running:
                raise ImportBusy("An import is already running")
            found = source_kind(source)
            if kind is not None and found != kind:
                raise LibraryError(f"{source}: looks like a {SOURCE_KINDS[found]} source, not a {SOURCE_KINDS[kind]}")
            if found != "hub":
                server_path_access(ws, local).check(source)
            if found == "hub":  # fail fast and clearly when offline (the job itself copies from the cache)
                reason = hub_offline_reason()
                if reason and not any(r == source for r, _ in hub_cached_models()):
                    raise LibraryError(f"cannot download {source} from the Hugging Face Hub: {reason}. Import a "
                                       "local folder or GGUF file instead, or retry when online.")
            job = ImportJob(ws, source, name, link=link, dequantize=dequantize, revision=revision).start()
            self.jobs.append(job)
            return job

    def close(self) -> None:
        """Cancel the running import, if any (a Hub download keeps its partial folder)."""
        for job in self.jobs:
            job.cancel()


def _child_main(argv: list[str] | None = None) -> int:
    """``python -m services.library.imports SOURCE --name NAME``: one import, JSON progress lines on stdout."""
    p = argparse.ArgumentParser(prog="python -m services.library.imports")
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
    try:
        path = import_model(Workspace.resolve(args.workspace), args.source, args.name, link=args.link,
                            dequantize=args.dequantize, revision=args.revision,
                            progress=lambda ph, fr, msg: emit("progress", phase=ph, fraction=fr, message=msg))
    except LibraryError as e:
        emit("error", message=str(e))
        return 2
    emit("progress", phase="done", fraction=1.0, message=f"imported into {path}")
    emit("result", path=str(path))
    return 0


if __name__ == "__main__":
    raise SystemExit(_child_main())
