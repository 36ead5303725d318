"""Per-replica cache of prefixes, bounded by bytes (LRU), keyed by prefix id.

Prefix versions are immutable, so a cached entry is never stale: freshness comes from
resolving the tenant's *active* prefix id per request, not from expiring entries.
Concurrent misses for the same id share one load (single flight). Prefixes are small
(~0.5 MB for the embedded model at length 10), so a replica holds hundreds by default.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

from common.prefix_file import Prefix


@dataclass
class PrefixCacheStats:
    hits: int = 0
    misses: int = 0
    loads: int = 0
    evictions: int = 0
    entries: int = 0
    bytes: int = 0


def prefix_bytes(prefix: Prefix) -> int:
    return prefix.key_values.numel() * prefix.key_values.element_size()


class PrefixCache:
    """``await cache.get(prefix_id, *args)`` returns the prefix, loading it with
    ``load(prefix_id, *args)`` on a miss (``args``: where to load it from)."""

    def __init__(self, max_bytes: int, load: Callable[..., Awaitable[Prefix]]) -> None:
        self.max_bytes = max_bytes
        self._load = load
        self._entries: OrderedDict[str, Prefix] = OrderedDict()
        self._inflight: dict[str, asyncio.Future[Prefix]] = {}
        self.stats = PrefixCacheStats()

    def __contains__(self, prefix_id: str) -> bool:
        return prefix_id in self._entries

    def keys(self) -> list[str]:
        return list(self._entries)

    def loading(self, prefix_id: str) -> bool:
        """A load of this id is in flight (it will be cached when it succeeds)."""
        return prefix_id in self._inflight

    async def get(self, prefix_id: str, *args: object) -> Prefix:
        if prefix_id in self._entries:
            self._entries.move_to_end(prefix_id)
            self.stats.hits += 1
            return self._entries[prefix_id]
        self.stats.misses += 1
        pending = self._inflight.get(prefix_id)
        if pending is not None:  # someone is loading it already: wait for that load
            return await asyncio.shield(pending)
        future: asyncio.Future[Prefix] = asyncio.get_running_loop().create_future()
        self._inflight[prefix_id] = future
        try:
            self.stats.loads += 1
            prefix = await self._load(prefix_id, *args)
            self._insert(prefix_id, prefix)
            future.set_result(prefix)
            return prefix
        except BaseException as error:
            future.set_exception(error)
            future.exception()  # mark retrieved: waiters get it, nobody else must
            raise
        finally:
            del self._inflight[prefix_id]

    def _insert(self, prefix_id: str, prefix: Prefix) -> None:
        size = prefix_bytes(prefix)
        if size > self.max_bytes:
            return  # served, not cached: it would evict everything else
        self._entries[prefix_id] = prefix
        self.stats.bytes += size
        while self.stats.bytes > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self.stats.bytes -= prefix_bytes(evicted)
            self.stats.evictions += 1
        self.stats.entries = len(self._entries)

    def evict(self, prefix_ids: Iterable[str]) -> int:
        """Drop these ids (deleted prefixes or tenants); returns how many were cached."""
        dropped = 0
        for prefix_id in prefix_ids:
            prefix = self._entries.pop(prefix_id, None)
            if prefix is not None:
                self.stats.bytes -= prefix_bytes(prefix)
                dropped += 1
        self.stats.entries = len(self._entries)
        return dropped
