"""The names the endpoint serves: every base model of ``models/`` (``NAME``), every published model
(``published/NAME``), every run checkpoint (``RUN@ITER``) and every run with a checkpoint (``RUN``: its best
checkpoint, else its latest, as a publish picks it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from services.config import ConfigError
from services.errors import NotFound
from services.library.models import list_models
from services.publishing.rules import choose_checkpoint
from services.training.manager import RunManager, parse_ref


class UnknownModel(NotFound):
    """A model name the endpoint does not serve; the message says which names it does."""


@dataclass(frozen=True)
class Served:
    """One servable name: the base model folder it runs on and the adapter (checkpoint folder) swapped in."""

    id: str
    model: Path
    adapter: Path | None
    kind: str  # model | published | checkpoint | run
    created: int

    def describe(self) -> dict:
        """The ``/v1/models`` entry (OpenAI's fields, plus where it comes from)."""
        return {"id": self.id, "object": "model", "created": self.created, "owned_by": "forgellm",
                "kind": self.kind, "base": str(self.model), "adapter": str(self.adapter) if self.adapter else None}


def _mtime(path: Path) -> int:
    try:
        return int(path.stat().st_mtime)
    except OSError:
        return 0


def _models(manager: RunManager) -> list[Served]:
    out = []
    for m in list_models(manager.workspace, hub=False):
        if m["safetensors"]:
            path = Path(m["path"]).resolve()
            out.append(Served(m["key"], path, None, m["source"].replace("workspace", "model"), _mtime(path)))
    return out


def _run(manager: RunManager, info: dict) -> list[Served]:
    """``RUN`` and ``RUN@ITER`` of one run (none when its base model folder is gone or it has no checkpoint)."""
    base = Path(info.get("model") or "")
    if not info.get("model") or not (base / "config.json").is_file():
        return []
    folder = manager.folder(info["id"])
    its = folder.checkpoint_iterations()
    if not its:
        return []
    base = base.resolve()
    best = choose_checkpoint(folder).iteration
    out = [Served(folder.id, base, folder.checkpoint_dir(best).resolve(), "run", _mtime(folder.checkpoint_dir(best)))]
    for it in reversed(its):
        path = folder.checkpoint_dir(it)
        out.append(Served(f"{folder.id}@{it}", base, path.resolve(), "checkpoint", _mtime(path)))
    return out


def served_models(manager: RunManager) -> list[Served]:
    """Everything the endpoint serves: base models, published models, then each run and its checkpoints."""
    out = _models(manager)
    for info in manager.list():
        out += _run(manager, info)
    return out


def find_served(manager: RunManager, name: str) -> Served:
    """The servable ``name`` (see the module's doc), or :class:`UnknownModel` naming what is served."""
    for s in _models(manager):
        if s.id == name:
            return s
    try:
        info = manager.get(parse_ref(name)[0])
    except ConfigError:  # not a run (or not RUN@ITER): the message lists what is served
        info = None
    for s in _run(manager, info) if info else []:
        if s.id == name:
            return s
    names = [s.id for s in served_models(manager)]
    shown = ", ".join(names[:12]) + (f" and {len(names) - 12} more" if len(names) > 12 else "")
    raise UnknownModel(f"model {name!r} is not served here; GET /v1/models lists them ({shown or 'none yet'})")
