"""The rules of publishing that need no MLX: safe names, the checkpoint choice and the export options.

:mod:`services.publishing.publish` (which imports MLX) uses these, and so can the UI process (which must not
import MLX) to check a form before it starts a publish in a child process.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from services.errors import ForgeError
from services.workspace import BadName, Workspace, read_json, safe_name
from services.workspace import suggest_name as workspace_name

if TYPE_CHECKING:
    from services.training.folder import RunFolder

GGUF_MODEL_TYPES = ("llama", "mistral")  # written as llama.cpp's llama (services.publishing.gguf_export)
GGUF_TYPES = ("f16", "q8_0")  # the GGUF tensor types a publish writes; the first is what gguf=True means
QUANT_BITS = (4, 8)
GROUP_SIZES = (32, 64, 128)
HUB_NAME_MAX = 96  # the longest Hugging Face repository name
# the export options of a publish, as the form, the jobs and the worker pass them (keyword arguments of publish)
OPTION_KEYS = ("dequantize", "quantize_bits", "group_size", "gguf", "lmstudio", "license", "overwrite")


class PublishError(ForgeError, ValueError):
    """Publishing cannot go on; the message says what is wrong and where."""


def published_path(workspace: Workspace, name: str, *, overwrite: bool = False) -> Path:
    """``workspace/published/NAME`` after checking NAME cannot escape it; refuses an existing NAME unless overwrite."""
    where = workspace.published
    try:
        safe_name(name, "name", max_len=HUB_NAME_MAX)
    except BadName as e:
        raise PublishError(f"{e}; models are published into {where}") from None
    target = where / name
    if target.is_symlink():
        raise PublishError(f"{target} is a symbolic link; refusing to publish through it (remove it first)")
    try:
        resolved = workspace.inside(target)
        root = workspace.inside(where)
    except ValueError as e:
        raise PublishError(f"name {name!r}: {e}") from None
    if resolved.parent != root:
        raise PublishError(f"name {name!r} resolves to {resolved}, outside {root}")
    if target.exists():
        if not target.is_dir():
            raise PublishError(f"{target} exists and is not a folder; choose another name")
        if not overwrite:
            raise PublishError(f"{target} already exists; choose another name or overwrite it (overwrite=True)")
    return target


def suggest_name(run_name: str, iteration: int) -> str:
    """A valid default folder name from the run's name and the checkpoint."""
    return f"{workspace_name(run_name, 'model', max_len=80)}-{iteration}"


def published_folder(workspace: Workspace, name: str) -> Path | None:
    """``published/NAME`` when NAME is a safe name of an existing published folder."""
    try:
        path = published_path(workspace, name, overwrite=True)
    except PublishError:
        return None
    return path if path.is_dir() and (path / "config.json").is_file() else None


@dataclass(frozen=True)
class CheckpointChoice:
    """The checkpoint a publish takes and why (``reason``: without the "requested (…)" wrapping of ``why``)."""

    iteration: int
    reason: str
    requested: bool = False

    @property
    def why(self) -> str:
        """The reason as a publish records it: ``requested (…)`` for a checkpoint that was asked for."""
        return f"requested ({self.reason})" if self.requested else self.reason


def choose_checkpoint(folder: RunFolder, iteration: int | None = None) -> CheckpointChoice:
    """The requested checkpoint, else the best by validation loss, else the latest."""
    its = folder.checkpoint_iterations()
    if not its:
        raise PublishError(f"run {folder.id} has no checkpoint yet (in {folder.checkpoints})")
    info = folder.info()
    ckpts = {c["iteration"]: c for c in info.get("checkpoints") or []}
    best = info.get("best") or {}
    if iteration is not None:
        if iteration not in its:
            raise PublishError(f"run {folder.id} has no checkpoint {iteration}; it has {its}")
        val = (ckpts.get(iteration) or {}).get("val_loss")
        reason = f"iteration {iteration}" + (f", validation loss {val:.4f}" if val is not None else "")
        if best.get("iteration") == iteration:
            reason += "; also the best by validation loss"
        elif best.get("val_loss") is not None:
            reason += f"; the best is {best['iteration']} with {best['val_loss']:.4f}"
        return CheckpointChoice(iteration, reason, requested=True)
    if best.get("iteration") in its and best.get("val_loss") is not None:
        scored = sum(1 for c in ckpts.values() if c.get("val_loss") is not None)
        return CheckpointChoice(best["iteration"], f"best validation loss ({best['val_loss']:.4f}) of the {scored} "
                                "checkpoint(s) with a validation loss")
    return CheckpointChoice(its[-1], "latest checkpoint (no validation loss was recorded to choose the best)")


def base_model(cfg: Mapping[str, Any]) -> tuple[Path, dict[str, Any] | None]:
    """A run config's base model folder and its config.json (None when the folder or the file is gone)."""
    base = Path(cfg.get("model") or "")
    return base, read_json(base / "config.json") if cfg.get("model") else None


def gguf_type(value: Any) -> str | None:
    """The GGUF type of the ``gguf`` option: None/False (no GGUF), True (the default, f16) or one of GGUF_TYPES."""
    if value in (None, False, "", "none"):
        return None
    if value is True:
        return GGUF_TYPES[0]
    if value not in GGUF_TYPES:
        raise PublishError(f"gguf {value!r}: choose one of {list(GGUF_TYPES)} (or none for no GGUF)")
    return str(value)


def gguf_file_name(kind: str) -> str:
    """The published GGUF's file name for a GGUF type (``model-TYPE.gguf``)."""
    return f"model-{kind}.gguf"


def lmstudio_dir(value: Any) -> Path | None:
    """The LM Studio models folder of the ``lmstudio`` option (None: not asked); refuses a path that is a file."""
    if not value:
        return None
    path = Path(str(value)).expanduser()
    if path.exists() and not path.is_dir():
        raise PublishError(f"LM Studio models folder {path} is a file, not a folder (LM Studio's is "
                           "~/.lmstudio/models)")
    return path


def check_options(options: Mapping[str, Any], base: Path | None = None,
                  base_cfg: Mapping[str, Any] | None = None) -> None:
    """Raise :class:`PublishError` when the export ``options`` (keys :data:`OPTION_KEYS`) do not fit each other,
    or, given the base model's folder and config, the base model."""
    unknown = set(options) - set(OPTION_KEYS)
    if unknown:
        raise PublishError(f"unknown option(s) {sorted(unknown)}; known: {list(OPTION_KEYS)}")
    quantize_bits, group_size = options.get("quantize_bits"), options.get("group_size", 64)
    dequantize, gguf = bool(options.get("dequantize")), gguf_type(options.get("gguf")) is not None
    if quantize_bits is not None and quantize_bits not in QUANT_BITS:
        raise PublishError(f"quantize_bits {quantize_bits!r}: choose one of {list(QUANT_BITS)} (or none for float)")
    if group_size not in GROUP_SIZES:
        raise PublishError(f"group_size {group_size!r}: choose one of {list(GROUP_SIZES)}")
    known, cfg = base_cfg is not None, base_cfg or {}  # unknown base: only the options' own rules are checked
    base_quantized = bool(cfg.get("quantization"))
    if quantize_bits is not None and base_quantized and not dequantize:
        raise PublishError(f"the base model {base} is already quantized; add dequantize (--dequantize) to "
                           f"re-quantize the fused weights at {quantize_bits} bits")
    if lmstudio_dir(options.get("lmstudio")) is not None and not gguf:
        raise PublishError("an LM Studio models folder needs a GGUF export (LM Studio loads GGUF on this "
                           "platform): choose a GGUF type")
    if not gguf:
        return
    model_type = cfg.get("model_type")
    if known and model_type not in GGUF_MODEL_TYPES:
        raise PublishError(f"GGUF export: ForgeLLM writes GGUF only for {', '.join(GGUF_MODEL_TYPES)} models, and "
                           f"the base model {base} is {model_type!r}. Publish without GGUF and convert the folder "
                           "with llama.cpp's convert_hf_to_gguf.py")
    if quantize_bits is not None:
        raise PublishError("GGUF export needs float weights (it quantizes by its own GGUF type, q8_0); drop "
                           "quantize_bits, or publish the GGUF and the MLX-quantized model under two names")
    if base_quantized and not dequantize:
        raise PublishError(f"GGUF export: the base model {base} is quantized; add dequantize (--dequantize) "
                           "so the fused weights are written as floats")


def split_front_matter(text: str) -> tuple[dict[str, Any], str]:
    """(YAML front matter, the rest) of a model card; ``({}, text)`` when it has none (or it is not a mapping)."""
    m = re.match(r"---[ \t]*\n(.*?)\n---[ \t]*(?:\n|$)", text, re.S)
    if not m:
        return {}, text
    try:
        front = yaml.safe_load(m.group(1))
    except yaml.YAMLError:
        return {}, text
    return (front if isinstance(front, dict) else {}), text[m.end():]
