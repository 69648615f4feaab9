"""GGUF export: write ``model-DTYPE.gguf`` with mlx-lm next to the published model and check its round trip.

Importing this module imports MLX: call it from a worker process or the CLI, not from the UI's process.
"""

from __future__ import annotations

import contextlib
import io
import json
import tempfile
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.utils import load_model

from services.publishing.fuse import float_dtype
from services.publishing.parity import ParityInputs
from services.workspace import read_json, write_json

GGUF_DTYPE_NAMES = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}


def export_gguf(dst: Path, model: nn.Module, config: dict[str, Any],
                probe: ParityInputs) -> tuple[Path, dict[str, Any]]:
    """Write ``model.gguf`` with mlx-lm and read it back: tensors and logits of the round trip."""
    from mlx_lm.gguf import convert_to_gguf

    from services.library.gguf import convert_weights

    dtype = float_dtype(model)
    path = dst / f"model-{GGUF_DTYPE_NAMES.get(dtype, dtype)}.gguf"
    weights = dict(tree_flatten(model.parameters()))
    with contextlib.redirect_stdout(io.StringIO()):
        convert_to_gguf(dst, weights, config, str(path))
    check: dict[str, Any] = {"file": path.name, "bytes": path.stat().st_size, "tensors": None, "ok": False}
    warnings = []
    tok_json = read_json(dst / "tokenizer.json", {}) or {}
    if (tok_json.get("model") or {}).get("type") == "BPE" and "ByteLevel" in json.dumps(tok_json.get("decoder")):
        warnings.append("mlx-lm's GGUF writer labels every tokenizer as SentencePiece ('llama') without merges; this "
                        "model's tokenizer is byte-level BPE, so llama.cpp would tokenize it wrongly. For llama.cpp, "
                        "convert the published folder with llama.cpp's convert_hf_to_gguf.py")
    check["warnings"] = warnings
    try:
        raw = mx.load(str(path), format="gguf")
        check["tensors"] = len(raw)
        back, _ = convert_weights(path, raw, dequantize=False)
        with tempfile.TemporaryDirectory(prefix="forgellm-gguf-") as tmp:
            mx.save_safetensors(str(Path(tmp) / "model.safetensors"), back)
            # llama.cpp stores q/k permuted for interleaved RoPE (the same trick services.library.gguf uses)
            write_json(Path(tmp) / "config.json", {**config, "rope_traditional": True})
            rt, _ = load_model(Path(tmp))
        deltas = [mx.abs(rt(mx.array(ids)[None]).astype(mx.float32)[0] - model(mx.array(ids)[None])[0]).max().item()
                  for ids in probe.prompt_ids]
        check["max_abs_logit_delta"] = max(deltas)
        check["ok"] = check["max_abs_logit_delta"] <= 1e-3 * max(1.0, _logit_scale(model, probe))
        check["method"] = ("the GGUF tensors, read back with MLX and un-permuted, give the published model's logits "
                           "on the parity prompts (llama.cpp itself was not run)")
    except (ValueError, RuntimeError, KeyError) as e:
        check["error"] = f"GGUF round trip not checked: {e}"
    return path, check


def _logit_scale(model: nn.Module, probe: ParityInputs) -> float:
    return max(mx.abs(model(mx.array(ids)[None])).max().item() for ids in probe.prompt_ids)
