"""Built-in plugin: the embedded durable queue, one SQLite file (WAL).

The default queue backend (``queue.backend = "sqlite"``), for a gateway on
one machine. Envelopes are committed before the device gets its 2.04; a
gateway killed the instant after still has them when it restarts.

Configuration (``[queue]``):

- ``path``: the queue file (default ``<data_dir>/queue.sqlite3``); its
  directory is created if missing. A path that cannot be opened fails
  start-up with a message naming ``queue.path``.
- ``synchronous``: ``full`` (default), an acknowledged message survives
  power loss (each commit waits for the write-ahead log's fsync);
  ``normal``, it survives a crashed or killed process, but the last
  commits before a power cut may be lost; faster on slow disks.
- ``max_pending``: envelopes waiting for a commit (default 20000); beyond
  that a put fails at once with 5.03 Service Unavailable and Max-Age
  ``retry_after`` (default 5 s), so a stalled disk cannot eat the
  gateway's memory.
- ``max_batch``: envelopes per transaction at most (default 2000).
- ``max_receives``, ``visibility_timeout``: the processor's side. A
  received message is invisible for ``visibility_timeout`` seconds
  (default 30); one received ``max_receives`` times (default 5) without
  being deleted moves to the dead letters with its last failure reason
  (``sense dlq list``), from where ``sense dlq replay`` puts it back.

Group commit: puts made in one turn of the reactor (the datagrams one
read of the socket brought) go together in one transaction, started when
that turn ends; puts that arrive while a transaction is being written wait
and go together in the next one, started the moment the current one
commits. Under load one fsync acknowledges hundreds of messages; an idle
gateway writes each put in the turn it arrives, with no added delay.
:meth:`SQLiteQueue.put_then` reports each put to a plain callable from the
transaction's completion, so the CoAP layer needs no Deferred per
request.

Threads: all SQLite work happens on one thread of the queue's own (never
the reactor's pool, which DNS uses), which opens the connection and is the
only one to use it. The reactor thread only serialises envelopes and hands
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

import secrets
import sqlite3
import time
from collections import deque
from collections.abc import Callable, Iterable
from pathlib import Path

import orjson
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

_SYNCHRONOUS = {"full": "FULL", "normal": "NORMAL"}

def _has_json_each(db: sqlite3.Connection) -> bool:
    """Whether this SQLite has the JSON functions (built in since 3.38)."""
    try:
        db.execute("SELECT count(*) FROM json_each('[]')").fetchone()
    except sqlite3.OperationalError:
        return False
    return True


class SQLiteQueueStore:
    """The queue file, synchronously: one connection, used from one thread.

    The Twisted service runs it on its own thread; the CLI and tests use it
    directly (a second store on the same file sees exactly what was
    committed). *clock* gives the time in seconds, so tests can move it.
    """

    def __init__(self, path: str | Path, *, synchronous: str = "full", max_receives: int = 5,
                 visibility_timeout: float = 30.0, busy_timeout: float = 5.0,
                 clock: Callable[[], float] = time.time):
        if synchronous not in _SYNCHRONOUS:
            raise ValueError(f"synchronous must be 'full' or 'normal', not {synchronous!r}")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.max_receives = max_receives
        self.visibility_timeout = visibility_timeout
        self.clock = clock
        # Autocommit mode: every transaction below is explicit, so a commit
        # is exactly where this code says it is.
        self.db = sqlite3.connect(str(self.path), isolation_level=None)
        try:
            # Set before anything else: busy_timeout covers the WAL switch too,
            # which another open connection (the CLI) can make wait.
            self.db.execute(f"PRAGMA busy_timeout={int(busy_timeout * 1000)}")
            mode = self.db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode.lower() != "wal":
                # Still correct, only slower and readers block the writer
                # (some network file systems cannot share WAL memory).
                log.warn("queue {path}: journal mode is {mode}, not WAL",
                         path=str(self.path), mode=mode)
            self.db.execute(f"PRAGMA synchronous={_SYNCHRONOUS[synchronous]}")
            self.db.executescript(_SCHEMA)
            self._json_each = _has_json_each(self.db)
        except BaseException:
            self.db.close()
            raise

    def close(self) -> None:
        self.db.close()

    def put_many(self, bodies: Iterable[bytes]) -> None:
        """Append envelope documents, all in one transaction."""
        now = self.clock()
        bodies = list(bodies)
        if self._json_each:
            try:
                texts = orjson.dumps([body.decode("utf-8") for body in bodies])
            except (UnicodeDecodeError, AttributeError):
                pass  # not all UTF-8 bytes: the general way below
            else:
                # One statement in autocommit mode is one transaction, and
                # one step: the sqlite3 module lets go of the GIL and must
                # take it back from the busy reactor thread once per step,
                # not once per row (executemany) or per BEGIN and COMMIT.
                # A writing statement takes the write lock as it starts, as
                # BEGIN IMMEDIATE would.
                self.db.execute(
                    "INSERT INTO messages (body, enqueued_at, visible_at) "
                    "SELECT CAST(value AS BLOB), ?, 0 FROM json_each(?) ORDER BY key",
                    (now, texts))
                return
        with self._transaction():
            self.db.executemany(
                "INSERT INTO messages (body, enqueued_at, visible_at) VALUES (?, ?, 0)",
                [(body, now) for body in bodies])

    def receive(self, max_messages: int, visibility_timeout: float | None = None) -> list[Received]:
        now = self.clock()
        timeout = self.visibility_timeout if visibility_timeout is None else visibility_timeout
        # One random part per receive: the id prefix finds the row, and a
        # later receive of the message gives it another random part, so a
        # receipt from an earlier receive is stale. (Per message it would be
        # one os.urandom call each, letting go of the GIL every time.)
        token = secrets.token_hex(8)
        out: list[Received] = []
        with self._transaction():
            # Messages buried on the way leave room: select again until full.
            while len(out) < max_messages:
                rows = self._visible(now, max_messages - len(out))
                if not rows:
                    break
                taken = []
                for message_id, body, count, last_error in rows:
                    if count >= self.max_receives:
                        reason = last_error or f"received {count} times without being deleted"
                        self._bury(message_id, reason, now)
                        continue
                    try:
                        envelope = Envelope.from_json(body)
                    except (ValueError, KeyError, TypeError) as e:
                        # Would fail the same way on every receive: no retries.
                        self._bury(message_id, f"undecodable envelope: {e}", now)
                        continue
                    taken.append(message_id)
                    out.append(Received(message_id, f"{message_id}:{token}", envelope, count + 1))
                self._take(taken, now + timeout, token)
        return out

    def _visible(self, now: float, limit: int) -> list[tuple[int, bytes, int, str | None]]:
        """The next *limit* visible messages: (id, body, receive count, last error)."""
        if not self._json_each:
            return self.db.execute(
                "SELECT id, body, receive_count, last_error FROM messages "
                "WHERE visible_at <= ? ORDER BY id LIMIT ?", (now, limit)).fetchall()
        # The whole batch as one JSON text, so one step of one statement:
        # the sqlite3 module lets go of the GIL for every step (every row
        # fetched) and then waits to get it back from the busy processor
        # thread. Bodies travel as hex, whatever bytes they hold.
        (batch,) = self.db.execute(
            "SELECT json_group_array(json_array(id, hex(body), receive_count, last_error)) "
            "FROM (SELECT id, body, receive_count, last_error FROM messages "
            "WHERE visible_at <= ? ORDER BY id LIMIT ?)", (now, limit)).fetchone()
        rows = orjson.loads(batch)
        rows.sort()  # by id (an aggregate's order is not promised)
        fromhex = bytes.fromhex
        return [(message_id, fromhex(body), count, last_error)
                for message_id, body, count, last_error in rows]

    def _take(self, ids: list[int], visible_at: float, token: str) -> None:
        """Hide received messages until *visible_at* with receipts ``id:token``."""
        if not ids:
            return
        if self._json_each:
            self.db.execute(
                "UPDATE messages SET visible_at = ?, receive_count = receive_count + 1, "
                "receipt = id || ':' || ? WHERE id IN (SELECT value FROM json_each(?))",
                (visible_at, token, orjson.dumps(ids)))
            return
        self.db.executemany(
            "UPDATE messages SET visible_at = ?, receive_count = receive_count + 1, "
            "receipt = ? WHERE id = ?",
            [(visible_at, f"{message_id}:{token}", message_id) for message_id in ids])

    def _bury(self, message_id: int, reason: str, now: float) -> None:
        self.db.execute(
            "INSERT INTO dead_letters (body, enqueued_at, failed_at, receive_count, reason) "
            "SELECT body, enqueued_at, ?, receive_count, ? FROM messages WHERE id = ?",
            (now, reason, message_id))
        self.db.execute("DELETE FROM messages WHERE id = ?", (message_id,))

    def delete(self, receipts: Iterable[str]) -> int:
        receipts = list(receipts)
        if not receipts:
            return 0
        if self._json_each:
            # One statement, one step (see _visible). A receipt names its
            # row: the ids find the rows, the receipts must match exactly.
            return self.db.execute(
                "DELETE FROM messages WHERE id IN (SELECT value FROM json_each(?)) "
                "AND receipt IN (SELECT value FROM json_each(?))",
                (orjson.dumps([_receipt_id(r) for r in receipts]), orjson.dumps(receipts))
            ).rowcount
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
        # Counted on the (visible_at, id) index, not by reading every row.
        visible, in_flight, dead = self.db.execute(
            "SELECT (SELECT COUNT(*) FROM messages WHERE visible_at <= ?), "
            "(SELECT COUNT(*) FROM messages WHERE visible_at > ?), "
            "(SELECT COUNT(*) FROM dead_letters)", (now, now)).fetchone()
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
        return [DeadLetter(i, _envelope_or_none(body), reason, count, enqueued, failed, body)
                for i, body, reason, count, enqueued, failed in rows]

    def replay(self, ids: list | None = None) -> int:
        where, args = ("", ()) if ids is None else (
            f"WHERE id IN ({','.join('?' * len(ids))})", tuple(ids))
        with self._transaction():
            # A fresh row: receive count 0, at the back of the queue.
            self.db.execute(
                "INSERT INTO messages (body, enqueued_at, visible_at) "
                f"SELECT body, enqueued_at, 0 FROM dead_letters {where} ORDER BY id", args)
            return self.db.execute(f"DELETE FROM dead_letters {where}", args).rowcount

    def _transaction(self) -> "_Transaction":
        return _Transaction(self.db)


class _Transaction:
    """``BEGIN IMMEDIATE`` ... ``COMMIT``, or ``ROLLBACK`` on error.

    IMMEDIATE takes the write lock up front, so a concurrent writer (the
    CLI replaying dead letters) waits for busy_timeout instead of failing
    half-way through with SQLITE_BUSY on lock upgrade.
    """

    def __init__(self, db: sqlite3.Connection):
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, kind, value, traceback) -> bool:
        if kind is None:
            try:
                self.db.execute("COMMIT")
            except sqlite3.Error:
                # A failed COMMIT leaves the transaction open: end it, or
                # every later BEGIN fails too.
                if self.db.in_transaction:
                    self.db.execute("ROLLBACK")
                raise
        elif self.db.in_transaction:
            self.db.execute("ROLLBACK")
        return False


def _receipt_id(receipt: str) -> int:
    try:
        return int(receipt.partition(":")[0])
    except ValueError:
        return -1


def _envelope_or_none(body: bytes) -> Envelope | None:
    try:
        return Envelope.from_json(body)
    except (ValueError, KeyError, TypeError):
        return None


class SQLiteQueue(EnvelopeQueue):
    """The store on a thread of its own, with group commit for puts."""

    def __init__(self, path: str | Path, reactor, *, synchronous: str = "full",
                 max_receives: int = 5, visibility_timeout: float = 30.0,
                 max_pending: int = 20000, max_batch: int = 2000, retry_after: int = 5,
                 clock: Callable[[], float] = time.time):
        self.path = Path(path)
        self.reactor = reactor
        self._store_options = dict(synchronous=synchronous, max_receives=max_receives,
                                   visibility_timeout=visibility_timeout, clock=clock)
        self.max_pending = max_pending
        self.max_batch = max_batch
        self.retry_after = retry_after
        self._store: SQLiteQueueStore | None = None
        self._pool: ThreadPool | None = None
        self._closing = False
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
        self._closing = False
        self._pool = ThreadPool(1, 1, name=f"sense-queue-sqlite {self.path.name}")
        self._pool.start()
        # One worker thread runs tasks in order: the store opens before any
        # put or receive reaches it. Were it to fail, each of those fails
        # (puts with Unavailable) instead of hanging.
        deferToThreadPool(self.reactor, self._pool, self._open).addErrback(
            lambda f: log.failure("cannot open the queue {path}", f, path=str(self.path)))

    def _open(self) -> None:
        self._store = self.open_store()

    def stopService(self) -> Deferred[None]:
        super().stopService()  # from here on puts are refused
        pool = self._pool
        if pool is None:
            return succeed(None)

        def close(_: object) -> Deferred[None]:
            self._closing = True
            return deferToThreadPool(self.reactor, pool, self._close)

        def stop(result: object) -> None:
            if isinstance(result, Failure):
                log.failure("closing the queue {path} failed", result, path=str(self.path))
            self._pool = None
            pool.stop()

        # Pending puts were promised a commit: write them, then close (work
        # already handed to the thread runs before the close, in order).
        return self._until_idle().addCallback(close).addBoth(stop)

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

    def _in_thread(self, method: str, *args) -> Deferred:
        if self._pool is None or self._closing:
            # A stopped pool silently drops work: that would be a Deferred
            # that never fires.
            return fail(Unavailable("queue stopped", max_age=self.retry_after))
        return deferToThreadPool(self.reactor, self._pool, self._call_store, method, *args)

    def _call_store(self, method: str, *args):
        if self._store is None:
            raise RuntimeError(f"queue {self.path} is not open")
        return getattr(self._store, method)(*args)

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
            done(Unavailable("queue stopped", max_age=self.retry_after))
            return
        if not envelopes:
            done(None)
            return
        if self._pending_count + len(envelopes) > self.max_pending:
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
        self._in_thread("put_many", bodies).addBoth(self._committed, batch)

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
            log.failure("queue {path}: commit of {count} envelopes ({puts} puts) failed",
                        result, path=str(self.path), count=sum(len(b) for b, _ in batch),
                        puts=len(batch))
            error = Unavailable("queue write failed", max_age=self.retry_after)
            for _, done in batch:
                self._notify(done, error)
        else:
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
        return self._in_thread("receive", max_messages, visibility_timeout)

    def delete(self, receipts: list[str]) -> Deferred[int]:
        return self._in_thread("delete", list(receipts))

    def release(self, receipt: str, reason: str, delay: float = 0.0) -> Deferred[None]:
        return self._in_thread("release", receipt, reason, delay)

    def depth(self) -> Deferred[dict[str, int]]:
        return self._in_thread("depth")

    def dead_letters(self, limit: int = 100) -> Deferred[list[DeadLetter]]:
        return self._in_thread("dead_letters", limit)

    def replay(self, ids: list | None = None) -> Deferred[int]:
        return self._in_thread("replay", None if ids is None else list(ids))


def make_sqlite_queue(config, reactor) -> SQLiteQueue:
    """The ``sqlite`` backend's factory: ``factory(config, reactor)``."""
    path = config.queue_path
    q = config.queue
    try:
        # Fail start-up here, naming the key, rather than on the first put.
        # (Before the reactor runs, so opening on this thread blocks no one.)
        SQLiteQueueStore(path, synchronous=q.synchronous).close()
    except (sqlite3.Error, OSError) as e:
        raise ConfigError(f"queue.path: cannot open {path}: {e}") from None
    return SQLiteQueue(path, reactor, synchronous=q.synchronous, max_receives=q.max_receives,
                       visibility_timeout=q.visibility_timeout, max_pending=q.max_pending,
                       max_batch=q.max_batch, retry_after=q.retry_after)


@hookimpl
def sense_register_queues():
    return {"sqlite": make_sqlite_queue}
