"""The random tiny model: builds, loads with mlx-lm, generates, and is bitwise deterministic."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import pytest
from mlx_lm import load, stream_generate

from services.library.tiny_model import CHAT_TEMPLATE, build_tiny_model, stdlib_corpus, synthetic_corpus

FILES = ["chat_template.jinja", "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def _bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_writes_expected_files_and_config(tiny):
    assert sorted(p.name for p in tiny.iterdir()) == FILES
    cfg = json.loads((tiny / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["architectures"] == ["LlamaForCausalLM"]
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["intermediate_size"]) == (64, 2, 128)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (4, 2, 16)
    assert cfg["vocab_size"] == 512  # the synthetic corpus is rich enough to reach the requested size
    assert cfg["max_position_embeddings"] == 1024


def test_loads_and_generates(tiny):
    model, tok = load(str(tiny))
    cfg = json.loads((tiny / "config.json").read_text())
    assert len(tok) == cfg["vocab_size"]
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert tok.eos_token_ids == {tok.convert_tokens_to_ids("<|im_end|>")}
    assert type(tok._detokenizer).__name__ == "BPEStreamingDetokenizer"

    ids = tok.encode("the cat eats an apple in the garden.")
    assert tok.decode(ids) == "the cat eats an apple in the garden."
    logits = model(mx.array([ids]))
    assert logits.shape == (1, len(ids), cfg["vocab_size"])
    assert mx.all(mx.isfinite(logits)).item()

    responses = list(stream_generate(model, tok, "the cat", max_tokens=4))
    assert 1 <= responses[-1].generation_tokens <= 4


def test_chat_template(tiny):
    _, tok = load(str(tiny))
    assert tok.has_chat_template
    assert (tiny / "chat_template.jinja").read_text() == CHAT_TEMPLATE
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    ids = tok.apply_chat_template(messages, add_generation_prompt=True)
    specials = {tok.convert_tokens_to_ids(t) for t in ("<|im_start|>", "<|im_end|>")}
    assert sum(i in specials for i in ids) == 5  # special tokens are single ids, not split into bytes


def test_same_arguments_give_identical_bytes(tiny, tmp_path):
    again = build_tiny_model(tmp_path / "again")
    assert _bytes(again) == _bytes(tiny)


def test_other_seed_changes_only_the_weights(tiny, tmp_path):
    other = _bytes(build_tiny_model(tmp_path / "seed1", seed=1))
    base = _bytes(tiny)
    assert other["model.safetensors"] != base["model.safetensors"]
    assert {k: v for k, v in other.items() if k != "model.safetensors"} == \
        {k: v for k, v in base.items() if k != "model.safetensors"}


def test_qwen3_architecture(tmp_path):
    out = build_tiny_model(tmp_path / "q3", arch="qwen3", vocab=300)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "qwen3" and cfg["vocab_size"] == 300
    model, tok = load(str(out))
    assert "q_norm" in dict(model.model.layers[0].self_attn.named_modules())
    assert model(mx.array([tok.encode("a dog")])).shape[-1] == 300


def test_custom_texts_and_stdlib_corpus(tmp_path):
    out = build_tiny_model(tmp_path / "custom", ["hello world. hello there."] * 3, vocab=400)
    tok = json.loads((out / "tokenizer.json").read_text())
    assert "Ġworld" in tok["model"]["vocab"]
    assert json.loads((out / "config.json").read_text())["vocab_size"] < 400  # tiny corpus runs out of merges

    corpus = stdlib_corpus()
    assert len(corpus) > 50 and any("def " in t for t in corpus)
    assert synthetic_corpus(600) == synthetic_corpus(600)


@pytest.mark.parametrize("kwargs, message", [
    ({"arch": "gpt2"}, "arch: 'gpt2' is not supported"),
    ({"hidden": 66, "heads": 4}, r"hidden \(66\) must be divisible by heads \(4\)"),
    ({"heads": 4, "kv_heads": 3}, r"heads \(4\) must be divisible by kv_heads \(3\)"),
    ({"vocab": 100}, "vocab: must be an integer >= 259"),
    ({"layers": 0}, "layers: must be a positive integer"),
    ({"texts": "stdlb"}, "texts: expected None, 'stdlib'"),
    ({"texts": ["ok", 3]}, "texts: item 1 is int"),
])
def test_bad_arguments(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_tiny_model(tmp_path / "bad", **kwargs)
    assert not (tmp_path / "bad").exists()
