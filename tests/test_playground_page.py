"""Playground page through NiceGUI's simulated user, with real services on a temporary workspace.

One model worker and one tiny trained run (checkpoints 10 and 20) are shared by the module's tests.
"""

from __future__ import annotations

import json
import os
from functools import partial

import pytest
from conftest import base_config
from nicegui.elements.upload_files import SmallFileUpload
from nicegui.testing import User, user_simulation
from nicegui.testing.user_interaction import UserInteraction
from test_runs_pages import record_navigation
from uihelpers import el, els, set_value
from uihelpers import wait_for as _wait_for

from app.composition import build_services
from pages.playground.chat import stats_text
from pages.shell import make_root
from services.inference.chats import split_think
from services.training.manager import RunManager
from services.workspace import Workspace

wait_for = partial(_wait_for, timeout=30.0)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ws(tmp_path_factory, tiny_model, chat_data) -> Workspace:
    ws = Workspace.resolve(tmp_path_factory.mktemp("playground") / "ws")
    os.symlink(tiny_model, ws.models / "tiny")
    os.symlink(chat_data, ws.datasets / "chat")
    return ws


@pytest.fixture(scope="module")
def trained(ws, tiny_model, chat_data) -> str:
    """A LoRA run on the tiny model with checkpoints 10 and 20; returns its id."""
    manager = RunManager(ws)
    folder = manager.launch(base_config(tiny_model, chat_data, iters=20, steps_per_eval=10, val_batches=1))
    info = manager.wait(folder.id, timeout=300)
    assert info["status"] == "completed", info.get("reason")
    return folder.id


@pytest.fixture(scope="module")
def services(ws, trained):
    s = build_services(ws)
    yield s
    s.models.unload()


@pytest.fixture
async def ui_user(services) -> User:
    async with user_simulation(make_root(services)) as user:
        yield user


# ----------------------------------------------------------------------------------------- helpers


def click(user: User, element) -> None:
    UserInteraction(user, {element}, None).click()


def texts(user: User, marker: str) -> list[str]:
    return [getattr(e, "text", None) or getattr(e, "content", "") for e in els(user, marker)]


async def load_tiny(user: User, services) -> None:
    set_value(user, "model", str((services.workspace.models / "tiny").resolve()))
    set_value(user, "adapter", "none")
    user.find(marker="load").click()
    await wait_for(lambda: services.models.status["state"] == "ready" and services.models.status["adapter"] is None)
    await wait_for(lambda: el(user, "model-state").text == "ready")


async def say(user: User, text: str) -> None:
    n = len(els(user, "msg-assistant"))
    user.find(marker="chat-input").clear().type(text)
    user.find(marker="send").click()
    await wait_for(lambda: len(els(user, "msg-assistant")) == n + 1 and not els(user, "msg-live"))


# ----------------------------------------------------------------------------------------- display


def test_stats_text():
    line = stats_text({"prompt_tokens": 5, "generation_tokens": 7, "generation_tps": 321.4, "context_used": 12,
                       "context_max": 1024, "finish_reason": "cancelled"})
    assert line == "5 prompt + 7 generated tokens · 321 tokens/s · context 12 / 1,024 · stopped"
    assert stats_text({"error": "boom"}) == "error: boom" and stats_text(None) == ""


# ----------------------------------------------------------------------------------------- chat


async def test_load_chat_and_stop(ui_user: User, services):
    await ui_user.open("/playground")
    await ui_user.should_see(marker="nav-playground")
    await load_tiny(ui_user, services)
    assert el(ui_user, "loaded").text.startswith("tiny")
    assert "worker" in el(ui_user, "memory").text
    await say(ui_user, "hello there")
    assert texts(ui_user, "user-text") == ["hello there"]
    assert texts(ui_user, "answer-text")[0]
    stats = texts(ui_user, "answer-stats")[0]
    assert "prompt +" in stats and "tokens/s" in stats and "context" in stats

    # a long answer is stopped part way; its text so far stays in the chat
    set_value(ui_user, "sampling-max_tokens", 100_000)
    ui_user.find(marker="chat-input").type("tell me everything")
    ui_user.find(marker="send").click()
    await wait_for(lambda: els(ui_user, "live-stats") and "tokens…" in el(ui_user, "live-stats").text)
    assert el(ui_user, "stop").enabled and not el(ui_user, "send").enabled
    ui_user.find(marker="stop").click()
    await wait_for(lambda: len(els(ui_user, "msg-assistant")) == 2 and not els(ui_user, "msg-live"), timeout=20)
    assert texts(ui_user, "answer-stats")[1].endswith("stopped")
    assert el(ui_user, "send").enabled and not el(ui_user, "stop").enabled

    # leaving the page mid-answer cancels the generation
    ui_user.find(marker="chat-input").type("and more")
    ui_user.find(marker="send").click()
    await wait_for(lambda: services.models.status["state"] == "generating")
    ui_user.find(marker="nav-train").click()
    await wait_for(lambda: services.models.status["state"] == "ready", timeout=10)


async def test_edit_regenerate_and_save_load(ui_user: User, services, monkeypatch):
    sent: list[dict] = []
    generate = services.models.generate
    monkeypatch.setattr(services.models, "generate", lambda req: sent.append(req) or generate(req))
    await ui_user.open("/playground")
    if services.models.status["state"] != "ready" or services.models.status["adapter"] is not None:
        await load_tiny(ui_user, services)
    set_value(ui_user, "sampling-max_tokens", 8)
    for text in ("first", "second", "third"):
        await say(ui_user, text)
    first_answer = sent[1]["messages"][1]["content"]  # as the history sent it with the second message
    first_shown = texts(ui_user, "answer-text")[0]

    # edit the second message: the first exchange is kept, everything from the second on is replaced
    click(ui_user, els(ui_user, "edit")[1])
    assert el(ui_user, "chat-input").value == "second"
    await ui_user.should_see("Editing your message 2")
    ui_user.find(marker="chat-input").clear().type("second, edited")
    ui_user.find(marker="send").click()
    await wait_for(lambda: len(els(ui_user, "msg-assistant")) == 2 and not els(ui_user, "msg-live"))
    assert texts(ui_user, "user-text") == ["first", "second, edited"]
    assert texts(ui_user, "answer-text")[0] == first_shown
    assert [m["content"] for m in sent[-1]["messages"]] == ["first", first_answer, "second, edited"]
    assert sent[-1]["max_tokens"] == 8 and sent[-1]["temperature"] == 0.0

    # regenerate the last answer: same conversation sent again, still two answers
    ui_user.find(marker="regenerate").click()
    await wait_for(lambda: len(sent) == 5 and not els(ui_user, "msg-live"))
    await wait_for(lambda: len(els(ui_user, "msg-assistant")) == 2)
    assert sent[-1]["messages"] == sent[-2]["messages"]

    # history off: only the new message goes to the model
    set_value(ui_user, "history", False)
    await say(ui_user, "alone")
    assert [m["content"] for m in sent[-1]["messages"]] == ["alone"]

    # save as JSON, clear, load it back
    ui_user.find(marker="save-chat").click()
    saved = (await ui_user.download.next()).content
    doc = json.loads(saved)
    assert [m["role"] for m in doc["messages"]] == ["user", "assistant"] * 3
    assert doc["settings"]["history"] is False and doc["messages"][1]["stats"]["generation_tokens"] == 8
    ui_user.find(marker="clear-chat").click()
    await ui_user.should_see(marker="empty-chat")
    ui_user.find(marker="load-chat").click()
    await el(ui_user, "chat-upload").handle_uploads([SmallFileUpload("chat.json", "application/json", saved)])
    await wait_for(lambda: len(els(ui_user, "msg-user")) == 3)
    assert texts(ui_user, "user-text") == ["first", "second, edited", "alone"]


async def test_completion_mode_continues_the_text(ui_user: User, services):
    await ui_user.open("/playground")
    if services.models.status["state"] != "ready":
        await load_tiny(ui_user, services)
    await ui_user.should_not_see(marker="completion-text")
    set_value(ui_user, "format", "completion")
    await ui_user.should_see(marker="completion-text")
    await ui_user.should_not_see(marker="chat-input")
    set_value(ui_user, "sampling-max_tokens", 6)
    ui_user.find(marker="completion-text").type("the cat eats")
    ui_user.find(marker="continue").click()
    await wait_for(lambda: "6 generated tokens" in el(ui_user, "chat-stats").text)
    value = el(ui_user, "completion-text").value
    assert value.startswith("the cat eats") and len(value) > len("the cat eats")


# ----------------------------------------------------------------------------------------- compare


async def test_compare_base_and_checkpoint_and_blind_pick(ui_user: User, services, trained):
    ckpt = str((services.workspace.runs / trained / "checkpoints" / "0000010").resolve())
    await ui_user.open("/playground")
    ui_user.find(marker="tab-compare").click()
    set_value(ui_user, "model", str((services.workspace.models / "tiny").resolve()))
    assert ckpt in el(ui_user, "compare-targets").options
    ui_user.find(marker="compare-prompt").type("the cat")
    set_value(ui_user, "sampling-max_tokens", 12)
    set_value(ui_user, "compare-targets", [ckpt])
    ui_user.find(marker="compare").click()
    await wait_for(lambda: len(els(ui_user, "compare-stats")) == 2)
    assert texts(ui_user, "compare-title") == ["base", f"{trained} @ 10"]
    assert all("generated tokens" in t for t in texts(ui_user, "compare-stats")), texts(ui_user, "compare-stats")

    # blind A/B between two checkpoints: labels hidden until the pick, which is saved as a preference pair
    ckpt20 = ckpt.replace("0000010", "0000020")
    set_value(ui_user, "compare-base", False)
    set_value(ui_user, "compare-targets", [ckpt, ckpt20])
    set_value(ui_user, "blind", True)
    ui_user.find(marker="compare").click()
    await wait_for(lambda: els(ui_user, "pick-A") and len(els(ui_user, "compare-stats")) == 2)
    assert texts(ui_user, "compare-title") == ["A", "B"]
    answers = [next(d.content for d in col.descendants() if "answer-text" in d._markers)  # noqa: SLF001
               for col in els(ui_user, "compare-column")]  # in A, B order
    ui_user.find(marker="pick-A").click()
    await wait_for(lambda: all(" = " in t for t in texts(ui_user, "compare-title")))
    titles = texts(ui_user, "compare-title")
    assert [t[:4] for t in titles] == ["A = ", "B = "]
    assert {t[4:].removesuffix(" ★ best") for t in titles} == {f"{trained} @ 10", f"{trained} @ 20"}
    session = el(ui_user, "preference-dataset").value
    assert session.startswith("ratings-")  # one dataset per session
    rows = [json.loads(line) for line in
            (services.workspace.datasets / session / "train.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["prompt"] == "the cat"
    assert split_think(rows[0]["chosen"])[1] == answers[0] and split_think(rows[0]["rejected"])[1] == answers[1]

    # a tie is counted, not trained on; "Train on these ratings" opens DPO from the rated checkpoint
    ui_user.find(marker="compare").click()
    await wait_for(lambda: els(ui_user, "pick-tie") and len(els(ui_user, "compare-stats")) == 2)
    ui_user.find(marker="pick-tie").click()
    await wait_for(lambda: "1 tie(s)" in el(ui_user, "rating-tally").text)
    assert "1 pair(s) to train on" in el(ui_user, "rating-tally").text
    assert len((services.workspace.datasets / session / "train.jsonl").read_text().splitlines()) == 1
    targets = record_navigation(ui_user)
    ui_user.find(marker="train-on-ratings").click()
    picked = titles[0][4:].removesuffix(" ★ best").split(" @ ")[1]  # shown twice each: the one chosen
    assert targets == [f"/train?preference={session}&start={trained}%40{picked}"]
    await ui_user.open(f"/train?preference={session}&start={trained}@{picked}")
    assert el(ui_user, "field-mode").value == "dpo" and el(ui_user, "field-data").value == session
    assert el(ui_user, "field-model").value == services.manager.get(trained)["model"]  # the parent's settings
    assert el(ui_user, "field-rank").value == 8
    await ui_user.should_see(f"Starts from checkpoint {trained}@{picked}")
    await ui_user.should_not_see(marker="queue")


async def test_link_to_checkpoint_loads_it(ui_user: User, services, trained):
    await ui_user.open(f"/playground/{trained}/20")
    await wait_for(lambda: services.models.status["adapter_label"] == f"{trained}@20"
                   and services.models.status["state"] == "ready")
    assert el(ui_user, "adapter").value.endswith("checkpoints/0000020")
    await wait_for(lambda: f"{trained}@20" in el(ui_user, "loaded").text)
    await ui_user.open(f"/playground?run={trained}&iteration=99")
    await ui_user.should_see("has checkpoints [10, 20]")


# ----------------------------------------------------------------------------------------- errors


async def test_errors_are_shown_and_the_page_stays_usable(ui_user: User, services, tmp_path):
    await ui_user.open("/playground")
    set_value(ui_user, "model", str(tmp_path / "no-such-model"))
    ui_user.find(marker="load").click()
    await ui_user.should_see("does not exist")
    await wait_for(lambda: el(ui_user, "model-state").text == "error")
    assert "text-negative" in el(ui_user, "model-message").classes
    # perplexity on the real model still works from the same page
    set_value(ui_user, "model", str((services.workspace.models / "tiny").resolve()))
    ui_user.find(marker="tab-perplexity").click()
    assert el(ui_user, "ppl-dataset").value == str((services.workspace.datasets / "chat").resolve())
    ui_user.find(marker="ppl-run").click()
    await wait_for(lambda: "perplexity" in el(ui_user, "ppl-result").text)
    assert el(ui_user, "ppl-table").rows[0]["adapter"] == "base"
    # after an unload, Send loads the picked model (instead of an error) and answers
    ui_user.find(marker="unload").click()
    await wait_for(lambda: services.models.status["state"] == "idle")
    ui_user.find(marker="tab-chat").click()
    await wait_for(lambda: "Send loads it" in texts(ui_user, "empty-chat")[0])
    ui_user.find(marker="chat-input").type("anyone?")
    ui_user.find(marker="send").click()
    await wait_for(lambda: len(els(ui_user, "msg-assistant")) == 1 and not els(ui_user, "msg-live"))
    assert services.models.status["model"] == str((services.workspace.models / "tiny").resolve())
    assert texts(ui_user, "user-text") == ["anyone?"] and "error" not in texts(ui_user, "answer-stats")[0]


async def test_the_chat_survives_leaving_the_page_and_a_reload(ui_user: User, services):
    await ui_user.open("/playground")
    if services.models.status["state"] != "ready" or services.models.status["adapter"] is not None:
        await load_tiny(ui_user, services)
    ui_user.find(marker="clear-chat").click()
    await wait_for(lambda: texts(ui_user, "empty-chat") == ["tiny is loaded: say something."])  # not "load a model"
    set_value(ui_user, "sampling-max_tokens", 4)
    await say(ui_user, "remember me")
    answer = texts(ui_user, "answer-text")
    await ui_user.open("/runs")
    await ui_user.open("/playground")
    assert texts(ui_user, "user-text") == ["remember me"] and texts(ui_user, "answer-text") == answer
    ui_user.find(marker="clear-chat").click()
    await ui_user.open("/playground")
    await ui_user.should_see(marker="empty-chat")


async def test_the_compare_results_survive_leaving_the_page_and_a_reload(ui_user: User, services):
    await ui_user.open("/playground")
    ui_user.find(marker="tab-compare").click()
    set_value(ui_user, "model", str((services.workspace.models / "tiny").resolve()))
    ui_user.find(marker="compare-prompt").type("the dog")
    set_value(ui_user, "sampling-max_tokens", 4)
    ui_user.find(marker="compare").click()
    await wait_for(lambda: len(els(ui_user, "compare-stats")) == 1)
    shown = texts(ui_user, "compare-stats"), texts(ui_user, "answer-text")
    await ui_user.open("/runs")
    await ui_user.open("/playground")
    ui_user.find(marker="tab-compare").click()
    assert el(ui_user, "compare-prompt").value == "the dog" and texts(ui_user, "compare-title") == ["base"]
    assert (texts(ui_user, "compare-stats"), texts(ui_user, "answer-text")) == shown
    assert "generated tokens" in shown[0][0]
