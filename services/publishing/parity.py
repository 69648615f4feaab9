"""The parity check: does a published model still behave like base + checkpoint?

Both are measured on the same :class:`ParityInputs` (the run's validation data through mlx-lm's ``evaluate``,
greedy text and logits on fixed prompts) and :func:`compare` says pass or fail by the export's kind: float
exports must match (loss within :data:`FLOAT_LOSS_RTOL`, identical greedy text); quantized ones must stay
within :data:`QUANT_PPL_TOLERANCE` and keep the fine-tune. :func:`run` is the whole sequence, for a publish
and for a later re-check alike.

Importing this module imports MLX: call it from a worker process or the CLI, not from the UI's process.
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.generate import stream_generate
from mlx_lm.tuner.trainer import default_loss, evaluate, iterate_batches
from mlx_lm.utils import load

from services.publishing.fuse import apply_checkpoint, float_dtype, free_memory
from services.training.batching import eval_batches, masked_loss
from services.training.data import DataError, chat_tokens
from services.training.folder import RunFolder
from services.training.prepared import PreparedCache
from services.workspace import read_json

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

Progress = Callable[[str, float, str], None]


@dataclass
class ParityInputs:
    """What the parity check feeds both models: validation data and tokenized prompts."""

    cfg: dict[str, Any]
    stats: dict[str, Any]
    valid: Any
    prompts: list[str]
    prompt_ids: list[list[int]]
    batches: int
    note: str | None = None

    @classmethod
    def of(cls, cfg: dict[str, Any], stats: dict[str, Any], tokenizer: Any, batches: int | None,
           cache: PreparedCache | None = None) -> ParityInputs:
        """The run's validation data (``batches`` of it; None: the run's ``val_batches``; from the prepared-data
        ``cache`` when given) and the prompts."""
        from services.training.trainer import load_datasets

        note = None
        try:
            _, valid, _, _ = load_datasets(cfg, tokenizer, splits=("valid",), cache=cache)
        except (DataError, FileNotFoundError, ValueError) as e:
            valid, note = [], f"validation data unavailable ({e}); loss not compared"
        if not len(valid) and note is None:
            note = "the run has no validation data; loss not compared"
        n = batches if batches is not None else int(cfg.get("val_batches") or -1)
        return cls(cfg, stats, valid, list(PARITY_PROMPTS), prompt_ids(cfg, stats, tokenizer), n, note)


def prompt_ids(cfg: dict[str, Any], stats: dict[str, Any], tokenizer: Any) -> list[list[int]]:
    """The parity prompts as token ids: chat-templated for instruction-tuned runs, raw text otherwise."""
    chat = bool(getattr(tokenizer, "chat_template", None)) and (
        cfg.get("mode") == "ift" or (cfg.get("mode") is None and stats.get("format") not in (None, "text")))
    return [chat_tokens(tokenizer, [{"role": "user", "content": p}], gen=True) if chat
            else list(tokenizer.encode(p)) for p in PARITY_PROMPTS]


def measure(model: nn.Module, tokenizer: Any, probe: ParityInputs,
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


# ----------------------------------------------------------------------------------------- the whole check


class Spans(NamedTuple):
    """Where :func:`run` reports within the whole job (0..1): each measurement's span, and the reload."""

    base: tuple[float, float]
    reference: tuple[float, float]
    reload: float
    published: tuple[float, float]


@dataclass
class Reference:
    """Base + checkpoint after it was measured: what an ``export`` callback makes the published model from."""

    model: nn.Module | None
    tokenizer: Any
    config: dict[str, Any]  # the base model's config.json
    adapter_config: dict[str, Any]  # the checkpoint's
    inputs: ParityInputs


@dataclass
class Export:
    """The published folder an ``export`` callback made (or found) for :func:`run` to check."""

    path: Path
    dtype: str | None = None  # of the float weights before quantization; None: read from the folder's model
    quantization: dict[str, Any] | None = None
    bits_per_weight: float | None = None
    gguf: Path | None = None  # a GGUF file next to it: judged too (its tokenizer and logits), part of the badge


def run(base: Path, folder: RunFolder, iteration: int, checkpoint: Path, export: Callable[[Reference], Export], *,
        batches: int | None, report: Progress, spans: Spans) -> tuple[dict[str, Any], dict[str, Any]]:
    """Measure ``base``, put ``checkpoint`` (of ``folder`` at ``iteration``) onto it and measure that (the
    reference); ``export(reference)`` makes the published folder; load
    it back, measure it, check its tokenizer and compare. Return (parity, the checkpoint's adapter config).

    The reference model is released before the published one is loaded: only one is in memory at a time."""
    with contextlib.redirect_stdout(io.StringIO()):
        model, tokenizer, config = load(str(base), return_config=True)
    ws = folder.workspace()
    inputs = ParityInputs.of(folder.config(), read_json(folder.stats_path, {}) or {}, tokenizer, batches,
                             PreparedCache.of(ws) if ws is not None else None)
    base_m = measure(model, tokenizer, inputs, measuring(report, *spans.base, "the base model"))
    report("loading", spans.base[1], f"applying checkpoint {iteration}")
    acfg = apply_checkpoint(model, checkpoint)
    what = f"base + checkpoint {iteration} (the reference)"
    ref_m = measure(model, tokenizer, inputs, measuring(report, *spans.reference, what))
    reference = Reference(model, tokenizer, config, acfg, inputs)
    del model
    made = export(reference)
    reference.model = None
    free_memory()
    report("parity", spans.reload, "loading the published model back with mlx_lm.load")
    with contextlib.redirect_stdout(io.StringIO()):
        pub_model, pub_tok = load(str(made.path))
    tok_match = prompt_ids(inputs.cfg, inputs.stats, pub_tok) == inputs.prompt_ids
    pub_m = measure(pub_model, pub_tok, inputs, measuring(report, *spans.published, "the published model"))
    dtype = made.dtype or float_dtype(pub_model)
    del pub_model
    free_memory()
    parity = compare(ref_m, pub_m, base_m, dtype=dtype, quantization=made.quantization, prompts=inputs.prompts,
                     note=inputs.note, tokenizer_match=tok_match)
    if made.bits_per_weight is not None:
        parity["bits_per_weight"] = round(float(made.bits_per_weight), 3)
    if made.gguf is not None:
        report("parity", spans.published[1], f"reading {made.gguf.name} back and comparing its logits")
        judge_gguf_into(parity, made.gguf, inputs, ref_m["logits"])
    parity["source"] = {"run": folder.id, "iteration": iteration}
    return parity, acfg


def judge_gguf_into(parity: dict[str, Any], path: Path, inputs: ParityInputs, reference_logits: list) -> None:
    """Add the checks of the GGUF ``path`` (:func:`~services.publishing.gguf_export.judge_gguf`) to ``parity``:
    a GGUF whose tokenizer or logits do not match fails the badge."""
    from services.publishing.gguf_export import judge_gguf

    judged = judge_gguf(path, inputs.prompt_ids, reference_logits,
                        lambda tok: prompt_ids(inputs.cfg, inputs.stats, tok))
    parity["checks"] += judged.pop("checks")
    parity["gguf"] = judged
    parity["criteria"] += (f"; the GGUF ({judged['type']}) tokenizes the prompts the same and its logits stay "
                           "within the tolerance of its type")
    parity["passed"] = all(c["ok"] for c in parity["checks"])
