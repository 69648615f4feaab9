"""Model output and the saved-chat format (services.inference.chats): plain Python, no model."""

from __future__ import annotations

import json

import pytest

from services.errors import ForgeError
from services.inference.chats import CHAT_KIND, MAX_CHAT_BYTES, ChatFileError, chat_json, parse_chat, split_think


def test_split_think():
    assert split_think("<think>hmm</think>Hello") == ("hmm", "Hello", False)
    assert split_think("plan it</think>\nAnswer") == ("plan it", "Answer", False)  # template opened the block
    assert split_think("a <think>still going") == ("still going", "a", True)
    assert split_think("no thoughts") == ("", "no thoughts", False)
    assert split_think("<think>one</think>x <think>two</think>y") == ("one\n\ntwo", "x y", False)


def test_a_saved_chat_reads_back():
    messages = [{"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello", "stats": {"generation_tokens": 3}}]
    raw = chat_json(messages, "be brief", {"format": "chat", "history": False, "max_tokens": 8},
                    {"model": "/m/tiny", "adapter": None})
    doc = json.loads(raw)
    assert doc["kind"] == CHAT_KIND and doc["version"] == 1 and doc["model"] == "/m/tiny"
    chat = parse_chat(raw)
    assert chat == {"messages": messages, "system": "be brief",
                    "settings": {"format": "chat", "history": False, "max_tokens": 8}}


def test_a_plain_list_of_messages_reads_and_bad_files_say_why():
    chat = parse_chat(json.dumps([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}])
                      .encode())
    assert chat["system"] == "be brief" and chat["messages"] == [{"role": "user", "content": "hi"}]
    assert chat["settings"] == {}
    with pytest.raises(ChatFileError, match="messages\\[0\\]"):
        parse_chat(b'{"messages": [{"role": "robot", "content": "x"}]}')
    with pytest.raises(ValueError, match="not a JSON file"):
        parse_chat(b"\xff\xfe")
    with pytest.raises(ForgeError, match="expected"):
        parse_chat(b'{"chat": []}')
    with pytest.raises(ChatFileError, match="system: expected text"):
        parse_chat(b'{"messages": [], "system": 3}')
    with pytest.raises(ChatFileError, match="larger than 2 MB"):
        parse_chat(b" " * (MAX_CHAT_BYTES + 1))
