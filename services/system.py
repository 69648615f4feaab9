"""Machine status for the app's status strip: CPU, memory, MLX memory, BLAS and free disk (no UI code).

:class:`StatusBoard` is what the strip shows, shared by all clients: the active run, the queue and the machine.

Never imports MLX or loads a BLAS: the UI process only reports what is already there, and the BLAS
a training worker actually uses is the one it recorded in its ``run.json``.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import json
import platform
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil

from services import blas
from services.training.folder import ACTIVE, WAITING, RunFolder
from services.workspace import Workspace

if TYPE_CHECKING:
    from services.notify import RunEvents
    from services.training.manager import RunManager
    from services.training.watch import WatcherPool

GB = 1e9
STATUS_SECONDS = 1.5


def installed_blas() -> str:
    """BLAS a new worker would load: ``mkl`` if MKL is installed (x86-64 Linux), else the platform's default."""
    if not sys.platform.startswith("linux"):
        return "accelerate"
    return "mkl" if blas._mkl_libs() else "reference"  # noqa: SLF001 (read-only probe, loads nothing)


def _active_run(workspace: Workspace) -> dict[str, Any] | None:
    runs = workspace.runs
    if not runs.exists():
        return None
    for path in sorted(runs.iterdir(), reverse=True):
        info = RunFolder(path).info()
        if info.get("status") in ACTIVE:
            return info
    return None


def mlx_memory() -> dict[str, float] | None:
    """MLX active/peak memory in GB, only if this process has already imported MLX."""
    mx = sys.modules.get("mlx.core")
    if mx is None:
        return None
    try:
        return {"active_gb": mx.get_active_memory() / GB, "peak_gb": mx.get_peak_memory() / GB}
    except Exception:  # noqa: BLE001 (informational only)
        return None


def system_status(workspace: Workspace, active: dict[str, Any] | None = None) -> dict[str, Any]:
    """CPU %, RAM and swap, MLX memory (if loaded here), BLAS name and free workspace disk, as plain data.

    ``active`` is the running run's ``run.json`` if the caller knows it; otherwise the runs folder is scanned.
    """
    vm, sw = psutil.virtual_memory(), psutil.swap_memory()
    if active is None:
        active = _active_run(workspace)
    if active and active.get("blas"):
        blas_name, blas_source = active["blas"], f"run {active.get('id')}"
    else:
        blas_name, blas_source = installed_blas(), "installed"
    try:
        disk = shutil.disk_usage(workspace.root)
        disk_free, disk_total = disk.free / GB, disk.total / GB
    except OSError:
        disk_free = disk_total = None
    return {
        "cpu_percent": psutil.cpu_percent(interval=None),
        "cpu_count": psutil.cpu_count(),
        "ram_used_gb": (vm.total - vm.available) / GB,
        "ram_total_gb": vm.total / GB,
        "ram_percent": vm.percent,
        "swap_used_gb": sw.used / GB,
        "swap_total_gb": sw.total / GB,
        "mlx": mlx_memory(),
        "blas": blas_name,
        "blas_source": blas_source,
        "disk_free_gb": disk_free,
        "disk_total_gb": disk_total,
    }


class StatusBoard:
    """The app's status for all clients: ``{"active": run.json of the running run or None, "waiting": runs in the
    queue, "system": system_status}``.

    Listing the runs and probing the machine is cached for ``ttl`` seconds. The active run's progress is not: it is
    read through the run's shared :class:`services.training.watch.RunWatcher`, the Monitor's source, so the strip and
    the Monitor show the same iteration.
    """

    def __init__(self, manager: RunManager, watchers: WatcherPool, ttl: float = STATUS_SECONDS,
                 events: RunEvents | None = None):
        self.manager, self.watchers, self.ttl, self.events = manager, watchers, ttl, events
        self._lock = threading.Lock()
        self._stamp = 0.0
        self._cached: dict[str, Any] = {}

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            if not self._cached or time.monotonic() - self._stamp >= self.ttl:
                runs = self.manager.list()  # also finds a dead worker, which moves the queue on
                if self.events is not None:
                    self.events.observe(runs)
                run = next((r for r in runs if r.get("status") in ACTIVE), None)
                self._cached = {"active": run, "waiting": sum(r.get("status") == WAITING for r in runs),
                                "system": system_status(self.manager.workspace, run or {})}
                self._stamp = time.monotonic()
            value = dict(self._cached)
        run = value["active"]
        if run:
            watcher = self.watchers.get(run["id"])
            watcher.poll()
            latest = watcher.latest()
            value["active"] = {**run, "iteration": latest["iteration"], "iters": latest["iters"] or run.get("iters"),
                               "status": latest["status"] or run.get("status")}
        return value

    def forget(self) -> None:
        """Drop the cache: the next :meth:`snapshot` lists the runs again."""
        with self._lock:
            self._cached = {}


def _last_train_record(path: Path, tail: int = 65536) -> dict[str, Any] | None:
    """The last ``train`` record of a run's ``metrics.jsonl`` (only the file's tail is read)."""
    try:
        with open(path, "rb") as f:
            f.seek(max(f.seek(0, 2) - tail, 0))
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and rec.get("type") == "train":
            return rec
    return None


def mlx_processes(workspace: Workspace, active: dict[str, Any] | None = None,
                  model_status: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """MLX memory as recorded by the processes that have MLX: the running run's last training report and the
    model worker's last report. The UI process never imports MLX, so it reports theirs."""
    out = []
    if active and active.get("id"):
        rec = _last_train_record(workspace.runs / active["id"] / "metrics.jsonl")
        if rec:
            out.append({"source": f"run {active.get('name') or active['id']}", "active_gb": None,
                        "peak_gb": rec.get("peak_memory_gb"), "rss_gb": rec.get("rss_gb"),
                        "device": (active.get("hardware") or {}).get("device")})
    mem = (model_status or {}).get("memory") or {}
    if (model_status or {}).get("model") and mem:
        out.append({"source": f"model worker ({Path(model_status['model']).name})",
                    "active_gb": mem.get("mlx_active_gb"), "peak_gb": mem.get("mlx_peak_gb"),
                    "rss_gb": mem.get("rss_gb"), "device": None})
    return out


def mlx_device(workspace: Workspace, active: dict[str, Any] | None = None) -> str:
    """The device MLX trains on: what the running (or newest) run recorded, else what this platform offers."""
    info = active
    if not info and workspace.runs.exists():
        for path in sorted(workspace.runs.iterdir(), reverse=True)[:5]:
            info = RunFolder(path).info()
            if (info.get("hardware") or {}).get("device"):
                break
    device = ((info or {}).get("hardware") or {}).get("device")
    if device:
        return str(device)
    return mlx_backend()


def mlx_backend() -> str:
    """The backend MLX computes on here: ``gpu (Metal)``, ``gpu (CUDA)`` or ``cpu`` (what a cost depends on; the
    device's own name, as a run records it, may be a CPU's model name)."""
    if sys.platform == "darwin" and platform.machine() == "arm64":
        return "gpu (Metal)"
    if importlib.util.find_spec("mlx_cuda") is not None:
        return "gpu (CUDA)"
    return "cpu"


def is_loopback(host: str | None) -> bool:
    """Whether ``host`` (an address, ``localhost`` or a name under ``.localhost``) is this machine's loopback."""
    host = (host or "").lower().rstrip(".")
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost" or host.endswith(".localhost")


def host_name(header: str | None) -> str:
    """The name or address of an HTTP ``Host`` (or an ``Origin``'s netloc), without port or brackets, lowercase."""
    value = (header or "").strip().lower()
    if value.startswith("["):  # [::1]:8080
        return value[1:value.find("]")] if "]" in value else ""
    if value.count(":") == 1:
        value = value.split(":", 1)[0]
    return value.rstrip(".")


def is_local_request(client: str | None, host_header: str | None) -> bool:
    """Whether a request is from a browser on this machine: a loopback client that also asked for a loopback name
    (a foreign name resolved to 127.0.0.1, as in DNS rebinding, is not trusted)."""
    return is_loopback(client) and is_loopback(host_name(host_header))


def lan_addresses() -> list[str]:
    """This machine's IPv4 addresses other devices may reach it at (not loopback), sorted."""
    import socket  # noqa: PLC0415

    import psutil  # noqa: PLC0415

    return sorted({a.address for addrs in psutil.net_if_addrs().values() for a in addrs
                   if a.family == socket.AF_INET and not ipaddress.ip_address(a.address).is_loopback})
