"""Helpers shared by the NiceGUI ``User``-fixture page tests."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from nicegui import ui
from nicegui.testing import User


def els(user: User, marker: str) -> list:
    """Elements with ``marker`` in page order (oldest first); none is an empty list."""
    try:
        with user:
            return sorted(user.find(marker=marker).elements, key=lambda e: e.id)
    except AssertionError:
        return []


def el(user: User, marker: str) -> Any:
    """The one element with ``marker``."""
    found = els(user, marker)
    assert len(found) == 1, f"{marker}: {found}"
    return found[0]


def set_value(user: User, marker: str, value: Any) -> None:
    """Set a widget's value as a person would (a select with typed input accepts new values)."""
    with user:
        element = el(user, marker)
        if isinstance(element, ui.select) and not element.multiple and value not in element.options:
            element.set_options({**element.options, value: value})
        element.value = value


async def wait_for(cond, timeout: float = 10.0, step: float = 0.05) -> Any:
    """Poll ``cond`` until it returns something truthy (returned), or fail after ``timeout`` seconds."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = cond()
        if value:
            return value
        await asyncio.sleep(step)
    raise AssertionError(f"condition not met within {timeout} s")


def from_this_machine(user: User) -> User:
    """Make the simulated browser a local one (loopback address and Host), as the pages' server-path rules ask."""
    import httpx
    from nicegui import core

    user.http_client = httpx.AsyncClient(transport=httpx.ASGITransport(core.app, client=("127.0.0.1", 5000)),
                                         base_url="http://localhost")
    return user
