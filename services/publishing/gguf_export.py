"""GGUF export: write ``model-TYPE.gguf`` (f16 or q8_0) with llama.cpp's own ``gguf`` writer, and judge it.

:func:`gguf_vocab` reads the tokenizer as llama.cpp wants it (model ``gpt2`` for byte-level BPE, its
pre-tokenizer, tokens, token types, merges, special ids, add_bos/add_eos, chat template); :func:`write_gguf`
writes it with the llama hyperparameters and tensors under llama.cpp's names (q/k permuted, as
convert_hf_to_gguf.py does). :func:`judge_gguf` reads the file back through the GGUF import
(:func:`services.library.gguf.import_gguf`) and checks its tokenizer and its logits against the reference:
that is what the parity badge of a GGUF publish is made of.

Importing this module imports MLX: call it from a worker process or the CLI, not from the UI's process.
"""

from __future__ import annotations

import contextlib
import io
import json
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import mlx.core as mx
import numpy as np
from mlx_lm.utils import load

from services.library.gguf import TOKEN_CONTROL, TOKEN_USER_DEFINED, gguf_tensor_name, import_gguf, permute_qk
from services.publishing.rules import GGUF_TYPES, PublishError, gguf_file_name
from services.workspace import read_json

_NORMAL, _UNUSED = 1, 5
# The pre-tokenizers of llama.cpp (tokenizer.ggml.pre) this exporter recognises in a tokenizer.json
_LLAMA3_REGEX_START = "(?i:'s|'t|'re|'ve|'m|'ll|'d)"
_FILE_TYPES = {"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
# Relative RMS difference of a GGUF's prompt logits from the reference's: f16 rounding of the weights costs
# about 1e-3 on the tiny test model and SmolLM2, q8_0 about 1e-2; a swapped or damaged tensor costs O(1).
GGUF_LOGIT_RTOL = {"f16": 1e-2, "q8_0": 6e-2}
# ... and the share of prompt positions whose most likely next token must agree.
GGUF_MIN_TOP1 = {"f16": 0.95, "q8_0": 0.85}


@dataclass
class GGUFVocab:
    """The tokenizer of a model as llama.cpp's ``tokenizer.ggml.*`` keys hold it."""

    model: str  # "gpt2": byte-level BPE
    pre: str
    tokens: list[str]
    types: list[int]
    merges: list[str]
    special: dict[str, int | None] = field(default_factory=dict)  # bos, eos, pad, unk
    add_bos: bool = False
    add_eos: bool = False
    chat_template: str | None = None


def _fail(folder: Path, reason: str) -> PublishError:
    return PublishError(f"GGUF export of {folder}: {reason}. Publish without GGUF and convert the folder with "
                        "llama.cpp's convert_hf_to_gguf.py")


def _pre_tokenizer(folder: Path, pre: dict[str, Any] | None) -> str:
    """llama.cpp's name of a byte-level tokenizer.json pre-tokenizer."""
    steps = (pre or {}).get("pretokenizers") if (pre or {}).get("type") == "Sequence" else [pre or {}]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and str((steps[0].get("pattern") or {}).get("Regex", "")).startswith(
            _LLAMA3_REGEX_START):
        return "llama-bpe"
    raise _fail(folder, f"its byte-level pre-tokenizer {json.dumps(pre)[:200]} is not one llama.cpp knows by a "
                        "name here (gpt2, smollm, llama-bpe)")


def gguf_vocab(folder: Path, n_vocab: int) -> GGUFVocab:
    """The tokenizer of the Hugging Face model ``folder`` (tokenizer.json) for a GGUF of ``n_vocab`` rows."""
    from transformers import AutoTokenizer

    tj = read_json(folder / "tokenizer.json")
    if not tj:
        raise _fail(folder, "it has no tokenizer.json (a fast tokenizer is needed)")
    model = tj.get("model") or {}
    byte_level = "ByteLevel" in json.dumps(tj.get("decoder"))
    if model.get("type") != "BPE" or not byte_level:
        raise _fail(folder, f"its tokenizer is {model.get('type')} without a byte-level decoder; only byte-level "
                            "BPE tokenizers (SmolLM2, Llama 3, GPT-2 style) are written here, not SentencePiece")
    pre = _pre_tokenizer(folder, tj.get("pre_tokenizer"))
    ids: dict[int, tuple[str, int]] = {i: (t, _NORMAL) for t, i in model["vocab"].items()}
    for a in tj.get("added_tokens") or []:
        ids[a["id"]] = (a["content"], TOKEN_CONTROL if a.get("special") else TOKEN_USER_DEFINED)
    size = max(n_vocab, max(ids) + 1)
    tokens = [ids.get(i, (f"[PAD{i}]", _UNUSED))[0] for i in range(size)]
    types = [ids.get(i, ("", _UNUSED))[1] for i in range(size)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    with contextlib.redirect_stderr(io.StringIO()):
        hf = AutoTokenizer.from_pretrained(str(folder))
    special = {"bos": hf.bos_token_id, "eos": hf.eos_token_id, "pad": hf.pad_token_id, "unk": hf.unk_token_id}
    probe = hf.encode("a")
    template = hf.chat_template if isinstance(hf.chat_template, str) else None
    if template is None and (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    return GGUFVocab("gpt2", pre, tokens, types, merges, special,
                     add_bos=special["bos"] is not None and probe[:1] == [special["bos"]],
                     add_eos=special["eos"] is not None and probe[-1:] == [special["eos"]],
                     chat_template=template)


def _hyperparameters(w: gguf.GGUFWriter, config: dict[str, Any], folder: Path) -> None:
    heads = int(config["num_attention_heads"])
    hidden = int(config["hidden_size"])
    head_dim = int(config.get("head_dim") or hidden // heads)
    scaling = config.get("rope_scaling") or {}
    kind = scaling.get("rope_type") or scaling.get("type")
    if kind not in (None, "default", "linear"):
        raise _fail(folder, f"RoPE scaling {kind!r} is not written here (only none and linear)")
    if config.get("attention_bias") or config.get("mlp_bias"):
        raise _fail(folder, "attention or MLP biases are not part of llama.cpp's llama")
    w.add_context_length(int(config.get("max_position_embeddings") or 2048))
    w.add_embedding_length(hidden)
    w.add_block_count(int(config["num_hidden_layers"]))
    w.add_feed_forward_length(int(config["intermediate_size"]))
    w.add_rope_dimension_count(head_dim)
    w.add_head_count(heads)
    w.add_head_count_kv(int(config.get("num_key_value_heads") or heads))
    if head_dim != hidden // heads:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-5)))
    w.add_rope_freq_base(float(config.get("rope_theta", 10000.0)))
    if kind == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(scaling["factor"]))


def _vocab(w: gguf.GGUFWriter, vocab: GGUFVocab) -> None:
    w.add_tokenizer_model(vocab.model)
    w.add_tokenizer_pre(vocab.pre)
    w.add_token_list(vocab.tokens)
    w.add_token_types(vocab.types)
    w.add_token_merges(vocab.merges)
    for key, add in (("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id), ("pad", w.add_pad_token_id),
                     ("unk", w.add_unk_token_id)):
        if vocab.special.get(key) is not None:
            add(int(vocab.special[key]))
    w.add_add_bos_token(vocab.add_bos)
    w.add_add_eos_token(vocab.add_eos)
    if vocab.chat_template:
        w.add_chat_template(vocab.chat_template)


def gguf_tensors(weights: dict[str, mx.array], config: dict[str, Any], gguf_type: str,
                 folder: Path) -> dict[str, tuple[np.ndarray, gguf.GGMLQuantizationType]]:
    """``{llama.cpp name: (data, type)}``: norms f32, matrices f16 or q8_0 (rows not a multiple of 32: f16).

    q/k are permuted into llama.cpp's interleaved-RoPE order, unless the model already uses it
    (``rope_traditional``: a model imported from GGUF)."""
    permute = not config.get("rope_traditional")
    heads = int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads") or heads)
    out = {}
    for name, value in sorted(weights.items()):
        if name.endswith((".scales", ".biases")) or not mx.issubdtype(value.dtype, mx.floating):
            raise _fail(folder, f"weight {name} is quantized; GGUF export needs float weights")
        try:
            gname = gguf_tensor_name(name)
        except KeyError:
            raise _fail(folder, f"weight {name} has no tensor in llama.cpp's llama") from None
        arr = np.array(value.astype(mx.float32))
        if permute and name.endswith("q_proj.weight"):
            arr = permute_qk(arr, heads)
        elif permute and name.endswith("k_proj.weight"):
            arr = permute_qk(arr, kv_heads)
        if arr.ndim == 1:
            out[gname] = (arr, gguf.GGMLQuantizationType.F32)
        elif gguf_type == "q8_0" and arr.shape[-1] % 32 == 0:
            qtype = gguf.GGMLQuantizationType.Q8_0
            out[gname] = (gguf.quants.quantize(arr, qtype), qtype)
        else:
            out[gname] = (arr.astype(np.float16), gguf.GGMLQuantizationType.F16)
    return out


def write_gguf(path: Path, tensors: dict[str, tuple[np.ndarray, gguf.GGMLQuantizationType]],
               config: dict[str, Any], vocab: GGUFVocab, gguf_type: str, name: str) -> Path:
    """Write a llama GGUF file: metadata (general, hyperparameters, tokenizer) and ``tensors``."""
    w = gguf.GGUFWriter(str(path), "llama")
    try:
        w.add_name(name)
        w.add_file_type(_FILE_TYPES[gguf_type])
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _hyperparameters(w, config, path.parent)
        w.add_vocab_size(len(vocab.tokens))
        _vocab(w, vocab)
        for tname, (data, qtype) in tensors.items():
            w.add_tensor(tname, data, raw_dtype=qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
    finally:
        w.close()
    return path


def export_gguf(dst: Path, model: Any, config: dict[str, Any], gguf_type: str, name: str) -> tuple[Path, dict]:
    """Write ``dst/model-TYPE.gguf`` from the float ``model`` (saved in ``dst`` with its tokenizer)."""
    from mlx.utils import tree_flatten

    if gguf_type not in GGUF_TYPES:
        raise PublishError(f"GGUF type {gguf_type!r}: choose one of {list(GGUF_TYPES)}")
    weights = dict(tree_flatten(model.parameters()))
    vocab = gguf_vocab(dst, int(weights["model.embed_tokens.weight"].shape[0]))
    path = write_gguf(dst / gguf_file_name(gguf_type), gguf_tensors(weights, config, gguf_type, dst), config,
                      vocab, gguf_type, name)
    return path, {"file": path.name, "bytes": path.stat().st_size, "type": gguf_type, "tensors": len(weights),
                  "tokenizer": {"model": vocab.model, "pre": vocab.pre, "tokens": len(vocab.tokens),
                                "merges": len(vocab.merges), "add_bos": vocab.add_bos},
                  "writer": f"gguf {_gguf_version()}"}


def _gguf_version() -> str:
    from importlib.metadata import version

    return version("gguf")


def gguf_type_of(path: Path) -> str:
    """``f16`` or ``q8_0`` from a published GGUF's name (``model-TYPE.gguf``)."""
    return path.stem.removeprefix("model-")


def judge_gguf(path: Path, prompt_ids: Sequence[list[int]], reference_logits: Sequence[mx.array],
               encode: Any) -> dict[str, Any]:
    """Read the GGUF back as the import does and compare it with the reference: ``encode(tokenizer)`` (the
    prompt ids by the GGUF's own tokenizer) must equal ``prompt_ids``, and its logits on them must be within
    :data:`GGUF_LOGIT_RTOL` (relative RMS) of ``reference_logits`` with :data:`GGUF_MIN_TOP1` of the argmax
    agreeing. Returns ``{"checks": [...], "relative_rms", "top1_agreement", "max_abs_logit_delta", ...}``."""
    kind = gguf_type_of(path)
    out: dict[str, Any] = {"file": path.name, "type": kind, "method": (
        "the GGUF read back by ForgeLLM's GGUF import (its tensors and its tokenizer.ggml metadata) against base "
        "+ checkpoint on the parity prompts")}
    try:
        with tempfile.TemporaryDirectory(prefix="forgellm-gguf-") as tmp:
            import_gguf(path, Path(tmp) / "m")
            with contextlib.redirect_stdout(io.StringIO()):
                model, tok = load(str(Path(tmp) / "m"))
    except (ValueError, RuntimeError, OSError) as e:
        out["checks"] = [{"check": "GGUF", "ok": False, "detail": f"{path.name} cannot be read back: {e}"}]
        return out
    ids = encode(tok)
    same = sum(a == b for a, b in zip(ids, prompt_ids, strict=True))
    checks = [{"check": "GGUF tokenizer", "ok": same == len(prompt_ids),
               "detail": f"{same}/{len(prompt_ids)} parity prompts tokenized as by the model's tokenizer"}]
    if same == len(prompt_ids):
        num = den = 0.0
        agree = total = 0
        deltas = []
        for p, ref in zip(prompt_ids, reference_logits, strict=True):
            got = model(mx.array(p)[None]).astype(mx.float32)[0]
            diff = got - ref
            num += mx.sum(diff * diff).item()
            den += mx.sum(ref * ref).item()
            agree += mx.sum(mx.argmax(got, -1) == mx.argmax(ref, -1)).item()
            total += ref.shape[0]
            deltas.append(mx.abs(diff).max().item())
        rel, top1 = (num / max(den, 1e-30)) ** 0.5, agree / max(total, 1)
        out.update(relative_rms=rel, top1_agreement=top1, max_abs_logit_delta=max(deltas))
        rtol, need = GGUF_LOGIT_RTOL.get(kind, 1e-2), GGUF_MIN_TOP1.get(kind, 0.95)
        checks.append({"check": "GGUF logits", "ok": rel <= rtol and top1 >= need,
                       "detail": f"relative RMS difference {rel:.2e} (limit {rtol:g}, {kind}); next-token argmax "
                                 f"agrees at {top1:.1%} of {total} positions (need {need:.0%})"})
    out["checks"] = checks
    return out
