"""Run a preference config through mlx-lm-lora's own DPO/ORPO trainer and print its reports as JSON.

Usage: ``python tests/mlx_lora_reference.py CONFIG.yaml OUT_DIR``. The data is a folder with train.jsonl and
valid.jsonl of ``{"prompt", "chosen", "rejected"}`` rows. The model and its LoRA layers are built as
``mlx_lm_lora.train`` builds them, except that the adapters are initialised right after ``mx.random.seed(seed)``
with mlx-lm's ``linear_to_lora_layers`` (mlx-lm-lora initialises them before it seeds MLX, so its own start is not
reproducible); the datasets, the batches, the loss, the reference model (a second full copy, as its CLI loads it)
and the loop are mlx-lm-lora's.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import services  # noqa: F401 (first: the same BLAS as the ForgeLLM worker)

# isort: split
import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
import yaml
from mlx_lm.tuner.callbacks import TrainingCallback
from mlx_lm.tuner.utils import linear_to_lora_layers
from mlx_lm.utils import load
from mlx_lm_lora.trainer.datasets import DPODataset, ORPODataset
from mlx_lm_lora.trainer.dpo_trainer import DPOTrainingArgs, train_dpo
from mlx_lm_lora.trainer.orpo_trainer import ORPOTrainingArgs, train_orpo

from services.training.data import read_jsonl

_device_info = mx.device_info
if "max_recommended_working_set_size" not in _device_info():  # MLX on the CPU has no wired memory to set
    mx.device_info = lambda: {**_device_info(), "max_recommended_working_set_size": 0}


def plain(v):
    return v.item() if isinstance(v, mx.array) else v


class Recorder(TrainingCallback):
    def on_train_loss_report(self, info):
        print(json.dumps({"type": "train", **{k: plain(v) for k, v in info.items()}}), flush=True)

    def on_val_loss_report(self, info):
        print(json.dumps({"type": "val", **{k: plain(v) for k, v in info.items()}}), flush=True)


def main() -> None:
    cfg = yaml.safe_load(Path(sys.argv[1]).read_text())
    out = Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    pref = cfg.get("preference") or {}
    np.random.seed(cfg["seed"])
    model, tokenizer = load(cfg["model"])
    rows = {s: [r for _, r in read_jsonl(Path(cfg["data"]) / f"{s}.jsonl")] for s in ("train", "valid")}
    dataset = DPODataset if cfg["mode"] == "dpo" else ORPODataset
    train, valid = (dataset(rows[s], tokenizer) for s in ("train", "valid"))
    mx.random.seed(cfg["seed"])
    model.freeze()
    linear_to_lora_layers(model, cfg["num_layers"], cfg["lora_parameters"])
    opt = optim.Adam(learning_rate=cfg["learning_rate"])
    common = dict(batch_size=cfg["batch_size"], iters=cfg["iters"], val_batches=cfg["val_batches"],
                  steps_per_report=cfg["steps_per_report"], steps_per_eval=cfg["steps_per_eval"],
                  steps_per_save=10**9, max_seq_length=cfg["max_seq_length"],
                  adapter_file=str(out / "adapters.safetensors"), beta=pref.get("beta", 0.1))
    if cfg["mode"] == "dpo":
        ref, _ = load(cfg["model"])  # mlx-lm-lora's load_reference_model: a second copy of the base
        ref.freeze()
        args = DPOTrainingArgs(**common, loss_type=pref.get("loss_type", "sigmoid"))
        train_dpo(model, ref, opt, train, valid, args=args, training_callback=Recorder(),
                  loss_type=args.loss_type)
    else:
        train_orpo(model, opt, train, valid, args=ORPOTrainingArgs(**common), training_callback=Recorder())
    print(json.dumps({"type": "peak", "peak_memory": mx.get_peak_memory()}), flush=True)


if __name__ == "__main__":
    main()
