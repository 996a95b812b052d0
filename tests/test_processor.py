"""The processing core against real stores: SQLite registry and readings
store, VictoriaMetrics through influxdb-client, InfluxDB 1.x."""

from __future__ import annotations

from pathlib import Path

from twisted.trial.unittest import TestCase

from sense_gateway.config import InfluxConfig
from sense_gateway.envelope import Envelope, Reading, new_envelope_id
from sense_gateway.processor import BatchProcessor, Outcome
from sense_gateway.registry.sqlite import SQLiteRegistry
from sense_gateway.sinks.influxdb import InfluxSink
from sense_gateway.sinks.sqlite import SQLiteStore
from tests.servers import InfluxDB1, VictoriaMetrics

T0 = 1764300000.0


def envelope(device="node-1", seq=1, ts=T0, **fields) -> Envelope:
    return Envelope(id=new_envelope_id(), device=device, seq=seq, received=ts,
                    source="[::1]:5683", transport="coap", identity=None, path="/data",
                    content_format=50, readings=[Reading(fields=fields or {"t": 20.0}, ts=ts)])


class ProcessorTestCase(TestCase):
    def setUp(self):
        directory = Path(self.mktemp()).resolve()
        self.registry = SQLiteRegistry(directory / "registry.sqlite3")
        self.store = SQLiteStore(directory / "readings.sqlite3", retention_days=36500)
        self.vm = VictoriaMetrics(self)
        self.influx = InfluxSink(InfluxConfig(url=self.vm.url, retries=0), sleep=lambda s: None)
        self.processor = BatchProcessor(self.registry, [self.store, self.influx], clock=lambda: T0 + 60)
        self.addCleanup(self.processor.close)

    def device(self, device_id="node-1"):
        return self.registry.load([device_id])[device_id]


class ProcessBatchTests(ProcessorTestCase):
    def test_readings_reach_every_sink_and_register_the_device(self):
        batch = [envelope(seq=1, ts=T0, t=20.5), envelope(seq=2, ts=T0 + 1, t=21),
                 envelope("node-2", seq=7, ts=T0, humidity=40)]
        self.assertEqual([r.outcome for r in self.processor.process_batch(batch)],
                         [Outcome.WRITTEN] * 3)
        self.assertEqual(self.store.query("node-1", "t"),
                         [(int(T0 * 1e9), 20.5), (int((T0 + 1) * 1e9), 21.0)])
        points = self.vm.points()
        self.assertEqual(points[("sense_t", "node-1")], {T0 * 1000: 20.5, (T0 + 1) * 1000: 21.0})
        self.assertEqual(points[("sense_humidity", "node-2")], {T0 * 1000: 40.0})
        self.assertEqual(points[("sense_device_received", "node-1")], {(T0 + 60) * 1000: 2.0})
        record = self.device()
        self.assertEqual((record.first_seen, record.last_seen, record.state.last_seq), (T0, T0 + 1, 2))

    def test_same_envelope_twice_writes_once_and_keeps_counters(self):
        e = envelope(seq=1)
        self.processor.process_batch([e])
        before = self.device()
        [result] = self.processor.process_batch([e])
        self.assertEqual((result.outcome, result.reason), (Outcome.DUPLICATE, "already processed"))
        self.assertEqual(self.device().state.counters, before.state.counters)
        self.assertEqual(len(self.store.query("node-1", "t")), 1)
        self.assertEqual(len(self.vm.points()[("sense_t", "node-1")]), 1)

    def test_device_repeating_a_number_is_counted_duplicate(self):
        self.processor.process_batch([envelope(seq=5), envelope(seq=5, ts=T0 + 1)])
        counters = self.device().state.counters
        self.assertEqual((counters.received, counters.duplicates), (1, 1))
        self.assertEqual(len(self.store.query("node-1", "t")), 1)

    def test_counters_written_as_sense_device(self):
        self.processor.process_batch([envelope(seq=1), envelope(seq=7, ts=T0 + 1),
                                      envelope(seq=7, ts=T0 + 2)])
        points = self.vm.points('{__name__=~"sense_device_.*"}')
        at = (T0 + 60) * 1000
        written = {name: values[at] for (name, _), values in points.items()}
        # The state is text, which VictoriaMetrics does not keep as such.
        written.pop("sense_device_state")
        self.assertEqual(written, {
            "sense_device_received": 2, "sense_device_lost": 5, "sense_device_duplicates": 1,
            "sense_device_resets": 0, "sense_device_unsequenced": 0,
            # seconds since the last message (received T0 + 2) when written
            "sense_device_silent": 58})


class SinkFailureTests(ProcessorTestCase):
    def test_sink_down_fails_batch_and_leaves_sequence_unseen(self):
        self.vm.stop()
        results = self.processor.process_batch([envelope(seq=1), envelope(seq=2)])
        self.assertEqual({(r.outcome, r.retryable) for r in results}, {(Outcome.FAILED, True)})
        self.assertIn("cannot reach", results[0].reason)
        self.assertEqual(self.registry.load(["node-1"]), {})

    def test_retry_after_recovery_writes_everything_once(self):
        batch = [envelope(seq=1), envelope(seq=2, ts=T0 + 1)]
        self.vm.stop()
        self.processor.process_batch(batch)
        self.vm.start()
        self.assertEqual([r.outcome for r in self.processor.process_batch(batch)],
                         [Outcome.WRITTEN] * 2)
        self.assertEqual(len(self.vm.points()[("sense_t", "node-1")]), 2)
        self.assertEqual(self.device().state.counters.received, 2)


class CountingInfluxSink(InfluxSink):
    """The real sink, counting its requests (retries are 0: one each)."""

    writes = 0

    def write(self, points):
        self.writes += 1
        return super().write(points)


class InfluxV1Tests(TestCase):
    """``api = "v1"`` against a real InfluxDB 1.x, read back with InfluxQL."""

    def setUp(self):
        self.db = InfluxDB1(self)
        directory = Path(self.mktemp()).resolve()
        self.registry = SQLiteRegistry(directory / "registry.sqlite3")
        self.sink = CountingInfluxSink(InfluxConfig(url=self.db.url, api="v1", database="sense",
                                                    retries=0))
        self.processor = BatchProcessor(self.registry, [self.sink], clock=lambda: T0 + 60)
        self.addCleanup(self.processor.close)

    def test_points_queryable_with_influxql(self):
        self.processor.process_batch([envelope(seq=1, t=20.5), envelope("node-2", seq=1, t=19)])
        rows = self.db.rows('SELECT "t" FROM "sense" GROUP BY "device"')
        self.assertEqual(sorted((r["device"], r["t"], r["time"]) for r in rows),
                         [("node-1", 20.5, T0 * 1000), ("node-2", 19.0, T0 * 1000)])
        counters = self.db.rows('SELECT "received", "lost" FROM "sense_device" GROUP BY "device"')
        self.assertEqual(sorted((r["device"], r["received"]) for r in counters),
                         [("node-1", 1), ("node-2", 1)])

    def test_one_bad_line_refuses_its_message_alone_in_the_same_round(self):
        # The field "t" is a float in InfluxDB from the first write; a
        # string for it is refused by the server (400, field type conflict).
        self.processor.process_batch([envelope(seq=1, t=20.5)])
        batch = [envelope(seq=seq, ts=T0 + seq, t=20.0 + seq / 100) for seq in range(2, 300)]
        batch[100] = envelope(seq=102, ts=T0 + 102, t="warm")
        self.sink.writes = 0
        results = self.processor.process_batch(batch)
        self.assertEqual([i for i, r in enumerate(results) if r.outcome is not Outcome.WRITTEN],
                         [100])
        self.assertEqual((results[100].outcome, results[100].retryable),
                         (Outcome.REFUSED, False))
        self.assertIn('HTTP 400: partial write: field type conflict: input field "t" on '
                      'measurement "sense" is type string', results[100].reason)
        # The refused write, then the rest again: no halving.
        self.assertEqual(self.sink.writes, 2)
        self.assertEqual(len(self.db.rows('SELECT "t" FROM "sense"')), 1 + 297)
        # Its number is not marked seen: replayed once the field is fixed,
        # it is accepted (late) and no longer counted lost.
        state = self.registry.load(["node-1"])["node-1"].state
        self.assertEqual((state.last_seq, state.counters.lost, state.counters.received),
                         (299, 1, 298))

    def test_bad_lines_of_several_messages_are_refused_together(self):
        self.processor.process_batch([envelope(seq=1, t=20.5), envelope("node-2", seq=1, on=True)])
        self.sink.writes = 0
        results = self.processor.process_batch([
            envelope(seq=2, ts=T0 + 1, t="warm"), envelope("node-2", seq=2, ts=T0 + 1, on=1.5),
            envelope("node-3", seq=1, ts=T0 + 1, t=3.0)])
        self.assertEqual([r.outcome for r in results],
                         [Outcome.REFUSED, Outcome.REFUSED, Outcome.WRITTEN])
        self.assertLessEqual(self.sink.writes, 3)

    def test_the_refused_message_is_found_among_skipped_and_many_reading_ones(self):
        first = envelope(seq=1, t=20.5)
        self.processor.process_batch([first])
        several = Envelope(new_envelope_id(), "node-2", 1, T0, "[::1]:5683", "coap", None,
                           "/data", 50, [Reading({"t": 1.0}, T0 + i) for i in range(3)])
        bad = Envelope(new_envelope_id(), "node-3", 1, T0, "[::1]:5683", "coap", None, "/data",
                       50, [Reading({"t": 2.0}, T0), Reading({"t": "warm"}, T0 + 1)])
        results = self.processor.process_batch([
            first,                                  # redelivered: skipped
            envelope(seq=1, ts=T0 + 5, t=20.5),     # same number, same content: duplicate
            several, bad, envelope("node-4", seq=1, t=4.0)])
        self.assertEqual([r.outcome for r in results],
                         [Outcome.DUPLICATE, Outcome.DUPLICATE, Outcome.WRITTEN, Outcome.REFUSED,
                          Outcome.WRITTEN])
        rows = self.db.rows('SELECT "t" FROM "sense" GROUP BY "device"')
        # InfluxDB kept the good line of the refused message (a partial
        # write): its replay writes it again, to the same point.
        self.assertEqual(sorted((r["device"], r["t"]) for r in rows),
                         [("node-1", 20.5)] + [("node-2", 1.0)] * 3 + [("node-3", 2.0),
                                                                      ("node-4", 4.0)])
        self.assertNotIn("node-3", self.registry.load(["node-3"]))

    def test_the_servers_own_parse_error_names_the_line(self):
        from sense_gateway.sinks import MetricPoint
        from tests.servers import http

        good = MetricPoint("sense", {"device": "a"}, {"t": 1.0}, 1_764_300_000_000_000_000)
        bad = MetricPoint("sense", {"device": "b"}, {"t": 2.0}, 10 ** 20)  # beyond int64
        line = self.sink.lines([bad])[0]
        status, body = http("POST", f"{self.db.url}/write?db=sense&precision=ns",
                            "\n".join(self.sink.lines([good, bad])).encode())
        self.assertEqual(status, 400)
        from sense_gateway.sinks.influxdb import _server_message

        message = _server_message(body.decode())
        self.assertIn(f"unable to parse '{line}'", message)
        self.assertEqual(self.sink.refused_points(message, [good, bad]), {1})


class InfluxRetryTests(TestCase):
    def test_unreachable_server_is_retried_with_backoff_then_reported_retryable(self):
        from sense_gateway.sinks import MetricPoint, SinkError
        from tests.servers import free_tcp_port

        slept = []
        sink = InfluxSink(InfluxConfig(url=f"http://127.0.0.1:{free_tcp_port()}", retries=3),
                          sleep=slept.append)
        self.addCleanup(sink.close)
        error = self.assertRaises(SinkError, sink.write,
                                  [MetricPoint("sense", {"device": "d"}, {"t": 1.0}, 1)])
        self.assertTrue(error.retryable)
        self.assertEqual(slept, [0.25, 0.5, 1.0])

    def test_missing_database_is_a_set_up_problem_worth_retrying(self):
        from sense_gateway.sinks import MetricPoint, SinkError

        db = InfluxDB1(self)
        slept = []
        sink = InfluxSink(InfluxConfig(url=db.url, api="v1", database="no_such_db", retries=3),
                          sleep=slept.append)
        self.addCleanup(sink.close)
        error = self.assertRaises(SinkError, sink.write,
                                  [MetricPoint("sense", {"device": "d"}, {"t": 1.0}, 1)])
        # Not the data's fault: the batch waits in the queue, not in dead letters.
        self.assertEqual((error.retryable, slept), (True, [0.25, 0.5, 1.0]))
        self.assertIn("404", str(error))


class ReadingPointTests(TestCase):
    """The points a batch becomes, built on the processor's hot path."""

    def test_fields_become_floats_and_the_device_joins_the_tags(self):
        from sense_gateway.sinks import MetricPoint, reading_points

        e = Envelope(new_envelope_id(), "node 7", 1, 1764300000.0, "[::1]:1", "coap", None,
                     "/data", 50, [Reading({"t": 21.5}, 1764300000.25),
                                   Reading({"n": 3, "on": True, "s": "x"}, 1.0000001, "m",
                                           {"room": "a"})])
        self.assertEqual(reading_points(e), [
            MetricPoint("sense", {"device": "node 7"}, {"t": 21.5}, 1764300000250000000),
            MetricPoint("m", {"room": "a", "device": "node 7"},
                        {"n": 3.0, "on": True, "s": "x"}, 1000000000),  # whole microseconds
        ])
        self.assertIs(type(reading_points(e)[1].fields["n"]), float)

    def test_line_heads_kept_between_batches_are_the_same_text(self):
        from sense_gateway.sinks import MetricPoint

        sink = InfluxSink(InfluxConfig(url="http://127.0.0.1:9"))
        self.addCleanup(sink.close)
        points = [MetricPoint("sense", {"device": "node 7,a=b"}, {"t": 1.5}, 1),
                  MetricPoint("sense_device", {"device": "node 7,a=b"}, {"received": 1}, 2)]
        first = sink.lines(points)
        self.assertEqual(first, [r"sense,device=node\ 7\,a\=b t=1.5 1",
                                 r"sense_device,device=node\ 7\,a\=b received=1i 2"])
        self.assertEqual(sink.lines(points), first)


class RefusingSink:
    """A sink whose server refuses any batch holding a string field in a
    reading (the devices' own text field ``state`` is its schema)."""

    name = "refusing"

    def __init__(self):
        self.writes = 0
        self.points = []

    def write(self, points):
        from sense_gateway.sinks import SinkError

        self.writes += 1
        if any(isinstance(v, str) for p in points if p.measurement == "sense"
               for v in p.fields.values()):
            raise SinkError("refusing: HTTP 400: field type conflict", retryable=False)
        self.points.extend(points)

    def close(self):
        pass


class PoisonSplitTests(TestCase):
    def test_a_refusal_naming_no_line_is_narrowed_down_by_halving(self):
        registry = SQLiteRegistry(Path(self.mktemp()).resolve() / "registry.sqlite3")
        sink = RefusingSink()
        processor = BatchProcessor(registry, [sink], clock=lambda: T0 + 60)
        self.addCleanup(processor.close)
        batch = [envelope(f"node-{i % 7}", seq=i // 7 + 1, ts=T0 + i, t=float(i))
                 for i in range(1024)]
        batch[300] = envelope("node-300", seq=1, ts=T0, t="warm")
        results = processor.process_batch(batch)
        self.assertEqual([i for i, r in enumerate(results) if r.outcome is not Outcome.WRITTEN],
                         [300])
        self.assertEqual((results[300].outcome, results[300].retryable), (Outcome.REFUSED, False))
        self.assertLessEqual(sink.writes, 2 * 10 + 1)
        readings = [p for p in sink.points if p.measurement == "sense"]
        self.assertEqual(len(readings), 1023)
        self.assertEqual(registry.load(["node-0"])["node-0"].state.counters.received, 147)
        self.assertNotIn("node-300", registry.load(["node-300"]))


def stamped(device, seq, value, received, boot=None) -> Envelope:
    """An envelope as the gateway makes it from a reading without ``ts``:
    stamped with its receive time."""
    return Envelope(new_envelope_id(), device, seq, received, "[::1]:5683", "coap", None,
                    "/data", 50, [Reading({"t": value}, received)], None, boot)


class RebootSequenceChecks:
    """The issue's reboot sequence, for any registry (``self.registry``,
    ``self.store``: a readings store, ``self.processor``)."""

    def test_reboot_counting_from_one_again_keeps_its_reading(self):
        # seq 1, 2, 3, 9, then 9 sent again as a new message (so a new
        # envelope, received later), then a reboot: seq 1 with a new value.
        sent = [(1, 22.0), (2, 22.1), (3, 22.2), (9, 22.4), (9, 22.4), (1, 30.5)]
        outcomes = []
        for i, (seq, value) in enumerate(sent):
            [result] = self.processor.process_batch([stamped("n1", seq, value, T0 + 10 * i)])
            outcomes.append(result.outcome)
        self.assertEqual(outcomes, [Outcome.WRITTEN] * 4 + [Outcome.DUPLICATE, Outcome.WRITTEN])
        self.assertEqual(self.store.query("n1", "t")[-1], (int((T0 + 50) * 1e9), 30.5))
        self.assertEqual(len(self.store.query("n1", "t")), 5)
        counters = self.registry.load(["n1"])["n1"].state.counters
        self.assertEqual((counters.received, counters.duplicates, counters.resets, counters.lost),
                         (5, 1, 1, 5))

    def test_the_reboot_sequence_in_one_batch(self):
        sent = [(1, 22.0), (2, 22.1), (3, 22.2), (9, 22.4), (9, 22.4), (1, 30.5)]
        results = self.processor.process_batch(
            [stamped("n2", seq, value, T0 + 10 * i) for i, (seq, value) in enumerate(sent)])
        self.assertEqual([r.outcome for r in results],
                         [Outcome.WRITTEN] * 4 + [Outcome.DUPLICATE, Outcome.WRITTEN])
        counters = self.registry.load(["n2"])["n2"].state.counters
        self.assertEqual((counters.duplicates, counters.resets), (1, 1))

    def test_redelivered_envelope_changes_nothing_after_the_reboot(self):
        first = stamped("n3", 1, 22.0, T0)
        after_reboot = stamped("n3", 1, 30.5, T0 + 10)
        self.processor.process_batch([first])
        self.processor.process_batch([after_reboot])
        before = self.registry.load(["n3"])["n3"]
        # The queue hands both out again (at-least-once): both are known.
        results = self.processor.process_batch([first, after_reboot])
        self.assertEqual([(r.outcome, r.reason) for r in results],
                         [(Outcome.DUPLICATE, "already processed")] * 2)
        after = self.registry.load(["n3"])["n3"]
        self.assertEqual((after.state, after.version), (before.state, before.version))

    def test_boot_counter_decides_for_identical_content(self):
        # Byte for byte the same reading after a reboot: only the boot
        # counter tells it from a repetition.
        self.processor.process_batch([stamped("n4", 1, 22.0, T0, boot=3)])
        [repeated] = self.processor.process_batch([stamped("n4", 1, 22.0, T0 + 5, boot=3)])
        [rebooted] = self.processor.process_batch([stamped("n4", 1, 22.0, T0 + 10, boot=4)])
        self.assertEqual((repeated.outcome, rebooted.outcome), (Outcome.DUPLICATE, Outcome.WRITTEN))
        state = self.registry.load(["n4"])["n4"].state
        self.assertEqual((state.boot, state.counters.resets, state.counters.duplicates), (4, 1, 1))


class SQLiteRebootTests(RebootSequenceChecks, TestCase):
    def setUp(self):
        directory = Path(self.mktemp()).resolve()
        self.registry = SQLiteRegistry(directory / "registry.sqlite3")
        self.store = SQLiteStore(directory / "readings.sqlite3", retention_days=36500)
        self.processor = BatchProcessor(self.registry, [self.store], clock=lambda: T0 + 60)
        self.addCleanup(self.processor.close)

    def test_a_registry_file_from_before_digests_is_upgraded_in_place(self):
        import sqlite3

        path = Path(self.mktemp()).resolve()
        path.mkdir()
        old = sqlite3.connect(path / "registry.sqlite3")
        old.execute("CREATE TABLE devices (id TEXT PRIMARY KEY, first_seen REAL NOT NULL, "
                    "last_seen REAL NOT NULL, last_source TEXT NOT NULL, last_seq INTEGER, "
                    "window TEXT NOT NULL, received INTEGER NOT NULL, duplicates INTEGER NOT NULL, "
                    "lost INTEGER NOT NULL, resets INTEGER NOT NULL, unsequenced INTEGER NOT NULL, "
                    "recent TEXT NOT NULL, version INTEGER NOT NULL)")
        old.execute("INSERT INTO devices VALUES ('old', 1, 2, 'x', 5, '3', 5, 0, 0, 0, 0, '[]', 4)")
        old.commit()
        old.close()
        registry = SQLiteRegistry(path / "registry.sqlite3")
        self.addCleanup(registry.close)
        record = registry.load(["old"])["old"]
        self.assertEqual((record.state.last_seq, record.state.digests, record.state.boot,
                          record.version), (5, b"", None, 4))
        processor = BatchProcessor(registry, [], clock=lambda: T0)
        self.assertEqual([r.outcome for r in processor.process_batch(
            [stamped("old", 4, 1.0, T0), stamped("old", 6, 1.0, T0)])],
            [Outcome.DUPLICATE, Outcome.WRITTEN])
        # The new number has its digest; the older ones stay unknown.
        self.assertEqual(len(registry.load(["old"])["old"].state.digests), 4)
