"""Built-in plugin: the ``sqlite`` metric sink, the embedded readings store.

Enabled by default (``sinks.enabled = ["sqlite"]``): a newcomer gets a
queryable history without any server, and the built-in dashboard reads
it. One row per (device, measurement, tags, field, timestamp), so two
readings that differ only in their tags are both kept, each value with
its unit when the device named one; writing a point again replaces it. Rows older than ``store.retention_days`` (default 7)
are deleted as new ones arrive. A full disk fails the write like a
server that is down: the readings stay in the queue and are written once
there is room.

Configuration (``[store]``): ``path`` (default
``<data_dir>/readings.sqlite3``), ``retention_days``.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import orjson

from sense_gateway.hookspecs import hookimpl
from sense_gateway.sinks import MetricPoint, MetricSink, SinkError

_SCHEMA = """
CREATE TABLE IF NOT EXISTS readings (
    device TEXT NOT NULL,
    measurement TEXT NOT NULL,
    field TEXT NOT NULL,
    time_ns INTEGER NOT NULL,
    value REAL,
    text TEXT,
    -- the reading's tags but device, as sorted JSON; '' for none
    tags TEXT NOT NULL DEFAULT '',
    -- the field's unit as the device named it (SenML's Cel), if it did
    unit TEXT,
    PRIMARY KEY (device, measurement, field, tags, time_ns)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS readings_time ON readings (time_ns);
"""

# A store from before tags were part of the key: its rows move to a table
# with the new key, in one transaction, the first time it is opened.
_UPGRADE = """
BEGIN IMMEDIATE;
ALTER TABLE readings RENAME TO readings_untagged;
DROP INDEX IF EXISTS readings_time;
{schema}
INSERT INTO readings (device, measurement, field, time_ns, value, text)
    SELECT device, measurement, field, time_ns, value, text FROM readings_untagged;
DROP TABLE readings_untagged;
COMMIT;
"""


def tags_key(tags: dict[str, str]) -> str:
    """The store's text for a point's tags, the device's left out."""
    if len(tags) == 1 and "device" in tags:
        return ""  # nearly every point: nothing to encode
    others = {k: v for k, v in tags.items() if k != "device"}
    return orjson.dumps(others, option=orjson.OPT_SORT_KEYS).decode() if others else ""


def _series_name(field: str, tags: str) -> str:
    if not tags:
        return field
    pairs = ",".join(f"{k}={v}" for k, v in orjson.loads(tags).items())
    return f"{field}{{{pairs}}}"


#: seconds between retention sweeps
SWEEP_INTERVAL = 60.0


class SQLiteStore(MetricSink):
    name = "sqlite"

    def __init__(self, path: str | Path, retention_days: float = 7.0, clock=time.time):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.retention = retention_days * 86400
        self.clock = clock
        self._next_sweep = 0.0
        self.db = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA busy_timeout=5000")
        columns = {row[1] for row in self.db.execute("PRAGMA table_info(readings)")}
        if columns and "tags" not in columns:
            try:
                self.db.executescript(_UPGRADE.format(schema=_SCHEMA))
            except sqlite3.Error:
                if self.db.in_transaction:
                    self.db.execute("ROLLBACK")
                raise
        self.db.executescript(_SCHEMA)
        if "unit" not in {row[1] for row in self.db.execute("PRAGMA table_info(readings)")}:
            self.db.execute("ALTER TABLE readings ADD COLUMN unit TEXT")

    def write(self, points: list[MetricPoint]) -> None:
        rows = []
        for point in points:
            device = point.tags.get("device", "")
            tags = tags_key(point.tags)
            units = point.units or {}
            for field, value in point.fields.items():
                if isinstance(value, str):
                    rows.append((device, point.measurement, field, point.time_ns, None, value, tags,
                                 units.get(field)))
                else:
                    rows.append((device, point.measurement, field, point.time_ns, float(value),
                                 None, tags, units.get(field)))
        try:
            self.db.execute("BEGIN IMMEDIATE")
            self.db.executemany("INSERT OR REPLACE INTO readings "
                                "(device, measurement, field, time_ns, value, text, tags, unit) "
                                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
            now = self.clock()
            if now >= self._next_sweep:
                self.db.execute("DELETE FROM readings WHERE time_ns < ?",
                                (int((now - self.retention) * 1e9),))
                self._next_sweep = now + SWEEP_INTERVAL
            self.db.execute("COMMIT")
        except sqlite3.Error as e:
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            raise SinkError(f"sqlite store: {e}") from None

    def query(self, device: str, field: str, since_ns: int = 0,
              measurement: str | None = None,
              tags: dict[str, str] | None = None, until_ns: int | None = None,
              with_units: bool = False) -> list[tuple]:
        """(time_ns, value) of one device's field, oldest first: of every
        tag set, or only of the readings tagged exactly *tags*; with
        *with_units*, (time_ns, value, unit or None)."""
        sql = (f"SELECT time_ns, COALESCE(value, text){', unit' if with_units else ''} "
               "FROM readings WHERE device = ? AND field = ? AND time_ns >= ?")
        args: list = [device, field, since_ns]
        if until_ns is not None:
            sql += " AND time_ns <= ?"
            args.append(until_ns)
        if measurement is not None:
            sql += " AND measurement = ?"
            args.append(measurement)
        if tags is not None:
            sql += " AND tags = ?"
            args.append(tags_key(tags))
        return list(self.db.execute(sql + " ORDER BY time_ns, tags", args))

    def series(self, device: str, since_ns: int = 0, limit: int = 5000,
               until_ns: int | None = None, with_units: bool = False
               ) -> dict[str, list[tuple]]:
        """Every numeric field of one device's readings since *since_ns*, for
        the dashboard: ``{field: [(time_ns, value), ...]}``, oldest first, at
        most the newest *limit* points per field; a field of tagged readings
        is one series per tag set, named ``field{name=value,...}``. The
        device's own counters (``sense_device``) are left out. With
        *with_units* each row is (time_ns, value, unit or None)."""
        until_ns = (1 << 63) - 1 if until_ns is None else until_ns
        names = self.db.execute(
            "SELECT DISTINCT field, tags FROM readings WHERE device = ? AND time_ns >= ? "
            "AND time_ns <= ? AND value IS NOT NULL AND measurement != 'sense_device' "
            "ORDER BY field, tags", (device, since_ns, until_ns)).fetchall()
        out = {}
        unit = ", unit" if with_units else ""
        for field, tags in names:
            rows = self.db.execute(
                f"SELECT time_ns, value{unit} FROM readings WHERE device = ? AND field = ? "
                "AND tags = ? AND time_ns >= ? AND time_ns <= ? AND value IS NOT NULL "
                "AND measurement != 'sense_device' ORDER BY time_ns DESC LIMIT ?",
                (device, field, tags, since_ns, until_ns, limit)).fetchall()
            rows.reverse()
            out[_series_name(field, tags)] = rows
        return out

    def close(self) -> None:
        self.db.close()


@hookimpl
def sense_register_sinks():
    return {"sqlite": lambda config: SQLiteStore(config.store_path, config.store.retention_days)}
