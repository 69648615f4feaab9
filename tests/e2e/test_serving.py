"""A person turns on serving on the Settings page, sees the URL to paste into Open WebUI / Continue, an OpenAI
client talks to it, and it is on again after the app restarts (issue 16, serving)."""

from __future__ import annotations

import json
import urllib.request

from conftest import ARTIFACTS, AppProcess, fill, free_port, shot
from playwright.sync_api import Page, expect


def get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


def test_turn_on_serving_see_the_url_and_it_survives_a_restart(page: Page, tmp_path):
    import openai

    from services.library.tiny_model import build_tiny_model
    from services.workspace import Workspace

    ws = Workspace.resolve(tmp_path / "ws")
    build_tiny_model(ws.models / "tiny-llama")
    app = AppProcess(ws.root, ARTIFACTS / "serving-app.log")
    app.start()
    port = free_port()
    url = f"http://127.0.0.1:{port}/v1"
    try:
        page.goto(app.url + "/settings")
        expect(page.get_by_text("Not serving.")).to_be_visible()
        fill(page, "Port", str(port))
        page.get_by_role("button", name="Start serving").click()
        expect(page.get_by_text(url, exact=True)).to_be_visible(timeout=30_000)
        expect(page.get_by_text(f"curl {url}/models")).to_be_visible()
        shot(page, "settings-serving")
        assert [m["id"] for m in get(f"{url}/models")["data"]] == ["tiny-llama"]
        client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=120)
        reply = client.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": "hi"}],
                                               max_tokens=4, temperature=0)
        assert reply.choices[0].finish_reason in ("stop", "length") and reply.usage.prompt_tokens > 0

        app.restart()  # kept on in the workspace settings: the endpoint starts with the app
        assert get(f"{url}/models")["data"][0]["id"] == "tiny-llama"
        page.goto(app.url + "/settings")
        expect(page.get_by_text(url, exact=True)).to_be_visible()
        page.get_by_role("button", name="Stop serving").click()
        expect(page.get_by_text("Not serving.")).to_be_visible(timeout=30_000)
        shot(page, "settings-serving-stopped")
    finally:
        app.stop()
    assert "OpenAI-compatible endpoint: " + url in (ARTIFACTS / "serving-app.log").read_text()
