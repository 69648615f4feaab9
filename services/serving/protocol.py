"""The OpenAI wire format: request fields to a ForgeLLM generation request (:mod:`services.inference.requests`),
replies, stream chunks and errors (``{"error": {"message", "type", "param", "code"}}``, the field named in
``param`` and in the message).

Sampling fields: ``max_tokens`` (or ``max_completion_tokens``), ``temperature``, ``top_p``, ``seed``, ``stop``,
``stream`` and ``stream_options.include_usage``; mlx-lm's ``top_k``, ``min_p`` and ``repetition_penalty`` too.
Fields of OpenAI's API that change nothing here (``user``, ``logit_bias`` …) are ignored; ``n`` must be 1.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from services.errors import ForgeError
from services.inference.requests import RequestError, normalize_request

SAMPLING = {"max_tokens": "max_tokens", "max_completion_tokens": "max_tokens", "temperature": "temperature",
            "top_p": "top_p", "seed": "seed", "top_k": "top_k", "min_p": "min_p",
            "repetition_penalty": "repetition_penalty"}
MAX_STOPS = 32  # OpenAI allows 4; code assistants (Continue) send more, so a few more are taken


class ApiError(ForgeError):
    """A request the endpoint refuses: HTTP ``status``, OpenAI's error ``type``, the field (``param``), a ``code``."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 type: str = "invalid_request_error", code: str | None = None) -> None:
        super().__init__(message)
        self.message, self.param, self.status, self.type, self.code = message, param, status, type, code

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.param, self.type, self.code)


def error_body(message: str, param: str | None = None, type: str = "invalid_request_error",
               code: str | None = None) -> dict[str, Any]:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def parse_json(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object, or :class:`ApiError`."""
    try:
        body = json.loads(raw or b"null")
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(f"the request body is not valid JSON ({e})") from None
    if not isinstance(body, dict):
        raise ApiError("the request body must be a JSON object, e.g. {\"model\": ..., \"messages\": [...]}")
    return body


def model_name(body: dict[str, Any]) -> str:
    name = body.get("model")
    if not isinstance(name, str) or not name.strip():
        raise ApiError("model: give the name of a served model (GET /v1/models lists them)", "model")
    return name.strip()


def _content(value: Any, where: str) -> str:
    """A message's content: a string, or a list of ``{"type": "text", "text": ...}`` parts."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) for p in value):
        texts = []
        for i, part in enumerate(value):
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ApiError(f"{where}[{i}]: only text parts ({{\"type\": \"text\", \"text\": ...}}) are served, "
                               f"got type {part.get('type')!r}", f"{where}[{i}]")
            texts.append(part["text"])
        return "".join(texts)
    if value is None:
        return ""
    raise ApiError(f"{where}: expected a string or a list of text parts, got {type(value).__name__}", where)


def _messages(body: dict[str, Any]) -> list[dict[str, str]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError("messages: expected a non-empty list of {\"role\", \"content\"} objects", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ApiError(f"messages[{i}]: expected an object with role and content", f"messages[{i}]")
        role = "system" if m.get("role") == "developer" else m.get("role")
        if role not in ("system", "user", "assistant", "tool"):
            raise ApiError(f"messages[{i}].role: expected system, user, assistant or tool, got {m.get('role')!r}",
                           f"messages[{i}].role")
        out.append({"role": role, "content": _content(m.get("content"), f"messages[{i}].content")})
    return out


def _prompt(body: dict[str, Any]) -> str:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise ApiError("prompt: expected a string (one prompt per request)", "prompt")
    return prompt


def stops(body: dict[str, Any]) -> list[str]:
    """The ``stop`` sequences (a string or up to four strings)."""
    value = body.get("stop")
    if value is None:
        return []
    value = [value] if isinstance(value, str) else value
    if not isinstance(value, list) or not all(isinstance(s, str) and s for s in value) or len(value) > MAX_STOPS:
        raise ApiError(f"stop: expected a string or a list of up to {MAX_STOPS} non-empty strings", "stop")
    return value


def to_request(body: dict[str, Any], chat: bool) -> dict[str, Any]:
    """A checked ForgeLLM generation request for a chat (``messages``) or completion (``prompt``) body."""
    if body.get("n", 1) != 1:
        raise ApiError("n: only 1 choice per request is served", "n")
    if not isinstance(body.get("stream", False), bool):
        raise ApiError("stream: expected true or false", "stream")
    request: dict[str, Any] = ({"messages": _messages(body), "format": "auto"} if chat
                               else {"prompt": _prompt(body), "format": "completion"})
    for field, key in SAMPLING.items():
        if body.get(field) is not None:
            request[key] = body[field]
    try:
        return normalize_request(request)
    except RequestError as e:
        field = str(e).split(":", 1)[0]
        param = next((f for f, k in SAMPLING.items() if k == field and f in body), field)
        raise ApiError(str(e).replace(f"{field}:", f"{param}:", 1), param) from None


class StopScanner:
    """Cuts a stream of text at the first stop sequence, holding back only what could be the start of one."""

    def __init__(self, sequences: list[str]) -> None:
        self.sequences, self.held, self.hit = sequences, "", False
        self.keep = max((len(s) for s in sequences), default=1) - 1

    def feed(self, text: str) -> str:
        """The text that can be sent now (``hit`` turns True at a stop sequence; nothing follows it)."""
        if not self.sequences:
            return text
        if self.hit:
            return ""
        self.held += text
        found = [i for i in (self.held.find(s) for s in self.sequences) if i >= 0]
        if found:
            self.hit, out, self.held = True, self.held[:min(found)], ""
            return out
        cut = max(0, len(self.held) - self.keep)
        out, self.held = self.held[:cut], self.held[cut:]
        return out

    def flush(self) -> str:
        out, self.held = ("" if self.hit else self.held), ""
        return out


def new_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]


def usage(result: dict[str, Any]) -> dict[str, int]:
    prompt, gen = int(result.get("prompt_tokens") or 0), int(result.get("generation_tokens") or 0)
    return {"prompt_tokens": prompt, "completion_tokens": gen, "total_tokens": prompt + gen}


def finish_reason(result: dict[str, Any], stopped: bool) -> str:
    return "stop" if stopped else ("length" if result.get("finish_reason") == "length" else "stop")


def reply(chat: bool, rid: str, model: str, text: str, result: dict[str, Any], stopped: bool) -> dict[str, Any]:
    """The whole (not streamed) answer."""
    reason = finish_reason(result, stopped)
    choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": reason} if chat
              else {"index": 0, "text": text, "logprobs": None, "finish_reason": reason})
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": [choice], "usage": usage(result)}


def chunk(chat: bool, rid: str, model: str, text: str | None, reason: str | None = None,
          first: bool = False) -> dict[str, Any]:
    """One stream chunk: text (``None``: none), or the last one with its ``finish_reason``."""
    if chat:
        delta: dict[str, Any] = {"role": "assistant"} if first else {}
        if text is not None:
            delta["content"] = text
        choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": reason}
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}
    return {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": [choice]}


def sse(data: dict[str, Any] | str) -> bytes:
    """One server-sent event, as OpenAI's API sends them (``data: …`` and a blank line; ``[DONE]`` ends)."""
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n".encode()
