"""Token buckets per key (a source address, say), in a bounded table: the
rate limits of CoAP requests, DTLS handshakes and new devices.

A key's bucket holds at most ``burst`` tokens and gains ``rate`` per
second; each event takes one. When the table is full, the bucket touched
longest ago is forgotten (a forgotten source starts again with a full
bucket: the bound costs precision, never memory).

:func:`backoff` is the one doubling delay of whatever is tried again
after failing (the processor's outages and receives, a queue's shards).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable


def backoff(base: float, maximum: float, failures: int) -> float:
    """Seconds to wait after *failures* failed tries in a row: *base*,
    doubled per failure after the first, at most *maximum*."""
    # The exponent capped: 2.0 ** 1024 is no float, and days of failing
    # must not end what retries.
    return min(maximum, base * 2.0 ** min(max(0, failures - 1), 64))


class TokenBuckets:
    def __init__(self, rate: float, burst: float, now: Callable[[], float],
                 max_keys: int = 65536):
        self.rate = rate
        self.burst = burst
        self.max_keys = max_keys
        self._now = now
        # key -> (tokens, time of that count)
        self._buckets: OrderedDict[Hashable, tuple[float, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, key: Hashable) -> float:
        """Take a token for *key*: 0 if there was one, otherwise the seconds
        until there will be (nothing is taken then)."""
        now = self._now()
        buckets = self._buckets
        entry = buckets.pop(key, None)
        if entry is None:
            tokens = self.burst
            if len(buckets) >= self.max_keys:
                buckets.popitem(last=False)
        else:
            tokens = min(self.burst, entry[0] + (now - entry[1]) * self.rate)
        if tokens >= 1:
            buckets[key] = (tokens - 1, now)
            return 0.0
        buckets[key] = (tokens, now)
        return (1 - tokens) / self.rate if self.rate > 0 else float("inf")
