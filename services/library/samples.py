"""Bundled sample datasets (a small sourdough-baking domain) and their installation into a workspace.

``configs/samples/cpt`` holds eight plain-text/Markdown documents for continued pre-training and
``configs/samples/ift`` holds ``train.jsonl``/``valid.jsonl`` chat rows for instruction fine-tuning;
``configs/samples/dpo`` the same prompts as preference pairs (the specific answer chosen over a vague one).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from services.jobs import REPO_ROOT
from services.workspace import staged

SAMPLES_DIR = REPO_ROOT / "configs" / "samples"
SAMPLE_DATASETS = {"cpt": "sample-cpt", "ift": "sample-ift", "dpo": "sample-dpo"}


def _install_one(src: Path, dst: Path) -> None:
    if dst.is_dir():
        return
    if dst.exists():
        raise ValueError(f"cannot install sample dataset: {dst} exists and is not a folder")
    if not src.is_dir():
        raise FileNotFoundError(f"sample data folder {src} is missing; is the repository checkout complete?")
    try:
        with staged(dst) as tmp:
            shutil.copytree(src, tmp)
    except OSError:
        if not dst.is_dir():  # not merely a concurrent install that got there first
            raise


def install_samples(datasets_dir: Path) -> dict[str, Path]:
    """Copy the sample CPT, IFT and DPO datasets into ``datasets_dir`` unless already there.

    Returns ``{"cpt": datasets_dir/"sample-cpt", "ift": …/"sample-ift", "dpo": …/"sample-dpo"}``. Each copy is staged
    in a temporary folder and renamed into place, so an interrupted install leaves nothing half-copied.
    Existing folders are left untouched.
    """
    datasets_dir = Path(datasets_dir)
    datasets_dir.mkdir(parents=True, exist_ok=True)
    installed = {}
    for kind, name in SAMPLE_DATASETS.items():
        dst = datasets_dir / name
        _install_one(SAMPLES_DIR / kind, dst)
        installed[kind] = dst
    return installed
