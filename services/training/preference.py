"""Preference data for DPO and ORPO runs: pairs of answers to one prompt, the better one first.

A row is ``{"prompt", "chosen", "rejected"}`` with an optional ``system``. ``prompt`` is a string (one user
turn) or a list of messages; ``chosen`` and ``rejected`` are strings, an assistant message, or lists of
messages. Each side is rendered with the model's chat template as prompt + answer; only the answer tokens
(everything after the prompt's generation prefix) are loss targets. Rows where the two answers are the same,
one answer is empty, or the prompt leaves no answer token inside ``max_seq_length`` are left out and named
``file:line``. No MLX here: the Datasets page uses it too.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.config import PREFERENCE_KEYS
from services.training import data as data_mod
from services.training.data import DataError, chat_tokens

MODES = ("dpo", "orpo")
LOSS_TYPES = PREFERENCE_KEYS["loss_type"]
SIDES = ("chosen", "rejected")
DEFAULTS: dict[str, Any] = {
    "beta": 0.1,  # DPO: the KL temperature; ORPO: lambda, the weight of the odds-ratio term
    "loss_type": "sigmoid",  # DPO only
    "label_smoothing": 0.0,  # DPO sigmoid only: the assumed share of flipped labels (conservative DPO)
    "best": "val_loss",  # the best checkpoint: lowest validation loss, or highest validation accuracy
    "compat": False,  # mlx-lm-lora's batching and validation, for report-for-report parity
}
BEST = PREFERENCE_KEYS["best"]


def is_preference(cfg: dict[str, Any]) -> bool:
    return cfg.get("mode") in MODES


def settings(cfg: dict[str, Any]) -> dict[str, Any]:
    """The ``preference`` block with its defaults filled in."""
    return {**DEFAULTS, **(cfg.get("preference") or {})}


def reference_kind(cfg: dict[str, Any], forked: bool = False) -> str:
    """Where a run's reference log-probabilities come from: ``none`` (ORPO), ``precomputed`` (a full fine-tune or
    a fork: the starting weights are not the base; computed once and kept in the run folder) or ``adapters-off``
    (LoRA/DoRA from the base: the policy with its adapters switched off, per batch)."""
    if cfg.get("mode") == "orpo":
        return "none"
    return "precomputed" if cfg.get("fine_tune_type") == "full" or forked else "adapters-off"


def two_pass(cfg: dict[str, Any]) -> bool:
    """Whether a step computes the chosen and rejected sides' gradients one after the other (one side's
    activations at a time) rather than in one joint pass: not in compat mode (mlx-lm-lora's rounding) and not with
    LoRA dropout (MLX cannot replay a dropout mask between a value pass and a gradient pass)."""
    dropout = cfg.get("fine_tune_type") != "full" and (cfg.get("lora_parameters") or {}).get("dropout")
    return not (settings(cfg)["compat"] or dropout)


@dataclass
class Pair:
    """One rendered pair: the full token ids of each side and the length of the shared prompt."""

    chosen: list[int]
    rejected: list[int]
    prompt_length: int
    where: str = ""

    @property
    def tokens(self) -> list[int]:  # the length key batching sorts by (mlx-lm-lora sorts by the chosen side)
        return self.chosen


# ----------------------------------------------------------------------------------------- rows


def _messages(value: Any, field: str, where: str, role: str | None = None) -> list[dict]:
    if isinstance(value, str):
        return [{"role": role or "user", "content": value}]
    items = [value] if isinstance(value, dict) else value
    if not isinstance(items, list) or not items:
        raise DataError(f"{where}: {field!r} must be a string, a message or a non-empty list of messages")
    for i, m in enumerate(items):
        if not isinstance(m, dict) or m.get("role") not in data_mod.ROLES or not isinstance(m.get("content", ""), str):
            raise DataError(f"{where}: {field}[{i}] must be a message with a role in {sorted(data_mod.ROLES)} "
                            "and string content")
    return list(items)


def conversation(row: dict, where: str = "row") -> tuple[list[dict], dict[str, list[dict]]]:
    """The prompt messages and each side's answer messages of a row; a malformed row raises :class:`DataError`."""
    prompt = _messages(row.get("prompt"), "prompt", where)
    system = row.get("system")
    if system is not None:
        if not isinstance(system, str):
            raise DataError(f"{where}: 'system' must be a string")
        if prompt[0]["role"] != "system":
            prompt = [{"role": "system", "content": system}, *prompt]
    answers = {side: _messages(row.get(side), side, where, role="assistant") for side in SIDES}
    return prompt, answers


def check_pair_row(row: dict, where: str) -> None:
    """Raise :class:`DataError` for a row that is no preference row at all (a wrong type, a missing side)."""
    for side in ("prompt", *SIDES):
        if side not in row:
            raise DataError(f"{where}: a preference row needs 'prompt', 'chosen' and 'rejected', "
                            f"got keys {sorted(row)}")
    conversation(row, where)


def pair_problem(row: dict) -> str | None:
    """Why a well-formed row teaches nothing (the answers are equal, or one is empty), or ``None``."""
    _, answers = conversation(row)
    texts = {side: "".join(m.get("content", "") for m in answers[side]).strip() for side in SIDES}
    for side in SIDES:
        if not texts[side]:
            return f"empty {side} answer: nothing to compare"
    if answers["chosen"] == answers["rejected"] or texts["chosen"] == texts["rejected"]:
        return "chosen and rejected are the same answer: nothing to learn"
    return None


def render_pair(tokenizer: Any, row: dict, where: str) -> Pair:
    """Both sides through the chat template; the prompt (with its generation prefix) must prefix each."""
    prompt, answers = conversation(row, where)
    head = chat_tokens(tokenizer, prompt, row.get("tools"), gen=True)
    sides = {}
    for side in SIDES:
        toks = chat_tokens(tokenizer, prompt + answers[side], row.get("tools"))
        if toks[: len(head)] != head:
            raise DataError(f"{where}: the model's chat template does not render the prompt as a prefix of the "
                            f"{side} conversation, so its answer tokens cannot be located")
        sides[side] = toks
    return Pair(sides["chosen"], sides["rejected"], len(head), where)


def answer_mask(pair: Pair, side: str) -> list[bool]:
    """``mask[j]``: token ``j`` of ``side`` is a loss target (an answer token)."""
    toks = getattr(pair, side)
    return [False] * pair.prompt_length + [True] * (len(toks) - pair.prompt_length)


# ----------------------------------------------------------------------------------------- splits


def render_split(tokenizer: Any, rows: list[tuple[str, dict]], max_seq_length: int
                 ) -> tuple[list[Pair], list[str]]:
    """Rendered pairs of a split, and ``file:line: reason`` for each row left out."""
    pairs, left_out = [], []
    for where, row in rows:
        problem = pair_problem(row)
        if problem is None:
            pair = render_pair(tokenizer, row, where)
            if pair.prompt_length >= max_seq_length - 1:
                problem = (f"the prompt takes {pair.prompt_length} tokens, leaving no answer token within "
                           f"max_seq_length={max_seq_length}")
            elif min(len(pair.chosen), len(pair.rejected)) <= pair.prompt_length:
                problem = "an answer renders to no token after the prompt"
        if problem is None:
            pairs.append(pair)
        else:
            left_out.append(f"{where}: {problem}")
    return pairs, left_out


def pair_stats(pairs: list[Pair], max_seq_length: int | None = None) -> dict[str, Any]:
    """Pair statistics: answer lengths of each side, the length bias (share of pairs whose chosen answer is
    longer), and truncation."""
    if not pairs:
        return {"pairs": 0}
    ans = {side: [len(getattr(p, side)) - p.prompt_length for p in pairs] for side in SIDES}
    st: dict[str, Any] = {
        "pairs": len(pairs), "sequences": len(pairs),
        "tokens": sum(len(p.chosen) + len(p.rejected) for p in pairs),
        "trained_tokens": sum(ans["chosen"]) + sum(ans["rejected"]),
        "prompt_mean_length": round(sum(p.prompt_length for p in pairs) / len(pairs), 1),
        "chosen_mean_length": round(sum(ans["chosen"]) / len(pairs), 1),
        "rejected_mean_length": round(sum(ans["rejected"]) / len(pairs), 1),
        "chosen_longer": round(sum(c > r for c, r in zip(ans["chosen"], ans["rejected"], strict=True)) / len(pairs), 4),
        "max_length": max(max(len(p.chosen), len(p.rejected)) for p in pairs),
    }
    if max_seq_length is not None:
        st["truncated_pairs"] = sum(max(len(p.chosen), len(p.rejected)) > max_seq_length for p in pairs)
    return st


def prepare(cfg: dict[str, Any], tokenizer: Any, data: Path, splits: tuple[str, ...] = data_mod.SPLITS
            ) -> data_mod.Prepared:
    """Read, check, split and render a preference dataset; a dataset with no usable training pair raises."""
    fmt, rows_of = data_mod.split_rows(cfg, data)
    if fmt != "preference":
        raise DataError(f"{data}: mode: {cfg['mode']} needs preference rows {{'prompt', 'chosen', 'rejected'}}, "
                        f"these are {fmt} rows")
    seq = cfg["max_seq_length"]
    stats: dict[str, Any] = {"format": "preference", "mode": cfg["mode"]}
    out: dict[str, list[Pair]] = {}
    for s in data_mod.SPLITS:
        pairs, left_out = render_split(tokenizer, rows_of.get(s, []), seq) if s in splits else ([], [])
        out[s] = pairs
        if s == "train" and "train" in splits and not pairs:
            shown = "; ".join(left_out[:5])
            raise DataError(f"{data}: no usable preference pair in the training split ({len(left_out)} left out: "
                            f"{shown})")
        if s != "test":
            stats[s] = pair_stats(pairs, seq)
            if left_out:
                stats[s]["left_out"] = len(left_out)
                stats[s]["left_out_examples"] = left_out[:5]
    return data_mod.Prepared(out["train"], out["valid"], out["test"], stats)
