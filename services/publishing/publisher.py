"""Publish one checkpoint of a run as a standalone model, check that it still is the fine-tune, and describe it.

::

    result = publish(workspace, "RUN", name="my-model")                          # best checkpoint, float weights
    result = publish(workspace, "RUN", 20, "my-model-q4", quantize_bits=4)       # checkpoint 20, 4-bit
    result.parity["passed"], result.path                                         # workspace/published/my-model-q4

``publish`` loads the run's base model with exactly the chosen checkpoint's adapters, fuses them
(``.fuse()`` as ``mlx_lm.fuse`` does; full fine-tune checkpoints replace the weights), optionally
quantizes (``mlx_lm.utils.quantize_model``) or writes GGUF (``mlx_lm.gguf``, llama/mistral/mixtral only),
and saves with ``mlx_lm.utils.save`` into a hidden folder next to ``workspace/published/NAME`` that is
renamed into place only when complete. The folder holds the Hugging Face layout (config.json,
model.safetensors + index, tokenizer files, chat template) plus:

* ``parity.json``: the published model, read back with ``mlx_lm.load``, against base + checkpoint:
  validation loss/perplexity through mlx-lm's ``evaluate`` on the run's own validation data, and greedy
  text on fixed prompts. Float exports must match (loss within 1e-4 relative, identical greedy text);
  quantized ones must stay within a perplexity tolerance and keep the fine-tune (see :data:`QUANT_PPL_TOLERANCE`).
* ``README.md``: a model card (YAML front matter, checkpoint choice, curve, evaluation, parity, data,
  config, versions) and ``loss_curve.svg``.
* ``forgellm.json``: where it came from, so :func:`parity_check` can re-run the check later.

Importing this module imports MLX: call it from a worker process or the CLI, not from the UI's process.
"""

from __future__ import annotations

import contextlib
import gc
import io
import json
import math
import os
import re
import shutil
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import psutil
import yaml
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.generate import stream_generate
from mlx_lm.tuner.trainer import default_loss, evaluate, iterate_batches
from mlx_lm.tuner.utils import linear_to_lora_layers
from mlx_lm.utils import compute_bits_per_weight, dequantize_model, load, load_model, quantize_model, save

from services import __version__
from services.config import ConfigError
from services.errors import ForgeError
from services.inference.requests import RequestError, adapter_files
from services.library.imports import hub_offline_reason
from services.publishing.rules import (
    PublishError,
    choose_checkpoint,
    published_path,
    split_front_matter,
)
from services.publishing.rules import check_options as _check_options
from services.training.batching import eval_batches, masked_loss
from services.training.data import DataError, _chat_tokens
from services.training.folder import RunFolder, history
from services.training.index import resolve_adapter
from services.training.manager import RunManager, parse_ref
from services.workspace import Workspace, disk_size, read_json, write_atomic, write_json

GGUF_DTYPE_NAMES = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}
PARITY_PROMPTS = ("Once upon a time", "The capital of France is", "Write one sentence about the sea.")
PARITY_MAX_TOKENS = 16
# Float exports: fusing W + s·BA is exact up to rounding in the weights' dtype.
FLOAT_LOSS_RTOL = {"float32": 1e-4, "float16": 1e-3, "bfloat16": 5e-3}
# Quantized exports: the largest allowed perplexity increase over base + checkpoint. Affine quantization with
# group size 64 typically costs LLMs +2-6 % perplexity at 4 bits and < 0.5 % at 8 bits (MLX and llama.cpp
# tables), so these pass sound exports with room to spare, while a lost fine-tune or a damaged tensor costs
# far more (a lost fine-tune: the whole gap to the base model; one zeroed projection: +40 % on the tiny test model).
QUANT_PPL_TOLERANCE = {2: 0.5, 3: 0.25, 4: 0.10, 5: 0.06, 6: 0.04, 8: 0.02}
# A quantized export must also keep at least this share of the fine-tune's loss improvement over the base.
MIN_RETAINED = 0.5
PHASES = ("loading", "fusing", "quantizing", "saving", "parity", "card")

Progress = Callable[[str, float, str], None]


class UploadError(ForgeError, RuntimeError):
    """Uploading to the Hugging Face Hub failed; the message says why and what to do."""


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
    base = Path(cfg["model"])
    base_cfg = read_json(base / "config.json")
    if base_cfg is None:
        raise PublishError(f"run {run}: its base model folder {base} is gone or has no config.json")
    return base, base_cfg


def _clean_stale(published: Path) -> None:
    """Remove hidden build folders left by a publish that was killed (their process is gone)."""
    for p in published.glob(".tmp-*") if published.is_dir() else []:
        m = re.search(r"-pid(\d+)-", p.name)
        if m and not psutil.pid_exists(int(m.group(1))) and p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)


# ----------------------------------------------------------------------------------------- model


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


def _float_dtype(model: nn.Module) -> str:
    counts = Counter(str(v.dtype).rsplit(".", 1)[-1] for _, v in tree_flatten(model.parameters())
                     if mx.issubdtype(v.dtype, mx.floating))
    return counts.most_common(1)[0][0] if counts else "float32"


def _free() -> None:
    """Return the memory of models the caller has just deleted."""
    gc.collect()
    mx.clear_cache()


# ----------------------------------------------------------------------------------------- parity


@dataclass
class _Probe:
    """What the parity check feeds both models: validation data and tokenized prompts."""

    cfg: dict[str, Any]
    stats: dict[str, Any]
    valid: Any
    prompts: list[str]
    prompt_ids: list[list[int]]
    batches: int
    note: str | None = None


def _probe(cfg: dict[str, Any], stats: dict[str, Any], tokenizer: Any, batches: int | None) -> _Probe:
    from services.training.trainer import load_datasets

    note = None
    try:
        _, valid, _, _ = load_datasets(cfg, tokenizer, splits=("valid",))
    except (DataError, FileNotFoundError, ValueError) as e:
        valid, note = [], f"validation data unavailable ({e}); loss not compared"
    if not len(valid) and note is None:
        note = "the run has no validation data; loss not compared"
    n = batches if batches is not None else int(cfg.get("val_batches") or -1)
    return _Probe(cfg, stats, valid, list(PARITY_PROMPTS), _prompt_ids(cfg, stats, tokenizer), n, note)


def _prompt_ids(cfg: dict[str, Any], stats: dict[str, Any], tokenizer: Any) -> list[list[int]]:
    """The parity prompts as token ids: chat-templated for instruction-tuned runs, raw text otherwise."""
    chat = bool(getattr(tokenizer, "chat_template", None)) and (
        cfg.get("mode") == "ift" or (cfg.get("mode") is None and stats.get("format") not in (None, "text")))
    return [_chat_tokens(tokenizer, [{"role": "user", "content": p}], gen=True) if chat
            else list(tokenizer.encode(p)) for p in PARITY_PROMPTS]


def measure(model: nn.Module, tokenizer: Any, probe: _Probe,
            progress: Callable[[float, str], None] | None = None) -> dict[str, Any]:
    """Validation loss (mlx-lm ``evaluate``, fixed batch order), greedy continuations and prompt logits.

    ``progress(fraction, message)`` hears of every validation batch and prompt."""
    out: dict[str, Any] = {"loss": None, "perplexity": None, "tokens": 0}
    tell = progress or (lambda fraction, message: None)
    if len(probe.valid):
        counts: list[mx.array] = []
        compat = probe.cfg.get("mode") is None
        base_loss = default_loss if compat else masked_loss
        n = max(1, math.ceil(len(probe.valid) / probe.cfg["batch_size"]))
        n = n if probe.batches < 0 else min(probe.batches, n)

        def loss(m: nn.Module, *batch: mx.array) -> tuple[mx.array, mx.array]:
            value, ntoks = base_loss(m, *batch)
            counts.append(ntoks)
            tell(0.8 * min(len(counts) / n, 1.0), f"validation batch {len(counts)} of {n}")
            return value, ntoks

        state = np.random.get_state()
        np.random.seed(0)  # evaluate() draws the batch order from numpy's global generator: same order each time
        try:
            value = evaluate(model=model, dataset=probe.valid, batch_size=probe.cfg["batch_size"],
                             num_batches=probe.batches, max_seq_length=probe.cfg["max_seq_length"], loss=loss,
                             iterate_batches=iterate_batches if compat else eval_batches)
        finally:
            np.random.set_state(state)
        out.update(loss=value, perplexity=math.exp(value) if value < 700 else math.inf,
                   tokens=int(sum(c.item() for c in counts)))
    logits, greedy = [], []
    for k, ids in enumerate(probe.prompt_ids):
        tell(0.8 + 0.2 * k / len(probe.prompt_ids), f"greedy prompt {k + 1} of {len(probe.prompt_ids)}")
        logits.append(model(mx.array(ids)[None]).astype(mx.float32)[0])
        tokens, text = [], []
        for r in stream_generate(model, tokenizer, ids, max_tokens=PARITY_MAX_TOKENS):
            tokens.append(int(r.token))  # the last one is EOS when the text stopped
            text.append(r.text)
        greedy.append({"tokens": tokens, "text": "".join(text)})
    mx.eval(logits)
    out.update(logits=logits, greedy=greedy)
    return out


def measuring(report: Progress, lo: float, hi: float,
              what: str) -> Callable[[float, str], None]:
    """A :func:`measure` progress callback that reports within ``lo``..``hi`` of the whole job."""
    return lambda f, message: report("parity", lo + (hi - lo) * f, f"measuring {what}: {message}")


def compare(reference: dict[str, Any], published: dict[str, Any], base: dict[str, Any] | None, *,
            dtype: str, quantization: dict[str, Any] | None, prompts: list[str], note: str | None = None,
            tokenizer_match: bool = True) -> dict[str, Any]:
    """Pass/fail and the numbers: published vs base + checkpoint (``reference``)."""
    ref_loss, pub_loss = reference["loss"], published["loss"]
    base_loss = base["loss"] if base else None
    result: dict[str, Any] = {"kind": "quantized" if quantization else "float", "dtype": dtype,
                              "quantization": quantization, "note": note, "tokenizer_match": tokenizer_match}
    loss: dict[str, Any] | None = None
    if ref_loss is not None and pub_loss is not None:
        delta = pub_loss - ref_loss
        loss = {"base": base_loss, "reference": ref_loss, "published": pub_loss, "delta": delta,
                "relative_delta": abs(delta) / max(abs(ref_loss), 1e-12),
                "perplexity": {"base": _exp(base_loss), "reference": _exp(ref_loss), "published": _exp(pub_loss)},
                "perplexity_increase": _exp(delta) - 1 if _exp(delta) is not None else None,
                "tokens": published["tokens"]}
        if base_loss is not None and base_loss - ref_loss > 0:
            loss["fine_tune_gain"] = base_loss - ref_loss
            loss["retained"] = (base_loss - pub_loss) / (base_loss - ref_loss)
    result["loss"] = loss
    greedy = []
    for p, r, q in zip(prompts, reference["greedy"], published["greedy"], strict=True):
        same = r["tokens"] == q["tokens"]
        first = next((i for i, (a, b) in enumerate(zip(r["tokens"], q["tokens"], strict=False)) if a != b),
                     None if same else min(len(r["tokens"]), len(q["tokens"])))
        greedy.append({"prompt": p, "reference": r["text"], "published": q["text"], "identical": same,
                       "first_difference": first})
    result["greedy"] = greedy
    matches = sum(g["identical"] for g in greedy)
    result["greedy_identical"] = f"{matches}/{len(greedy)}"
    deltas = [mx.abs(a - b).max().item() for a, b in zip(reference["logits"], published["logits"], strict=True)
              if a.shape == b.shape]
    result["max_abs_logit_delta"] = max(deltas) if deltas else None
    checks: list[dict[str, Any]] = []
    if not tokenizer_match:
        checks.append({"check": "tokenizer", "ok": False, "detail": "the published tokenizer encodes the prompts "
                                                                     "differently from the base model's"})
    if quantization is None:
        rtol = FLOAT_LOSS_RTOL.get(dtype, 1e-3)
        if loss:
            checks.append({"check": "validation loss", "ok": loss["relative_delta"] <= rtol,
                           "detail": f"relative delta {loss['relative_delta']:.2e} (limit {rtol:g}, {dtype} weights)"})
        need = len(greedy) if dtype == "float32" else math.ceil(len(greedy) / 2)
        checks.append({"check": "greedy text", "ok": matches >= need,
                       "detail": f"{matches}/{len(greedy)} greedy continuations identical (need {need})"})
        result["criteria"] = (f"float: validation loss within {rtol:g} relative of base + checkpoint and "
                              f"{'identical' if need == len(greedy) else 'mostly identical'} greedy text")
    else:
        bits = int(quantization.get("bits", 4))
        tol = QUANT_PPL_TOLERANCE.get(bits, 0.10)
        if loss:
            checks.append({"check": "perplexity increase", "ok": loss["perplexity_increase"] <= tol,
                           "detail": f"perplexity {loss['perplexity_increase']:+.2%} (limit +{tol:.0%}, {bits}-bit)"})
            if loss.get("fine_tune_gain") and loss["fine_tune_gain"] > math.log1p(tol):
                checks.append({"check": "fine-tune retained", "ok": loss["retained"] >= MIN_RETAINED,
                               "detail": f"{loss['retained']:.1%} of the loss gain over the base model kept "
                                         f"(need {MIN_RETAINED:.0%})"})
        else:
            need = math.ceil(len(greedy) / 2)
            checks.append({"check": "greedy text", "ok": matches >= need,
                           "detail": f"{matches}/{len(greedy)} greedy continuations identical (need {need})"})
        gs = int(quantization.get("group_size", 64))
        advice = ("try 8 bits" + (" or group size 32" if gs > 32 else "") if bits < 8 else
                  "try group size 32, or publish unquantized" if gs > 32 else "publish unquantized")
        for c in checks:
            if not c["ok"]:
                c["detail"] += f"; {advice}"
        result["criteria"] = (f"{bits}-bit: validation perplexity at most {tol:.0%} above base + checkpoint, and at "
                              f"least {MIN_RETAINED:.0%} of the fine-tune's gain over the base kept; greedy text is "
                              "reported, not required (quantization may flip near ties)")
    result["checks"] = checks
    result["passed"] = all(c["ok"] for c in checks)
    return result


def _exp(x: float | None) -> float | None:
    if x is None:
        return None
    return math.exp(x) if x < 700 else math.inf


def parity_summary(parity: dict[str, Any]) -> str:
    """One line: verdict, loss before/after, greedy agreement, largest logit difference."""
    loss = parity.get("loss")
    parts = [("PASSED" if parity["passed"] else "FAILED") + f" ({parity['kind']}, {parity['dtype']})"]
    if loss:
        parts.append(f"val loss {loss['reference']:.6f} -> {loss['published']:.6f} (delta {loss['delta']:+.3e}, "
                     f"relative {loss['relative_delta']:.2e}, perplexity {loss['perplexity_increase']:+.3%})")
    parts.append(f"greedy {parity['greedy_identical']} identical")
    if parity.get("max_abs_logit_delta") is not None:
        parts.append(f"max |logit delta| {parity['max_abs_logit_delta']:.3g}")
    return "; ".join(parts)


# ----------------------------------------------------------------------------------------- GGUF


def _export_gguf(dst: Path, model: nn.Module, config: dict[str, Any], probe: _Probe) -> tuple[Path, dict[str, Any]]:
    """Write ``model.gguf`` with mlx-lm and read it back: tensors and logits of the round trip."""
    from mlx_lm.gguf import convert_to_gguf

    from services.library.gguf import _convert_weights

    dtype = _float_dtype(model)
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
        back, _ = _convert_weights(path, raw, dequantize=False)
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


def _logit_scale(model: nn.Module, probe: _Probe) -> float:
    return max(mx.abs(model(mx.array(ids)[None])).max().item() for ids in probe.prompt_ids)


# ----------------------------------------------------------------------------------------- model card


def base_model_info(base: Path, base_cfg: dict[str, Any]) -> dict[str, Any]:
    """The base model's Hub id (when it can be known) and license, from its folder, card and config."""
    card = {}
    readme = base / "README.md"
    if readme.is_file():
        card, _ = split_front_matter(readme.read_text(encoding="utf-8", errors="replace"))
    hub_id = None
    for part in base.resolve().parts:
        m = re.fullmatch(r"models--([^/]+?)--(.+)", part)
        if m:
            hub_id = f"{m.group(1)}/{m.group(2)}"
    lic = card.get("license") or base_cfg.get("license")
    return {"id": hub_id or base.name, "hub_id": hub_id, "license": lic, "path": str(base)}


def loss_svg(train: list[tuple[float, float]], val: list[tuple[float, float]], mark: tuple[float, float] | None,
             width: int = 640, height: int = 260) -> str:
    """A small standalone SVG line chart of the loss curves (no plotting library needed)."""
    pts = train + val + ([mark] if mark else [])
    if not pts:
        return ""
    left, right, top, bottom = 56, 16, 28, 36
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    y0, y1 = min(p[1] for p in pts), max(p[1] for p in pts)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)

    def xy(p: tuple[float, float]) -> str:
        x = left + (p[0] - x0) / (x1 - x0) * (width - left - right)
        y = top + (y1 - p[1]) / (y1 - y0) * (height - top - bottom)
        return f"{x:.1f},{y:.1f}"

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">',
             f'<rect width="{width}" height="{height}" fill="white"/>',
             f'<line x1="{left}" y1="{height - bottom}" x2="{width - right}" y2="{height - bottom}" stroke="#888"/>',
             f'<line x1="{left}" y1="{top}" x2="{left}" y2="{height - bottom}" stroke="#888"/>']
    for v, anchor in ((y1, top + 4), (y0, height - bottom)):
        parts.append(f'<text x="{left - 6}" y="{anchor}" text-anchor="end">{v:.3f}</text>')
    for v, anchor in ((x0, "start"), (x1, "end")):
        x = left if anchor == "start" else width - right
        parts.append(f'<text x="{x}" y="{height - bottom + 16}" text-anchor="{anchor}">{v:g}</text>')
    parts.append(f'<text x="{(left + width - right) / 2}" y="{height - 4}" text-anchor="middle">iteration</text>')
    for i, (name, series, color) in enumerate((("train", train, "#1f77b4"), ("validation", val, "#ff7f0e"))):
        if series:
            parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" '
                         f'points="{" ".join(xy(p) for p in series)}"/>')
            lx = width - right - 170 + i * 80
            parts.append(f'<rect x="{lx}" y="8" width="12" height="3" fill="{color}"/>'
                         f'<text x="{lx + 16}" y="13">{name}</text>')
    if mark:
        x, y = xy(mark).split(",")
        anchor = "end" if float(x) > width - right - 40 else "middle"
        parts.append(f'<circle cx="{x}" cy="{y}" r="5" fill="none" stroke="#d62728" stroke-width="2"/>'
                     f'<text x="{x}" y="{float(y) - 9:.1f}" text-anchor="{anchor}" fill="#d62728">published</text>')
    parts.append("</svg>\n")
    return "\n".join(parts)


def _redact(text: str) -> str:
    home = str(Path.home())
    return text.replace(home + "/", "~/") if home not in ("/", "") else text


def _num(v: Any, digits: int = 4) -> str:
    if isinstance(v, float):
        return "inf" if math.isinf(v) else f"{v:.{digits}f}"
    return "–" if v is None else str(v)


def _md_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _downsample(points: list[Any], n: int) -> list[Any]:
    if len(points) <= n:
        return points
    idx = sorted({round(i * (len(points) - 1) / (n - 1)) for i in range(n)})
    return [points[i] for i in idx]


def model_card(dst: Path, prov: dict[str, Any], parity: dict[str, Any], folder: RunFolder | None) -> str:
    """README.md for a published folder; also writes ``loss_curve.svg`` when the run's metrics are there."""
    src, opts = prov["source"], prov["options"]
    info = folder.info() if folder and folder.exists() else {}
    cfg = folder.config() if folder and folder.config_path.exists() else {}
    stats = read_json(folder.stats_path, {}) if folder else {}
    mode = cfg.get("mode") or ("cpt" if (stats or {}).get("format") == "text" else "ift")
    kind = src["fine_tune_type"]
    quant = prov.get("quantization")
    tags = ["mlx", "forgellm", kind, mode, "text-generation"]
    if quant:
        tags += ["quantized", f"{quant.get('bits')}-bit"]
    if prov.get("gguf"):
        tags.append("gguf")
    front = {"base_model": prov["base_model"]["id"], "base_model_relation": "quantized" if quant else "finetune",
             "license": opts.get("license") or prov["base_model"].get("license") or "unknown",
             "library_name": "mlx", "pipeline_tag": "text-generation", "tags": tags}
    name = prov["name"]
    kind_words = {"lora": "LoRA", "dora": "DoRA", "full": "full fine-tuning"}[kind]
    mode_words = {"cpt": "continued pre-training", "ift": "instruction fine-tuning"}[mode]
    weights = (f"{quant['bits']}-bit affine quantized (group size {quant['group_size']})" if quant
               else f"{prov['dtype']} (unquantized)")
    out = ["---", yaml.safe_dump(front, sort_keys=False, allow_unicode=True).strip(), "---", "", f"# {name}", "",
           f"`{name}` is **{prov['base_model']['id']}** after {mode_words} with {kind_words} in ForgeLLM, exported "
           f"from checkpoint **{src['iteration']}** of run `{src['run']}`. Weights: {weights}, in the MLX / Hugging "
           "Face safetensors layout.", ""]
    if not parity["passed"]:
        out += [f"> **Warning: the parity check failed.** {parity_summary(parity)}. This export may not behave "
                "like the fine-tuned checkpoint.", ""]
    prompt = (['messages = [{"role": "user", "content": "Hello!"}]',
               "prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)"]
              if mode == "ift" else ['prompt = "Once upon a time"'])
    out += ["## Use", "", "```python", "from mlx_lm import load, generate", "",
            f'model, tokenizer = load("{name}")  # this folder, or its Hub repository', *prompt,
            "print(generate(model, tokenizer, prompt=prompt, max_tokens=128))", "```", ""]
    out += ["## Checkpoint", "", f"Published: iteration **{src['iteration']}** — {src['reason']}.", ""]
    ckpts = info.get("checkpoints") or []
    if ckpts:
        best_it = (info.get("best") or {}).get("iteration")
        rows = [[str(c["iteration"]) + (" (published)" if c["iteration"] == src["iteration"] else "")
                 + (" ★" if c["iteration"] == best_it else ""), _num(c.get("val_loss")), _num(c.get("train_loss")),
                 _num(c.get("epoch"), 2), c.get("trained_tokens", "–")] for c in ckpts]
        out += [_md_table(["iteration", "val loss", "train loss", "epoch", "trained tokens"], rows),
                "", "★ best validation loss", ""]
    records = history(folder.metrics()[0]) if folder and folder.exists() else []
    train = [(r["iteration"], r["train_loss"]) for r in records if r.get("type") == "train"]
    val = [(r["iteration"], r["val_loss"]) for r in records
           if r.get("type") == "val" and r.get("val_loss") is not None and math.isfinite(r["val_loss"])]
    if train or val:
        chosen = next((c for c in ckpts if c["iteration"] == src["iteration"]), {})
        y = chosen.get("val_loss") if chosen.get("val_loss") is not None else chosen.get("train_loss")
        mark = (src["iteration"], y) if y is not None and math.isfinite(y) else None
        write_atomic(dst / "loss_curve.svg", loss_svg(train, val, mark))
        by_it: dict[int, list[Any]] = {}
        for it, v in train:
            by_it.setdefault(it, ["–", "–"])[0] = _num(v)
        for it, v in val:
            by_it.setdefault(it, ["–", "–"])[1] = _num(v)
        rows = _downsample([[it, *vals] for it, vals in sorted(by_it.items())], 15)
        out += ["## Training curve", "", "![Loss curve](loss_curve.svg)", "",
                _md_table(["iteration", "train loss", "val loss"], rows), ""]
    loss = parity.get("loss") or {}
    out += ["## Evaluation", ""]
    if loss:
        ppl = loss["perplexity"]
        rows = [["base model", _num(loss.get("base")), _num(ppl.get("base"), 3)],
                ["base + checkpoint (reference)", _num(loss["reference"]), _num(ppl["reference"], 3)],
                ["this model", _num(loss["published"]), _num(ppl["published"], 3)]]
        out += [f"Validation loss on the run's held-out data ({loss['tokens']} target tokens, mlx-lm `evaluate`):", "",
                _md_table(["model", "val loss", "perplexity"], rows), ""]
    tests = [r for r in records if r.get("type") == "test"]
    if tests:
        out += [f"Test loss at the end of training: {_num(tests[-1].get('test_loss'))} "
                f"(perplexity {_num(tests[-1].get('test_perplexity'), 3)}).", ""]
    if not loss and not tests:
        out += [parity.get("note") or "No validation data.", ""]
    out += ["## Parity check", "", f"**{'PASSED' if parity['passed'] else 'FAILED'}** — {parity['criteria']}.", ""]
    out += [_md_table(["check", "result", ""], [[c["check"], "ok" if c["ok"] else "**FAIL**", c["detail"]]
                                                for c in parity["checks"]]), ""]
    extra = [f"max \\|logit delta\\| on the prompts: {_num(parity.get('max_abs_logit_delta'), 6)}"]
    if loss:
        extra.append(f"loss delta {loss['delta']:+.3e} (relative {loss['relative_delta']:.2e})")
        if loss.get("retained") is not None:
            extra.append(f"fine-tune gain retained {loss['retained']:.1%}")
    out += ["; ".join(extra) + ".", ""]
    out += [_md_table(["prompt", "base + checkpoint", "this model", "same"],
                      [[g["prompt"], repr(g["reference"]), repr(g["published"]), "yes" if g["identical"] else "no"]
                       for g in parity["greedy"]]), ""]
    if parity.get("note"):
        out += [f"Note: {parity['note']}.", ""]
    gg = prov.get("gguf")
    if gg:
        status = ("round trip ok" if gg.get("ok") else "round trip FAILED" if "error" not in gg else gg["error"])
        out += ["## GGUF", "", f"`{gg['file']}` ({gg['bytes'] / 1e6:.1f} MB, {gg.get('tensors')} tensors, written by "
                f"mlx-lm): {status}; max \\|logit delta\\| {_num(gg.get('max_abs_logit_delta'), 6)}. "
                f"{gg.get('method', '')}", ""]
        out += [f"> {w}" for w in gg.get("warnings", [])] + [""]
    if stats:
        rows = []
        for split in ("train", "valid"):
            s = stats.get(split) or {}
            rows.append([split, s.get("documents", "–"), s.get("sequences", "–"), s.get("tokens", "–"),
                         s.get("trained_tokens", "–")])
        out += ["## Training data", "", f"Format `{stats.get('format')}`, mode `{stats.get('mode')}`, data "
                f"fingerprint `{stats.get('fingerprint')}`, {stats.get('steps_per_epoch')} steps per epoch.", "",
                _md_table(["split", "documents", "sequences", "tokens", "trained tokens"], rows), ""]
    if cfg:
        keys = ("fine_tune_type", "mode", "num_layers", "lora_parameters", "optimizer", "learning_rate",
                "lr_schedule", "batch_size", "grad_accumulation_steps", "iters", "epochs", "max_seq_length",
                "mask_prompt", "mask_all_turns", "packing", "seed")
        rows = [[k, f"`{json.dumps(cfg[k])}`"] for k in keys if cfg.get(k) is not None]
        out += ["## Training configuration", "", _md_table(["key", "value"], rows), ""]
    out += ["## Reproducibility", ""]
    versions = info.get("versions") or {}
    hw = info.get("hardware") or {}
    rows = [["trained with", ", ".join(f"{k} {v}" for k, v in versions.items()) or "–"],
            ["exported with", ", ".join(f"{k} {v}" for k, v in prov["versions"].items())],
            ["hardware", ", ".join(f"{k} {v}" for k, v in hw.items()) or "–"],
            ["seed", info.get("seed", "–")], ["dataset fingerprint", info.get("dataset_fingerprint", "–")],
            ["parent run", json.dumps(info.get("parent")) if info.get("parent") else "–"],
            ["run / checkpoint", f"{src['run']} @ {src['iteration']}"],
            ["exported", time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(prov["created"]))]]
    out += [_md_table(["", ""], rows), ""]
    if cfg:
        out += ["<details><summary>config.yaml (the run's resolved configuration)</summary>", "", "```yaml",
                yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True).rstrip(), "```", "", "</details>", ""]
    return _redact("\n".join(out))


# ----------------------------------------------------------------------------------------- publish


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


def _finish_parity(dst: Path, prov: dict[str, Any], parity: dict[str, Any], folder: RunFolder | None) -> None:
    """Write parity.json, forgellm.json, README.md and loss_curve.svg, readable like the model files."""
    write_json(dst / "parity.json", parity)
    write_json(dst / "forgellm.json", prov)
    write_atomic(dst / "README.md", model_card(dst, prov, parity, folder))
    mode = (dst / "config.json").stat().st_mode & 0o777 if (dst / "config.json").exists() else 0o644
    for f in ("parity.json", "forgellm.json", "README.md", "loss_curve.svg"):
        if (dst / f).is_file():
            os.chmod(dst / f, mode)


def publish(workspace: Workspace, run_id: str, iteration: int | None = None, name: str | None = None, *,
            dequantize: bool = False, quantize_bits: int | None = None, group_size: int = 64, gguf: bool = False,
            license: str | None = None, overwrite: bool = False, strict: bool = False,
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
    cfg = folder.config()
    base, base_cfg = _base_config(cfg, folder.id)
    _check_options(base, base_cfg, dequantize=dequantize, quantize_bits=quantize_bits, group_size=group_size,
                   gguf=gguf)
    it, why = choose_checkpoint(folder, iteration)
    try:
        ckpt = resolve_adapter(RunManager(workspace), f"{folder.id}@{it}")
    except ConfigError as e:
        raise PublishError(str(e)) from None
    _clean_stale(workspace.published)
    tmp = workspace.published / f".tmp-{target.name}-pid{os.getpid()}-{uuid.uuid4().hex[:8]}"
    warnings: list[str] = []
    try:
        report("loading", 0.02, f"loading {base.name} and the run's validation data")
        with contextlib.redirect_stdout(io.StringIO()):
            model, tokenizer, config = load(str(base), return_config=True)
        probe = _probe(cfg, read_json(folder.stats_path, {}) or {}, tokenizer, parity_batches)
        base_m = measure(model, tokenizer, probe, measuring(report, 0.12, 0.2, "the base model"))
        report("loading", 0.2, f"applying checkpoint {it}")
        acfg = apply_checkpoint(model, ckpt)
        ref_m = measure(model, tokenizer, probe,
                        measuring(report, 0.25, 0.35, f"base + checkpoint {it} (the reference)"))
        report("fusing", 0.35, f"fusing {acfg.get('fine_tune_type', 'lora')} checkpoint {it}")
        n_fused = fuse(model, dequantize)
        if dequantize:
            model = dequantize_model(model)
            config.pop("quantization", None)
            config.pop("quantization_config", None)
        dtype = _float_dtype(model)
        if quantize_bits is not None:
            report("quantizing", 0.45, f"quantizing to {quantize_bits} bits, group size {group_size}")
            with contextlib.redirect_stdout(io.StringIO()):
                model, config = quantize_model(model, config, group_size, quantize_bits)
        quantization = config.get("quantization")
        report("saving", 0.55, f"writing the model to {target}")
        with contextlib.redirect_stdout(io.StringIO()):
            save(tmp, str(base), model, tokenizer, config, donate_model=False)
        gguf_path, gguf_check = None, None
        if gguf:
            report("saving", 0.62, "writing GGUF and reading it back")
            gguf_path, gguf_check = _export_gguf(tmp, model, config, probe)
            warnings += gguf_check.get("warnings", [])
            if not gguf_check.get("ok"):
                warnings.append(gguf_check.get("error") or "the GGUF round trip does not reproduce the model's logits")
        bpw = compute_bits_per_weight(model) if quantization else None
        del model
        _free()
        report("parity", 0.7, "loading the published model back with mlx_lm.load")
        with contextlib.redirect_stdout(io.StringIO()):
            pub_model, pub_tok = load(str(tmp))
        tok_match = _prompt_ids(probe.cfg, probe.stats, pub_tok) == probe.prompt_ids
        pub_m = measure(pub_model, pub_tok, probe, measuring(report, 0.75, 0.9, "the published model"))
        del pub_model
        _free()
        parity = compare(ref_m, pub_m, base_m, dtype=dtype, quantization=quantization, prompts=probe.prompts,
                         note=probe.note, tokenizer_match=tok_match)
        if bpw is not None:
            parity["bits_per_weight"] = round(float(bpw), 3)
        parity["source"] = {"run": folder.id, "iteration": it}
        report("card", 0.92, "writing parity.json and the model card")
        prov = {"name": target.name, "created": time.time(), "versions": _environment(),
                "source": {"run": folder.id, "iteration": it, "reason": why, "checkpoint": str(ckpt),
                           "fine_tune_type": acfg.get("fine_tune_type", "lora"), "fused_layers": n_fused},
                "base_model": base_model_info(base, base_cfg), "dtype": dtype, "quantization": quantization,
                "options": {"dequantize": dequantize, "quantize_bits": quantize_bits, "group_size": group_size,
                            "gguf": gguf, "license": license, "parity_batches": parity_batches},
                "gguf": gguf_check}
        _finish_parity(tmp, prov, parity, folder)
        if strict and not parity["passed"]:
            raise PublishError(f"parity check failed, nothing published: {parity_summary(parity)}")
        if not parity["passed"]:
            warnings.append(f"parity check failed: {parity_summary(parity)}")
        _install(tmp, target, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    size = disk_size(target)
    report("card", 1.0, f"published {target}")
    return PublishResult(name=target.name, path=target, run_id=folder.id, iteration=it, reason=why,
                         fine_tune_type=prov["source"]["fine_tune_type"], dtype=dtype, quantization=quantization,
                         gguf=target / gguf_path.name if gguf_path else None, parity=parity, warnings=warnings,
                         size_bytes=size, seconds=round(time.time() - t0, 2))


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
    cfg = folder.config()
    base, _ = _base_config(cfg, folder.id)
    if parity_batches is None:
        parity_batches = prov["options"].get("parity_batches")
    report("loading", 0.05, f"loading {base.name} + checkpoint {it}")
    with contextlib.redirect_stdout(io.StringIO()):
        model, tokenizer = load(str(base))
    probe = _probe(cfg, read_json(folder.stats_path, {}) or {}, tokenizer, parity_batches)
    base_m = measure(model, tokenizer, probe, measuring(report, 0.15, 0.4, "the base model"))
    apply_checkpoint(model, folder.checkpoint_dir(it))
    ref_m = measure(model, tokenizer, probe, measuring(report, 0.4, 0.6, "base + checkpoint (the reference)"))
    del model
    _free()
    report("parity", 0.6, "measuring the published model")
    with contextlib.redirect_stdout(io.StringIO()):
        pub_model, pub_tok = load(str(dst))
    pub_m = measure(pub_model, pub_tok, probe, measuring(report, 0.6, 0.9, "the published model"))
    tok_match = _prompt_ids(probe.cfg, probe.stats, pub_tok) == probe.prompt_ids
    dtype = _float_dtype(pub_model)
    del pub_model
    _free()
    config = read_json(dst / "config.json", {}) or {}
    parity = compare(ref_m, pub_m, base_m, dtype=dtype, quantization=config.get("quantization"),
                     prompts=probe.prompts, note=probe.note, tokenizer_match=tok_match)
    parity["source"] = {"run": folder.id, "iteration": it}
    parity["rechecked"] = time.time()
    report("card", 0.95, "rewriting parity.json and the model card")
    _finish_parity(dst, prov, parity, folder)
    report("card", 1.0, parity_summary(parity))
    return parity


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


# ----------------------------------------------------------------------------------------- upload


def upload(published_path: str | os.PathLike, repo_id: str, token: str | None = None, *, private: bool = True,
           timeout: float = 4.0) -> str:
    """Upload a published folder to the Hugging Face Hub (creating the repository); return its URL.

    Fails fast (within ``timeout`` seconds) with :class:`UploadError` when offline (``HF_HUB_OFFLINE``) or when
    the Hub cannot be reached.
    """
    path = Path(published_path)
    if not (path / "config.json").is_file() or not (path / "README.md").is_file():
        raise UploadError(f"{path} is not a published model folder (config.json and README.md expected)")
    if not re.fullmatch(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}", repo_id or ""):
        raise UploadError(f"repo_id {repo_id!r}: expected OWNER/NAME (letters, digits, '.', '_', '-')")
    reason = hub_offline_reason(timeout)
    if reason:
        raise UploadError(f"{reason}: nothing can be uploaded; retry when online")
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi(endpoint=os.environ.get("HF_ENDPOINT"), token=token)
    try:
        url = api.create_repo(repo_id, exist_ok=True, private=private, repo_type="model")
        api.upload_folder(folder_path=str(path), repo_id=repo_id, repo_type="model",
                          commit_message=f"Upload {path.name} from ForgeLLM")
    except HfHubHTTPError as e:
        raise UploadError(f"upload of {path} to {repo_id} failed: {e}") from e
    except (OSError, ValueError) as e:
        raise UploadError(f"upload of {path} to {repo_id} failed: {type(e).__name__}: {e}") from e
    return str(url)
