"""The one base of ForgeLLM's errors: a problem a person can act on.

Every service raises a subclass of :class:`ForgeError` whose message says what is wrong, where (file:line,
field, run or path) and what to do, so pages and the CLI catch one type and show the message as it is.
"""

from __future__ import annotations

import json


class ForgeError(Exception):
    """A problem a person can act on; ``str(e)`` is the whole message to show."""


class NotFound(ForgeError, LookupError):
    """A run, checkpoint, model or dataset that does not exist; the message names it and where it was looked for."""


def json_problem(e: json.JSONDecodeError) -> str:
    """``invalid JSON at column 24: a raw tab inside a string (write it as \\t)`` -- json's own message ends in
    "at" and leaves the column and the character to the reader."""
    msg = e.msg.removesuffix(" at").removesuffix(" starting")
    char = e.doc[e.pos] if 0 <= e.pos < len(e.doc) else ""
    if msg == "Invalid control character" and char:
        names = {"\t": "a raw tab", "\n": "a raw line break", "\r": "a raw carriage return"}
        escape = {"\t": "\\t", "\n": "\\n", "\r": "\\r"}.get(char, f"\\u{ord(char):04x}")
        return (f"invalid JSON at column {e.colno}: {names.get(char, f'control character U+{ord(char):04X}')} "
                f"inside a string (write it as {escape})")
    return f"invalid JSON at column {e.colno}: {msg}"
