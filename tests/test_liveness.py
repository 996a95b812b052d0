"""Device liveness: the interval learned from inter-arrival times (or set by
hand), the states it gives, and what the processor keeps and writes."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import orjson
from twisted.trial.unittest import SynchronousTestCase

import sense_gateway.aws.lambda_handler as lambda_handler
from sense_gateway.registry.dynamodb import DynamoDBRegistry
from tests.support import BIN
from tests.test_cloud import NOW, CloudTestCase

from sense_gateway.envelope import Envelope, Reading, new_envelope_id
from sense_gateway.liveness import (DeviceState, LivenessPolicy, fleet_order, learned_interval,
                                    liveness, parse_duration)
from sense_gateway.processor import BatchProcessor
from sense_gateway.registry import DeviceRecord
from sense_gateway.registry.sqlite import SQLiteRegistry

T0 = 1764300000.0


def record(last_seen=T0, intervals=(), interval=None, device="node-1"):
    return DeviceRecord(device, T0 - 100, last_seen, "x", intervals=tuple(intervals),
                        interval=interval)


class RecordingSink:
    name = "recording"

    def __init__(self):
        self.points = []

    def write(self, points):
        self.points.extend(points)

    def check(self):
        pass

    def close(self):
        pass


class StateTests(SynchronousTestCase):
    def test_median_of_recent_intervals_ignores_one_outage(self):
        self.assertEqual(learned_interval([10, 10, 3600, 10.5]), 10.25)
        self.assertIsNone(learned_interval([10, 10]))

    def test_states_by_intervals_of_silence(self):
        r = record(intervals=(10, 10, 10))
        self.assertEqual(liveness(r, T0 + 19.9).state, DeviceState.ONLINE)
        self.assertEqual(liveness(r, T0 + 20).state, DeviceState.LATE)
        self.assertEqual(liveness(r, T0 + 49).state, DeviceState.LATE)
        offline = liveness(r, T0 + 50)
        self.assertEqual((offline.state, offline.silent, offline.interval_source),
                         (DeviceState.OFFLINE, 50, "learned"))

    def test_an_interval_set_by_hand_wins_and_new_devices_are_new(self):
        self.assertEqual(liveness(record(intervals=(10, 10, 10), interval=60), T0 + 50).state,
                         DeviceState.ONLINE)
        self.assertEqual(liveness(record(interval=60), T0 + 301).interval_source, "set")
        self.assertEqual(liveness(record(), T0 + 10_000).state, DeviceState.NEW)

    def test_policy_thresholds(self):
        policy = LivenessPolicy(late_after=1.5, offline_after=3)
        self.assertEqual(liveness(record(interval=10), T0 + 15, policy).state, DeviceState.LATE)
        self.assertEqual(liveness(record(interval=10), T0 + 30, policy).state, DeviceState.OFFLINE)

    def test_fleet_order_puts_offline_first_silent_longest_first(self):
        records = [record(T0, device="a", interval=1), record(T0 - 100, device="b", interval=1),
                   record(T0 - 10, device="c", interval=1), record(T0 - 3, device="d", interval=1),
                   record(T0, device="e")]
        order = [(r.id, l.state.value) for r, l in fleet_order(records, T0, LivenessPolicy())]
        self.assertEqual(order, [("b", "offline"), ("c", "offline"), ("d", "late"),
                                 ("e", "new"), ("a", "online")])

    def test_durations(self):
        self.assertEqual([parse_duration(t) for t in ("60s", "5m", "1.5h", "250ms", "90")],
                         [60, 300, 5400, 0.25, 90])
        for bad in ("", "0s", "-5s", "5 weeks"):
            self.assertRaises(ValueError, parse_duration, bad)


def envelope(device, received, seq):
    return Envelope(new_envelope_id(), device, seq, received, "x", "coap", None, "/data", 50,
                    [Reading({"t": 1.0}, received)])


class ProcessorLivenessTests(SynchronousTestCase):
    def setUp(self):
        self.now = T0
        self.registry = SQLiteRegistry(Path(self.mktemp()) / "registry.sqlite3")
        self.sink = RecordingSink()
        self.processor = BatchProcessor(self.registry, [self.sink], clock=lambda: self.now)
        self.addCleanup(self.processor.close)

    def test_intervals_are_learned_across_batches_and_kept(self):
        # One batch with a burst (two messages 10 ms apart: one report), then
        # one message per batch.
        self.processor.process_batch([envelope("node-1", T0, 1), envelope("node-1", T0 + 0.01, 2)])
        for seq, at in enumerate((T0 + 30, T0 + 60, T0 + 91), start=3):
            self.processor.process_batch([envelope("node-1", at, seq)])
        [stored] = self.registry.devices()
        self.assertEqual(stored.intervals, (29.99, 30.0, 31.0))
        self.now = T0 + 91
        self.assertEqual(liveness(stored, self.now).state, DeviceState.ONLINE)
        last = [p for p in self.sink.points if p.measurement == "sense_device"][-1]
        self.assertEqual((last.fields["state"], last.fields["silent"], last.fields["interval"]),
                         ("online", 0.0, 30.0))

    def test_sweep_writes_only_silent_devices(self):
        for seq in range(1, 5):
            self.processor.process_batch([envelope("quiet", T0 + 10 * seq, seq),
                                          envelope("busy", T0 + 10 * seq, seq)])
        self.processor.process_batch([envelope("busy", T0 + 100, 5)])
        self.sink.points.clear()
        self.now = T0 + 100
        self.assertEqual(self.processor.sweep(), 1)
        [point] = self.sink.points
        self.assertEqual((point.tags["device"], point.fields["state"], point.fields["silent"]),
                         ("quiet", "offline", 60.0))

    def test_interval_set_by_hand_survives_processing(self):
        self.processor.process_batch([envelope("node-1", T0, 1)])
        self.assertTrue(self.registry.set_interval("node-1", 60.0))
        self.assertFalse(self.registry.set_interval("node-9", 60.0))
        # The processor's cached record is older now: its commit must not
        # undo the setting.
        self.processor.process_batch([envelope("node-1", T0 + 60, 2)])
        self.processor.process_batch([envelope("node-1", T0 + 120, 3)])
        [stored] = self.registry.devices()
        self.assertEqual((stored.interval, stored.state.counters.received), (60.0, 3))
        self.assertTrue(self.registry.set_interval("node-1", None))
        self.assertIsNone(self.registry.devices()[0].interval)


class LambdaLivenessTests(CloudTestCase):
    """The Lambda path: the handler keeps the intervals in DynamoDB, the
    state is derived from them wherever the registry is read, and a
    scheduled invocation sweeps the silent devices into the sinks."""

    def test_lambda_learns_intervals_sweeps_and_sense_devices_reads_them(self):
        records = [{"messageId": f"m{seq}", "body": envelope("node-l", NOW + 60 * seq, seq)
                    .to_json().decode()} for seq in range(1, 5)]
        self.assertEqual(lambda_handler.handler({"Records": records}, None),
                         {"batchItemFailures": []})
        registry = DynamoDBRegistry("sense-devices", "us-east-1", self.moto.url)
        [stored] = registry.devices()
        self.assertEqual(stored.intervals, (60.0, 60.0, 60.0))
        # Sent in 2025: offline by now.
        self.assertEqual(liveness(stored, time.time()).state, DeviceState.OFFLINE)
        self.assertEqual(lambda_handler.handler({"source": "aws.events",
                                                 "detail-type": "Scheduled Event"}, None),
                         {"swept": 1})
        self.assertIn(("sense_device_silent", "node-l"), self.vm.points())

        self.assertTrue(registry.set_interval("node-l", 3600 * 24 * 3650.0))
        self.assertFalse(registry.set_interval("node-x", 60.0))
        [stored] = registry.devices()
        self.assertEqual((stored.interval, stored.intervals), (3600 * 24 * 3650.0, (60.0,) * 3))
        out = subprocess.run([str(BIN / "sense"), "devices", "--json"], capture_output=True,
                             text=True, timeout=60, env=os.environ.copy())
        self.assertEqual(out.returncode, 0, out.stderr)
        [row] = orjson.loads(out.stdout)
        self.assertEqual((row["id"], row["state"], row["interval_source"]),
                         ("node-l", "online", "set"))
        self.assertTrue(registry.set_interval("node-l", None))
        self.assertIsNone(registry.devices()[0].interval)
