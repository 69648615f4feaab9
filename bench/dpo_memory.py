#!/usr/bin/env python
"""DPO memory: peak MLX memory of a LoRA DPO run against the same SFT run, and against mlx-lm-lora's DPO.

One invocation prints four figures for the same model, pairs, batch size, sequence length and LoRA layers:

* ForgeLLM LoRA DPO (the reference is the base with the adapters switched off: no second copy of the weights), with
  the default two-pass step (one side's activations at a time);
* the same with the joint pass of both sides (``preference.compat: true``, mlx-lm-lora's batching and rounding);
* ForgeLLM LoRA SFT (``mode: ift``) on the chosen answers of the same pairs (prompt + chosen as chat rows);
* mlx-lm-lora's ``train_dpo`` (``tests/mlx_lora_reference.py``), which loads a second full copy as reference.

Target: ForgeLLM DPO ≤ 1.15 × ForgeLLM SFT. Figures are ``mx.get_peak_memory()`` of each training process (the
largest value its train reports carry). Model: the 20M llama of ``bench/preflight_memory.py`` (``--quick``: the
tiny one).

Usage: ``python bench/dpo_memory.py [--quick]``. Writes ``bench/results/dpo_memory[-quick].json``.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))
from conftest import sentence, write_jsonl  # noqa: E402
from preflight_memory import RESULTS, ensure_model, log  # noqa: E402 (sets the BLAS and MLX environment first)

from services.training.manager import RunManager  # noqa: E402
from services.workspace import Workspace  # noqa: E402

TARGET = 1.15


def pairs(rng: random.Random, n: int) -> list[dict]:
    out = []
    for _ in range(n):
        body = " ".join(sentence(rng) for _ in range(6))
        out.append({"prompt": sentence(rng), "chosen": f"yes. {body}", "rejected": f"no. {body} {sentence(rng)}"})
    return out


def peak_of(manager: RunManager, cfg: dict) -> tuple[float, float]:
    """The largest MLX peak of a run's train reports, and its median iterations per second."""
    folder = manager.launch(cfg)
    info = manager.wait(folder.id, timeout=1200)
    assert info["status"] == "completed", info
    records, _ = folder.metrics()
    train = [r for r in records if r.get("type") == "train"]
    speeds = sorted(r["iterations_per_second"] for r in train)
    return max(r["peak_memory_gb"] for r in train), speeds[len(speeds) // 2]


def main() -> None:
    quick = "--quick" in sys.argv
    model = ensure_model("tiny" if quick else "20m")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        rng = random.Random(0)
        data = {"train": pairs(rng, 24), "valid": pairs(rng, 8)}
        for split, rows in data.items():
            write_jsonl(root / "pref" / f"{split}.jsonl", rows)
            write_jsonl(root / "sft" / f"{split}.jsonl", [{"messages": [
                {"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["chosen"]}]}
                for r in rows])
        common = {"model": str(model), "fine_tune_type": "lora", "num_layers": -1, "batch_size": 4, "iters": 6,
                  "val_batches": 1, "learning_rate": 1e-4, "steps_per_report": 2, "steps_per_eval": 100,
                  "save_every": 100, "max_seq_length": 256, "seed": 0,
                  "lora_parameters": {"rank": 8, "dropout": 0.0, "scale": 20.0}}
        manager = RunManager(Workspace.resolve(root / "ws"))
        log("ForgeLLM LoRA DPO")
        dpo, dpo_speed = peak_of(manager, {**common, "mode": "dpo", "data": str(root / "pref"),
                                           "preference": {"beta": 0.1}})
        log("ForgeLLM LoRA DPO, joint pass (compat)")
        joint, joint_speed = peak_of(manager, {**common, "mode": "dpo", "data": str(root / "pref"),
                                               "preference": {"beta": 0.1, "compat": True}})
        log("ForgeLLM LoRA SFT on the chosen answers")
        sft, _ = peak_of(manager, {**common, "mode": "ift", "data": str(root / "sft")})
        log("mlx-lm-lora DPO")
        cfg_path = root / "ref.yaml"
        cfg_path.write_text(json.dumps({**common, "mode": "dpo", "data": str(root / "pref"),
                                        "preference": {"beta": 0.1}}))  # JSON is YAML
        proc = subprocess.run([sys.executable, str(ROOT / "tests" / "mlx_lora_reference.py"), str(cfg_path),
                               str(root / "ref")], capture_output=True, text=True, timeout=1200)
        assert proc.returncode == 0, proc.stderr[-3000:]
        ref = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith('{"type"')]
        lora = max(r["peak_memory"] for r in ref if r["type"] == "peak") / 1e9
    result = {"model": model.name, "forgellm_dpo_gb": dpo, "forgellm_dpo_joint_gb": joint, "forgellm_sft_gb": sft,
              "mlx_lm_lora_dpo_gb": lora, "dpo_over_sft": dpo / sft, "joint_over_sft": joint / sft,
              "dpo_over_mlx_lm_lora": dpo / lora, "two_pass_speed_over_joint": dpo_speed / joint_speed,
              "target": TARGET, "pass": dpo / sft <= TARGET}
    for k, v in result.items():
        print(f"{k:>22}: {v:.4f}" if isinstance(v, float) else f"{k:>22}: {v}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"dpo_memory{'-quick' if quick else ''}.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
