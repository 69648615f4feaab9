"""Model output and saved chats, in plain Python (no MLX): ``<think>`` blocks and the chat file format.

A saved chat is one JSON document::

    {"kind": "forgellm-chat", "version": 1, "saved": "2026-01-31T12:00:00", "model": PATH, "adapter": PATH,
     "system": "…", "settings": {...}, "messages": [{"role", "content", "stats"?}, ...]}

:func:`parse_chat` also reads a plain list of messages.
"""

from __future__ import annotations

import json
import time
from typing import Any

from services.errors import ForgeError
from services.inference.requests import ROLES

CHAT_KIND = "forgellm-chat"
MAX_CHAT_BYTES = 2_000_000


class ChatFileError(ForgeError, ValueError):
    """A saved chat that cannot be read; the message says what is wrong and where."""


def split_think(text: str) -> tuple[str, str, bool]:
    """(thinking, answer, thinking still open) of a model's output with ``<think>…</think>`` blocks.

    A ``</think>`` without an opening tag (the chat template opened it) closes everything before it.
    """
    thoughts, answer, still_open = [], [], False
    rest = text
    close = rest.find("</think>")
    if close >= 0 and (rest.find("<think>") < 0 or close < rest.find("<think>")):
        thoughts.append(rest[:close])
        rest = rest[close + len("</think>"):]
    while "<think>" in rest:
        before, _, after = rest.partition("<think>")
        answer.append(before)
        inner, closed, rest = after.partition("</think>")
        thoughts.append(inner)
        if not closed:
            still_open, rest = True, ""
    answer.append(rest)
    return "\n\n".join(t.strip() for t in thoughts if t.strip()), "".join(answer).strip(), still_open


def chat_json(messages: list[dict[str, Any]], system: str, settings: dict[str, Any],
              status: dict[str, Any]) -> bytes:
    """A saved chat: messages (with their statistics), system prompt, settings and the model it ran on."""
    doc = {"kind": CHAT_KIND, "version": 1, "saved": time.strftime("%Y-%m-%dT%H:%M:%S"),
           "model": status.get("model"), "adapter": status.get("adapter"), "system": system,
           "settings": settings, "messages": messages}
    return json.dumps(doc, indent=2, ensure_ascii=False).encode()


def parse_chat(raw: bytes) -> dict[str, Any]:
    """``{"messages", "system", "settings"}`` from a saved chat (or a plain list of messages).

    Raises :class:`ChatFileError` (a ``ValueError``) for a file over :data:`MAX_CHAT_BYTES` or not in the format.
    """
    if len(raw) > MAX_CHAT_BYTES:
        raise ChatFileError(f"file is larger than {MAX_CHAT_BYTES // 1_000_000} MB")
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ChatFileError(f"not a JSON file ({e})") from None
    if isinstance(doc, list):
        doc = {"messages": doc}
    if not isinstance(doc, dict) or not isinstance(doc.get("messages"), list):
        raise ChatFileError("expected {\"messages\": [{\"role\", \"content\"}, ...]} or a list of messages")
    messages, system = [], doc.get("system") or ""
    for i, m in enumerate(doc["messages"]):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ChatFileError(f"messages[{i}]: expected {{'role': one of {list(ROLES)}, 'content': text}}")
        if m["role"] == "system":
            system = system or m["content"]
            continue
        stats = m.get("stats") if isinstance(m.get("stats"), dict) else None
        messages.append({"role": m["role"], "content": m["content"], **({"stats": stats} if stats else {})})
    if not isinstance(system, str):
        raise ChatFileError("system: expected text")
    settings = doc.get("settings") if isinstance(doc.get("settings"), dict) else {}
    return {"messages": messages, "system": system, "settings": settings}
