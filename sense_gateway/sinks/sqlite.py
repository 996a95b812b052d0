"""Built-in plugin: the ``sqlite`` metric sink, the embedded readings store.

Enabled by default (``sinks.enabled = ["sqlite"]``): a newcomer gets a
queryable history without any server, and the built-in dashboard reads
it. One row per (device, measurement, field, timestamp); writing a point
again replaces it. Rows older than ``store.retention_days`` (default 7)
are deleted as new ones arrive.

Configuration (``[store]``): ``path`` (default
``<data_dir>/readings.sqlite3``), ``retention_days``.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

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
    PRIMARY KEY (device, measurement, field, time_ns)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS readings_time ON readings (time_ns);
"""

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
        self.db.executescript(_SCHEMA)

    def write(self, points: list[MetricPoint]) -> None:
        rows = []
        for point in points:
            device = point.tags.get("device", "")
            for field, value in point.fields.items():
                if isinstance(value, str):
                    rows.append((device, point.measurement, field, point.time_ns, None, value))
                else:
                    rows.append((device, point.measurement, field, point.time_ns, float(value), None))
        try:
            self.db.execute("BEGIN IMMEDIATE")
            self.db.executemany("INSERT OR REPLACE INTO readings VALUES (?, ?, ?, ?, ?, ?)", rows)
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
              measurement: str | None = None) -> list[tuple[int, float | str]]:
        """(time_ns, value) of one device's field, oldest first."""
        sql = ("SELECT time_ns, COALESCE(value, text) FROM readings "
               "WHERE device = ? AND field = ? AND time_ns >= ?")
        args: list = [device, field, since_ns]
        if measurement is not None:
            sql += " AND measurement = ?"
            args.append(measurement)
        return list(self.db.execute(sql + " ORDER BY time_ns", args))

    def series(self, device: str, since_ns: int = 0, limit: int = 5000
               ) -> dict[str, list[tuple[int, float]]]:
        """Every numeric field of one device's readings since *since_ns*, for
        the dashboard: ``{field: [(time_ns, value), ...]}``, oldest first, at
        most the newest *limit* points per field. The device's own counters
        (``sense_device``) are left out."""
        fields = [f for (f,) in self.db.execute(
            "SELECT DISTINCT field FROM readings WHERE device = ? AND time_ns >= ? "
            "AND value IS NOT NULL AND measurement != 'sense_device' ORDER BY field",
            (device, since_ns))]
        out = {}
        for field in fields:
            rows = self.db.execute(
                "SELECT time_ns, value FROM readings WHERE device = ? AND field = ? "
                "AND time_ns >= ? AND value IS NOT NULL AND measurement != 'sense_device' "
                "ORDER BY time_ns DESC LIMIT ?", (device, field, since_ns, limit)).fetchall()
            rows.reverse()
            out[field] = rows
        return out

    def close(self) -> None:
        self.db.close()


@hookimpl
def sense_register_sinks():
    return {"sqlite": lambda config: SQLiteStore(config.store_path, config.store.retention_days)}
