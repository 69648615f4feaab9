"""The run detail's Evaluate tab through NiceGUI's simulated user: write a suite, save it, run it on the base and
every checkpoint of a real run in the model worker, then the table, the charts and the side-by-side outputs."""

from __future__ import annotations

from functools import partial

import pytest
from conftest import base_config
from nicegui.testing import User, user_simulation
from uihelpers import el, els, set_value
from uihelpers import wait_for as _wait_for

from app.composition import build_services
from pages.shell import make_root
from services.evaluation import results
from services.training.manager import RunManager
from services.workspace import Workspace

wait_for = partial(_wait_for, timeout=120.0)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model, chat_data):
    ws = Workspace.resolve(tmp_path_factory.mktemp("eval-page") / "ws")
    manager = RunManager(ws)
    folder = manager.launch(base_config(tiny_model, chat_data, mode="ift", iters=20))
    other = manager.launch(base_config(tiny_model, chat_data, mode="ift", iters=20, learning_rate=1e-2, name="other"))
    for f in (folder, other):
        assert manager.wait(f.id, timeout=240)["status"] == "completed"
    return ws.root, folder.id, other.id


@pytest.fixture
def services(trained):
    s = build_services(trained[0])
    yield s
    s.close()


@pytest.fixture
async def user(services) -> User:
    async with user_simulation(make_root(services)) as u:
        yield u


async def test_write_a_suite_run_it_on_the_checkpoints_and_see_table_and_outputs(user: User, services, trained):
    run_id = trained[1]
    await user.open(f"/runs/{run_id}")
    user.find(marker="tab-evaluate").click()
    await user.should_see(marker="suite-editor")
    set_value(user, "suite-name", "three")
    user.find(marker="suite-add-case").click()
    await user.should_see(marker="suite-case-1")
    user.find(marker="suite-add-case").click()
    await user.should_see(marker="suite-case-2")
    for i, (prompt, check, value) in enumerate([("the cat", "contains", "the"), ("the dog", "max_tokens", "64"),
                                                ("a bird", "regex", "(unclosed")]):
        set_value(user, f"case-prompt-{i}", prompt)
        set_value(user, f"case-check-{i}", check)
        set_value(user, f"case-value-{i}", value)
    user.find(marker="suite-save").click()
    await user.should_see("invalid regex")  # refused, nothing saved
    assert not services.evals.suite_files()
    set_value(user, "case-value-2", "b")
    user.find(marker="suite-save").click()
    await wait_for(lambda: services.evals.suite_files())
    assert list(el(user, "eval-suites").options.values()) == ["three"]
    set_value(user, "eval-suites", [str(services.evals.suite_files()[0])])
    user.find(marker="eval-run").click()
    await wait_for(lambda: services.evals.state["state"] in ("done", "error"))
    assert services.evals.state["state"] == "done", services.evals.state["message"]
    folder = services.manager.folder(run_id)
    await wait_for(lambda: els(user, "eval-table") and els(user, "eval-table")[0].rows)
    rows = el(user, "eval-table").rows
    assert [r["label"] for r in rows] == ["base", f"{run_id}@10", f"{run_id}@20"]
    assert [r["three"] for r in rows] == [f"{r['three']:.4g}" for r in results.table(results.read(folder))]
    assert el(user, "eval-chart-three").options["series"][0]["data"] == results.series(results.read(folder), "three")
    assert len(els(user, "eval-output")) == 3 * 3  # three cases, each on base and two checkpoints side by side
    assert len(els(user, "eval-diff")) == 3 * 2  # checkpoints are diffed against the base


async def test_compare_runs_by_an_eval_metric_and_the_card_carries_the_eval_table(user: User, services, trained):
    from services.evaluation.suites import from_dict
    from services.publishing.card import eval_section

    _, a, b = trained
    suite = from_dict({"name": "says-the", "cases": [{"prompt": p, "checks": [{"contains": "the"}]}
                                                     for p in ("the cat", "a dog", "the bread")]})
    for run_id in (a, b):
        services.evals.run(run_id, [suite])
    by_run = {r: results.read(services.manager.folder(r)) for r in (a, b)}
    await user.open(f"/compare?runs={a},{b}")
    await user.should_see(marker="compare-eval-table")
    assert el(user, "compare-eval-metric").value == "says-the"
    ranked = results.rank_runs(by_run, "says-the")
    shown = el(user, "compare-eval-table").rows
    assert [r["best"] for r in shown] == [f"{r['score']:.4g} @ {r['iteration']}" for r in ranked]
    assert el(user, "compare-eval").options["series"][0]["data"] == results.series(by_run[a], "says-the")
    card = "\n".join(eval_section(services.manager.folder(a), 20))
    base = next(r for r in by_run[a] if r["iteration"] == 0)["score"]
    mine = next(r for r in by_run[a] if r["iteration"] == 20)["score"]
    assert f"| says-the | pass_rate | {base:.3f} | {mine:.3f} |" in card
