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
    """(message id, endpoint) -> encoded response, or ``None`` while pending."""

    def __init__(self, lifetime: float, max_entries: int, now: Callable[[], float]):
        self.lifetime = lifetime
        self.max_entries = max_entries
        self._now = now
        self._entries: OrderedDict[Hashable, list] = OrderedDict()
        #: entries dropped before their lifetime because the cache was full
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._entries)

    def _expire(self, now: float) -> None:
        entries = self._entries
        while entries:
            key, entry = next(iter(entries.items()))
            if entry[0] > now:
                break
            del entries[key]

    def seen(self, key: Hashable) -> bool:
        """Whether *key* arrived before within the lifetime; if not, remember it."""
        now = self._now()
        self._expire(now)
        if key in self._entries:
            return True
        if len(self._entries) >= self.max_entries:
            self._entries.popitem(last=False)
            self.evicted += 1
        self._entries[key] = [now + self.lifetime, None]
        return False

    def response(self, key: Hashable) -> bytes | None:
        """The response sent for *key*, if any yet."""
        entry = self._entries.get(key)
        return entry[1] if entry else None

    def record_response(self, key: Hashable, datagram: bytes) -> None:
        """Remember the first response sent for *key* (later ones are separate)."""
        entry = self._entries.get(key)
        if entry is not None and entry[1] is None:
            entry[1] = datagram
