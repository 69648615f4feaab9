"""Which dataset the Train form suggests for a mode: documents for CPT, chats for IFT (real dataset folders)."""

from __future__ import annotations

import os

from services.library.datasets import list_datasets, suggested_dataset


def test_the_suggested_dataset_fits_the_mode(workspace, chat_data, cpt_corpus, tmp_path):
    os.symlink(chat_data, workspace.datasets / "a-chats")
    os.symlink(cpt_corpus, workspace.datasets / "b-corpus")
    (workspace.datasets / "c-notes.txt").write_text("a text document\n")
    datasets = list_datasets(workspace)
    assert [d["key"] for d in datasets] == ["a-chats", "b-corpus", "c-notes.txt"]
    assert suggested_dataset(datasets, "cpt") == "b-corpus"
    assert suggested_dataset(datasets, "ift") == "a-chats"
    assert suggested_dataset(datasets, "mlx-lm") is None
    assert suggested_dataset([d for d in datasets if d["key"] != "b-corpus"], "cpt") == "c-notes.txt"
    assert suggested_dataset([d for d in datasets if d["key"] == "b-corpus"], "ift") is None
