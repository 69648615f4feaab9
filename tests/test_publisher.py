"""Publishing: fuse exactly the chosen checkpoint, quantize, GGUF, the parity check, safe names, model card, upload."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import mlx.core as mx
import pytest
import yaml
from conftest import base_config
from mlx_lm import load as mlx_load

from app.cli import main as cli_main
from services.library.tiny_model import build_tiny_model
from services.publishing.hub import UploadError, upload
from services.publishing.publish import list_published, parity_check, publish
from services.publishing.rules import (
    PublishError,
    base_model,
    check_options,
    choose_checkpoint,
    published_path,
    suggest_name,
)
from services.training.manager import RunManager
from services.workspace import Workspace

TEXT = "<|im_start|>user\nthe cat eats an apple.<|im_end|>\n<|im_start|>assistant\nthe dog sees the ball."


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model, chat_data):
    """One LoRA IFT run with checkpoints 10 and 20 (different weights)."""
    ws = Workspace.resolve(tmp_path_factory.mktemp("publish") / "ws")
    manager = RunManager(ws)
    folder = manager.launch(base_config(tiny_model, chat_data, mode="ift", iters=20, save_every=10, steps_per_eval=10))
    info = manager.wait(folder.id, timeout=300)
    assert info["status"] == "completed", info.get("reason")
    return ws, folder


def reference_logits(base: Path, run: Path, iteration: int, tmp: Path) -> mx.array:
    """Logits of base + checkpoint through mlx-lm's own adapter loader (independent of the publisher)."""
    adapter = tmp / f"adapter-{iteration}"
    adapter.mkdir(exist_ok=True)
    shutil.copy(run / "adapter_config.json", adapter)
    shutil.copy(run / "checkpoints" / f"{iteration:07d}" / "adapters.safetensors", adapter)
    model, tok = mlx_load(str(base), adapter_path=str(adapter))
    return model(mx.array(tok.encode(TEXT))[None])


def published_logits(path: Path) -> mx.array:
    model, tok = mlx_load(str(path))
    return model(mx.array(tok.encode(TEXT))[None])


def max_delta(a: mx.array, b: mx.array) -> float:
    return mx.abs(a - b).max().item()


def test_fp32_export_loads_with_mlx_lm_and_matches_base_plus_adapter(trained, tiny_model, tmp_path):
    ws, folder = trained
    seen: list[tuple[str, float]] = []
    result = publish(ws, folder.id, name="fp32", progress=lambda phase, f, msg: seen.append((phase, f)))
    best = folder.info()["best"]["iteration"]
    assert result.iteration == best and result.reason.startswith("best validation loss")
    assert result.path == ws.published / "fp32" and result.quantization is None and result.dtype == "float32"
    for f in ("config.json", "model.safetensors", "model.safetensors.index.json", "tokenizer.json",
              "tokenizer_config.json", "chat_template.jinja", "README.md", "parity.json", "forgellm.json",
              "loss_curve.svg"):
        assert (result.path / f).is_file(), f
    assert not [p for p in ws.published.iterdir() if p.name.startswith(".")]  # the build folder was renamed away
    phases = [p for p, _ in seen]
    assert {"loading", "fusing", "saving", "parity", "card"} <= set(phases) and "quantizing" not in phases
    fractions = [f for _, f in seen]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0

    delta = max_delta(published_logits(result.path), reference_logits(tiny_model, folder.path, best, tmp_path))
    assert delta < 1e-4

    parity = json.loads((result.path / "parity.json").read_text())
    assert parity["passed"] and parity["kind"] == "float" and parity["greedy_identical"] == "3/3"
    assert parity["loss"]["relative_delta"] <= 1e-4 and parity["loss"]["tokens"] > 0
    assert parity["loss"]["base"] > parity["loss"]["reference"]  # the fine-tune is measurable
    assert parity == result.parity

    card = (result.path / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert {"mlx", "forgellm", "lora", "ift"} <= set(front["tags"])
    assert front["base_model"] == tiny_model.name and front["license"] == "unknown"
    for section in ("## Checkpoint", "## Training curve", "## Evaluation", "## Parity check", "## Training data",
                    "## Training configuration", "## Reproducibility", "mlx_lm 0.32", "fine_tune_type: lora"):
        assert section in card, section
    assert f"checkpoint **{best}**" in card and "PASSED" in card
    assert list_published(ws)[0]["passed"] is True


def test_publishing_checkpoint_k_fuses_k_not_the_latest(trained, tiny_model, tmp_path):
    ws, folder = trained
    result = publish(ws, f"{folder.id}@10", name="k")
    assert result.iteration == 10 and result.reason.startswith("requested")
    logits = published_logits(result.path)
    ref10 = reference_logits(tiny_model, folder.path, 10, tmp_path)
    ref20 = reference_logits(tiny_model, folder.path, 20, tmp_path)
    assert max_delta(logits, ref10) < 1e-4
    assert max_delta(ref10, ref20) > 1e-2 and max_delta(logits, ref20) > 1e-2
    with pytest.raises(PublishError, match="already exists"):
        publish(ws, folder.id, 20, "k")
    replaced = publish(ws, folder.id, 20, "k", overwrite=True)
    assert json.loads((replaced.path / "forgellm.json").read_text())["source"]["iteration"] == 20
    assert max_delta(published_logits(replaced.path), ref20) < 1e-4
    with pytest.raises(PublishError, match=r"no checkpoint 15; it has \[10, 20\]"):
        publish(ws, folder.id, 15, "k15")


def test_parity_check_flags_a_broken_export(trained):
    ws, folder = trained
    result = publish(ws, folder.id, name="broken")
    assert result.parity["passed"]
    weights_path = result.path / "model.safetensors"
    weights = mx.load(str(weights_path))
    key = "model.layers.0.self_attn.q_proj.weight"
    weights[key] = mx.zeros_like(weights[key])
    mx.save_safetensors(str(weights_path), weights, metadata={"format": "mlx"})

    parity = parity_check(ws, "broken")
    assert parity["passed"] is False
    loss_check = next(c for c in parity["checks"] if c["check"] == "validation loss")
    assert not loss_check["ok"] and parity["loss"]["relative_delta"] > 1e-3
    assert json.loads((result.path / "parity.json").read_text())["passed"] is False
    assert "parity check failed" in (result.path / "README.md").read_text()


def test_an_export_that_lost_the_fine_tune_is_flagged_and_strict_publishes_nothing(trained, monkeypatch):
    from mlx.utils import tree_unflatten

    import services.publishing.publish as publish_module

    def drop_adapters(model, dequantize=False):  # the classic silent failure: the base weights are written
        lora = [(n, m.linear) for n, m in model.named_modules() if hasattr(m, "fuse")]
        model.update_modules(tree_unflatten(lora))
        return len(lora)

    monkeypatch.setattr(publish_module, "fuse", drop_adapters)
    ws, folder = trained
    with pytest.raises(PublishError, match="parity check failed, nothing published"):
        publish(ws, folder.id, name="lost", strict=True)
    assert not (ws.published / "lost").exists()
    result = publish(ws, folder.id, name="lost")
    loss = result.parity["loss"]
    assert not result.parity["passed"] and abs(loss["retained"]) < 1e-3  # it is the base model again
    assert any("parity check failed" in w for w in result.warnings)


def test_names_and_paths_cannot_escape_the_workspace(trained, tmp_path):
    ws, folder = trained
    outside = tmp_path / "outside"
    outside.mkdir()
    for name in ("../x", "/abs", str(outside), "a/b", "..", ".", "", ".hidden", "x\\y", "../../" + outside.name):
        with pytest.raises(PublishError):
            publish(ws, folder.id, name=name)
    (ws.published / "link").symlink_to(outside, target_is_directory=True)
    with pytest.raises(PublishError, match="symbolic link"):
        publish(ws, folder.id, name="link", overwrite=True)
    (ws.published / "taken").mkdir()
    with pytest.raises(PublishError, match="already exists"):
        publish(ws, folder.id, name="taken")
    for run in ("../../" + outside.name, str(outside), "../models"):
        with pytest.raises(PublishError, match="outside the workspace|no such run"):
            publish(ws, run, name="fine")
    assert list(outside.iterdir()) == [] and not (ws.root.parent / "x").exists()
    assert not (ws.published / "fine").exists()


def test_quantized_exports_report_their_loss_delta(trained):
    ws, folder = trained
    q8 = publish(ws, folder.id, name="q8", quantize_bits=8)
    q4 = publish(ws, folder.id, name="q4", quantize_bits=4, group_size=64)
    for result, bits in ((q8, 8), (q4, 4)):
        config = json.loads((result.path / "config.json").read_text())
        assert config["quantization"]["bits"] == bits and config["quantization"]["group_size"] == 64
        loss = result.parity["loss"]
        assert result.parity["kind"] == "quantized" and loss["delta"] == loss["published"] - loss["reference"]
        assert abs(loss["delta"]) > 0 and loss["perplexity_increase"] is not None and 0 < loss["retained"]
        assert any(c["check"] == "perplexity increase" for c in result.parity["checks"])
        mlx_load(str(result.path))
    assert q8.parity["passed"] and abs(q8.parity["loss"]["perplexity_increase"]) < 0.02
    assert q4.parity["max_abs_logit_delta"] > q8.parity["max_abs_logit_delta"] > 1e-4  # 4 bits perturb more
    assert 4.5 < q4.parity["bits_per_weight"] < 5.5


def test_a_failed_quantized_export_says_what_to_try():
    from services.publishing.parity import compare

    def measured(loss: float) -> dict:
        return {"loss": loss, "tokens": 100, "greedy": [{"tokens": [1, 2], "text": "a b"}], "logits": []}

    ref, base = measured(3.0), measured(3.6)
    for bits, gs, advice in ((4, 64, "try 8 bits or group size 32"), (8, 64, "try group size 32, or publish "
                             "unquantized"), (8, 32, "publish unquantized")):
        result = compare(ref, measured(3.4), base, dtype="float32", quantization={"bits": bits, "group_size": gs},
                         prompts=["p"])
        failed = [c for c in result["checks"] if not c["ok"]]
        assert failed and all(c["detail"].endswith(advice) for c in failed), failed
    passed = compare(ref, measured(3.001), base, dtype="float32", quantization={"bits": 4, "group_size": 64},
                     prompts=["p"])
    assert passed["passed"] and not any("try" in c["detail"] for c in passed["checks"])


def test_gguf_export_on_tiny_llama_round_trips(trained):
    import gguf

    ws, folder = trained
    result = publish(ws, folder.id, name="gg", gguf=True)
    assert result.gguf is not None and result.gguf.is_file() and result.gguf.parent == result.path
    reader = gguf.GGUFReader(str(result.gguf))
    arch = reader.fields["general.architecture"]
    assert bytes(arch.parts[arch.data[0]]).decode() == "llama"
    assert len(reader.tensors) == 20  # 2 blocks x 9 + token_embd + output_norm (tied head)
    tok = reader.fields["tokenizer.ggml.model"]
    assert bytes(tok.parts[tok.data[0]]).decode() == "gpt2"  # byte-level BPE, as llama.cpp reads it
    written = json.loads((result.path / "forgellm.json").read_text())["gguf"]
    assert written["type"] == "f16" and written["file"] == "model-f16.gguf"
    judged = json.loads((result.path / "parity.json").read_text())["gguf"]
    assert judged["relative_rms"] < 1e-2 and result.parity["passed"] and not result.warnings
    assert "## GGUF" in (result.path / "README.md").read_text()


def test_gguf_is_refused_with_a_clear_message_for_qwen3_and_quantized(tmp_path, chat_data, trained):
    ws = Workspace.resolve(tmp_path / "ws")
    qwen = build_tiny_model(tmp_path / "qwen3", arch="qwen3")
    run = RunManager(ws).create(base_config(qwen, chat_data, mode="ift"))  # the check needs no checkpoint
    with pytest.raises(PublishError, match=r"only for llama, mistral models.*'qwen3'.*convert_hf_to_gguf"):
        publish(ws, run.id, name="q", gguf=True)
    ws2, folder = trained
    with pytest.raises(PublishError, match="GGUF export needs float weights"):
        publish(ws2, folder.id, name="gq", gguf=True, quantize_bits=4)
    for bad in ({"quantize_bits": 3}, {"quantize_bits": 4, "group_size": 48}):
        with pytest.raises(PublishError, match="choose one of"):
            publish(ws2, folder.id, name="bad", **bad)


def test_the_checkpoint_choice_says_why_in_fields_not_in_text_to_parse_apart(trained):
    _, folder = trained
    best = choose_checkpoint(folder)
    assert not best.requested and best.why == best.reason and best.reason.startswith("best validation loss")
    other = 10 if best.iteration == 20 else 20
    asked = choose_checkpoint(folder, other)
    assert asked.requested and asked.iteration == other
    assert asked.why == f"requested ({asked.reason})"
    assert asked.reason.startswith(f"iteration {other}, validation loss ")
    assert f"the best is {best.iteration}" in asked.reason
    again = choose_checkpoint(folder, best.iteration)
    assert again.requested and again.reason.endswith("; also the best by validation loss")


def test_suggested_names_are_publishable(tmp_path):
    ws = Workspace.resolve(tmp_path / "ws")
    cases = (("My run: v2!", "My-run-v2-20"), ("../..", "model-20"), ("a" * 200, "a" * 80 + "-20"))
    for run_name, expected in cases:
        assert suggest_name(run_name, 20) == expected
        assert published_path(ws, expected) == ws.published / expected


def test_one_check_of_the_export_options_with_and_without_the_base_model(tiny_model, tmp_path):
    base_cfg = json.loads((tiny_model / "config.json").read_text())
    quantized = {**base_cfg, "quantization": {"bits": 4, "group_size": 64}}
    check_options({})
    check_options({"quantize_bits": 4, "group_size": 32, "license": "mit", "overwrite": True}, tiny_model, base_cfg)
    check_options({"gguf": True}, tiny_model, base_cfg)
    check_options({"quantize_bits": 8}, tiny_model, None)  # the base model's rules need its config
    check_options({"quantize_bits": 8, "dequantize": True}, tiny_model, quantized)
    with pytest.raises(PublishError, match=r"unknown option\(s\) \['bits'\]"):
        check_options({"bits": 4})
    with pytest.raises(PublishError, match="quantize_bits 3: choose one of"):
        check_options({"quantize_bits": 3})
    with pytest.raises(PublishError, match="group_size 48: choose one of"):
        check_options({"group_size": 48})
    with pytest.raises(PublishError, match="GGUF export needs float weights"):
        check_options({"gguf": True, "quantize_bits": 4})
    with pytest.raises(PublishError, match="already quantized; add dequantize"):
        check_options({"quantize_bits": 8}, tiny_model, quantized)
    with pytest.raises(PublishError, match="is quantized; add dequantize"):
        check_options({"gguf": True}, tiny_model, quantized)
    with pytest.raises(PublishError, match="only for llama, mistral models.*'qwen3'"):
        check_options({"gguf": True}, tiny_model, {**base_cfg, "model_type": "qwen3"})


def test_the_base_model_of_a_run_config(tiny_model, tmp_path):
    base, cfg = base_model({"model": str(tiny_model)})
    assert base == tiny_model and cfg is not None and cfg["model_type"] == "llama"
    assert base_model({"model": str(tmp_path / "gone")}) == (tmp_path / "gone", None)
    assert base_model({})[1] is None


def test_upload_offline_fails_fast_with_a_clear_message(tmp_path, monkeypatch):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "README.md").write_text("# m\n")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.monotonic()
    with pytest.raises(UploadError, match="offline mode: HF_HUB_OFFLINE"):
        upload(folder, "someone/model", token="hf_x")
    import huggingface_hub.constants

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # read when the library was imported
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: like having no network
    with pytest.raises(UploadError, match="cannot reach http://127.0.0.1:9"):
        upload(folder, "someone/model", token="hf_x")
    assert time.monotonic() - t0 < 5
    with pytest.raises(UploadError, match="OWNER/NAME"):
        upload(folder, "../model", token="hf_x")
    with pytest.raises(UploadError, match="not a published model folder"):
        upload(tmp_path, "someone/model")


def test_cli_publish_prints_progress_and_parity(trained, capsys):
    ws, folder = trained
    args = ["--workspace", str(ws.root), "publish", f"{folder.id}@10", "--name", "cli", "--quantize", "8"]
    assert cli_main(args) == 0
    out = capsys.readouterr().out
    assert "] quantizing: quantizing to 8 bits" in out and "[100%] card" in out
    assert "measuring the published model: validation batch 1 of" in out  # steps within a task, throttled
    assert "parity check: PASSED (quantized" in out and "ok   perplexity increase" in out
    assert cli_main(["--workspace", str(ws.root), "publish", folder.id, "--name", "../x"]) == 2
    assert "give a plain folder name" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["dora", "full"])
def test_dora_and_full_checkpoints_fuse_exactly(kind, tmp_path, tiny_model, chat_data):
    ws = Workspace.resolve(tmp_path / "ws")
    manager = RunManager(ws)
    lr = 1e-3 if kind == "dora" else 1e-4
    folder = manager.launch(base_config(tiny_model, chat_data, mode="ift", fine_tune_type=kind, iters=10,
                                        learning_rate=lr))
    assert manager.wait(folder.id, timeout=300)["status"] == "completed"
    result = publish(ws, folder.id, name=kind)
    assert result.fine_tune_type == kind and result.parity["passed"]
    assert max_delta(published_logits(result.path), reference_logits(tiny_model, folder.path, 10, tmp_path)) < 1e-4
    if kind == "full":  # weights replaced, nothing to fuse
        assert json.loads((result.path / "forgellm.json").read_text())["source"]["fused_layers"] == 0
