"""A person writes a 3-case suite in the app (the first case with two checks), runs it on a run's base and
checkpoints, reads the table and the outputs side by side, then runs it in the Playground on what is loaded."""

from __future__ import annotations

import pytest
from conftest import shot
from playwright.sync_api import Page, expect


@pytest.fixture(scope="module")
def run(e2e_workspace) -> dict:
    from services.training.manager import RunManager
    from services.workspace import Workspace

    ws = Workspace.resolve(e2e_workspace)
    manager = RunManager(ws)
    folder = manager.launch({"model": str(ws.models / "tiny-llama"), "data": str(ws.datasets / "sample-ift"),
                             "mode": "ift", "fine_tune_type": "lora", "seed": 0, "num_layers": 2, "batch_size": 4,
                             "iters": 20, "val_batches": 2, "steps_per_report": 5, "steps_per_eval": 10,
                             "save_every": 10, "max_seq_length": 128, "learning_rate": 2e-3, "name": "eval-e2e",
                             "lora_parameters": {"rank": 8, "dropout": 0.0, "scale": 20.0}})
    info = manager.wait(folder.id, timeout=300)
    assert info["status"] == "completed", folder.log_path.read_text()[-2000:]
    return info


def test_write_a_suite_run_it_on_the_checkpoints_and_compare_outputs(page: Page, run):
    page.goto(f"/runs/{run['id']}")
    page.get_by_role("tab", name="Evaluate").click()
    editor = page.locator(".q-card").filter(has_text="Suite editor")
    expect(editor).to_be_visible()
    editor.get_by_label("Suite name", exact=True).fill("e2e-three")
    editor.get_by_role("button", name="Add case").click()
    editor.get_by_role("button", name="Add case").click()
    expect(editor.get_by_label("Prompt", exact=True)).to_have_count(3)  # redrawn before anything is typed
    cases = [("the cat eats", "contains", "the"), ("sourdough starter", "not_contains", "zebra"),
             ("flour and water", "max_tokens", "64")]
    for i, (prompt, check, value) in enumerate(cases):
        case = editor.locator(".q-card").nth(i)
        case.get_by_label("Prompt", exact=True).fill(prompt)
        case.get_by_label("Check", exact=True).first.click()
        page.get_by_role("option", name=check, exact=True).last.click()  # an earlier menu may still be closing
        field = "At most tokens" if check == "max_tokens" else "Expected"
        expect(case.get_by_label(field, exact=True)).to_be_visible()  # each kind has its own argument field
        case.get_by_label(field, exact=True).fill(value)
    first = editor.locator(".q-card").first  # a second check on the first case
    first.get_by_role("button", name="Add check").click()
    expect(first.get_by_label("Check", exact=True)).to_have_count(2)
    first.get_by_label("Check", exact=True).nth(1).click()
    page.get_by_role("option", name="max_tokens", exact=True).last.click()
    expect(first.get_by_label("At most tokens", exact=True)).to_have_value("64")
    editor.get_by_role("button", name="Try on the base model").click()
    expect(editor.locator(".q-badge").first).to_be_visible(timeout=60_000)
    shot(page, "evaluate-editor")
    editor.get_by_role("button", name="Save").click()
    expect(page.locator(".q-notification").filter(has_text="Saved")).to_be_visible()

    page.get_by_label("Suites (workspace/evals)", exact=True).click()
    page.get_by_role("option", name="e2e-three").click()
    page.keyboard.press("Escape")
    page.get_by_role("button", name="Evaluate base + checkpoints").click()
    table = page.locator(".q-table").filter(has_text="e2e-three")
    expect(table.get_by_role("row")).to_have_count(4, timeout=120_000)  # header + base + 2 checkpoints
    expect(table).to_contain_text("base")
    expect(table).to_contain_text(f"{run['id']}@20")
    outputs = page.locator(".q-card").filter(has_text="Outputs per case")
    expect(outputs).to_be_visible()
    first_case = page.locator(".q-card").filter(has_text="case-1").last
    expect(first_case.get_by_text("base", exact=True)).to_be_visible()
    expect(first_case.get_by_text(f"{run['id']}@10", exact=True)).to_be_visible()
    expect(first_case.get_by_text(f"{run['id']}@20", exact=True)).to_be_visible()
    expect(page.locator(".nicegui-echart canvas").last).to_be_visible()
    first_case.scroll_into_view_if_needed()
    shot(page, "evaluate-results")

    # the Playground runs the same suite on what it has loaded: the base and checkpoint 20
    page.goto(f"/playground?run={run['id']}@20")
    expect(page.get_by_text(f"+ {run['id']}@20").first).to_be_visible(timeout=60_000)
    page.get_by_role("tab", name="Evaluate").click()
    expect(page.locator(".q-chip").filter(has_text=f"{run['id']} @ 20")).to_be_visible()
    page.get_by_label("Suite", exact=True).click()
    page.get_by_role("option", name="e2e-three").click()
    page.get_by_role("button", name="Run suite").click()
    rates = page.locator(".q-table").filter(has_text="pass rate")
    expect(rates.get_by_role("row")).to_have_count(3, timeout=120_000)  # header + base + checkpoint 20
    expect(page.locator(".q-card").filter(has_text="case-1").last.locator(".q-badge")).to_have_count(2)
    shot(page, "playground-evaluate")
