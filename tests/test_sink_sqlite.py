"""The embedded readings store (``sinks.enabled = ["sqlite"]``): its key,
its upgrade from an older file, and a full disk."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from sense_gateway.envelope import Envelope, Reading, new_envelope_id
from sense_gateway.processor import BatchProcessor, Outcome
from sense_gateway.registry.sqlite import SQLiteRegistry
from sense_gateway.sinks import MetricPoint, SinkError
from sense_gateway.sinks.sqlite import SQLiteStore

T0 = 1764300000.0


def tagged(seq: int, **readings_by_probe) -> Envelope:
    """One envelope whose readings, all at T0, differ only in the tag ``probe``."""
    return Envelope(new_envelope_id(), "node-t", seq, T0, "[::1]:5683", "coap", None, "/data", 50,
                    [Reading({"t": value}, T0, "sense", {"probe": probe})
                     for probe, value in readings_by_probe.items()])


class StoreKeyTests(SynchronousTestCase):
    def setUp(self):
        self.path = Path(self.mktemp()).resolve()
        self.store = SQLiteStore(self.path / "readings.sqlite3", retention_days=36500)
        self.addCleanup(self.store.close)

    def test_two_tagged_series_at_one_timestamp_are_both_kept(self):
        registry = SQLiteRegistry(self.path / "registry.sqlite3")
        self.addCleanup(registry.close)
        processor = BatchProcessor(registry, [self.store], clock=lambda: T0 + 60)
        [result] = processor.process_batch([tagged(1, a=21.5, b=30.25)])
        self.assertEqual(result.outcome, Outcome.WRITTEN)
        t0 = int(T0 * 1e9)
        self.assertEqual(self.store.query("node-t", "t"), [(t0, 21.5), (t0, 30.25)])
        self.assertEqual(self.store.query("node-t", "t", tags={"probe": "b"}), [(t0, 30.25)])
        self.assertEqual(self.store.query("node-t", "t", tags={"probe": "b", "device": "node-t"}),
                         [(t0, 30.25)])
        self.assertEqual(self.store.series("node-t"),
                         {"t{probe=a}": [(t0, 21.5)], "t{probe=b}": [(t0, 30.25)]})

    def test_the_same_point_written_again_replaces_itself(self):
        point = MetricPoint("sense", {"device": "d", "room": "x"}, {"t": 1.0}, 5)
        self.store.write([point])
        self.store.write([MetricPoint("sense", {"room": "x", "device": "d"}, {"t": 2.0}, 5)])
        self.assertEqual(self.store.query("d", "t"), [(5, 2.0)])

    def test_untagged_readings_keep_plain_field_names(self):
        self.store.write([MetricPoint("sense", {"device": "d"}, {"t": 1.0}, 5)])
        self.assertEqual(self.store.series("d"), {"t": [(5, 1.0)]})
        self.assertEqual(self.store.query("d", "t", tags={}), [(5, 1.0)])

    def test_a_store_from_before_tags_in_the_key_is_upgraded_keeping_its_rows(self):
        old_path = self.path / "old.sqlite3"
        old = sqlite3.connect(old_path)
        old.executescript("""
            CREATE TABLE readings (device TEXT NOT NULL, measurement TEXT NOT NULL,
                field TEXT NOT NULL, time_ns INTEGER NOT NULL, value REAL, text TEXT,
                PRIMARY KEY (device, measurement, field, time_ns)) WITHOUT ROWID;
            CREATE INDEX readings_time ON readings (time_ns);
            INSERT INTO readings VALUES ('d', 'sense', 't', 5, 1.5, NULL);
        """)
        old.close()
        store = SQLiteStore(old_path, retention_days=36500)
        self.addCleanup(store.close)
        store.write([MetricPoint("sense", {"device": "d", "probe": "a"}, {"t": 9.0}, 5)])
        self.assertEqual(store.query("d", "t"), [(5, 1.5), (5, 9.0)])
        self.assertEqual([row[0] for row in store.db.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table'")], ["readings"])


class FullDiskTests(SynchronousTestCase):
    def test_a_full_file_fails_like_a_server_that_is_down_then_recovers(self):
        store = SQLiteStore(Path(self.mktemp()).resolve() / "readings.sqlite3",
                            retention_days=36500)
        self.addCleanup(store.close)
        pages = store.db.execute("PRAGMA page_count").fetchone()[0]
        # No page more for this file: SQLite answers "database or disk is full".
        store.db.execute(f"PRAGMA max_page_count = {pages}")
        points = [MetricPoint("sense", {"device": f"d{i}"}, {"t": float(i)}, i * 1000)
                  for i in range(2000)]
        error = self.assertRaises(SinkError, store.write, points)
        self.assertTrue(error.retryable)
        self.assertIn("full", str(error))
        self.assertEqual(store.query("d1", "t"), [])
        store.db.execute("PRAGMA max_page_count = 1000000")
        store.write(points)
        self.assertEqual(store.query("d1", "t"), [(1000, 1.0)])
