"""The composition root: every service the pages use, built once per app process.

:func:`build_services` makes one :class:`Services`; ``run_app`` hands it to the pages through
``ui.sub_pages(data=...)`` and calls :meth:`Services.close` on shutdown, which ends every child job.
Pages import this module only for the ``Services`` type.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from app.lan import LanAccess, api_guard, lan_token
from services.evaluation.service import Evaluations
from services.inference.service import ModelService
from services.library.imports import ImportJobs
from services.notify import RunEvents
from services.publishing.jobs import PublishJobs
from services.serving.server import ServingServer
from services.system import StatusBoard
from services.training.manager import RunManager
from services.training.watch import WatcherPool
from services.workspace import Workspace

CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"


@dataclass
class Services:
    """Everything the pages use; one instance per app process, shared by all clients."""

    workspace: Workspace
    manager: RunManager
    watchers: WatcherPool  # one shared RunWatcher per run
    status: StatusBoard  # the status strip's active run, queue and machine
    models: ModelService = field(default_factory=ModelService)  # the Playground's model worker
    configs_dir: Path = CONFIGS_DIR
    lan: LanAccess | None = None  # set when the app serves beyond loopback: the token, its links, rotation
    publisher_jobs: PublishJobs | None = None  # publishes in child processes (build_services makes it)
    model_imports: ImportJobs = field(default_factory=ImportJobs)  # model imports in child processes, one at a time
    events: RunEvents = field(default_factory=RunEvents)  # run endings and new best checkpoints, for toasts
    evals: Evaluations | None = None  # suites and lm-eval tasks in the model worker (build_services makes it)
    serving: ServingServer | None = None  # the OpenAI-compatible endpoint, off until started (build_services makes it)

    def close(self) -> None:
        """End every child job this app started: the endpoint's model workers, the model worker, publishes and
        model imports."""
        if self.serving is not None:
            self.serving.stop()
        if self.evals is not None:
            self.evals.cancel()
        self.models.unload()
        if self.publisher_jobs is not None:
            self.publisher_jobs.stop()
        self.model_imports.close()


def build_serving(manager: RunManager) -> ServingServer:
    """The OpenAI-compatible endpoint over ``manager``'s workspace, behind :class:`app.lan.ApiGate` with the LAN
    token (for the app and ``forgellm serve``)."""
    ws = manager.workspace
    return ServingServer(manager, api_guard(ws), lambda: lan_token(ws))


def build_services(workspace: Workspace | str | os.PathLike, configs_dir: Path | None = None) -> Services:
    """The services of one app process on ``workspace``."""
    ws = workspace if isinstance(workspace, Workspace) else Workspace.resolve(workspace)
    manager = RunManager(ws)
    watchers, events, models = WatcherPool(manager), RunEvents(), ModelService()
    return Services(workspace=ws, manager=manager, watchers=watchers,
                    status=StatusBoard(manager, watchers, events=events), models=models,
                    configs_dir=configs_dir or CONFIGS_DIR, publisher_jobs=PublishJobs(ws), events=events,
                    evals=Evaluations(ws, manager, models), serving=build_serving(manager))
