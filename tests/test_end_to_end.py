"""End to end on the embedded backends: CoAP requests from libcoap's client
into ``--role all``, out of the queue through the processor, into the
SQLite store and VictoriaMetrics; faults on the way and dead letters."""

from __future__ import annotations

import subprocess

import cbor2
import orjson
from twisted.internet import defer
from twisted.trial.unittest import TestCase

from sense_gateway.queues.sqlite import SQLiteQueueStore
from sense_gateway.registry.sqlite import SQLiteRegistry
from sense_gateway.sinks.sqlite import SQLiteStore
from tests.servers import VictoriaMetrics
from tests.support import BIN, coap_url, deferLater, eventually, libcoap_request, start_gateway
from tests.test_interop import sense_text

NOW = 1764300000


class EmbeddedEndToEndTests(TestCase):
    timeout = 120

    def setUp(self):
        self.vm = VictoriaMetrics(self)

    def gateway(self, **overrides):
        settings = {"role": "all", **self.vm.settings("sqlite"),
                    "processor.poll_interval": 0.05, "processor.retry_base": 0.2,
                    "store.retention_days": 36500.0}
        settings.update(overrides)
        return start_gateway(self, **settings)

    def queue_depth(self, gateway) -> dict:
        store = SQLiteQueueStore(gateway.config.queue_path)
        try:
            return store.depth()
        finally:
            store.close()

    def devices(self, gateway) -> dict:
        registry = SQLiteRegistry(gateway.config.registry_path)
        try:
            return {r.id: r for r in registry.devices()}
        finally:
            registry.close()

    def sense(self, gateway, *args) -> bytes:
        return subprocess.run([str(BIN / "sense"), "--data-dir", gateway.config.data_dir, *args],
                              check=True, capture_output=True, timeout=60).stdout

    @defer.inlineCallbacks
    def post(self, gateway, host, path, payload, cf):
        response = yield libcoap_request("post", coap_url(host, gateway.port, path), payload, cf)
        self.assertEqual(response.code, "2.04", response)

    @defer.inlineCallbacks
    def test_three_devices_reach_store_and_victoriametrics(self):
        gateway = yield self.gateway()
        for seq in (1, 2, 3):
            yield self.post(gateway, "::1", "/data", orjson.dumps(
                {"id": "node-a", "seq": seq, "ts": NOW + seq, "data": {"temperature": 20 + seq / 10}}), 50)
        yield self.post(gateway, "::1", "/data", cbor2.dumps(
            [{-2: "urn:dev:mac:0024befffe804ff1:", -3: NOW, 0: "humidity", 2: 41.5}]), 112)
        yield self.post(gateway, "127.0.0.1", "/temperature", sense_text([2150, 2160, 2170]), 0)

        yield eventually(lambda: len(self.devices(gateway)) == 3)
        yield eventually(lambda: self.queue_depth(gateway) == {"visible": 0, "in_flight": 0, "dead": 0})
        devices = self.devices(gateway)
        self.assertEqual(sorted(devices), ["127.0.0.1", "node-a", "urn:dev:mac:0024befffe804ff1"])
        self.assertEqual(devices["node-a"].state.counters.received, 3)

        points = self.vm.points()
        self.assertEqual(points[("sense_temperature", "node-a")],
                         {(NOW + 1) * 1000: 20.1, (NOW + 2) * 1000: 20.2, (NOW + 3) * 1000: 20.3})
        self.assertEqual(points[("sense_humidity", "urn:dev:mac:0024befffe804ff1")],
                         {NOW * 1000: 41.5})
        text_values = points[("sense_temperature", "127.0.0.1")]
        self.assertEqual(sorted(text_values.values()), [21.5, 21.6, 21.7])
        stamps = sorted(text_values)
        self.assertEqual([b - a for a, b in zip(stamps, stamps[1:])], [1000, 1000])

        store = SQLiteStore(gateway.config.store_path)
        self.addCleanup(store.close)
        self.assertEqual([v for _, v in store.query("node-a", "temperature")], [20.1, 20.2, 20.3])

        listed = orjson.loads(self.sense(gateway, "devices", "--json"))
        self.assertEqual([(d["id"], d["received"]) for d in listed],
                         [("127.0.0.1", 1), ("node-a", 3), ("urn:dev:mac:0024befffe804ff1", 1)])

    @defer.inlineCallbacks
    def test_a_device_that_reboots_keeps_its_first_reading_after_the_reboot(self):
        # The sequence, as libcoap sends it, readings without ts.
        gateway = yield self.gateway()
        sent = [(1, 22.0), (2, 22.1), (3, 22.2), (9, 22.4), (9, 22.4), (1, 30.5)]
        for seq, value in sent:
            yield self.post(gateway, "::1", "/data", orjson.dumps(
                {"id": "n1", "seq": seq, "data": {"t": value}}), 50)
        yield eventually(lambda: "n1" in self.devices(gateway)
                         and self.devices(gateway)["n1"].state.counters.received == 5)
        counters = self.devices(gateway)["n1"].state.counters
        self.assertEqual((counters.resets, counters.duplicates), (1, 1))
        store = SQLiteStore(gateway.config.store_path)
        self.addCleanup(store.close)
        self.assertEqual([v for _, v in store.query("n1", "t")], [22.0, 22.1, 22.2, 22.4, 30.5])

    @defer.inlineCallbacks
    def test_metrics_server_down_loses_nothing(self):
        gateway = yield self.gateway()
        self.vm.stop()
        for seq in range(1, 6):
            yield self.post(gateway, "::1", "/data", orjson.dumps(
                {"id": "node-f", "seq": seq, "ts": NOW + seq, "data": {"t": seq}}), 50)
        # The processor tries, fails, and gives the batch back to the queue;
        # then it waits for the sink (so how many it tried depends on how
        # the posts were batched).
        yield eventually(lambda: gateway.worker.counts[_failed()] >= 1
                         and "cannot reach" in (gateway.worker.problem or ""), timeout=60)
        self.assertEqual(self.devices(gateway), {})
        self.assertEqual(sum(self.queue_depth(gateway).values()), 5)
        self.vm.start()
        yield eventually(lambda: self.queue_depth(gateway)["visible"] + self.queue_depth(
            gateway)["in_flight"] == 0, timeout=30)
        self.assertEqual(sorted(self.vm.points()[("sense_t", "node-f")].values()),
                         [1.0, 2.0, 3.0, 4.0, 5.0])
        counters = self.devices(gateway)["node-f"].state.counters
        self.assertEqual((counters.received, counters.duplicates, counters.lost), (5, 0, 0))

    @defer.inlineCallbacks
    def test_refused_reading_is_dead_lettered_at_once_with_the_servers_message_and_replays(self):
        from tests.servers import InfluxDB1

        influx = InfluxDB1(self)
        gateway = yield self.gateway(**{"influxdb.url": influx.url, "influxdb.api": "v1"})
        yield self.post(gateway, "::1", "/data", orjson.dumps(
            {"id": "node-d", "seq": 1, "ts": NOW, "data": {"t": 1}}), 50)
        yield eventually(lambda: "node-d" in self.devices(gateway))
        # "t" is a float in InfluxDB now: a string for it is refused (400).
        for seq in (2, 3):
            yield self.post(gateway, "::1", "/data", orjson.dumps(
                {"id": "node-d", "seq": seq, "ts": NOW + seq, "data": {"t": "warm" if seq == 2 else 3}}), 50)
        yield eventually(lambda: self.queue_depth(gateway) == {"visible": 0, "in_flight": 0, "dead": 1})
        [letter] = orjson.loads(self.sense(gateway, "dlq", "list", "--json"))
        self.assertEqual((letter["device"], letter["seq"], letter["receives"]), ("node-d", 2, 1))
        self.assertIn('HTTP 400: partial write: field type conflict: input field "t" on '
                      'measurement "sense" is type string', letter["reason"])
        self.assertEqual(gateway.worker.counts[_outcome("REFUSED")], 1)
        self.assertEqual([r["t"] for r in influx.rows('SELECT "t" FROM "sense"')], [1.0, 3.0])

        # The schema is fixed (the old series dropped): the replay is stored.
        influx.query('DROP MEASUREMENT "sense"')
        self.assertEqual(self.sense(gateway, "dlq", "replay"), b"1 message back in the queue\n")
        yield eventually(lambda: influx.rows('SELECT "t" FROM "sense"') != [])
        self.assertEqual([r["t"] for r in influx.rows('SELECT "t" FROM "sense"')], ["warm"])
        counters = self.devices(gateway)["node-d"].state.counters
        self.assertEqual((counters.received, counters.lost, counters.duplicates), (3, 0, 0))


def _failed():
    return _outcome("FAILED")


def _outcome(name: str):
    from sense_gateway.processor import Outcome

    return Outcome[name]


class StopDuringProcessingTests(TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def test_stop_waits_for_the_round_in_flight_then_the_queue(self):
        import threading
        from pathlib import Path

        writing, release = threading.Event(), threading.Event()
        plugins = Path(self.mktemp()).resolve()
        plugins.mkdir()
        (plugins / "slow_sink.py").write_text(
            "from sense_gateway.hookspecs import hookimpl\n"
            "from sense_gateway.sinks import MetricSink\n"
            "class Slow(MetricSink):\n"
            "    def write(self, points):\n"
            "        import tests.test_end_to_end as t\n"
            "        t.SLOW_SINK[0].set()\n"
            "        t.SLOW_SINK[1].wait(10)\n"
            "@hookimpl\n"
            "def sense_register_sinks():\n"
            "    return {'slow': lambda config: Slow()}\n")
        SLOW_SINK[:] = [writing, release]
        gateway = yield start_gateway(self, role="all", plugins_dir=str(plugins),
                                **{"sinks.enabled": ("slow",), "processor.poll_interval": 0.05})
        yield libcoap_request("post", coap_url("::1", gateway.port, "/data"),
                              b'{"id": "n", "seq": 1, "data": {"t": 1}}', 50)
        yield eventually(writing.is_set)
        stopped = gateway.stopService()
        yield deferLater(0.2)
        release.set()
        yield stopped
        # The round finished against a queue still running: the message is gone.
        store = SQLiteQueueStore(gateway.config.queue_path)
        self.addCleanup(store.close)
        self.assertEqual(store.depth(), {"visible": 0, "in_flight": 0, "dead": 0})


SLOW_SINK: list = []
