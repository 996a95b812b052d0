"""Recently seen requests, for answering retransmissions (RFC 7252 4.5).

txthings keeps one ``reactor.callLater`` per received message for
EXCHANGE_LIFETIME (247 s), with no limit: at a few thousand messages a
second that is a million timers. This cache is bounded in size and age
instead, expires entries lazily (insertion order is arrival order, so the
oldest are always at the front), and stores the encoded response so a
retransmission gets the very same bytes back.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable


class ExchangeCache:
    """(message id, endpoint) -> encoded response, or ``None`` while pending.

    Entries are tuples of numbers, strings and bytes only (the protocol
    keys them by the peer's address as received), which the garbage
    collector stops tracking: tens of thousands of remembered exchanges
    cost no time in its full collections.
    """

    def __init__(self, lifetime: float, max_entries: int, now: Callable[[], float]):
        self.lifetime = lifetime
        self.max_entries = max_entries
        self._now = now
        # key -> (expiry, response datagram or None)
        self._entries: OrderedDict[Hashable, tuple] = OrderedDict()
        # No entry expires before this (the oldest entry's expiry, or
        # earlier): most lookups need not look at the oldest at all.
        self._next_expiry = float("inf")
        #: entries dropped before their lifetime because the cache was full
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._entries)

    def _expire(self, now: float) -> None:
        entries = self._entries
        while entries:
            key, entry = next(iter(entries.items()))
            if entry[0] > now:
                self._next_expiry = entry[0]
                return
            del entries[key]
        self._next_expiry = float("inf")

    def seen(self, key: Hashable) -> bool:
        """Whether *key* arrived before within the lifetime; if not, remember it."""
        now = self._now()
        if now >= self._next_expiry:
            self._expire(now)
        entries = self._entries
        if key in entries:
            return True
        if len(entries) >= self.max_entries:
            entries.popitem(last=False)
            self.evicted += 1
        expiry = now + self.lifetime
        if expiry < self._next_expiry:
            self._next_expiry = expiry
        entries[key] = (expiry, None)
        return False

    def response(self, key: Hashable) -> bytes | None:
        """The response sent for *key*, if any yet."""
        entry = self._entries.get(key)
        return entry[1] if entry else None

    def record_response(self, key: Hashable, datagram: bytes) -> None:
        """Remember the first response sent for *key* (later ones are separate)."""
        entry = self._entries.get(key)
        if entry is not None and entry[1] is None:
            self._entries[key] = (entry[0], datagram)  # stays where it was
