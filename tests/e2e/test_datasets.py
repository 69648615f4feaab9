"""Datasets: upload a dataset with bad lines, see each one, drop them, page the preview, open the mask view.
Models: the catalogue and the system panel."""

from __future__ import annotations

import json
import random
import re

from conftest import shot
from playwright.sync_api import Page, expect

TOPICS = ["starter", "hydration", "proofing", "scoring", "oven spring", "crumb"]


def chat(rng: random.Random, turns: int) -> dict:
    messages = [{"role": "system", "content": "You are a patient sourdough baking coach."}]
    for _ in range(turns):
        topic = rng.choice(TOPICS)
        messages.append({"role": "user", "content": f"How do I get better {topic}?"})
        messages.append({"role": "assistant", "content": f"For {topic}, keep the dough warm and give it time. "
                                                         f"Check it every {rng.randint(20, 60)} minutes."})
    return {"messages": messages}


def test_upload_bad_lines_drop_preview_and_mask_view(page: Page, app_server, tmp_path):
    rng = random.Random(11)
    lines = [json.dumps(chat(rng, turns=1 + i % 3)) for i in range(24)]
    lines[3] = '{"messages": [{"role": "user", "content": "cut off'
    lines[9] = json.dumps({"messages": [{"role": "user", "content": "Nobody answers this one."}]})
    lines[17] = json.dumps({"prompt": "wrong format", "completion": "here"})
    data = tmp_path / "baking-chats.jsonl"
    data.write_text("\n".join(lines) + "\n")

    page.set_viewport_size({"width": 1400, "height": 1000})
    page.goto("/datasets")
    expect(page.get_by_text("Choose or import a dataset.")).to_be_visible()
    page.locator("input[type=file]").set_input_files(str(data))

    bad = page.locator(".font-mono.text-negative")
    expect(bad).to_have_count(3, timeout=15_000)
    expect(bad.nth(0)).to_have_text(re.compile(r"^baking-chats\.jsonl:4: invalid JSON"))
    expect(bad.nth(1)).to_have_text(re.compile(r"^baking-chats\.jsonl:10: no assistant message"))
    expect(bad.nth(2)).to_have_text(re.compile(r"^baking-chats\.jsonl:18: expected a chat row"))
    expect(page.get_by_text("21 usable samples", exact=False)).to_be_visible()
    quiet(page)
    shot(page, "datasets-bad-lines")

    page.get_by_role("button", name=re.compile("Drop 3 bad line")).click()
    expect(page.get_by_text("Every line is valid.")).to_be_visible(timeout=15_000)
    expect(page.get_by_text("baking-chats-clean.jsonl").first).to_be_visible()
    rows = page.locator(".q-table tbody tr")
    expect(rows).to_have_count(10)
    page.locator(".q-pagination").get_by_role("button", name="3", exact=True).click()
    expect(rows).to_have_count(1)
    expect(rows.first).to_contain_text("21")  # the cleaned copy's last line
    page.locator(".q-pagination").get_by_role("button", name="1", exact=True).click()

    rows.nth(2).click()  # a three-turn chat
    trained = page.locator(".mask-tokens .tok-trained")
    expect(trained.first).to_be_visible(timeout=20_000)
    assert trained.count() > 10 and page.locator(".mask-tokens .tok-masked").count() > 10
    text = "".join(trained.all_inner_texts())
    assert "keep the dough warm" in text and "How do I" not in text and "sourdough baking coach" not in text
    expect(page.get_by_text(re.compile(r"tokens, \d+ trained"))).to_be_visible()
    max_len = page.get_by_label("max_seq_length")
    max_len.fill("160")
    max_len.blur()
    rows.nth(2).click()
    expect(page.get_by_text(re.compile(r"✂ max_seq_length 160"))).to_be_visible()
    expect(page.get_by_text(re.compile(r"cut at max_seq_length 160"))).to_be_visible()
    assert trained.count() > 10 and page.locator(".mask-tokens .tok-cut").count() > 10
    page.get_by_role("button", name="Count tokens").click()
    expect(page.get_by_text("Trained tokens")).to_be_visible(timeout=20_000)
    expect(page.locator(".nicegui-echart canvas").first).to_be_visible()
    quiet(page)
    shot(page, "mask-view")


def quiet(page: Page) -> None:
    """No toasts over the content, and the page scrolled to the top (the header is fixed)."""
    expect(page.locator(".q-notification")).to_have_count(0, timeout=15_000)
    page.evaluate("window.scrollTo(0, 0)")


def test_models_page_lists_models_and_the_system(page: Page, app_server):
    page.set_viewport_size({"width": 1400, "height": 900})
    page.goto("/models")
    expect(page.locator(".q-table tbody tr").filter(has_text="tiny-llama")).to_be_visible(timeout=15_000)
    row = page.locator(".q-table tbody tr").filter(has_text="tiny-llama")
    expect(row).to_contain_text("float32")
    for text in ("BLAS", "Device", "Disk", "Swap"):
        expect(page.get_by_text(text, exact=True)).to_be_visible()
    page.get_by_role("button", name="Local folder").click()
    page.get_by_label("Folder").fill("/no/such/folder")
    page.get_by_role("button", name="Import").click()
    expect(page.get_by_text(re.compile("no such file or folder"))).to_be_visible()
    quiet(page)
    shot(page, "models")
