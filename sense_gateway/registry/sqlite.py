"""Built-in plugin: the embedded device registry, an SQLite file.

The default registry (``registry.backend = "sqlite"``) for one machine;
``registry.path`` defaults to ``<data_dir>/registry.sqlite3``. Each device
row holds its first and last contact, last source address, sequence
state and counters (received, duplicates, lost, resets, unsequenced),
its newest inter-arrival times (comma-separated seconds) and the
reporting interval set by hand, if any (``sense devices set``).
The sequence state is the last number, its boot counter, a 64-bit window
(16 hex digits) and 65 content digests of 4 bytes (a 260-byte blob):
about 300 bytes per device besides the counters and the 32 envelope ids
kept to recognise redeliveries.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterable
from pathlib import Path

import orjson

from sense_gateway.hookspecs import hookimpl
from sense_gateway.registry import DeviceRecord, DeviceRegistry
from sense_gateway.sequence import DeviceCounters, SequenceState

_SCHEMA = """
CREATE TABLE IF NOT EXISTS devices (
    id TEXT PRIMARY KEY,
    first_seen REAL NOT NULL,
    last_seen REAL NOT NULL,
    last_source TEXT NOT NULL,
    last_seq INTEGER,
    window TEXT NOT NULL,
    received INTEGER NOT NULL,
    duplicates INTEGER NOT NULL,
    lost INTEGER NOT NULL,
    resets INTEGER NOT NULL,
    unsequenced INTEGER NOT NULL,
    recent TEXT NOT NULL,
    version INTEGER NOT NULL,
    digests BLOB NOT NULL DEFAULT x'',
    boot INTEGER,
    intervals TEXT NOT NULL DEFAULT '',
    interval REAL
)
"""

#: columns added since the first schema: a registry file written by an
#: earlier version gets them when it is opened (its devices' numbers then
#: have no digests yet, and are judged as before until they do)
_ADDED = {"digests": "BLOB NOT NULL DEFAULT x''", "boot": "INTEGER",
          "intervals": "TEXT NOT NULL DEFAULT ''", "interval": "REAL"}

_COLUMNS = ("id, first_seen, last_seen, last_source, last_seq, window, digests, boot, received, "
            "duplicates, lost, resets, unsequenced, recent, intervals, interval, version")


def _record(row) -> DeviceRecord:
    (device, first, last, source, last_seq, window, digests, boot, received, duplicates, lost,
     resets, unsequenced, recent, intervals, interval, version) = row
    counters = DeviceCounters(received, duplicates, lost, resets, unsequenced)
    return DeviceRecord(device, first, last, source,
                        SequenceState(last_seq, int(window, 16), counters, bytes(digests), boot),
                        tuple(orjson.loads(recent)), version,
                        tuple(float(i) for i in intervals.split(",")) if intervals else (),
                        interval)


_dumps = orjson.dumps


def _row(record: DeviceRecord, *key) -> tuple:
    """The columns of *record* from first_seen to interval, then *key*."""
    state = record.state
    c = state.counters
    # The window is 64 unsigned bits; SQLite integers are signed, so hex.
    # The intervals are comma-separated: orjson's list without brackets
    # (the shortest text that reads back as the same float, as repr's).
    intervals = _dumps(record.intervals)[1:-1].decode()
    if "n" in intervals:  # orjson's null for a non-finite float
        intervals = ",".join(map(repr, record.intervals))
    return (record.first_seen, record.last_seen, record.last_source, state.last_seq,
            format(state.window, "x"), state.digests, state.boot, c.received, c.duplicates,
            c.lost, c.resets, c.unsequenced, _dumps(record.recent).decode(), intervals,
            record.interval, *key)


#: records kept in memory between batches (about 2.5 KB each)
CACHE_ENTRIES = 10_000

_INSERT = (f"INSERT OR IGNORE INTO devices ({_COLUMNS}) "
           "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 1)")
_UPDATE = ("UPDATE devices SET first_seen = ?, last_seen = ?, last_source = ?, "
           "last_seq = ?, window = ?, digests = ?, boot = ?, received = ?, duplicates = ?, "
           "lost = ?, resets = ?, unsequenced = ?, recent = ?, intervals = ?, interval = ?, "
           "version = version + 1 "
           "WHERE id = ? AND version = ?")


class SQLiteRegistry(DeviceRegistry):
    """The registry file. Records this object committed are kept in memory
    (at most ``cache_entries``) and used again while the stored version is
    still theirs: a batch then reads one small column per device instead
    of whole rows, and another writer of the same file is still noticed."""

    def __init__(self, path: str | Path, cache_entries: int = CACHE_ENTRIES):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA busy_timeout=5000")
        self.db.execute(_SCHEMA)
        present = {row[1] for row in self.db.execute("PRAGMA table_info(devices)")}
        for column, definition in _ADDED.items():
            if column not in present:
                self.db.execute(f"ALTER TABLE devices ADD COLUMN {column} {definition}")
        self.cache_entries = cache_entries
        self._cache: dict[str, DeviceRecord] = {}

    def load(self, device_ids: Iterable[str]) -> dict[str, DeviceRecord]:
        ids = list(device_ids)
        records = {}
        cache = self._cache
        for start in range(0, len(ids), 500):
            chunk = ids[start:start + 500]
            marks = ",".join("?" * len(chunk))
            stale = []
            for device, version in self.db.execute(
                    f"SELECT id, version FROM devices WHERE id IN ({marks})", chunk):
                cached = cache.get(device)
                if cached is not None and cached.version == version:
                    records[device] = cached
                else:
                    stale.append(device)
            for begin in range(0, len(stale), 500):
                part = stale[begin:begin + 500]
                rows = self.db.execute(
                    f"SELECT {_COLUMNS} FROM devices WHERE id IN ({','.join('?' * len(part))})",
                    part)
                records.update((row[0], _record(row)) for row in rows)
        return records

    def commit(self, records: list[DeviceRecord]) -> set[str]:
        new = [r for r in records if r.version == 0]
        old = [r for r in records if r.version != 0]

        def all_at_once() -> set[str] | None:
            # Most batches conflict with nobody: one statement for all, and
            # row by row only if the total says some record lost.
            for sql, rows in ((_INSERT, [(r.id, *_row(r)) for r in new]),
                              (_UPDATE, [_row(r, r.id, r.version) for r in old])):
                if rows and self.db.executemany(sql, rows).rowcount != len(rows):
                    return None
            return set()

        def one_by_one() -> set[str]:
            lost = set()
            for record in records:
                if record.version == 0:
                    cursor = self.db.execute(_INSERT, (record.id, *_row(record)))
                else:
                    cursor = self.db.execute(_UPDATE, _row(record, record.id, record.version))
                if cursor.rowcount != 1:
                    lost.add(record.id)
            return lost

        lost = self._in_transaction(all_at_once)
        if lost is None:
            lost = self._in_transaction(one_by_one)
        self._remember(records, lost)
        return lost

    def _in_transaction(self, write: Callable[[], set[str] | None]) -> set[str] | None:
        """*write* in one immediate transaction, committed unless it returns None."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            lost = write()
            self.db.execute("ROLLBACK" if lost is None else "COMMIT")
        except BaseException:
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            raise
        return lost

    def _remember(self, records: list[DeviceRecord], lost: set[str]) -> None:
        cache = self._cache
        pop = cache.pop
        for record in records:
            device = record.id
            pop(device, None)  # re-inserted: newest last
            if device not in lost:
                cache[device] = DeviceRecord(device, record.first_seen, record.last_seen,
                                             record.last_source, record.state, record.recent,
                                             record.version + 1, record.intervals,
                                             record.interval)
        while len(cache) > self.cache_entries:
            del cache[next(iter(cache))]

    def devices(self) -> list[DeviceRecord]:
        return [_record(row) for row in
                self.db.execute(f"SELECT {_COLUMNS} FROM devices ORDER BY id")]

    def count(self) -> int:
        return self.db.execute("SELECT count(*) FROM devices").fetchone()[0]

    def set_interval(self, device: str, seconds: float | None) -> bool:
        cursor = self.db.execute("UPDATE devices SET interval = ?, version = version + 1 "
                                 "WHERE id = ?", (seconds, device))
        self._cache.pop(device, None)
        return cursor.rowcount == 1

    def close(self) -> None:
        self.db.close()


@hookimpl
def sense_register_registries():
    return {"sqlite": lambda config: SQLiteRegistry(config.registry_path)}
