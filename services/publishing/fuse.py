"""Put a checkpoint onto its base model and fold it into plain weights, as ``mlx_lm.fuse`` does.

Importing this module imports MLX: call it from a worker process or the CLI, not from the UI's process.
"""

from __future__ import annotations

import gc
from collections import Counter
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.tuner.utils import linear_to_lora_layers

from services.inference.requests import RequestError, adapter_files
from services.publishing.rules import PublishError


def apply_checkpoint(model: nn.Module, checkpoint: Path) -> dict[str, Any]:
    """Put a checkpoint's adapters (LoRA/DoRA layers) or full fine-tune weights onto ``model``; return its config."""
    try:
        weights_path, _, acfg = adapter_files(checkpoint)
    except RequestError as e:
        raise PublishError(str(e)) from None
    kind = acfg.get("fine_tune_type", "lora")
    if kind != "full":
        linear_to_lora_layers(model, acfg["num_layers"], acfg["lora_parameters"], use_dora=kind == "dora")
    weights = mx.load(str(weights_path))
    params = dict(tree_flatten(model.parameters()))
    bad = [f"{k} {tuple(v.shape)}" for k, v in weights.items() if k not in params or params[k].shape != v.shape]
    if bad:
        raise PublishError(f"checkpoint {weights_path} does not fit the base model: {len(bad)} tensor(s) without a "
                           f"matching parameter, e.g. {bad[0]}")
    model.load_weights(list(weights.items()), strict=False)
    model.eval()
    return acfg


def fuse(model: nn.Module, dequantize: bool = False) -> int:
    """Fold LoRA/DoRA layers into plain linears in place (as ``mlx_lm.fuse``); return how many were fused."""
    fused = [(n, m.fuse(dequantize=dequantize)) for n, m in model.named_modules() if hasattr(m, "fuse")]
    if fused:
        model.update_modules(tree_unflatten(fused))
    return len(fused)


def float_dtype(model: nn.Module) -> str:
    """The dtype most of the model's floating-point parameters have (float32 when it has none)."""
    counts = Counter(str(v.dtype).rsplit(".", 1)[-1] for _, v in tree_flatten(model.parameters())
                     if mx.issubdtype(v.dtype, mx.floating))
    return counts.most_common(1)[0][0] if counts else "float32"


def free_memory() -> None:
    """Return the memory of models the caller has just deleted."""
    gc.collect()
    mx.clear_cache()
