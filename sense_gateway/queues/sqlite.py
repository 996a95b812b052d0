"""Built-in plugin: the embedded durable queue, one SQLite file (WAL).

The default queue backend (``queue.backend = "sqlite"``), for a gateway on
one machine. Envelopes are committed before the device gets its 2.04; a
gateway killed the instant after still has them when it restarts.

Its own settings (``[queue.sqlite]``, ``SENSE_QUEUE_SQLITE_*``;
:class:`SQLiteQueueSettings`):

- ``path``: the queue file (default ``<data_dir>/queue.sqlite3``); its
  directory is created if missing. A path that cannot be opened fails
  start-up with a message naming ``queue.sqlite.path``.
- ``synchronous``: ``full`` (default), an acknowledged message survives
  power loss (each commit waits for the write-ahead log's fsync);
  ``normal``, it survives a crashed or killed process, but the last
  commits before a power cut may be lost; faster on slow disks.
- ``max_batch``: envelopes per transaction at most (default 2000).

The keys of ``[queue]`` every backend reads:

- ``max_pending``: envelopes waiting for a commit (default 20000); beyond
  that a put fails at once with 5.03 Service Unavailable and Max-Age
  ``retry_after`` (default 5 s), so a stalled disk cannot eat the
  gateway's memory.
- ``max_depth``: envelopes in the queue at most, waiting for the
  processor or in its hands (default 1000000, about 400 MB of file);
  beyond that a put fails at once with 5.03 and Max-Age, ``/healthz``
  says the queue is full, and puts are taken again as the processor
  makes room. It bounds the backlog of a long outage of the metrics
  server. The count is kept as puts and deletes go, and counted again
  from the file at least every second while puts arrive (another
  process may drain the same file).
- ``max_receives``, ``visibility_timeout``: the processor's side. A
  received message is invisible for ``visibility_timeout`` seconds
  (default 30); one received ``max_receives`` times (default 5) without
  being deleted moves to the dead letters with its last failure reason
  (``sense dlq list``), from where ``sense dlq replay`` puts it back.
  A processor killed with messages in hand does not hide them for the
  timeout: each receiving process locks a file of its own in
  ``<path>-holders/``, and the messages of one whose lock is gone are
  visible again at the next processor's first receive (and every 5 s
  after), so they are processed in order (``docs/processing.md``).

A commit that fails (a full disk, a file that cannot be written) fails
every put in it with 5.03 and Max-Age, never a 2.04; ``/healthz`` names
the queue and the error until a commit succeeds again, and each new put
tries again, so ingest resumes by itself once there is room. Refusals
are counted by reason (``refusals``: stopped, busy, full, write failed),
for ``/metrics``.

Group commit: puts made in one turn of the reactor (the datagrams one
read of the socket brought) go together in one transaction, started when
that turn ends; puts that arrive while a transaction is being written wait
and go together in the next one, started the moment the current one
commits. Under load one fsync acknowledges hundreds of messages; an idle
gateway writes each put in the turn it arrives, with no added delay.
:meth:`SQLiteQueue.put_then` reports each put to a plain callable from the
transaction's completion, so the CoAP layer needs no Deferred per
request.

Threads: all SQLite work happens on one thread of the queue's own (a
:class:`~sense_gateway.threads.BlockingThreads`, never the reactor's pool,
which DNS uses), which opens the connection and is the only one to use it;
:meth:`SQLiteQueue.with_store` runs a callable on it. The reactor thread only serialises envelopes and hands
them over, one hop per transaction, not per message. A transaction is one
``INSERT ... SELECT FROM json_each(?)`` statement in autocommit mode: that
thread needs the GIL back from the busy reactor thread once per
transaction, not once per row.

The file can be read while the gateway runs or after it was killed: open
it with :class:`SQLiteQueueStore` (WAL lets a reader see every committed
message without blocking the writer)::

    store = SQLiteQueueStore("var/queue.sqlite3")
    print(store.depth(), [m.envelope.device for m in store.peek(10)])
"""

from __future__ import annotations

import sqlite3
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from sense_gateway.envelope import Envelope
from sense_gateway.errors import ConfigError, Unavailable
from sense_gateway.hookspecs import hookimpl
from sense_gateway.queues import DeadLetter, EnvelopeQueue, QueueBackend, Received
from sense_gateway.queues.sqlite_settings import SQLiteQueueSettings, queue_file, sqlite_shards
from sense_gateway.queues.sqlite_store import (RECOUNT_INTERVAL, MissingJSONFunctions,
                                               SQLiteQueueStore)
from sense_gateway.threads import BlockingThreads

__all__ = ["SQLiteQueue", "SQLiteQueueSettings", "SQLiteQueueStore", "make_sqlite_queue"]

log = Logger()


class SQLiteQueue(EnvelopeQueue):
    """The store on a thread of its own, with group commit for puts."""

    def __init__(self, path: str | Path, reactor, *, synchronous: str = "full",
                 max_receives: int = 5, visibility_timeout: float = 30.0,
                 max_pending: int = 20000, max_batch: int = 2000, retry_after: int = 5,
                 max_depth: int = 1_000_000, clock: Callable[[], float] = time.time):
        self.path = Path(path)
        self.reactor = reactor
        self._store_options = dict(synchronous=synchronous, max_receives=max_receives,
                                   visibility_timeout=visibility_timeout, clock=clock)
        self.max_pending = max_pending
        self.max_batch = max_batch
        self.retry_after = retry_after
        self.max_depth = max_depth
        #: messages in the queue as the store last counted them
        self.waiting = 0
        #: why the last commit failed, until one succeeds
        self.write_error: str | None = None
        #: puts refused, by reason
        self.refusals = {"stopped": 0, "busy": 0, "full": 0, "write failed": 0}
        self._recounting = False
        self._recount_call = None
        self._store: SQLiteQueueStore | None = None
        #: the one thread that opens the store and is the only one to use it
        self.threads = BlockingThreads(f"sense-queue-sqlite {self.path.name}", reactor,
                                       close=self._close, refusal="queue stopped",
                                       max_age=retry_after)
        # (serialised envelopes of one put, what to call when it is done:
        # with None once committed, with the error if not), oldest first.
        self._pending: deque[tuple[list[bytes], Callable[[BaseException | None], object]]] = deque()
        self._pending_count = 0
        self._committing = False
        self._flush = None
        self._idle: list[Deferred[None]] = []
        #: transactions written for puts (group commit keeps this small)
        self.transactions = 0

    def open_store(self) -> SQLiteQueueStore:
        """Open the store; runs on the queue's thread (tests override it)."""
        return SQLiteQueueStore(self.path, **self._store_options)

    # -- life cycle ------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self.threads.startService()
        # One thread runs calls in order: the store opens before any put or
        # receive reaches it. Were it to fail, each of those fails (puts
        # with Unavailable) instead of hanging.
        self.threads.run(self._open).addCallbacks(
            self._counted,
            lambda f: log.failure("cannot open the queue {path}", f, path=str(self.path)))

    def _open(self) -> tuple[None, int]:
        self._store = self.open_store()
        return None, self._store.waiting

    def stopService(self) -> Deferred[None]:
        super().stopService()  # from here on puts are refused
        if self._recount_call is not None and self._recount_call.active():
            self._recount_call.cancel()
        self._recount_call, self._recounting = None, False
        # Pending puts were promised a commit: write them, then stop the
        # thread (what was handed to it runs first, then the store closes).
        return self._until_idle().addCallback(lambda _: self.threads.stopService())

    def _close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None

    def _until_idle(self) -> Deferred[None]:
        if not self._committing and not self._pending:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._idle.append(d)
        return d

    def with_store(self, use: Callable[[SQLiteQueueStore], object]) -> Deferred:
        """``use(store)`` on the queue's thread (the only one that may
        touch the store); fails with Unavailable once the queue stops."""
        return self.threads.run(self._use_store, use).addCallback(self._counted)

    def _use_store(self, use: Callable[[SQLiteQueueStore], object]):
        store = self._store
        if store is None:
            raise RuntimeError(f"queue {self.path} is not open")
        # The count comes back with every result, to be set on the
        # reactor's thread (one thread runs every call, in order).
        return use(store), store.waiting

    def _counted(self, outcome: tuple):
        result, self.waiting = outcome
        return result

    # -- puts, grouped ---------------------------------------------------------

    def put(self, envelopes: list[Envelope]) -> Deferred[None]:
        d: Deferred[None] = Deferred()

        def done(error: BaseException | None) -> None:
            if error is None:
                d.callback(None)
            else:
                d.errback(error)
        self.put_then(envelopes, done)
        return d

    def put_then(self, envelopes: list[Envelope],
                 done: Callable[[BaseException | None], object]) -> None:
        if not self.running:
            self.refusals["stopped"] += 1
            done(Unavailable("queue stopped", max_age=self.retry_after))
            return
        if not envelopes:
            done(None)
            return
        count = len(envelopes)
        if self._pending_count + count > self.max_pending:
            self.refusals["busy"] += 1
            done(Unavailable("queue full", max_age=self.retry_after))
            return
        if self.waiting + self._pending_count + count > self.max_depth:
            self.refusals["full"] += 1
            self._recount()
            done(Unavailable("queue full", max_age=self.retry_after))
            return
        try:
            # Serialised here, on the reactor thread (orjson: microseconds),
            # so the writer thread gets one ready list per transaction.
            bodies = [e.to_json() for e in envelopes]
        except Exception as e:
            done(e)
            return
        self._pending.append((bodies, done))
        self._pending_count += len(bodies)
        if not self._committing and self._flush is None:
            # Not at once: at the end of this turn of the reactor, so the
            # requests that arrived together share one transaction (the
            # reactor reads every waiting datagram in one turn).
            self._flush = self.reactor.callLater(0, self._flush_now)

    def _recount(self) -> None:
        """While full and refusing, count again from the file now and then:
        another process may have drained it."""
        if self._recounting or not self.threads.running:
            return
        self._recounting = True

        def done(result: object) -> None:
            self._recounting = False
            if isinstance(result, Failure) and not result.check(Unavailable):
                log.failure("queue {path}: counting failed", result, path=str(self.path))

        def count() -> None:
            self._recount_call = None
            self.with_store(lambda store: store.count_waiting()).addBoth(done)
        # Not more often than the store trusts its count anyway.
        self._recount_call = self.reactor.callLater(RECOUNT_INTERVAL, count)

    def check(self) -> Deferred[None]:
        """Fail with why puts are refused now: a failing disk, a full queue."""
        if self.write_error is not None:
            return fail(Unavailable(f"queue write failed: {self.write_error}",
                                    max_age=self.retry_after))

        def full(depth: dict[str, int]) -> None:
            waiting = depth["visible"] + depth["in_flight"]
            if waiting >= self.max_depth:
                raise Unavailable(f"queue full: {waiting} envelopes waiting "
                                  f"(queue.max_depth {self.max_depth})", max_age=self.retry_after)
        return self.depth().addCallback(full)

    def _flush_now(self) -> None:
        self._flush = None
        if not self._committing and self._pending:
            self._commit_next()

    def _commit_next(self) -> None:
        batch: list[tuple[list[bytes], Callable[[BaseException | None], object]]] = []
        bodies: list[bytes] = []
        # Whole puts only; one put larger than max_batch still goes alone.
        while self._pending and (
                not bodies or len(bodies) + len(self._pending[0][0]) <= self.max_batch):
            item = self._pending.popleft()
            batch.append(item)
            bodies.extend(item[0])
        self._pending_count -= len(bodies)
        self._committing = True
        self.with_store(lambda store: store.put_many(bodies)).addBoth(self._committed, batch)

    def _committed(self, result: object,
                   batch: list[tuple[list[bytes], Callable[[BaseException | None], object]]]) -> None:
        self._committing = False
        self.transactions += 1
        # Start writing the next group before answering this one, so the
        # disk works while the reactor sends acknowledgements.
        if self._pending:
            self._commit_next()
        else:
            idle, self._idle = self._idle, []
            for d in idle:
                d.callback(None)
        if isinstance(result, Failure):
            # Logged once per transaction, not once per waiting device.
            if self.write_error is None:
                # Logged when writing starts failing, not for every commit
                # of an outage (a full disk fails them all).
                log.failure("queue {path}: commit of {count} envelopes ({puts} puts) failed",
                            result, path=str(self.path), count=sum(len(b) for b, _ in batch),
                            puts=len(batch))
            self.write_error = f"{type(result.value).__name__}: {result.value}"[:200]
            self.refusals["write failed"] += len(batch)
            error = Unavailable("queue write failed", max_age=self.retry_after)
            for _, done in batch:
                self._notify(done, error)
        else:
            if self.write_error is not None:
                log.info("queue {path}: writing again after: {error}", path=str(self.path),
                         error=self.write_error)
                self.write_error = None
            for _, done in batch:
                self._notify(done, None)

    @staticmethod
    def _notify(done: Callable[[BaseException | None], object], error: BaseException | None) -> None:
        try:
            done(error)
        except Exception:
            # One waiter's failure must not cost the others their answer.
            log.failure("queue: a put's completion failed")

    # -- the processor's side --------------------------------------------------

    def receive(self, max_messages: int,
                visibility_timeout: float | None = None) -> Deferred[list[Received]]:
        return self.with_store(lambda store: store.receive(max_messages, visibility_timeout))

    def delete(self, receipts: list[str]) -> Deferred[int]:
        receipts = list(receipts)
        return self.with_store(lambda store: store.delete(receipts))

    def release(self, receipt: str, reason: str, delay: float = 0.0) -> Deferred[None]:
        return self.with_store(lambda store: store.release(receipt, reason, delay))

    def postpone(self, receipts: list[str], reason: str, delay: float = 0.0) -> Deferred[None]:
        receipts = list(receipts)
        return self.with_store(lambda store: store.postpone(receipts, reason, delay))

    def dead_letter(self, receipt: str, reason: str) -> Deferred[None]:
        return self.with_store(lambda store: store.dead_letter(receipt, reason)).addCallback(
            lambda _: None)

    def depth(self) -> Deferred[dict[str, int]]:
        return self.with_store(lambda store: store.depth())

    def dead_letters(self, limit: int = 100) -> Deferred[list[DeadLetter]]:
        return self.with_store(lambda store: store.dead_letters(limit))

    def replay(self, ids: list | None = None) -> Deferred[int]:
        ids = None if ids is None else list(ids)
        return self.with_store(lambda store: store.replay(ids))


def make_sqlite_queue(config, settings: SQLiteQueueSettings, reactor) -> SQLiteQueue:
    """The ``sqlite`` backend's queue: ``open(config, settings, reactor)``."""
    path = queue_file(config, settings)
    q = config.queue
    try:
        # Fail start-up here, naming the key, rather than on the first put.
        # (Before the reactor runs, so opening on this thread blocks no one.)
        SQLiteQueueStore(path, synchronous=settings.synchronous).close()
    except MissingJSONFunctions as e:
        raise ConfigError(f"queue.backend \"sqlite\": {e}") from None
    except (sqlite3.Error, OSError) as e:
        raise ConfigError(f"queue.sqlite.path: cannot open {path}: {e}") from None
    return SQLiteQueue(path, reactor, synchronous=settings.synchronous,
                       max_receives=q.max_receives, visibility_timeout=q.visibility_timeout,
                       max_pending=q.max_pending, max_batch=settings.max_batch,
                       retry_after=q.retry_after, max_depth=q.max_depth)


def open_sqlite_store(config, settings: SQLiteQueueSettings) -> SQLiteQueueStore:
    """The ``sqlite`` backend's store for ``sense queue`` and ``sense dlq``."""
    path = queue_file(config, settings)
    if not path.exists():
        raise ConfigError(f"queue.sqlite.path: no queue at {path}")
    return SQLiteQueueStore(path, max_receives=config.queue.max_receives)


@hookimpl
def sense_register_queues():
    return {"sqlite": QueueBackend(make_sqlite_queue, open_sqlite_store, SQLiteQueueSettings,
                                   shards=sqlite_shards)}
