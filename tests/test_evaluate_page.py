"""The run detail's Evaluate tab through NiceGUI's simulated user: write a suite (several checks per case, every kind),
save it, open it again, run it on the base and every checkpoint of a real run in the model worker, then the table,
the charts and the side-by-side outputs; the Playground's Evaluate tab on what it holds; progress and cancel in both."""

from __future__ import annotations

import json
from functools import partial

import pytest
from conftest import base_config
from nicegui import ui
from nicegui.testing import User, user_simulation
from uihelpers import el, els, set_value
from uihelpers import wait_for as _wait_for

from app.composition import build_services
from pages.shell import make_root
from services.evaluation import results
from services.evaluation.suites import load_suite
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
        await pick_kind(user, i, 0, check)
        set_value(user, f"case-value-{i}-0", int(value) if check == "max_tokens" else value)
    user.find(marker="suite-save").click()
    await user.should_see("invalid regex")  # refused, nothing saved
    assert not services.evals.suite_files()
    set_value(user, "case-value-2-0", "b")
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


# ----------------------------------------------------------------------------------------- the suite editor

ALL_KINDS = [{"exact": "the cat"}, {"contains": "cat"}, {"not_contains": "zebra"}, {"regex": "^the\\b"},
             {"json": {"type": "object", "required": ["answer"]}}, {"max_tokens": 8}, {"choice": ["yes", "no, never"]}]


FIELDS = {"max_tokens": ui.number, "choice": ui.input_chips, "json": ui.textarea}  # the others: a text input


async def pick_kind(user: User, i: int, j: int, kind: str) -> None:
    """Choose the kind of check j of case i: its argument field becomes that kind's own, at once."""
    set_value(user, f"case-check-{i}-{j}", kind)
    field = el(user, f"case-value-{i}-{j}")
    assert type(field) is FIELDS.get(kind, ui.input)
    if kind not in FIELDS:
        assert field.props["label"] == ("Pattern" if kind == "regex" else "Expected")


async def open_editor(user: User, run_id: str) -> None:
    await user.open(f"/runs/{run_id}")
    user.find(marker="tab-evaluate").click()
    await user.should_see(marker="suite-editor")


async def test_a_case_gets_several_checks_of_every_kind_and_saves_them(user: User, services, trained):
    await open_editor(user, trained[1])
    set_value(user, "suite-name", "several")
    set_value(user, "case-prompt-0", "the cat")
    set_value(user, "case-value-0-0", "cat")  # contains, the default kind
    user.find(marker="case-add-check-0").click()
    await user.should_see(marker="suite-check-0-1")
    await pick_kind(user, 0, 1, "max_tokens")
    assert el(user, "case-value-0-1").value == 64  # the number field of max_tokens, with its default
    user.find(marker="case-add-check-0").click()
    await user.should_see(marker="suite-check-0-2")
    await pick_kind(user, 0, 2, "not_contains")
    set_value(user, "case-value-0-2", "zebra")
    user.find(marker="case-remove-check-0-1").click()  # max_tokens goes, the others move up
    await wait_for(lambda: not els(user, "suite-check-0-2"))
    assert [el(user, f"case-check-0-{j}").value for j in range(2)] == ["contains", "not_contains"]
    assert el(user, "case-value-0-1").value == "zebra"

    user.find(marker="suite-add-case").click()
    await user.should_see(marker="suite-case-1")
    set_value(user, "case-prompt-1", "answer in JSON")
    for j, check in enumerate(ALL_KINDS):
        if j:
            user.find(marker="case-add-check-1").click()
            await user.should_see(marker=f"suite-check-1-{j}")
        (kind, value), = check.items()
        await pick_kind(user, 1, j, kind)
        set_value(user, f"case-value-1-{j}", json.dumps(value) if kind == "json" else value)
    set_value(user, "case-value-1-3", "(unclosed")
    user.find(marker="suite-save").click()
    await user.should_see("case 2 (case-2), check 4: invalid regex")  # which case, which check
    assert not (services.workspace.evals / "several.yaml").exists()
    set_value(user, "case-value-1-3", "^the\\b")
    user.find(marker="case-remove-check-0-1").click()
    await wait_for(lambda: not els(user, "suite-check-0-1"))
    assert not el(user, "case-remove-check-0-0").enabled  # the last check of a case stays
    user.find(marker="suite-save").click()
    await wait_for(lambda: (services.workspace.evals / "several.yaml").exists())
    suite = load_suite(services.workspace.evals / "several.yaml")
    assert [c.checks for c in suite.cases] == [[{"contains": "cat"}], ALL_KINDS]
    user.find(marker="suite-try").click()  # the live try on the base model marks each case
    await wait_for(lambda: els(user, "case-tried-0") and els(user, "case-tried-1"))
    assert "done" in el(user, "try-progress").text


async def test_a_saved_suite_round_trips_through_the_editor(user: User, services, trained):
    original = {"name": "round", "kind": "cases", "min_pass_rate": 0.5,
                "sampling": {"max_tokens": 16, "temperature": 0.0}, "format": "chat", "batch_size": 3,
                "cases": [{"id": "first", "prompt": "the cat", "system": "Be brief.", "checks": ALL_KINDS[:3]},
                          {"id": "chat", "messages": [{"role": "user", "content": "hi"}], "checks": ALL_KINDS[3:]},
                          {"id": "case-3", "prompt": "a dog", "checks": [{"contains": "dog"}]}]}
    path = services.evals.save_suite(original, "round")
    before = load_suite(path).to_dict()
    await open_editor(user, trained[1])
    set_value(user, "suite-open", str(path))
    await wait_for(lambda: els(user, "suite-case-2"))
    assert el(user, "suite-name").value == "round" and el(user, "case-system-0").value == "Be brief."
    assert el(user, "suite-batch").value == 3 and load_suite(path).batch_size == 3
    assert els(user, "case-messages-1")  # chat messages are kept, not turned into a prompt
    user.find(marker="suite-save").click()
    await user.should_see("Saved")
    assert load_suite(path).to_dict() == before  # load -> save -> load: equal

    user.find(marker="case-add-check-2").click()  # edit: one more check here, one less there, a new case
    await user.should_see(marker="suite-check-2-1")
    await pick_kind(user, 2, 1, "choice")
    set_value(user, "case-value-2-1", ["a dog", "the dog"])
    user.find(marker="case-remove-check-1-0").click()
    await wait_for(lambda: el(user, "case-check-1-0").value == "json")
    user.find(marker="suite-add-case").click()
    await user.should_see(marker="suite-case-3")
    set_value(user, "case-prompt-3", "a bird")
    set_value(user, "case-value-3-0", "bird")
    user.find(marker="suite-save").click()
    await wait_for(lambda: len(load_suite(path).cases) == 4)
    after = load_suite(path).to_dict()
    expected = json.loads(json.dumps(before))
    expected["cases"][2]["checks"].append({"choice": ["a dog", "the dog"]})
    del expected["cases"][1]["checks"][0]
    expected["cases"].append({"id": "case-4", "prompt": "a bird", "checks": [{"contains": "bird"}]})
    assert after == expected


# ----------------------------------------------------------------------------------------- progress and cancel


def long_suite(services, name: str = "long", cases: int = 2000) -> str:
    """A suite far too long to end on its own in a test: thousands of cases."""
    data = {"name": name, "sampling": {"max_tokens": 128},
            "cases": [{"prompt": f"the cat {i}", "checks": [{"contains": "the"}]} for i in range(cases)]}
    return str(services.evals.save_suite(data, name))


async def test_a_long_eval_of_a_run_shows_progress_and_is_cancelled_without_recording_a_partial_suite(
        user: User, services, trained):
    run_id = trained[2]
    folder = services.manager.folder(run_id)
    before = results.read(folder)
    path = long_suite(services)
    await open_editor(user, run_id)
    set_value(user, "eval-suites", [path])
    user.find(marker="eval-run").click()
    await wait_for(lambda: "long case" in el(user, "eval-progress").text)  # the page follows the job
    assert el(user, "eval-bar").visible and el(user, "eval-cancel").visible
    await wait_for(lambda: 0 < el(user, "eval-bar").value)
    user.find(marker="eval-cancel").click()
    await wait_for(lambda: services.evals.state["state"] != "running")
    state = services.evals.state
    assert state["state"] == "cancelled", state["message"]
    partial = [r for r in state["records"] if r["name"] == "long"]
    assert partial and partial[0]["partial"] and partial[0]["metrics"]["total"] < 2000
    await wait_for(lambda: not els(user, "eval-cancel") and not els(user, "eval-bar"))  # hidden once it ended
    assert "cancelled" in el(user, "eval-progress").text
    assert results.read(folder) == before  # a suite cut short is never recorded as the checkpoint's score


async def test_a_long_try_on_the_base_model_shows_progress_and_is_cancelled(user: User, services, trained):
    path = long_suite(services, "long-try", 300)
    await open_editor(user, trained[1])
    set_value(user, "suite-open", path)
    await wait_for(lambda: els(user, "suite-case-299"))
    user.find(marker="suite-try").click()
    await wait_for(lambda: els(user, "try-progress") and "long-try case" in el(user, "try-progress").text)
    assert els(user, "try-bar") and els(user, "try-cancel") and not els(user, "eval-cancel")  # shown where started
    user.find(marker="try-cancel").click()
    await wait_for(lambda: services.evals.state["state"] != "running")
    state = services.evals.state
    assert state["state"] == "cancelled", state["message"]
    done = state["records"][0]["metrics"]["total"]
    assert 0 < done < 300
    await wait_for(lambda: els(user, f"case-tried-{done - 1}"))  # the verdicts of the cases done before it
    assert not els(user, f"case-tried-{done}")
    assert not els(user, "try-cancel")


# ----------------------------------------------------------------------------------------- the Playground


def save_suites(services) -> tuple[str, str]:
    """A 3-case suite with two checks per case, and a suite too long to end on its own."""
    short = {"name": "short", "sampling": {"max_tokens": 12},
             "cases": [{"prompt": p, "checks": [{"contains": "the"}, {"max_tokens": 12}]}
                       for p in ("the cat", "a dog", "the baker bakes")]}
    return str(services.evals.save_suite(short, "short")), long_suite(services)


async def load(user: User, services, model: str, adapter: str) -> None:
    set_value(user, "model", model)
    set_value(user, "adapter", adapter)
    user.find(marker="load").click()
    await wait_for(lambda: services.models.status["state"] == "ready" and services.models.status["adapter"] == adapter)


async def test_the_playground_runs_a_suite_on_the_base_and_the_loaded_checkpoint(user: User, services, trained,
                                                                                tiny_model):
    short, _ = save_suites(services)
    run_id = trained[1]
    folder = services.manager.folder(run_id)
    before = results.read(folder)
    ckpt = str(folder.checkpoint_dir(20).resolve())
    await user.open("/playground")
    await load(user, services, str(tiny_model.resolve()), ckpt)
    user.find(marker="tab-evaluate").click()
    await wait_for(lambda: el(user, "pg-eval-targets").value == [ckpt])  # what is loaded is picked
    assert el(user, "pg-eval-base").value is True
    set_value(user, "pg-eval-suite", short)
    set_value(user, "pg-eval-base", False)
    set_value(user, "pg-eval-targets", [])
    user.find(marker="pg-eval-run").click()
    await user.should_see("pick the base model and/or one or more checkpoints")  # nothing to run on: said so
    set_value(user, "pg-eval-base", True)
    set_value(user, "pg-eval-targets", [ckpt])
    user.find(marker="pg-eval-run").click()
    await wait_for(lambda: services.evals.state["state"] in ("done", "error", "cancelled"))
    state = services.evals.state
    assert state["state"] == "done" and state["owner"] == "playground", state["message"]
    records = state["records"]
    assert [r["label"] for r in records] == ["base", f"{run_id}@20"]
    await wait_for(lambda: els(user, "pg-eval-table") and len(el(user, "pg-eval-table").rows) == 2)
    rows = el(user, "pg-eval-table").rows
    assert [(r["label"], r["pass_rate"], r["passed"]) for r in rows] == [
        (r["label"], f"{r['score']:.2f}", f"{r['metrics']['passed']}/3") for r in records]
    await wait_for(lambda: len(els(user, "eval-output")) == 3 * 2)  # three cases, base and checkpoint side by side
    verdicts = [b.text for b in els(user, "eval-verdict")]
    assert verdicts == ["pass" if c["passed"] else "fail" for row in results.case_grid(records, "short")
                        for c in row["targets"]]
    assert len(els(user, "eval-diff")) == 3  # the checkpoint's output against the base's
    assert services.models.status["adapter"] == ckpt  # what was loaded stays loaded
    assert results.read(folder) == before  # nothing written into the run from the Playground


async def test_a_long_eval_in_the_playground_shows_progress_keeps_the_page_live_and_is_cancelled(user: User, services,
                                                                                                tiny_model):
    _, long = save_suites(services)
    await user.open("/playground")
    set_value(user, "model", str(tiny_model.resolve()))  # not loaded yet: the evaluation loads it
    user.find(marker="tab-evaluate").click()
    set_value(user, "pg-eval-suite", long)
    set_value(user, "pg-eval-targets", [])
    user.find(marker="pg-eval-run").click()
    await wait_for(lambda: "long case" in el(user, "eval-progress").text)
    assert el(user, "eval-bar").visible and el(user, "eval-cancel").visible
    assert not el(user, "pg-eval-run").enabled  # one evaluation at a time
    seen = el(user, "eval-progress").text
    await wait_for(lambda: el(user, "eval-progress").text != seen)  # the page keeps following: nothing blocks it
    user.find(marker="eval-cancel").click()
    await wait_for(lambda: services.evals.state["state"] != "running")
    state = services.evals.state
    assert state["state"] == "cancelled", state["message"]
    assert state["records"][0]["partial"] and state["records"][0]["metrics"]["total"] < 2000
    await wait_for(lambda: els(user, "pg-eval-table") and [r["passed"] for r in el(user, "pg-eval-table").rows] == [
        f"{state['records'][0]['metrics']['passed']}/{state['records'][0]['metrics']['total']} (cancelled)"])
    await wait_for(lambda: not els(user, "eval-cancel") and not els(user, "eval-bar"))  # hidden once it ended
    assert el(user, "pg-eval-run").enabled
    assert services.models.status["state"] == "ready"  # the worker is free again
