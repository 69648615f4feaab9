"""Phone-sized screens (390×844, touch): one menu button instead of two rows of navigation, no page wider than
the screen, and a Playground message box one can type in."""

from __future__ import annotations

import pytest
from conftest import shot

PHONE = {"viewport": {"width": 390, "height": 844}, "is_mobile": True, "has_touch": True, "device_scale_factor": 2}


@pytest.fixture(scope="module")
def finished_run(e2e_workspace) -> str:
    from services.training.manager import RunManager
    from services.workspace import Workspace

    manager = RunManager(Workspace(e2e_workspace))
    ws = e2e_workspace
    cfg = {"model": str(ws / "models" / "tiny-llama"), "data": str(ws / "datasets" / "sample-cpt"), "num_layers": 2,
           "mode": "cpt", "name": "phone", "iters": 10, "batch_size": 2, "max_seq_length": 64, "save_every": 5,
           "steps_per_eval": 5, "steps_per_report": 5, "val_batches": 1}
    folder = manager.launch(cfg)
    assert manager.wait(folder.id, timeout=240)["status"] == "completed"
    return folder.id


def overflow(page) -> int:
    """How many CSS pixels the page is wider than the phone's screen (0: it fits; a mobile browser widens its
    layout viewport to the content, so compare with the screen, not with ``innerWidth``)."""
    return page.evaluate(f"document.documentElement.scrollWidth - {PHONE['viewport']['width']}")


def test_every_page_fits_a_phone(browser, base_url, finished_run):
    context = browser.new_context(**PHONE)
    page = context.new_page()
    pages = {"train": "/train", "monitor": f"/monitor/{finished_run}", "playground": "/playground", "runs": "/runs",
             "run-detail": f"/runs/{finished_run}", "compare": f"/compare?runs={finished_run}", "models": "/models",
             "datasets": "/datasets"}
    for name, path in pages.items():
        page.goto(base_url + path)
        page.wait_for_timeout(1500)  # charts and tables draw
        assert page.locator(".q-header").get_by_role("button", name="Runs").is_hidden(), name
        header = page.locator(".q-header").bounding_box()
        assert header["height"] < 70, f"{name}: the header takes {header['height']} px"
        shot(page, f"phone-{name}")
        assert overflow(page) <= 1, f"{name} is {overflow(page)} px wider than the phone"
    context.close()


def test_the_menu_button_reaches_every_page(browser, base_url):
    context = browser.new_context(**PHONE)
    page = context.new_page()
    page.goto(base_url + "/train")
    page.locator(".q-header button").first.click()
    page.locator(".q-menu").get_by_text("Datasets").click()
    page.wait_for_url("**/datasets")
    assert page.locator(".q-page-container").get_by_text("Datasets").first.is_visible()
    context.close()


def test_the_playground_message_box_is_wide_enough_to_type_in(browser, base_url):
    context = browser.new_context(**PHONE)
    page = context.new_page()
    page.goto(base_url + "/playground")
    box = page.get_by_placeholder("Message (Ctrl+Enter sends)")
    box.wait_for()
    assert box.bounding_box()["width"] > 300
    box.fill("Hello there, how are you today?")
    shot(page, "phone-playground-typing")
    context.close()


def test_a_message_is_sent_and_answered_on_a_phone(browser, base_url):
    from playwright.sync_api import expect

    context = browser.new_context(**PHONE)
    page = context.new_page()
    page.goto(base_url + "/playground")
    page.get_by_role("button", name="Load", exact=True).tap()
    expect(page.get_by_text("ready", exact=True)).to_be_visible(timeout=60_000)
    page.get_by_placeholder("Message (Ctrl+Enter sends)").fill("How do I feed my starter?")
    page.get_by_role("button", name="Send", exact=True).tap()
    answer = page.locator(".q-message").filter(has_text="generated tokens")
    expect(answer).to_have_count(1, timeout=60_000)
    assert answer.first.bounding_box()["width"] <= PHONE["viewport"]["width"]
    assert overflow(page) <= 1, f"the chat is {overflow(page)} px wider than the phone"
    shot(page, "phone-playground-answer")
    context.close()
