"""Built-in plugin: the embedded durable queue, one SQLite file (WAL).

The default queue backend (``queue.backend = "sqlite"``), for a gateway on
one machine. Envelopes are committed before the device gets its 2.04; a
gateway killed the instant after still has them when it restarts.

Configuration (``[queue]``): ``path`` (default ``<data_dir>/queue.sqlite3``),
``synchronous`` (``full``: an acknowledged message survives power loss;
``normal``: it survives a crashed process, faster on slow disks),
``max_pending`` (envelopes waiting for a commit before new ones get 5.03
with Max-Age ``retry_after``), ``max_batch`` (envelopes per transaction),
``max_receives`` and ``visibility_timeout`` (the processor's side: a
message received ``max_receives`` times without being deleted moves to the
dead letters with the last failure reason).

Group commit: requests that arrive while a transaction is being written
wait and go together in the next one, so under load one fsync
acknowledges hundreds of messages and an idle gateway adds no delay. All
SQLite work happens on one thread of the queue's own, which owns the
connection; the reactor thread only serialises envelopes and hands them
over.
"""

from __future__ import annotations

import secrets
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from sense_gateway.envelope import Envelope
from sense_gateway.errors import ConfigError, Unavailable
from sense_gateway.hookspecs import hookimpl
from sense_gateway.queues import DeadLetter, EnvelopeQueue, Received

log = Logger()

_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY,
    body BLOB NOT NULL,
    enqueued_at REAL NOT NULL,
    visible_at REAL NOT NULL,
    receive_count INTEGER NOT NULL DEFAULT 0,
    receipt TEXT,
    last_error TEXT
);
CREATE INDEX IF NOT EXISTS messages_visible ON messages (visible_at, id);
CREATE TABLE IF NOT EXISTS dead_letters (
    id INTEGER PRIMARY KEY,
    body BLOB NOT NULL,
    enqueued_at REAL NOT NULL,
    failed_at REAL NOT NULL,
    receive_count INTEGER NOT NULL,
    reason TEXT NOT NULL
);
"""


class SQLiteQueueStore:
    """The queue file, synchronously: one connection, used from one thread.

    The Twisted service runs it on its own thread; the CLI and tests use it
    directly (a second connection sees exactly what was committed).
    """

    def __init__(self, path: str | Path, *, synchronous: str = "full", max_receives: int = 5,
                 visibility_timeout: float = 30.0, clock: Callable[[], float] = time.time):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.max_receives = max_receives
        self.visibility_timeout = visibility_timeout
        self.clock = clock
        # Autocommit mode: every transaction below is explicit.
        self.db = sqlite3.connect(str(self.path), isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute(f"PRAGMA synchronous={'FULL' if synchronous == 'full' else 'NORMAL'}")
        self.db.execute("PRAGMA busy_timeout=5000")
        self.db.executescript(_SCHEMA)

    def close(self) -> None:
        self.db.close()

    def put_many(self, bodies: list[bytes]) -> None:
        now = self.clock()
        with self._transaction():
            self.db.executemany(
                "INSERT INTO messages (body, enqueued_at, visible_at) VALUES (?, ?, 0)",
                [(body, now) for body in bodies])

    def receive(self, max_messages: int, visibility_timeout: float | None = None) -> list[Received]:
        now = self.clock()
        timeout = self.visibility_timeout if visibility_timeout is None else visibility_timeout
        out: list[Received] = []
        with self._transaction():
            while len(out) < max_messages:
                rows = self.db.execute(
                    "SELECT id, body, receive_count, last_error FROM messages "
                    "WHERE visible_at <= ? ORDER BY id LIMIT ?",
                    (now, max_messages - len(out))).fetchall()
                if not rows:
                    break
                for message_id, body, count, last_error in rows:
                    if count >= self.max_receives:
                        reason = last_error or f"received {count} times without being deleted"
                        self._bury(message_id, reason, now)
                        continue
                    try:
                        envelope = Envelope.from_json(body)
                    except (ValueError, KeyError, TypeError) as e:
                        self._bury(message_id, f"undecodable envelope: {e}", now)
                        continue
                    receipt = f"{message_id}:{secrets.token_hex(8)}"
                    self.db.execute(
                        "UPDATE messages SET visible_at = ?, receive_count = receive_count + 1, "
                        "receipt = ? WHERE id = ?", (now + timeout, receipt, message_id))
                    out.append(Received(message_id, receipt, envelope, count + 1))
        return out

    def _bury(self, message_id: int, reason: str, now: float) -> None:
        self.db.execute(
            "INSERT INTO dead_letters (body, enqueued_at, failed_at, receive_count, reason) "
            "SELECT body, enqueued_at, ?, receive_count, ? FROM messages WHERE id = ?",
            (now, reason, message_id))
        self.db.execute("DELETE FROM messages WHERE id = ?", (message_id,))

    def delete(self, receipts: list[str]) -> int:
        with self._transaction():
            deleted = 0
            for receipt in receipts:
                deleted += self.db.execute(
                    "DELETE FROM messages WHERE id = ? AND receipt = ?",
                    (_receipt_id(receipt), receipt)).rowcount
        return deleted

    def release(self, receipt: str, reason: str, delay: float = 0.0) -> None:
        with self._transaction():
            self.db.execute(
                "UPDATE messages SET visible_at = ?, last_error = ? WHERE id = ? AND receipt = ?",
                (self.clock() + delay, reason, _receipt_id(receipt), receipt))

    def depth(self) -> dict[str, int]:
        now = self.clock()
        visible, in_flight = self.db.execute(
            "SELECT COALESCE(SUM(visible_at <= ?), 0), COALESCE(SUM(visible_at > ?), 0) "
            "FROM messages", (now, now)).fetchone()
        dead = self.db.execute("SELECT COUNT(*) FROM dead_letters").fetchone()[0]
        return {"visible": visible, "in_flight": in_flight, "dead": dead}

    def peek(self, limit: int = -1) -> list[Received]:
        """Every message in order, without receiving it (receipt empty)."""
        rows = self.db.execute(
            "SELECT id, body, receive_count FROM messages ORDER BY id LIMIT ?", (limit,))
        return [Received(i, "", Envelope.from_json(body), count) for i, body, count in rows]

    def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        rows = self.db.execute(
            "SELECT id, body, reason, receive_count, enqueued_at, failed_at FROM dead_letters "
            "ORDER BY id LIMIT ?", (limit,))
        return [DeadLetter(i, Envelope.from_json(body), reason, count, enqueued, failed)
                for i, body, reason, count, enqueued, failed in rows]

    def replay(self, ids: list | None = None) -> int:
        where, args = ("", ()) if ids is None else (
            f"WHERE id IN ({','.join('?' * len(ids))})", tuple(ids))
        with self._transaction():
            self.db.execute(
                "INSERT INTO messages (body, enqueued_at, visible_at) "
                f"SELECT body, enqueued_at, 0 FROM dead_letters {where} ORDER BY id", args)
            return self.db.execute(f"DELETE FROM dead_letters {where}", args).rowcount

    def _transaction(self):
        return _Transaction(self.db)


class _Transaction:
    """``BEGIN IMMEDIATE`` ... ``COMMIT``, or ``ROLLBACK`` on error."""

    def __init__(self, db: sqlite3.Connection):
        self.db = db

    def __enter__(self):
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, kind, value, traceback):
        if kind is None:
            self.db.execute("COMMIT")
        elif self.db.in_transaction:
            self.db.execute("ROLLBACK")
        return False


def _receipt_id(receipt: str) -> int:
    try:
        return int(receipt.partition(":")[0])
    except ValueError:
        return -1


class SQLiteQueue(EnvelopeQueue):
    """The store on a thread of its own, with group commit for puts."""

    def __init__(self, path: Path, reactor, *, synchronous: str = "full", max_receives: int = 5,
                 visibility_timeout: float = 30.0, max_pending: int = 20000,
                 max_batch: int = 2000, retry_after: int = 5):
        self.path = Path(path)
        self.reactor = reactor
        self._store_options = dict(synchronous=synchronous, max_receives=max_receives,
                                   visibility_timeout=visibility_timeout)
        self.max_pending = max_pending
        self.max_batch = max_batch
        self.retry_after = retry_after
        self._store: SQLiteQueueStore | None = None
        self._pool: ThreadPool | None = None
        self._pending: list[tuple[list[bytes], Deferred]] = []
        self._pending_count = 0
        self._committing = False
        self._idle: list[Deferred] = []
        #: transactions committed for puts (group commit makes this small)
        self.transactions = 0

    def _in_thread(self, method: str, *args) -> Deferred:
        return deferToThreadPool(self.reactor, self._pool,
                                 lambda: getattr(self._store, method)(*args))

    def _open(self) -> None:
        self._store = SQLiteQueueStore(self.path, **self._store_options)

    def startService(self) -> None:
        super().startService()
        self._pool = ThreadPool(1, 1, name="sense-queue-sqlite")
        self._pool.start()
        # The single worker runs tasks in order: the store opens first.
        deferToThreadPool(self.reactor, self._pool, self._open).addErrback(
            lambda f: log.failure("cannot open the queue {path}", f, path=str(self.path)))

    def stopService(self) -> Deferred:
        super().stopService()
        d = self._until_idle()

        def close(_):
            return deferToThreadPool(self.reactor, self._pool, self._close)

        def stop(_):
            self._pool.stop()

        return d.addCallback(close).addBoth(stop)

    def _close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None

    def _until_idle(self) -> Deferred:
        if not self._committing and not self._pending:
            return succeed(None)
        d = Deferred()
        self._idle.append(d)
        return d

    # -- puts, grouped -------------------------------------------------------

    def put(self, envelopes: list[Envelope]) -> Deferred:
        if not self.running:
            return fail(Unavailable("queue stopped", max_age=self.retry_after))
        if self._pending_count + len(envelopes) > self.max_pending:
            return fail(Unavailable("queue full", max_age=self.retry_after))
        d = Deferred()
        self._pending.append(([e.to_json() for e in envelopes], d))
        self._pending_count += len(envelopes)
        if not self._committing:
            self._commit_next()
        return d

    def _commit_next(self) -> None:
        batch: list[tuple[list[bytes], Deferred]] = []
        bodies: list[bytes] = []
        while self._pending and (not bodies or len(bodies) + len(self._pending[0][0]) <= self.max_batch):
            item = self._pending.pop(0)
            batch.append(item)
            bodies.extend(item[0])
        self._pending_count -= len(bodies)
        self._committing = True
        self._in_thread("put_many", bodies).addBoth(self._committed, batch)

    def _committed(self, result, batch) -> None:
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
            log.failure("queue commit of {count} envelopes failed", result,
                        count=sum(len(bodies) for bodies, _ in batch))
            for _, d in batch:
                d.errback(Unavailable("queue write failed", max_age=self.retry_after))
        else:
            for _, d in batch:
                d.callback(None)

    # -- the processor's side ------------------------------------------------

    def receive(self, max_messages: int, visibility_timeout: float | None = None) -> Deferred:
        return self._in_thread("receive", max_messages, visibility_timeout)

    def delete(self, receipts: list[str]) -> Deferred:
        return self._in_thread("delete", list(receipts))

    def release(self, receipt: str, reason: str, delay: float = 0.0) -> Deferred:
        return self._in_thread("release", receipt, reason, delay)

    def depth(self) -> Deferred:
        return self._in_thread("depth")

    def dead_letters(self, limit: int = 100) -> Deferred:
        return self._in_thread("dead_letters", limit)

    def replay(self, ids: list | None = None) -> Deferred:
        return self._in_thread("replay", ids)


def make_sqlite_queue(config, reactor) -> SQLiteQueue:
    path = config.queue_path
    try:
        # Fail start-up here, naming the key, rather than on the first put.
        SQLiteQueueStore(path, synchronous=config.queue.synchronous).close()
    except (sqlite3.Error, OSError) as e:
        raise ConfigError(f"queue.path: cannot open {path}: {e}") from None
    q = config.queue
    return SQLiteQueue(path, reactor, synchronous=q.synchronous, max_receives=q.max_receives,
                       visibility_timeout=q.visibility_timeout, max_pending=q.max_pending,
                       max_batch=q.max_batch, retry_after=q.retry_after)


@hookimpl
def sense_register_queues():
    return {"sqlite": make_sqlite_queue}
