"""Build small random-weight mlx-lm models with a locally trained byte-level BPE tokenizer.

Used by tests (a ~0.1M-parameter model in about a second) and by benchmarks (the "20M" size, with a
tokenizer trained on the Python standard library: ``texts="stdlib"``). Everything is offline and bitwise
deterministic for the same arguments. Note: building reseeds MLX's global random generator with ``seed``.
"""

from __future__ import annotations

import importlib
import json
import random
import sysconfig
from collections.abc import Iterable
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}"
)
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}
# 256 byte symbols + the special tokens: the smallest vocabulary a byte-level BPE can have.
MIN_VOCAB = 256 + len(SPECIAL_TOKENS)

_SUBJECTS = ("the cat", "a dog", "my friend", "the teacher", "a small bird", "the farmer", "our baker",
             "the old man", "a young girl", "the robot", "her brother", "the captain")
_VERBS = ("eats", "finds", "likes", "carries", "paints", "sells", "watches", "cooks", "buys", "reads",
          "draws", "keeps")
_OBJECTS = ("an apple", "the bread", "a red ball", "some water", "a blue book", "the green hat",
            "a warm cake", "the letter", "a wooden box", "the yellow kite", "a cup of tea", "the map")
_PLACES = ("in the garden", "at the market", "near the river", "on the hill", "in the kitchen",
           "by the window", "at school", "in the forest", "on the boat", "at home")
_TIMES = ("today", "every morning", "at night", "on sunday", "after lunch", "before dinner", "again")
_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "st", "tr", "sh")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ou")


def synthetic_corpus(vocab: int = 512, n_sentences: int = 400) -> list[str]:
    """Deterministic simple-English sentences, plus made-up names so BPE can reach about ``vocab`` tokens."""
    rng = random.Random(1234)  # fixed: the corpus (and so the tokenizer) never depends on the weight seed
    lines = [
        f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} "
        f"{rng.choice(_PLACES)} {rng.choice(_TIMES)}."
        for _ in range(n_sentences)
    ]
    # Each invented name adds fresh character pairs to merge, so larger vocabularies stay reachable.
    n_names = max(0, vocab - MIN_VOCAB) * 2
    names = ["".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(rng.randint(2, 4)))
             for _ in range(n_names)]
    lines += [f"{names[i]} and {names[i + 1]} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}."
              for i in range(0, len(names) - 1, 2)]
    return lines


def stdlib_corpus() -> list[str]:
    """The text of the Python standard library's top-level ``*.py`` files, in sorted order."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(stdlib.glob("*.py"))
    if not files:
        raise ValueError(f"texts='stdlib': no *.py files found in the standard library folder {stdlib}")
    return [f.read_text(encoding="utf-8", errors="replace") for f in files]


def _resolve_texts(texts: Iterable[str] | str | None, vocab: int) -> list[str]:
    if texts is None:
        return synthetic_corpus(vocab)
    if isinstance(texts, str):
        if texts == "stdlib":
            return stdlib_corpus()
        raise ValueError(f"texts: expected None, 'stdlib' or an iterable of strings, got {texts!r}")
    out = list(texts)
    bad = [i for i, t in enumerate(out) if not isinstance(t, str)]
    if bad:
        raise ValueError(f"texts: item {bad[0]} is {type(out[bad[0]]).__name__}, expected str")
    if not any(t.strip() for t in out):
        raise ValueError("texts: the corpus is empty; give at least one non-blank string")
    return out


def _check_sizes(arch: str, hidden: int, layers: int, intermediate: int, heads: int, kv_heads: int,
                 vocab: int, max_position_embeddings: int) -> None:
    if arch not in ARCHITECTURES:
        raise ValueError(f"arch: {arch!r} is not supported; choose one of {sorted(ARCHITECTURES)}")
    for name, value in (("hidden", hidden), ("layers", layers), ("intermediate", intermediate),
                        ("heads", heads), ("kv_heads", kv_heads),
                        ("max_position_embeddings", max_position_embeddings)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: must be a positive integer, got {value!r}")
    if hidden % heads:
        raise ValueError(f"hidden ({hidden}) must be divisible by heads ({heads})")
    if (hidden // heads) % 2:
        raise ValueError(f"head dim hidden/heads = {hidden // heads} must be even for RoPE")
    if heads % kv_heads:
        raise ValueError(f"heads ({heads}) must be divisible by kv_heads ({kv_heads})")
    if not isinstance(vocab, int) or vocab < MIN_VOCAB:
        raise ValueError(f"vocab: must be an integer >= {MIN_VOCAB} (bytes + special tokens), got {vocab!r}")


def train_tokenizer(texts: list[str], vocab: int):
    """Train a byte-level BPE tokenizer with the ChatML specials; returns a transformers fast tokenizer."""
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()  # => mlx_lm picks its BPEStreamingDetokenizer
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab, show_progress=False, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN)
    hf.chat_template = CHAT_TEMPLATE
    return hf


def build_tiny_model(
    out_dir: str | Path,
    texts: Iterable[str] | str | None = None,
    *,
    arch: str = "llama",
    hidden: int = 64,
    layers: int = 2,
    intermediate: int = 128,
    heads: int = 4,
    kv_heads: int = 2,
    vocab: int = 512,
    seed: int = 0,
    max_position_embeddings: int = 1024,
) -> Path:
    """Write a random-weight mlx-lm model (config.json, model.safetensors, tokenizer) to ``out_dir``.

    ``texts`` is the tokenizer corpus: None for the built-in synthetic sentences, ``"stdlib"`` for the
    Python standard library sources, or any iterable of strings. ``vocab`` is an upper bound; the
    trainer stops early when the corpus has no more pairs to merge. Same arguments => same bytes.
    """
    _check_sizes(arch, hidden, layers, intermediate, heads, kv_heads, vocab, max_position_embeddings)
    corpus = _resolve_texts(texts, vocab)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"out_dir: {out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)

    hf = train_tokenizer(corpus, vocab)
    hf.save_pretrained(str(out))  # tokenizer.json, tokenizer_config.json, chat_template.jinja
    cfg = {
        "model_type": arch,
        "architectures": [ARCHITECTURES[arch]],
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "intermediate_size": intermediate,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": hidden // heads,
        "rms_norm_eps": 1e-6,
        "vocab_size": len(hf),
        "max_position_embeddings": max_position_embeddings,
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
        "bos_token_id": None,
        "eos_token_id": hf.eos_token_id,
        "pad_token_id": hf.pad_token_id,
        "torch_dtype": "float32",
    }
    module = importlib.import_module(f"mlx_lm.models.{arch}")
    mx.random.seed(seed)
    model = module.Model(module.ModelArgs.from_dict(cfg))
    weights = dict(tree_flatten(model.parameters()))
    mx.eval(weights)
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return out
