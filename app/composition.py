"""The composition root: every service the pages use, built once per app process.

:func:`build_services` makes one :class:`Services`; ``run_app`` hands it to the pages through
``ui.sub_pages(data=...)`` and calls :meth:`Services.close` on shutdown, which ends every child job.
Pages import this module only for the ``Services`` type.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.inference.service import ModelService
from services.library.imports import ImportJobs
from services.publishing.jobs import PublishJobs
from services.system import system_status
from services.training.folder import ACTIVE, WAITING
from services.training.manager import RunManager
from services.training.watch import RunWatcher, WatcherPool
from services.workspace import Workspace

CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"
STATUS_SECONDS = 1.5


@dataclass
class Services:
    """Everything the pages use; one instance per app process, shared by all clients."""

    workspace: Workspace
    manager: RunManager
    watchers: WatcherPool
    models: ModelService = field(default_factory=ModelService)  # the Playground's model worker
    configs_dir: Path = CONFIGS_DIR
    lan_urls: list[str] = field(default_factory=list)  # set when serving beyond loopback, token included
    publisher_jobs: PublishJobs | None = None  # publishes in child processes (build_services makes it)
    model_imports: ImportJobs = field(default_factory=ImportJobs)  # model imports in child processes, one at a time
    _status: tuple[float, dict[str, Any]] = field(default=(0.0, {}), repr=False)
    _status_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def close(self) -> None:
        """End every child job this app started: the model worker, publishes and model imports."""
        self.models.unload()
        if self.publisher_jobs is not None:
            self.publisher_jobs.stop()
        self.model_imports.close()

    def watcher(self, run_id: str) -> RunWatcher:
        return self.watchers.get(run_id)

    def status(self) -> dict[str, Any]:
        """``{"active": run.json of the running run or None, "waiting": runs in the queue, "system":
        system_status}``, cached for all clients."""
        with self._status_lock:
            stamp, value = self._status
            if time.monotonic() - stamp < STATUS_SECONDS and value:
                return value
            runs = self.manager.list()  # also finds a dead worker, which moves the queue on
            run = next((r for r in runs if r.get("status") in ACTIVE), None)
            value = {"active": run, "waiting": sum(r.get("status") == WAITING for r in runs),
                     "system": system_status(self.workspace, run or {})}
            self._status = (time.monotonic(), value)
            return value


def build_services(workspace: Workspace | str | os.PathLike, configs_dir: Path | None = None) -> Services:
    ws = workspace if isinstance(workspace, Workspace) else Workspace.resolve(workspace)
    manager = RunManager(ws)
    return Services(workspace=ws, manager=manager, watchers=WatcherPool(manager), models=ModelService(),
                    configs_dir=configs_dir or CONFIGS_DIR, publisher_jobs=PublishJobs(ws))
