"""The memory of recent requests, for answering retransmissions (RFC 7252 4.5).

A retransmitted request (same message id from the same endpoint within
EXCHANGE_LIFETIME) must get the very same response and must not be
processed twice. This memory is bounded in size and in age, expires
entries lazily (insertion order is arrival order, so the oldest are always
at the front), and keeps the encoded response so a retransmission gets the
same bytes back.

It is also fair: each source address (any port) may hold at most
``per_source`` entries. A source that sends a flood of fresh message ids
only pushes out its own oldest exchanges, never those of other devices;
only when many sources together fill the whole memory do the oldest
entries overall go first.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable, Hashable


class ExchangeMemory:
    """``(message id, host, port, ...)`` -> encoded response, or ``None``
    while none has been sent; the host is the key's second item.

    Keys are tuples of numbers and strings and values bytes, which the
    garbage collector stops tracking: tens of thousands of remembered
    exchanges cost no time in its full collections.
    """

    def __init__(self, lifetime: float, max_entries: int, per_source: int,
                 now: Callable[[], float]):
        self.lifetime = lifetime
        self.max_entries = max_entries
        self.per_source = min(per_source, max_entries)
        self._now = now
        # key -> (expiry, response datagram or None)
        self._entries: OrderedDict[Hashable, tuple] = OrderedDict()
        # host -> that host's keys, oldest first: the same order as in
        # _entries, so the globally oldest entry is also its host's oldest.
        self._by_source: dict[str, deque] = {}
        # No entry expires before this (the oldest entry's expiry, or
        # earlier): most lookups need not look at the oldest at all.
        self._next_expiry = float("inf")
        #: entries dropped before their lifetime because the memory was full
        self.evicted = 0
        #: entries dropped because their source was over its share
        self.evicted_from_source = 0

    def __len__(self) -> int:
        return len(self._entries)

    def sources(self) -> int:
        """Source addresses with at least one remembered exchange."""
        return len(self._by_source)

    def _drop_oldest(self) -> None:
        key, _ = self._entries.popitem(last=False)
        host = key[1]
        keys = self._by_source[host]
        keys.popleft()
        if not keys:
            del self._by_source[host]

    def _expire(self, now: float) -> None:
        entries = self._entries
        while entries:
            expiry = next(iter(entries.values()))[0]
            if expiry > now:
                self._next_expiry = expiry
                return
            self._drop_oldest()
        self._next_expiry = float("inf")

    def seen(self, key: Hashable) -> bool:
        """Whether *key* arrived before within the lifetime; if not, remember it."""
        now = self._now()
        if now >= self._next_expiry:
            self._expire(now)
        entries = self._entries
        if key in entries:
            return True
        host = key[1]
        keys = self._by_source.get(host)
        if keys is None:
            keys = self._by_source[host] = deque()
        elif len(keys) >= self.per_source:
            del entries[keys.popleft()]
            self.evicted_from_source += 1
        if len(entries) >= self.max_entries:
            self._drop_oldest()
            self.evicted += 1
            keys = self._by_source.setdefault(host, keys)
        expiry = now + self.lifetime
        if expiry < self._next_expiry:
            self._next_expiry = expiry
        entries[key] = (expiry, None)
        keys.append(key)
        return False

    def response(self, key: Hashable) -> bytes | None:
        """The response sent for *key*, if any yet."""
        entry = self._entries.get(key)
        return entry[1] if entry else None

    def record_response(self, key: Hashable, datagram: bytes) -> None:
        """Remember the response sent for *key* (it stays where it was)."""
        entry = self._entries.get(key)
        if entry is not None:
            self._entries[key] = (entry[0], datagram)
