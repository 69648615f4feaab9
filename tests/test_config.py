"""Config schema: mlx-lm compatibility, export to mlx_lm.lora, clear errors."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml
from conftest import base_config

from services import config as config_mod
from services.config import ConfigError, ConfigProblems


def test_defaults_are_mlx_lm_defaults():
    from mlx_lm.lora import CONFIG_DEFAULTS

    assert config_mod.MLX_LM_DEFAULTS == CONFIG_DEFAULTS


def test_plain_mlx_lm_config_resolves_like_mlx_lm():
    cfg = config_mod.resolve({"model": "m", "data": "d", "iters": 5})
    assert cfg["mode"] is None and cfg["learning_rate"] == 1e-5 and cfg["num_layers"] == 16
    assert cfg["optimizer_config"] == {"adam": {}, "adamw": {}, "muon": {}, "sgd": {}, "adafactor": {}}


def test_exported_config_runs_under_mlx_lm_lora(tiny_model, chat_data, tmp_path):
    cfg = config_mod.resolve(base_config(tiny_model, chat_data, iters=4, steps_per_report=2, save_every=4))
    exported = config_mod.to_mlx_lm(cfg, str(tmp_path / "out"))
    assert set(exported) <= set(config_mod.MLX_LM_DEFAULTS) | set(config_mod.MLX_LM_FEATURE_KEYS)
    path = tmp_path / "cfg.yaml"
    path.write_text(config_mod.dump_yaml(exported))
    proc = subprocess.run([sys.executable, "-m", "mlx_lm", "lora", "-c", str(path)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "out" / "adapters.safetensors").exists()


def test_forgellm_only_features_refuse_export_naming_the_key(tiny_model, chat_data):
    cfg = config_mod.resolve(base_config(tiny_model, chat_data, mode="ift"))
    with pytest.raises(ConfigError, match="mode"):
        config_mod.to_mlx_lm(cfg, "out")
    cfg = config_mod.resolve(base_config(tiny_model, chat_data, early_stopping={"patience": 2}))
    with pytest.raises(ConfigError, match="early_stopping"):
        config_mod.to_mlx_lm(cfg, "out")


def test_every_problem_is_reported_at_once_with_field_value_and_reason():
    with pytest.raises(ConfigProblems) as err:
        config_mod.resolve({"model": "m", "data": "d", "batch_size": 0, "learning_rate": 2.0, "optimzer": "adam",
                            "lora_parameters": {"rank": 8, "alpha": 16, "scale": 2.0},
                            "lr_schedule": {"name": "cosine_decay", "arguments": [1e-3, 10], "warmup": -1}})
    by_field = {e.field: e for e in err.value.errors}
    assert set(by_field) == {"batch_size", "learning_rate", "optimzer", "lora_parameters.alpha",
                             "lr_schedule.warmup"}
    assert "did you mean 'optimizer'" in by_field["optimzer"].reason
    assert "scale" in by_field["lora_parameters.alpha"].reason
    assert by_field["batch_size"].value == 0
    assert "batch_size = 0: must be an integer ≥ 1" in str(err.value)


def test_problems_come_in_one_pass_in_the_order_of_the_schema():
    user = {"model": "", "data": "d", "mode": "cpt", "fine_tune_type": "lora", "optimizer": "lion", "batch_size": 0,
            "epochs": -1, "learning_rate": 2.0, "lora_parameters": {"rank": 0, "scale": 1.0},
            "lr_schedule": {"name": "cosine_decay", "arguments": [1e-3, 10], "warmup": -1}, "valid_fraction": 1.0,
            "mask_prompt": True, "mixture": {"data": "r", "ratio": 2}, "early_stopping": {"patience": 0},
            "keep_checkpoints": 0, "train_embeddings": True, "optimzer": "adam"}
    with pytest.raises(ConfigProblems) as err:
        config_mod.resolve(user)
    assert [e.field for e in err.value.errors] == [
        "optimzer", "model", "optimizer", "batch_size", "epochs", "learning_rate", "lora_parameters.rank",
        "lr_schedule.warmup", "valid_fraction", "mask_prompt", "mixture.ratio", "early_stopping.patience",
        "keep_checkpoints", "train_embeddings"]
    assert "mixture.ratio = 2: must be a share of training tokens between 0 and 1" in str(err.value)


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model: m\ndata: d\niters: [1, 2\n")
    with pytest.raises(ConfigError, match=rf"{path}:\d+"):
        config_mod.load_yaml(path)


@pytest.mark.parametrize("kind", ["constant", "linear", "cosine"])
def test_schedule_helper_builds_real_mlx_schedules(kind):
    import mlx.optimizers as optim
    from mlx_lm.tuner.utils import build_schedule

    sched = config_mod.schedule(kind, 1e-3, 100, warmup=10)
    fn = build_schedule(sched)
    assert fn(0).item() == pytest.approx(0.0, abs=1e-9)
    assert fn(10).item() == pytest.approx(1e-3, rel=1e-5)
    assert hasattr(optim.schedulers, sched["name"])
    config_mod.validate(config_mod.resolve({"model": "m", "data": "d", "lr_schedule": sched}))


def test_presets_are_valid_configs():
    from pathlib import Path

    presets = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))
    assert len(presets) >= 4
    for p in presets:
        cfg = config_mod.resolve(yaml.safe_load(p.read_text()))
        assert cfg["mode"] in ("cpt", "ift", "dpo", "orpo"), p


def test_presets_are_the_yaml_files_of_the_configs_folder(tmp_path):
    (tmp_path / "samples").mkdir()
    (tmp_path / "samples" / "inner.yaml").write_text("model: m\n")
    (tmp_path / "b.yaml").write_text("model: m\n")
    (tmp_path / "a.yaml").write_text("model: m\n")
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "dir.yaml").mkdir()
    assert config_mod.list_presets(tmp_path) == {"a": tmp_path / "a.yaml", "b": tmp_path / "b.yaml"}
    assert list(config_mod.list_presets(tmp_path)) == ["a", "b"]
    assert config_mod.list_presets(tmp_path / "missing") == {}


def test_an_uploaded_config_is_utf8_yaml_of_at_most_a_megabyte():
    assert config_mod.parse_yaml_bytes(b"model: m\nlearning_rate: 1e-5\n", "up.yaml") == {
        "model": "m", "learning_rate": 1e-5}
    with pytest.raises(ConfigError, match="larger than 1 MB"):
        config_mod.parse_yaml_bytes(b"#" * (config_mod.MAX_YAML_BYTES + 1), "big.yaml")
    config_mod.check_yaml_size(config_mod.MAX_YAML_BYTES, "fits.yaml")
    with pytest.raises(ConfigError, match=r"big\.yaml.*larger than 1 MB"):
        config_mod.check_yaml_size(config_mod.MAX_YAML_BYTES + 1, "big.yaml")
    with pytest.raises(ConfigError, match=r"bad\.yaml:2"):
        config_mod.parse_yaml_bytes(b"a: [1, 2\n", "bad.yaml")
    with pytest.raises(ConfigError, match=r"latin\.yaml.*not UTF-8 text"):
        config_mod.parse_yaml_bytes(b"model: \xff\n", "latin.yaml")
