"""A person uploads a YAML config the CLI would refuse (issue 15 W2): the page names every problem, keeps the
form as it was, and Start launches nothing."""

from __future__ import annotations

import re
from pathlib import Path

from conftest import fill, shot
from playwright.sync_api import Page, expect


def test_an_upload_with_huge_and_mistyped_values_is_refused_field_by_field(page: Page, app_server, e2e_workspace,
                                                                           tmp_path):
    runs = Path(e2e_workspace) / "runs"
    before = sorted(p.name for p in runs.iterdir()) if runs.exists() else []
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("model: tiny-llama\ndata: sample-chat\nmode: ift\niters: 1.0e30\nbatch_size: true\n"
                   "seed: 18446744073709551616\nlr_schedule: cosine\n")
    page.goto("/train")
    expect(page.get_by_role("button", name="Start training")).to_be_visible()
    fill(page, "Batch size", "0")  # the form as it was cannot start either (a fresh form is fitted: it could)
    expect(page.get_by_text(re.compile(r"batch_size.*must be an integer"))).to_be_visible()
    page.locator("input[type=file]").set_input_files(str(cfg))
    problems = page.get_by_text("bad.yaml was not loaded; fix it")
    expect(problems).to_be_visible()
    for text in ("iters = 1e+30: must be an integer", "batch_size = True: must be an integer",
                 "seed = 18446744073709551616: must be an integer", "lr_schedule = 'cosine': must be a mapping"):
        expect(problems).to_contain_text(text)
    shot(page, "train-upload-refused")
    page.get_by_role("button", name="Start training").click()
    page.wait_for_timeout(500)
    expect(page).to_have_url(re.compile(r"/train$"))
    assert (sorted(p.name for p in runs.iterdir()) if runs.exists() else []) == before
