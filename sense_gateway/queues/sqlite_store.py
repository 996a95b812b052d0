"""The embedded queue's file, synchronously: :class:`SQLiteQueueStore`.

One connection used from one thread; the queue service
(:mod:`sense_gateway.queues.sqlite`) runs it on its own thread, the CLI
and tests use it directly.

It needs SQLite's JSON functions (``json_each``, ``json_group_array``;
built in since SQLite 3.38): a batch is one statement over a JSON array,
so the writing thread takes the GIL back once per batch, not once per
row. A SQLite without them fails the open with
:class:`MissingJSONFunctions`, naming the problem, rather than running a
slower second body of code that nothing tests.
"""

from __future__ import annotations

import secrets
import sqlite3
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import orjson
from twisted.logger import Logger

from sense_gateway.envelope import Envelope
from sense_gateway.queues import DeadLetter, Received
from sense_gateway.queues.sqlite_holders import Holders

log = Logger()

_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY,
    body BLOB NOT NULL,
    enqueued_at REAL NOT NULL,
    visible_at REAL NOT NULL,
    receive_count INTEGER NOT NULL DEFAULT 0,
    receipt TEXT,
    last_error TEXT,
    -- the holder (sqlite_holders) that received it and has not let go
    held_by TEXT
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

#: seconds a count of the waiting messages is trusted: another process
#: (a processor of its own, the CLI) may have taken some out or put back
RECOUNT_INTERVAL = 1.0

#: seconds between looks for messages held by a processor that is gone
#: (the first receive looks at once)
RECLAIM_INTERVAL = 5.0

class MissingJSONFunctions(sqlite3.NotSupportedError):
    """This SQLite cannot run the JSON functions the queue's statements use."""


def require_json_functions(db: sqlite3.Connection) -> None:
    """Raise :class:`MissingJSONFunctions` unless *db* runs ``json_each``."""
    try:
        db.execute("SELECT count(*) FROM json_each('[]')").fetchone()
    except sqlite3.DatabaseError as e:
        raise MissingJSONFunctions(
            f"SQLite {sqlite3.sqlite_version} cannot run json_each ({e}): the queue needs "
            "SQLite's JSON functions (built in since 3.38; a build without "
            "SQLITE_OMIT_JSON)") from None


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
        self.db = self.open_connection()
        try:
            # Set before anything else: busy_timeout covers the WAL switch too,
            # which another open connection (the CLI) can make wait.
            self.db.execute(f"PRAGMA busy_timeout={int(busy_timeout * 1000)}")
            # Reads the file's header: a file that is no database (or is
            # damaged) fails here as such, not as a SQLite without JSON
            # functions below.
            self.db.execute("PRAGMA schema_version").fetchone()
            # Before the file gets a schema: nothing is made that cannot be used.
            require_json_functions(self.db)
            mode = self.db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode.lower() != "wal":
                # Still correct, only slower and readers block the writer
                # (some network file systems cannot share WAL memory).
                log.warn("queue {path}: journal mode is {mode}, not WAL",
                         path=str(self.path), mode=mode)
            self.db.execute(f"PRAGMA synchronous={_SYNCHRONOUS[synchronous]}")
            self.db.executescript(_SCHEMA)
            columns = {row[1] for row in self.db.execute("PRAGMA table_info(messages)")}
            if "held_by" not in columns:  # a file from before holders were kept
                self.db.execute("ALTER TABLE messages ADD COLUMN held_by TEXT")
            self.holders = Holders(self.path)
            self._next_reclaim = 0.0
            #: messages made visible again because their holder was gone
            self.reclaimed = 0
            #: messages in the queue (not dead letters): counted now and
            #: again at least every RECOUNT_INTERVAL while puts arrive, kept
            #: up to date by this store's own changes in between
            self.waiting = 0
            self._counted_at = 0.0
            self.count_waiting()
        except BaseException:
            self.db.close()
            raise

    def open_connection(self) -> sqlite3.Connection:
        """The store's connection, in autocommit mode (tests override it)."""
        return sqlite3.connect(str(self.path), isolation_level=None)

    def close(self) -> None:
        self.db.close()
        self.holders.close()

    def count_waiting(self) -> int:
        """Count the messages in the queue again (an index scan)."""
        self.waiting = self.db.execute("SELECT COUNT(*) FROM messages").fetchone()[0]
        self._counted_at = self.clock()
        return self.waiting

    def _note_put(self, count: int, now: float) -> None:
        if now - self._counted_at >= RECOUNT_INTERVAL:
            self.count_waiting()
        else:
            self.waiting += count

    def put_many(self, bodies: Iterable[bytes]) -> None:
        """Append envelope documents (UTF-8 JSON, as :meth:`Envelope.to_json`
        makes them), all in one transaction."""
        now = self.clock()
        texts = [body.decode("utf-8") for body in bodies]
        # One statement in autocommit mode is one transaction, and one step:
        # the sqlite3 module lets go of the GIL and must take it back from
        # the busy reactor thread once per step, not once per row
        # (executemany) or per BEGIN and COMMIT. A writing statement takes
        # the write lock as it starts, as BEGIN IMMEDIATE would.
        self.db.execute(
            "INSERT INTO messages (body, enqueued_at, visible_at) "
            "SELECT CAST(value AS BLOB), ?, 0 FROM json_each(?) ORDER BY key",
            (now, orjson.dumps(texts)))
        self._note_put(len(texts), now)

    def receive(self, max_messages: int, visibility_timeout: float | None = None) -> list[Received]:
        now = self.clock()
        timeout = self.visibility_timeout if visibility_timeout is None else visibility_timeout
        # One random part per receive: the id prefix finds the row, and a
        # later receive of the message gives it another random part, so a
        # receipt from an earlier receive is stale. (Per message it would be
        # one os.urandom call each, letting go of the GIL every time.)
        token = secrets.token_hex(8)
        if now >= self._next_reclaim:
            self._reclaim(now)
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

    def _reclaim(self, now: float) -> int:
        """Make the messages of holders that are gone (a processor killed
        with a batch in hand) visible again, now instead of after the
        visibility timeout; how many. Their receive still counts."""
        first = self._next_reclaim == 0.0
        self._next_reclaim = now + RECLAIM_INTERVAL
        names = [name for (name,) in self.db.execute(
            "SELECT DISTINCT held_by FROM messages WHERE visible_at > ? AND held_by IS NOT NULL",
            (now,))]
        gone = self.holders.gone(names)
        if first:
            self.holders.sweep()  # files of holders whose messages were all deleted
        count = 0
        for name in gone:
            with self._transaction():
                count += self.db.execute(
                    "UPDATE messages SET visible_at = ?, held_by = NULL "
                    "WHERE held_by = ? AND visible_at > ?", (now, name, now)).rowcount
        if count:
            log.info("queue {path}: {count} messages held by a processor that stopped "
                     "are visible again", path=str(self.path), count=count)
        self.reclaimed += count
        return count

    def _visible(self, now: float, limit: int) -> list[tuple[int, bytes, int, str | None]]:
        """The next *limit* visible messages: (id, body, receive count, last error)."""
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
        self.db.execute(
            "UPDATE messages SET visible_at = ?, receive_count = receive_count + 1, "
            "receipt = id || ':' || ?, held_by = ? WHERE id IN (SELECT value FROM json_each(?))",
            (visible_at, token, self.holders.name, orjson.dumps(ids)))

    def _bury(self, message_id: int, reason: str, now: float, receipt: str | None = None) -> int:
        """Move one message to the dead letters (only if it still has
        *receipt*, when given); how many moved."""
        condition, args = ("id = ?", (message_id,)) if receipt is None else (
            "id = ? AND receipt = ?", (message_id, receipt))
        self.db.execute(
            "INSERT INTO dead_letters (body, enqueued_at, failed_at, receive_count, reason) "
            f"SELECT body, enqueued_at, ?, receive_count, ? FROM messages WHERE {condition}",
            (now, reason, *args))
        moved = self.db.execute(f"DELETE FROM messages WHERE {condition}", args).rowcount
        self.waiting -= moved
        return moved

    def dead_letter(self, receipt: str, reason: str) -> int:
        """Move a received message to the dead letters at once, with
        *reason* (a server refused it: retrying cannot help)."""
        with self._transaction():
            return self._bury(_receipt_id(receipt), reason, self.clock(), receipt)

    def delete(self, receipts: Iterable[str]) -> int:
        receipts = list(receipts)
        if not receipts:
            return 0
        # One statement, one step (see _visible). A receipt names its row:
        # the ids find the rows, the receipts must match exactly.
        deleted = self.db.execute(
            "DELETE FROM messages WHERE id IN (SELECT value FROM json_each(?)) "
            "AND receipt IN (SELECT value FROM json_each(?))",
            (orjson.dumps([_receipt_id(r) for r in receipts]), orjson.dumps(receipts))
        ).rowcount
        self.waiting -= deleted
        return deleted

    def release(self, receipt: str, reason: str, delay: float = 0.0) -> None:
        with self._transaction():
            self.db.execute(
                "UPDATE messages SET visible_at = ?, last_error = ?, held_by = NULL "
                "WHERE id = ? AND receipt = ?",
                (self.clock() + delay, reason, _receipt_id(receipt), receipt))

    def postpone(self, receipts: Iterable[str], reason: str, delay: float = 0.0) -> None:
        """Give messages back like :meth:`release`, but this receive does not
        count towards ``max_receives``: a sink or the registry was
        unavailable, which is no fault of theirs."""
        rows = [(self.clock() + delay, reason, _receipt_id(r), r) for r in receipts]
        with self._transaction():
            self.db.executemany(
                "UPDATE messages SET visible_at = ?, last_error = ?, held_by = NULL, "
                "receive_count = max(receive_count - 1, 0) WHERE id = ? AND receipt = ?", rows)

    def depth(self) -> dict[str, int]:
        now = self.clock()
        # Counted on the (visible_at, id) index, not by reading every row.
        visible, in_flight, dead = self.db.execute(
            "SELECT (SELECT COUNT(*) FROM messages WHERE visible_at <= ?), "
            "(SELECT COUNT(*) FROM messages WHERE visible_at > ?), "
            "(SELECT COUNT(*) FROM dead_letters)", (now, now)).fetchone()
        self.waiting, self._counted_at = visible + in_flight, now
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
            moved = self.db.execute(f"DELETE FROM dead_letters {where}", args).rowcount
        self.waiting += moved
        return moved

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
