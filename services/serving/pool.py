"""One model worker per base model (a :class:`~services.inference.service.ModelService`): a checkpoint's adapter
is swapped into its base's worker, so base → checkpoint → base keeps one copy of the base in memory.

Requests for one base take turns (a lock per base): a load that swaps the adapter must not cut into another
request's generation. At most ``max_bases`` bases stay resident; the least recently used idle one is unloaded.
"""

from __future__ import annotations

import asyncio
import collections
from dataclasses import dataclass, field
from typing import Any

from services.inference.service import ModelService
from services.serving.catalog import Served


@dataclass
class _Base:
    service: ModelService
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class ModelPool:
    """The resident bases of the endpoint, used from one event loop (the server's)."""

    def __init__(self, max_bases: int = 2) -> None:
        self.max_bases = max(1, max_bases)
        self._bases: collections.OrderedDict[str, _Base] = collections.OrderedDict()

    async def acquire(self, served: Served) -> ModelService:
        """Wait for ``served``'s base, load ``served`` into it (an adapter swap when the base is resident) and
        return its service, held until :meth:`release`. Raises :class:`~services.inference.service.ModelError`."""
        key = str(served.model)
        base = self._bases.get(key)
        if base is None:
            base = self._bases[key] = _Base(ModelService())
        self._bases.move_to_end(key)
        await base.lock.acquire()
        try:
            idle = [k for k, b in self._bases.items() if k != key and not b.lock.locked()]
            evicted = [self._bases.pop(k) for k in idle[:max(0, len(self._bases) - self.max_bases)]]
            if evicted:
                await asyncio.to_thread(lambda: [b.service.unload() for b in evicted])
            await asyncio.to_thread(base.service.load, served.model, served.adapter)
        except BaseException:
            base.lock.release()
            raise
        return base.service

    def release(self, served: Served) -> None:
        """Let the next request for ``served``'s base in."""
        base = self._bases.get(str(served.model))
        if base is not None and base.lock.locked():
            base.lock.release()

    def resident(self) -> dict[str, dict[str, Any]]:
        """Base folder → its worker's status (adapter, memory with ``rss_gb``, pid) for each loaded base."""
        return {k: b.service.status for k, b in self._bases.items() if b.service.worker_pid is not None}

    def close(self) -> None:
        """Unload every base (their worker processes exit)."""
        for base in self._bases.values():
            base.service.unload()
        self._bases.clear()
