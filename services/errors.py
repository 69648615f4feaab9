"""The one base of ForgeLLM's errors: a problem a person can act on.

Every service raises a subclass of :class:`ForgeError` whose message says what is wrong, where (file:line,
field, run or path) and what to do, so pages and the CLI catch one type and show the message as it is.
"""

from __future__ import annotations


class ForgeError(Exception):
    """A problem a person can act on; ``str(e)`` is the whole message to show."""


class NotFound(ForgeError, LookupError):
    """A run, checkpoint, model or dataset that does not exist; the message names it and where it was looked for."""
