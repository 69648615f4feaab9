"""Run a config through mlx-lm's own trainer (``mlx_lm.lora``'s code path) and print its reports as JSON.

Usage: ``python tests/mlx_reference.py CONFIG.yaml ADAPTER_DIR`` (under ``mlx.launch`` too: rank 0 prints).
Builds args exactly as
``mlx_lm.lora.main`` does and calls ``mlx_lm.lora.train_model`` with a recording callback.
"""

import json
import os
import sys
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import services  # noqa: F401 (first: the BLAS the ForgeLLM worker uses, since results are compared bitwise)

# isort: split
import numpy as np
import yaml
from mlx_lm.lora import CONFIG_DEFAULTS, train_model, yaml_loader
from mlx_lm.tuner.callbacks import TrainingCallback
from mlx_lm.tuner.datasets import load_dataset
from mlx_lm.utils import load

RANK0 = os.environ.get("MLX_RANK", "0") == "0"  # under mlx.launch every rank reports the same reduced figures


class Recorder(TrainingCallback):
    def on_train_loss_report(self, info):
        if RANK0:
            print(json.dumps({"type": "train", **info}), flush=True)

    def on_val_loss_report(self, info):
        if RANK0:
            print(json.dumps({"type": "val", **info}), flush=True)


def main() -> None:
    with open(sys.argv[1]) as f:
        args = yaml.load(f, yaml_loader)
    for k, v in CONFIG_DEFAULTS.items():
        if args.get(k) is None:
            args[k] = v
    args["adapter_path"] = sys.argv[2]
    args["train"] = True
    args = types.SimpleNamespace(**args)
    np.random.seed(args.seed)
    model, tokenizer = load(args.model)
    train_set, valid_set, _ = load_dataset(args, tokenizer)
    train_model(args, model, train_set, valid_set, training_callback=Recorder())


if __name__ == "__main__":
    main()
