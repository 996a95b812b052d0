"""One queue made of shards: what ``--workers N`` leaves behind.

Each ingest worker writes a shard of its own (for the sqlite backend, a
file of its own: ``queue.sqlite3``, ``queue-1.sqlite3``, ...), so no two
processes contend for one writer lock. The master's processor, ``/healthz``,
``/metrics``, ``sense queue`` and ``sense dlq`` see them as one queue:
:class:`ShardedQueue` (Deferreds, for the service) and
:class:`ShardedStore` (synchronous, for the commands). Receipts and
dead-letter ids name their shard: ``"1:42"`` is message 42 of shard 1.
"""

from __future__ import annotations

import time

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from sense_gateway.errors import ConfigError, failure_text
from sense_gateway.limits import backoff
from sense_gateway.queues import DeadLetter, EnvelopeQueue, Received

log = Logger()

#: a shard whose receive failed is skipped for this long, doubled per
#: failure in a row up to SHARD_RETRY_MAX: one that fails slowly (a lock
#: waited for) must not slow every round of the others
SHARD_RETRY_BASE = 1.0
SHARD_RETRY_MAX = 60.0


def _split(tagged) -> tuple[int, str]:
    shard, _, inner = str(tagged).partition(":")
    return int(shard), inner


def _inner_id(text: str):
    return int(text) if text.isdigit() else text


def _tag(shard: int, letter: DeadLetter) -> DeadLetter:
    return DeadLetter(f"{shard}:{letter.id}", letter.envelope, letter.reason,
                      letter.receive_count, letter.enqueued_at, letter.failed_at, letter.body)


def _by_shard(tagged_ids, count: int) -> dict[int, list]:
    grouped: dict[int, list] = {}
    for tagged in tagged_ids:
        shard, inner = _split(tagged)
        if 0 <= shard < count:
            grouped.setdefault(shard, []).append(inner)
    return grouped


def _replay_ids(ids, count: int) -> dict[int, list]:
    """Dead letter ids by shard; one that names no shard is an error (a
    bare ``42`` would else replay nothing and say so as if all were well)."""
    for tagged in ids:
        shard, sep, inner = str(tagged).partition(":")
        if not (sep and inner and shard.isdigit() and int(shard) < count):
            raise ConfigError(f"--id {tagged}: a dead letter's id names its shard, "
                              f"0 to {count - 1} (SHARD:ID, as `sense dlq list` shows it)")
    return {shard: [_inner_id(x) for x in inner]
            for shard, inner in _by_shard(ids, count).items()}


def _all(calls) -> defer.Deferred:
    """Every call's result, or the first failure itself (not wrapped in a
    FirstError, so it reads as what went wrong)."""
    return defer.gatherResults(calls, consumeErrors=True).addErrback(
        lambda failure: failure.value.subFailure if failure.check(defer.FirstError) else failure)


def _sum_depths(depths) -> dict[str, int]:
    total: dict[str, int] = {}
    for depth in depths:
        for key, value in depth.items():
            total[key] = total.get(key, 0) + value
    return total


class ShardedQueue(EnvelopeQueue):
    """The shards behind one :class:`EnvelopeQueue`; each shard is a child
    service started and stopped with this one. Puts go to the first shard
    (the workers put into theirs directly)."""

    def __init__(self, shards: list[EnvelopeQueue]):
        self.shards = list(shards)
        self.max_depth = sum(s.max_depth for s in self.shards) if all(
            s.max_depth is not None for s in self.shards) else None
        #: the shard the next receive starts at: every shard gets its turn
        self._next = 0
        # shards whose last receive failed: index -> (why, failures in a
        # row, when to try it again)
        self._failing: dict[int, tuple[str, int, float]] = {}

    @property
    def refusals(self) -> dict[str, int]:
        return _sum_depths(getattr(s, "refusals", {}) for s in self.shards)

    def startService(self) -> None:
        super().startService()
        for shard in self.shards:
            shard.startService()

    def stopService(self):
        super().stopService()
        return defer.gatherResults([defer.maybeDeferred(s.stopService) for s in self.shards],
                                   consumeErrors=True)

    def put(self, envelopes):
        return self.shards[0].put(envelopes)

    def put_then(self, envelopes, done) -> None:
        self.shards[0].put_then(envelopes, done)

    @defer.inlineCallbacks
    def receive(self, max_messages: int, visibility_timeout: float | None = None):
        received: list[Received] = []
        failures: list[Failure] = []
        start, self._next = self._next, (self._next + 1) % len(self.shards)
        for offset in range(len(self.shards)):
            if len(received) >= max_messages:
                break
            index = (start + offset) % len(self.shards)
            if index in self._failing and time.monotonic() < self._failing[index][2]:
                continue
            try:
                batch = yield self.shards[index].receive(max_messages - len(received),
                                                         visibility_timeout)
            except Exception as e:
                # One shard that cannot be read (a damaged file) must not
                # hold back the others; the processor says which one fails.
                self._receive_failed(index, e)
                failures.append(Failure())
                continue
            if self._failing.pop(index, None) is not None:
                log.info("queue shard {name}: receiving again", name=self._name(index))
            received += [Received(m.message_id, f"{index}:{m.receipt}", m.envelope,
                                  m.receive_count) for m in batch]
        if failures and not received and len(self._failing) == len(self.shards):
            failures[0].raiseException()  # every shard fails: the processor backs off
        return received

    def _name(self, index: int) -> str:
        """The shard's file (its number in this queue's list if it has none:
        a worker's list is not every shard)."""
        return str(getattr(self.shards[index], "path", f"#{index}"))

    def _receive_failed(self, index: int, error: Exception) -> None:
        reason = failure_text(error, 200)
        failures = self._failing[index][1] + 1 if index in self._failing else 1
        delay = backoff(SHARD_RETRY_BASE, SHARD_RETRY_MAX, failures)
        if failures == 1:
            # Once when it starts failing, not every round.
            log.warn("queue shard {name}: receiving failed, the other shards are processed "
                     "meanwhile, tried again after {delay} s (then with a backoff): {reason}",
                     name=self._name(index), delay=delay, reason=reason)
        self._failing[index] = (reason, failures, time.monotonic() + delay)

    def receive_problem(self) -> str | None:
        """Why some shards' messages are not being processed now (None if
        every shard was received from at its last try)."""
        if not self._failing:
            return None
        return "; ".join(f"queue shard {self._name(i)}: receiving fails: {reason}"
                         for i, (reason, _, _) in sorted(self._failing.items()))[:300]

    def _each_shard(self, method: str, receipts, *args):
        calls = [getattr(self.shards[i], method)(inner, *args)
                 for i, inner in _by_shard(receipts, len(self.shards)).items()]
        return _all(calls)

    def delete(self, receipts):
        return self._each_shard("delete", receipts).addCallback(sum)

    def postpone(self, receipts, reason: str, delay: float = 0.0):
        return self._each_shard("postpone", receipts, reason, delay).addCallback(lambda _: None)

    def release(self, receipt: str, reason: str, delay: float = 0.0):
        shard, inner = _split(receipt)
        return self.shards[shard].release(inner, reason, delay)

    def dead_letter(self, receipt: str, reason: str):
        shard, inner = _split(receipt)
        return self.shards[shard].dead_letter(inner, reason)

    def check(self):
        return _all([s.check() for s in self.shards]).addCallback(lambda _: None)

    def depth(self):
        return _all([s.depth() for s in self.shards]).addCallback(_sum_depths)

    @defer.inlineCallbacks
    def dead_letters(self, limit: int = 100):
        letters = []
        for index, shard in enumerate(self.shards):
            letters += [_tag(index, d) for d in (yield shard.dead_letters(limit))]
        return sorted(letters, key=lambda d: d.failed_at)[:limit]

    def replay(self, ids: list | None = None):
        if ids is None:
            calls = [s.replay(None) for s in self.shards]
        else:
            calls = [self.shards[i].replay(inner)
                     for i, inner in _replay_ids(ids, len(self.shards)).items()]
        return _all(calls).addCallback(sum)


class ShardedStore:
    """The shards' synchronous stores as one, for ``sense queue`` and
    ``sense dlq``."""

    def __init__(self, stores: list):
        self.stores = list(stores)

    def depth(self) -> dict[str, int]:
        return _sum_depths(s.depth() for s in self.stores)

    def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        letters = [_tag(i, d) for i, s in enumerate(self.stores) for d in s.dead_letters(limit)]
        return sorted(letters, key=lambda d: d.failed_at)[:limit]

    def replay(self, ids: list | None = None) -> int:
        if ids is None:
            return sum(s.replay(None) for s in self.stores)
        return sum(self.stores[i].replay(inner)
                   for i, inner in _replay_ids(ids, len(self.stores)).items())

    def close(self) -> None:
        for store in self.stores:
            store.close()
