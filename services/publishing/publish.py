"""Publish one checkpoint of a run as a standalone model, check that it still is the fine-tune, and describe it.

::

    result = publish(workspace, "RUN", name="my-model")                          # best checkpoint, float weights
    result = publish(workspace, "RUN", 20, "my-model-q4", quantize_bits=4)       # checkpoint 20, 4-bit
    result.parity["passed"], result.path                                         # workspace/published/my-model-q4

``publish`` loads the run's base model with exactly the chosen checkpoint's adapters, fuses them
(:mod:`~services.publishing.fuse`; full fine-tune checkpoints replace the weights), optionally
quantizes (``mlx_lm.utils.quantize_model``) or writes GGUF (:mod:`~services.publishing.gguf_export`),
and saves with ``mlx_lm.utils.save`` into a hidden folder next to ``workspace/published/NAME`` that is
renamed into place only when complete. The folder holds the Hugging Face layout (config.json,
model.safetensors + index, tokenizer files, chat template) plus:

* ``parity.json``: the published model, read back with ``mlx_lm.load``, against base + checkpoint
  (:mod:`~services.publishing.parity`).
* ``README.md``: a model card and ``loss_curve.svg`` (:mod:`~services.publishing.card`).
* ``forgellm.json``: where it came from, so :func:`parity_check` can re-run the check later.

Importing this module imports MLX: call it from a worker process or the CLI, not from the UI's process.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import psutil
from mlx_lm.utils import compute_bits_per_weight, dequantize_model, quantize_model, save

from services import __version__
from services.config import ConfigError
from services.publishing import parity
from services.publishing.card import base_model_info, write_card
from services.publishing.fuse import float_dtype, fuse
from services.publishing.gguf_export import export_gguf
from services.publishing.handoff import lmstudio_target, ollama_name, place_in_lmstudio, write_modelfile
from services.publishing.parity import Export, Progress, Reference, Spans, parity_summary
from services.publishing.rules import (
    PublishError,
    base_model,
    check_options,
    choose_checkpoint,
    gguf_file_name,
    gguf_type,
    lmstudio_dir,
    published_path,
)
from services.training.folder import RunFolder
from services.training.index import resolve_adapter
from services.training.manager import RunManager, parse_ref
from services.workspace import Workspace, disk_size, read_json

PHASES = ("loading", "fusing", "quantizing", "saving", "parity", "card")
PUBLISH_SPANS = Spans(base=(0.12, 0.2), reference=(0.25, 0.35), reload=0.7, published=(0.75, 0.9))
RECHECK_SPANS = Spans(base=(0.15, 0.4), reference=(0.4, 0.6), reload=0.6, published=(0.6, 0.9))


@dataclass
class PublishResult:
    """What :func:`publish` made: the folder, the checkpoint and why, the weights' format and the parity check."""

    name: str
    path: Path
    run_id: str
    iteration: int
    reason: str  # why this checkpoint
    fine_tune_type: str
    dtype: str  # of the float weights
    quantization: dict[str, Any] | None
    gguf: Path | None
    parity: dict[str, Any]
    warnings: list[str] = field(default_factory=list)
    size_bytes: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["path"], out["gguf"] = str(self.path), str(self.gguf) if self.gguf else None
        return out


class _Reporter:
    """Calls ``progress(phase, fraction, message)`` with a fraction that never goes back; the steps within one
    task (messages ``TASK: step``) at most every ``interval`` seconds."""

    def __init__(self, callback: Progress | None, interval: float = 0.5):
        self.callback, self.last, self.interval = callback, 0.0, interval
        self.task, self.sent = None, 0.0

    def __call__(self, phase: str, fraction: float, message: str) -> None:
        self.last = max(self.last, min(fraction, 1.0))
        task = (phase, message.split(": ", 1)[0])
        now = time.monotonic()
        if self.callback is None or (task == self.task and now - self.sent < self.interval):
            return
        self.task, self.sent = task, now
        self.callback(phase, round(self.last, 3), message)


# ----------------------------------------------------------------------------------------- names and sources


def _run_folder(workspace: Workspace, run_id: str, iteration: int | None) -> tuple[RunFolder, int | None]:
    if "@" in run_id:
        try:
            run_id, ref_it = parse_ref(run_id)
        except ConfigError as e:
            raise PublishError(str(e)) from None
        if iteration is not None and ref_it is not None and iteration != ref_it:
            raise PublishError(f"run {run_id}: iteration {iteration} and @{ref_it} disagree")
        iteration = iteration if iteration is not None else ref_it
    try:
        return RunManager(workspace).folder(run_id), iteration
    except (ConfigError, ValueError) as e:
        raise PublishError(f"run {run_id!r}: {e}") from None


def _base_config(cfg: dict[str, Any], run: str) -> tuple[Path, dict[str, Any]]:
    base, base_cfg = base_model(cfg)
    if base_cfg is None:
        raise PublishError(f"run {run}: its base model folder {base} is gone or has no config.json")
    return base, base_cfg


def _clean_stale(published: Path) -> None:
    """Remove hidden build folders left by a publish that was killed (their process is gone)."""
    for p in published.glob(".tmp-*") if published.is_dir() else []:
        m = re.search(r"-pid(\d+)-", p.name)
        if m and not psutil.pid_exists(int(m.group(1))) and p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)


class _Build:
    """The export step of a publish: fuse base + checkpoint, optionally dequantize, quantize and write GGUF, save
    into the build folder ``tmp``; what it made stays on its attributes for the provenance and warnings."""

    def __init__(self, tmp: Path, base: Path, target: Path, iteration: int, options: dict[str, Any],
                 report: Progress):
        self.tmp, self.base, self.target, self.iteration = tmp, base, target, iteration
        self.options, self.report = options, report
        self.fused, self.dtype = 0, "float32"
        self.quantization: dict[str, Any] | None = None
        self.gguf_path: Path | None = None
        self.gguf_check: dict[str, Any] | None = None
        self.warnings: list[str] = []

    def __call__(self, ref: Reference) -> Export:
        o, report = self.options, self.report
        model, config = ref.model, dict(ref.config)
        kind = ref.adapter_config.get("fine_tune_type", "lora")
        report("fusing", 0.35, f"fusing {kind} checkpoint {self.iteration}")
        self.fused = fuse(model, o["dequantize"])
        if o["dequantize"]:
            model = dequantize_model(model)
            config.pop("quantization", None)
            config.pop("quantization_config", None)
        self.dtype = float_dtype(model)
        bits, group_size = o["quantize_bits"], o["group_size"]
        if bits is not None:
            report("quantizing", 0.45, f"quantizing to {bits} bits, group size {group_size}")
            with contextlib.redirect_stdout(io.StringIO()):
                model, config = quantize_model(model, config, group_size, bits)
        self.quantization = config.get("quantization")
        report("saving", 0.55, f"writing the model to {self.target}")
        with contextlib.redirect_stdout(io.StringIO()):
            save(self.tmp, str(self.base), model, ref.tokenizer, config, donate_model=False)
        kind = o["gguf"]  # already a GGUF type or None (publish() normalised it)
        if kind:
            report("saving", 0.62, f"writing GGUF ({kind}) and an Ollama Modelfile")
            self.gguf_path, self.gguf_check = export_gguf(self.tmp, model, config, kind, self.target.name)
            write_modelfile(self.tmp, self.gguf_path.name)
        bpw = compute_bits_per_weight(model) if self.quantization else None
        return Export(self.tmp, self.dtype, self.quantization, bpw, gguf=self.gguf_path)


def _environment() -> dict[str, str]:
    import mlx_lm

    return {"forgellm": __version__, "mlx": mx.__version__, "mlx_lm": mlx_lm.__version__}


def _fsync_tree(path: Path) -> None:
    for p in [*path.rglob("*"), path]:
        if p.is_symlink():
            continue
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _install(tmp: Path, target: Path, overwrite: bool) -> None:
    """Rename the finished build folder into place (an existing one only with ``overwrite``)."""
    _fsync_tree(tmp)
    if target.exists() or target.is_symlink():
        if not overwrite or target.is_symlink():
            raise PublishError(f"{target} appeared while publishing; nothing was replaced (overwrite=True replaces it)")
        old = target.with_name(f".old-{target.name}-{uuid.uuid4().hex[:8]}")
        os.rename(target, old)
        os.rename(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        try:
            os.rename(tmp, target)
        except OSError as e:  # another publish of the same name finished first
            raise PublishError(f"{target} appeared while publishing; nothing was replaced ({e.strerror})") from None



def publish(workspace: Workspace, run_id: str, iteration: int | None = None, name: str | None = None, *,
            dequantize: bool = False, quantize_bits: int | None = None, group_size: int = 64, gguf: bool = False,
            lmstudio: str | os.PathLike | None = None, license: str | None = None, overwrite: bool = False,
            strict: bool = False,
            parity_batches: int | None = None, progress: Progress | None = None) -> PublishResult:
    """Fuse checkpoint ``iteration`` (None: the best by validation loss, else the latest) of ``run_id`` into
    ``workspace/published/NAME``; check parity; write the model card. ``run_id`` may be ``RUN@ITER``.

    ``progress(phase, fraction, message)`` is called with phases loading, fusing, quantizing, saving, parity and
    card. ``strict``: a failed parity check publishes nothing and raises :class:`PublishError` (default: the
    model is published and the failure is written into parity.json and the card). ``parity_batches`` caps the
    validation batches (default: the run's ``val_batches``). Raises :class:`PublishError` with the reason.
    """
    t0 = time.time()
    report = _Reporter(progress)
    target = published_path(workspace, name, overwrite=overwrite)  # type: ignore[arg-type]
    folder, iteration = _run_folder(workspace, run_id, iteration)
    base, base_cfg = _base_config(folder.config(), folder.id)
    options = {"dequantize": dequantize, "quantize_bits": quantize_bits, "group_size": group_size,
               "gguf": gguf_type(gguf), "lmstudio": str(lmstudio) if lmstudio else None}
    check_options(options, base, base_cfg)
    lms = lmstudio_dir(lmstudio)
    placed = lmstudio_target(lms, target.name, gguf_file_name(options["gguf"])) if lms is not None else None
    if placed is not None and not overwrite and placed.exists():
        raise PublishError(f"{placed} already exists in the LM Studio models folder; choose another name or "
                           "overwrite it")
    choice = choose_checkpoint(folder, iteration)
    it = choice.iteration
    try:
        ckpt = resolve_adapter(RunManager(workspace), f"{folder.id}@{it}")
    except ConfigError as e:
        raise PublishError(str(e)) from None
    _clean_stale(workspace.published)
    tmp = workspace.published / f".tmp-{target.name}-pid{os.getpid()}-{uuid.uuid4().hex[:8]}"
    build = _Build(tmp, base, target, it, options, report)
    try:
        report("loading", 0.02, f"loading {base.name} and the run's validation data")
        result, acfg = parity.run(base, folder, it, ckpt, build, batches=parity_batches, report=report,
                                  spans=PUBLISH_SPANS)
        report("card", 0.92, "writing parity.json and the model card")
        prov = {"name": target.name, "created": time.time(), "versions": _environment(),
                "source": {"run": folder.id, "iteration": it, "reason": choice.why, "checkpoint": str(ckpt),
                           "fine_tune_type": acfg.get("fine_tune_type", "lora"), "fused_layers": build.fused},
                "base_model": base_model_info(base, base_cfg), "dtype": build.dtype,
                "quantization": build.quantization,
                "options": {**options, "license": license, "parity_batches": parity_batches},
                "gguf": build.gguf_check,
                "handoff": {"folder": str(target), "gguf": build.gguf_path.name if build.gguf_path else None,
                            "modelfile": build.gguf_path is not None, "ollama": ollama_name(target.name),
                            "lmstudio": str(placed) if placed is not None else None}}
        write_card(tmp, prov, result, folder)
        if strict and not result["passed"]:
            raise PublishError(f"parity check failed, nothing published: {parity_summary(result)}")
        if not result["passed"]:
            build.warnings.append(f"parity check failed: {parity_summary(result)}")
        _install(tmp, target, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if prov["handoff"]["lmstudio"]:
        report("card", 0.97, f"placing the GGUF in LM Studio's models folder {lms}")
        try:
            place_in_lmstudio(target / build.gguf_path.name, lms, target.name, overwrite=overwrite)
        except OSError as e:
            build.warnings.append(f"the GGUF was not placed in LM Studio's folder {lms}: {e}; the card's command "
                                  "imports it")
    size = disk_size(target)
    report("card", 1.0, f"published {target}")
    return PublishResult(name=target.name, path=target, run_id=folder.id, iteration=it, reason=choice.why,
                         fine_tune_type=prov["source"]["fine_tune_type"], dtype=build.dtype,
                         quantization=build.quantization,
                         gguf=target / build.gguf_path.name if build.gguf_path else None, parity=result,
                         warnings=build.warnings, size_bytes=size, seconds=round(time.time() - t0, 2))


def parity_check(workspace: Workspace, name: str, *, parity_batches: int | None = None,
                 progress: Progress | None = None) -> dict[str, Any]:
    """Re-run the parity check of ``workspace/published/NAME`` against its run's checkpoint (recorded in
    forgellm.json); rewrites parity.json and the model card and returns the result."""
    report = _Reporter(progress)
    dst = published_path(workspace, name, overwrite=True)
    if not dst.is_dir():
        raise PublishError(f"{dst} is not a published model folder")
    prov = read_json(dst / "forgellm.json")
    if not prov:
        raise PublishError(f"{dst} has no forgellm.json: it was not published by ForgeLLM, nothing to compare with")
    folder, _ = _run_folder(workspace, prov["source"]["run"], None)
    it = prov["source"]["iteration"]
    if it not in folder.checkpoint_iterations():
        raise PublishError(f"run {folder.id} no longer has checkpoint {it}; the parity check needs it")
    base, _ = _base_config(folder.config(), folder.id)
    if parity_batches is None:
        parity_batches = prov["options"].get("parity_batches")

    gguf_file = dst / (prov.get("gguf") or {}).get("file", "") if prov.get("gguf") else None
    if gguf_file is not None and not gguf_file.is_file():
        raise PublishError(f"{gguf_file} is gone; the parity check of a GGUF publish judges the GGUF")

    def published(ref: Reference) -> Export:  # already there: the folder, its quantization and its GGUF
        return Export(dst, quantization=(read_json(dst / "config.json", {}) or {}).get("quantization"),
                      gguf=gguf_file)

    report("loading", 0.05, f"loading {base.name} + checkpoint {it}")
    result, _ = parity.run(base, folder, it, folder.checkpoint_dir(it), published, batches=parity_batches,
                           report=report, spans=RECHECK_SPANS)
    result["rechecked"] = time.time()
    report("card", 0.95, "rewriting parity.json and the model card")
    write_card(dst, prov, result, folder)
    report("card", 1.0, parity_summary(result))
    return result


def list_published(workspace: Workspace) -> list[dict[str, Any]]:
    """Published models in the workspace: name, path, source, quantization and parity verdict."""
    out = []
    for p in sorted(workspace.published.iterdir()) if workspace.published.is_dir() else []:
        if p.name.startswith(".") or not p.is_dir() or p.is_symlink():
            continue
        prov = read_json(p / "forgellm.json", {}) or {}
        parity = read_json(p / "parity.json", {}) or {}
        out.append({"name": p.name, "path": str(p), "source": prov.get("source"), "dtype": prov.get("dtype"),
                    "quantization": prov.get("quantization"), "passed": parity.get("passed"),
                    "summary": parity_summary(parity) if "checks" in parity else None,
                    "bytes": disk_size(p)})
    return out
