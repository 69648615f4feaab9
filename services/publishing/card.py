"""The model card of a published folder: README.md (front matter, checkpoint, curve, evaluation, parity, data,
config, versions), ``loss_curve.svg``, and the parity/provenance files next to it."""

from __future__ import annotations

import json
import math
import os
import re
import time
from pathlib import Path
from typing import Any

import yaml

from services.evaluation import results as evals
from services.publishing.handoff import use_section
from services.publishing.parity import parity_summary
from services.publishing.rules import split_front_matter
from services.training.folder import RunFolder, history
from services.training.series import loss_table, read
from services.workspace import read_json, write_atomic, write_json


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


def eval_section(folder: RunFolder | None, iteration: int) -> list[str]:
    """The eval table (suites and lm-eval tasks of ``evals.jsonl``) of the published checkpoint and of the base."""
    recs = [r for r in evals.read(folder) if r.get("iteration") in (0, iteration)] if folder else []
    if not recs:
        return []
    rows = []
    for name in evals.metric_names(recs):
        by_it = {r["iteration"]: r for r in recs if r["name"] == name}
        base, mine = by_it.get(0, {}), by_it.get(iteration, {})
        what = (mine or base).get("primary", "")
        rows.append([name, what, _num(base.get("score"), 3), _num(mine.get("score"), 3)])
    return ["Evaluations recorded for the run (ForgeLLM suites and lm-eval tasks, base and checkpoint on one base "
            "model with the adapter swapped in):", "",
            _md_table(["suite / task", "metric", "base model", f"checkpoint {iteration}"], rows), ""]


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
    handoff = prov.get("handoff") or {}
    out += use_section(name, handoff.get("folder") or str(dst), mode, handoff)
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
    curves = read(records, ("train_loss", "val_loss"))
    train, val = curves["train_loss"], curves["val_loss"]
    if train or val:
        chosen = next((c for c in ckpts if c["iteration"] == src["iteration"]), {})
        y = chosen.get("val_loss") if chosen.get("val_loss") is not None else chosen.get("train_loss")
        mark = (src["iteration"], y) if y is not None and math.isfinite(y) else None
        write_atomic(dst / "loss_curve.svg", loss_svg(train, val, mark))
        rows = [[it, _num(t), _num(v)] for it, t, v in loss_table(records, rows=15)]
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
    out += eval_section(folder, src["iteration"])
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
    out += gguf_section(prov.get("gguf"), parity.get("gguf"))
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


def gguf_section(written: dict[str, Any] | None, judged: dict[str, Any] | None) -> list[str]:
    """The card's GGUF section: the file, its tokenizer as written, and how it compared (part of the badge)."""
    if not written:
        return []
    tok = written.get("tokenizer") or {}
    out = ["## GGUF", "", f"`{written['file']}` ({written['bytes'] / 1e6:.1f} MB, {written.get('type')}, "
           f"{written.get('tensors')} tensors, written with {written.get('writer', 'the gguf library')}); "
           f"tokenizer `{tok.get('model')}` / pre-tokenizer `{tok.get('pre')}`, {tok.get('tokens')} tokens, "
           f"{tok.get('merges')} merges.", ""]
    if judged and judged.get("relative_rms") is not None:
        out += [f"Read back: relative RMS logit difference {judged['relative_rms']:.2e}, next-token agreement "
                f"{judged['top1_agreement']:.1%}, max \\|logit delta\\| {_num(judged.get('max_abs_logit_delta'), 4)} "
                f"({judged.get('method', '')}); the checks are in the parity table above.", ""]
    return out


def write_card(dst: Path, prov: dict[str, Any], parity: dict[str, Any], folder: RunFolder | None) -> None:
    """Write parity.json, forgellm.json, README.md and loss_curve.svg, readable like the model files."""
    write_json(dst / "parity.json", parity)
    write_json(dst / "forgellm.json", prov)
    write_atomic(dst / "README.md", model_card(dst, prov, parity, folder))
    mode = (dst / "config.json").stat().st_mode & 0o777 if (dst / "config.json").exists() else 0o644
    for f in ("parity.json", "forgellm.json", "README.md", "loss_curve.svg", "Modelfile"):
        if (dst / f).is_file():
            os.chmod(dst / f, mode)
