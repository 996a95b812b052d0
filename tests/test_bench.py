"""``sense bench``: its counters against a server that drops a known set of
requests, a run against the real gateway (readings land in the queue),
the ``--json`` document, ``--compare`` and ``--end-to-end`` on tiny runs.

Every run is the ``sense`` command as a user starts it, in a subprocess.
"""

from __future__ import annotations

import os
import sys
from collections import Counter
from pathlib import Path

import orjson
from twisted.internet import defer, utils
from twisted.trial.unittest import TestCase

from sense_gateway.bench.compare import format_table
from sense_gateway.bench.peers import dropped
from sense_gateway.bench.workload import Workload
from tests.support import GatewayProcess, queued

BIN = Path(sys.executable).parent
SENSE = str(BIN / "sense")


@defer.inlineCallbacks
def sense_bench(*args: str, expect_status: int | None = 0):
    """Run ``sense bench ARGS``; (stdout, stderr)."""
    out, err, status = yield utils.getProcessOutputAndValue(
        SENSE, ["bench", *args], env={k: v for k, v in os.environ.items()
                                      if not k.startswith("SENSE_")})
    if expect_status is not None and status != expect_status:
        raise AssertionError(f"sense bench {' '.join(args)} exited {status}: "
                             f"{err.decode()[-1500:]}{out.decode()[-500:]}")
    return out.decode(), err.decode()


@defer.inlineCallbacks
def sense_bench_json(*args: str) -> dict:
    out, _ = yield sense_bench(*args, "--json")
    return orjson.loads(out)


class LossyPeer:
    """``python -m sense_gateway.bench.peers udp-ack`` as a child process."""

    def __init__(self, testcase, drop: float = 0.0, seed: int = 0, host: str = "::1"):
        from sense_gateway.bench.processes import Peer

        extra = ("--drop", str(drop), "--seed", str(seed)) if drop else ()
        workdir = Path(testcase.mktemp()).resolve()
        workdir.mkdir(parents=True)
        self.peer = Peer("udp-ack", workdir, host=host, extra=extra)
        self.port = self.peer.port
        self.pid = self.peer.pid
        testcase.addCleanup(self.peer.stop)


def expected_counts(count: int, devices: int, seed: int, fraction: float,
                    max_retransmit: int, confirmable: bool = True) -> dict:
    """What the bench must count, computed from the peer's drop rule: the
    k-th request is device k % devices with sequence number 1 + k // devices."""
    builders = Workload(format="json", devices=devices).builders()
    retransmissions, lost = 0, 0
    histogram = Counter()
    for k in range(count):
        key = builders[k % devices](1 + k // devices)
        attempts = max_retransmit + 1 if confirmable else 1
        answered_at = next((a for a in range(attempts) if not dropped(seed, fraction, key, a)), None)
        if answered_at is None:
            lost += 1
            answered_at = attempts - 1
        retransmissions += answered_at
        histogram[str(answered_at)] += 1
    return {"sent": count, "retransmissions": retransmissions, "lost": lost,
            "answered": count - lost, "transmissions": count + retransmissions,
            "histogram": dict(histogram)}


class CountersAgainstLossyServer(TestCase):
    """The peer drops the n-th copy of a request when a keyed hash says so;
    the test knows that rule, so it knows every number the bench must print."""

    timeout = 60

    @defer.inlineCallbacks
    def test_confirmable_counters_are_exact(self):
        peer = LossyPeer(self, drop=0.3, seed=11)
        expected = expected_counts(600, 30, seed=11, fraction=0.3, max_retransmit=2)
        self.assertGreater(expected["lost"], 0)  # the drop rule does lose some
        self.assertGreater(expected["retransmissions"], expected["lost"] * 2)
        doc = yield sense_bench_json(
            f"coap://[::1]:{peer.port}", "--count", "600", "--devices", "30", "--window", "16",
            "--ack-timeout", "0.25", "--ack-random-factor", "1.0", "--max-retransmit", "2")
        result = doc["result"]
        self.assertEqual(result["sent"], 600)
        self.assertEqual(result["transmissions"], expected["transmissions"])
        self.assertEqual(result["retransmissions"], expected["retransmissions"])
        self.assertEqual(result["lost"], expected["lost"])
        self.assertEqual(result["answered"], expected["answered"])
        self.assertEqual(result["codes"], {"2.04": expected["answered"]})
        self.assertEqual(result["retransmitted"], expected["histogram"])
        self.assertEqual(result["duplicate_responses"], 0)

    @defer.inlineCallbacks
    def test_non_confirmable_losses_are_the_dropped_requests(self):
        peer = LossyPeer(self, drop=0.2, seed=5)
        expected = expected_counts(400, 20, seed=5, fraction=0.2, max_retransmit=0,
                                   confirmable=False)
        self.assertGreater(expected["lost"], 0)
        doc = yield sense_bench_json(
            f"coap://[::1]:{peer.port}", "--non", "--count", "400", "--devices", "20",
            "--window", "16", "--non-timeout", "0.3")
        result = doc["result"]
        self.assertEqual((result["sent"], result["transmissions"], result["retransmissions"]),
                         (400, 400, 0))
        self.assertEqual(result["lost"], expected["lost"])
        self.assertEqual(result["codes"], {"2.04": 400 - expected["lost"]})

    @defer.inlineCallbacks
    def test_nothing_lost_without_drops_and_rss_reported(self):
        peer = LossyPeer(self)
        doc = yield sense_bench_json(f"coap://[::1]:{peer.port}", "--count", "2000",
                                     "--server-pid", str(peer.pid))
        result = doc["result"]
        self.assertEqual(result["codes"], {"2.04": 2000})
        self.assertEqual((result["lost"], result["retransmissions"]), (0, 0))
        self.assertGreater(result["server_rss_mb"], 1)

    @defer.inlineCallbacks
    def test_rate_mode_sends_at_the_rate(self):
        peer = LossyPeer(self)
        doc = yield sense_bench_json(f"coap://[::1]:{peer.port}", "--rate", "400",
                                     "--duration", "1")
        self.assertEqual(doc["load"]["mode"], "rate 400/s")
        # the schedule is t0 + k/rate for k while t < t0 + 1 s
        self.assertLessEqual(abs(doc["result"]["sent"] - 400), 2)
        self.assertEqual(doc["result"]["codes"], {"2.04": doc["result"]["sent"]})
        # the generator drives a second answer-driven loop: the send rate,
        # not the answers, sets the pace
        self.assertGreaterEqual(doc["result"]["elapsed_s"], 0.99)

    @defer.inlineCallbacks
    def test_json_document(self):
        peer = LossyPeer(self, host="127.0.0.1")
        doc = yield sense_bench_json(f"coap://127.0.0.1:{peer.port}", "--count", "50",
                                     "--format", "cbor", "--ack-timeout", "0.5")
        self.assertEqual(set(doc), {"machine", "load", "result"})
        self.assertGreaterEqual(doc["machine"]["cpus"], 1)
        self.assertIn("cpu_model", doc["machine"])
        self.assertEqual(doc["load"]["target"], f"coap://127.0.0.1:{peer.port}")
        self.assertEqual((doc["load"]["type"], doc["load"]["format"]), ("CON", "cbor"))
        result = doc["result"]
        for key in ("sent", "transmissions", "retransmissions", "answered", "ok", "lost",
                    "codes", "retransmitted", "elapsed_s", "rate", "ok_rate", "server_rss_mb"):
            self.assertIn(key, result)
        self.assertEqual(set(result["latency_ms"]), {"p50", "p90", "p99", "max"})
        self.assertLessEqual(result["latency_ms"]["p50"], result["latency_ms"]["p99"])
        self.assertLessEqual(result["latency_ms"]["p99"], result["latency_ms"]["max"])

    @defer.inlineCallbacks
    def test_human_output(self):
        peer = LossyPeer(self, drop=0.5, seed=3)
        out, err = yield sense_bench(f"coap://[::1]:{peer.port}", "--count", "100",
                                     "--ack-timeout", "0.1", "--max-retransmit", "1",
                                     "--ack-random-factor", "1")
        expected = expected_counts(100, 100, seed=3, fraction=0.5, max_retransmit=1)
        self.assertIn(f"lost          {expected['lost']}\n", out + "\n")
        self.assertIn(f"2.04 x{expected['answered']}", out)
        self.assertIn("latency       p50 ", out)
        self.assertEqual(err, "")  # no progress bar when not on a terminal

    @defer.inlineCallbacks
    def test_a_server_that_is_not_there_is_all_lost(self):
        from sense_gateway.bench.processes import free_port

        out, _ = yield sense_bench(f"coap://[::1]:{free_port()}", "--count", "5",
                                   "--ack-timeout", "0.05", "--max-retransmit", "1",
                                   "--json", expect_status=1)
        result = orjson.loads(out)["result"]
        self.assertEqual((result["sent"], result["answered"], result["lost"]), (5, 0, 5))


class AgainstTheGateway(TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def test_every_format_acknowledged_and_queued(self):
        gateway = GatewayProcess(self, "--role", "gateway")
        yield gateway.wait_listening()
        counts = {"json": 100, "cbor": 40, "senml": 40, "senml-cbor": 40}
        for fmt, count in counts.items():
            doc = yield sense_bench_json(f"coap://[::1]:{gateway.port}", "--count", str(count),
                                         "--devices", "10", "--format", fmt)
            self.assertEqual(doc["result"]["codes"], {"2.04": count}, fmt)
            self.assertEqual(doc["result"]["lost"], 0, fmt)
        # IPv4 and the original text format (devices named by source address)
        doc = yield sense_bench_json(f"coap://127.0.0.1:{gateway.port}", "--count", "12",
                                     "--devices", "3", "--format", "text")
        self.assertEqual(doc["result"]["codes"], {"2.04": 12})

        envelopes = queued(gateway.queue_path)
        self.assertEqual(len(envelopes), sum(counts.values()) + 12)
        json_ones = [e for e in envelopes if e.content_format == 50]
        by_device = {}
        for e in json_ones:
            by_device.setdefault(e.device, []).append(e.seq)
        self.assertEqual(sorted(by_device), [f"bench-{i:05d}" for i in range(10)])
        for seqs in by_device.values():
            self.assertEqual(sorted(seqs), list(range(1, 11)))
        text_sources = {e.device for e in envelopes if e.path == "/temperature"}
        self.assertEqual(text_sources, {"127.0.0.1"})
        self.assertEqual(sum(len(e.readings) for e in envelopes if e.path == "/temperature"), 120)

    @defer.inlineCallbacks
    def test_compare_runs_every_peer_and_prints_ratios(self):
        doc = yield sense_bench_json("--compare", "--duration", "0.5", "--devices", "20")
        servers = [row["server"] for row in doc["results"]]
        self.assertEqual(servers, ["udp-ack", "aiocoap", "txthings", "gateway"])
        for row in doc["results"]:
            self.assertGreater(row["ok"], 0, row["server"])
            self.assertEqual(row["codes"], {"2.04": row["ok"]}, row["server"])
            self.assertIsNotNone(row["server_rss_mb"], row["server"])
        gateway = doc["results"][-1]
        table = format_table(doc)
        for row in doc["results"][:-1]:
            ratio = doc["gateway_ratio"][row["server"]]
            self.assertLess(abs(ratio - gateway["ok_rate"] / row["ok_rate"]), 0.006)
            self.assertIn(f"| {row['server']} | {row['ok_rate']:,.0f} | {ratio:.2f}x |", table)

    @defer.inlineCallbacks
    def test_end_to_end_every_reading_queryable(self):
        doc = yield sense_bench_json("--end-to-end", "--readings", "600", "--devices", "20")
        self.assertEqual(doc["ingest"]["codes"], {"2.04": 600})
        self.assertEqual((doc["queryable"], doc["expected"]), (600, 600))
        self.assertTrue(doc["all_queryable"])
        self.assertEqual(doc["processor"]["written"], 600)
        self.assertGreater(doc["processor"]["readings_per_s"], 0)


def client_lines(points, divisor, precision):
    """The lines influxdb-client's ``Point`` makes of *points*."""
    from influxdb_client import Point

    lines = []
    for point in points:
        p = Point(point.measurement)
        for key, value in point.tags.items():
            p.tag(key, value)
        for key, value in point.fields.items():
            p.field(key, value)
        p.time(point.time_ns // divisor, precision)
        if line := p.to_line_protocol():
            lines.append(line)
    return lines


class FasterLineProtocol(TestCase):
    """The InfluxDB sink encodes line protocol itself for speed (the
    processor's share of ``--end-to-end``); it must write exactly what
    influxdb-client's ``Point`` would."""

    def test_same_lines_as_influxdb_client(self):
        from sense_gateway.config import InfluxConfig
        from sense_gateway.sinks import MetricPoint
        from sense_gateway.sinks.influxdb import InfluxSink

        points = [
            MetricPoint("sense", {"device": "node 7", "room": "a,b=c", "z": "end\\", "e": ""},
                        {"t": 21.0, "h": 21.5, "big": 1e21, "neg": -0.0, "nan": float("nan"),
                         "on": True, "off": False, "s": 'say "hi" \\ there', "n": 3,
                         "x y=z,": 1.25e-7}, 1764300000123456789),
            MetricPoint("sense_device", {"device": "d"}, {"received": 5, "lost": 0}, 1),
            MetricPoint("m eas,ure", {}, {"v": float("inf")}, 5),  # no field left: no line
            MetricPoint("m", {}, {"v": 1.0}, 5),
            MetricPoint("m", {"room": "a"}, {"v": 2.0}, 6),
            MetricPoint("m", {"room": "b"}, {"v": 2.0}, 6),
            MetricPoint("m", {"device": "node 7"}, {"v": 3.0}, 7),
            MetricPoint("sense", {"device": "node 7"}, {"v": 3.0}, 7),
        ]
        for precision, divisor in (("ns", 1), ("ms", 10**6), ("s", 10**9)):
            sink = InfluxSink(InfluxConfig(url="http://127.0.0.1:9", precision=precision))
            self.addCleanup(sink.close)
            expected = client_lines(points, divisor, sink.precision)
            self.assertEqual(sink.lines(points), expected, precision)
            self.assertEqual(len(expected), 7)

    def test_device_counter_lines_same_as_influxdb_client(self):
        from sense_gateway.config import InfluxConfig
        from sense_gateway.liveness import DeviceState, Liveness
        from sense_gateway.registry import DeviceRecord
        from sense_gateway.sequence import DeviceCounters, SequenceState
        from sense_gateway.sinks import MetricPoint, device_point
        from sense_gateway.sinks.influxdb import InfluxSink

        record = DeviceRecord("node 7", 1.0, 2.0, "h:1",
                              SequenceState(9, 1, DeviceCounters(12, 3, 4, 1, 0)))
        points = [device_point(record, 1764300000.25, Liveness(state, interval, None, silent))
                  for state, interval, silent in (
                      (DeviceState.ONLINE, 10.0, 1.5), (DeviceState.NEW, None, 0.0),
                      (DeviceState.LATE, 0.125, 1e21), (DeviceState.OFFLINE, float("inf"), 7.0),
                      (DeviceState.ONLINE, 2.5, float("nan")))]
        # The same names, other types or more fields: written as any point.
        points += [
            MetricPoint("sense_device", {"device": "d"},
                        {**points[0].fields, "received": 5.0}, 1),
            MetricPoint("sense_device", {"device": "d"},
                        {**points[0].fields, "state": 'say "hi" \\'}, 1),
            MetricPoint("sense_device", {"device": "d"}, {**points[0].fields, "x": 1}, 1),
            MetricPoint("sense_device", {"device": "d"},
                        {**points[1].fields, "lost": True}, 1),
        ]
        sink = InfluxSink(InfluxConfig(url="http://127.0.0.1:9"))
        self.addCleanup(sink.close)
        expected = client_lines(points, 1, sink.precision)
        self.assertEqual(len(expected), len(points))
        self.assertEqual(sink.lines(points), expected)
        self.assertIn("interval=0.125,lost=4i,received=12i", expected[2])


class RegistryReuseBetweenBatches(TestCase):
    """The SQLite registry keeps records it committed for the next batch
    (part of the processor's speed); another writer of the same file must
    still be seen, and a stale record must still lose its commit."""

    def test_a_record_changed_by_another_writer_is_read_again(self):
        from dataclasses import replace

        from sense_gateway.registry import DeviceRecord
        from sense_gateway.registry.sqlite import SQLiteRegistry
        from sense_gateway.sequence import judge

        path = Path(self.mktemp()).resolve() / "registry.sqlite3"
        first, second = SQLiteRegistry(path), SQLiteRegistry(path)
        self.addCleanup(first.close)
        self.addCleanup(second.close)

        def advance(record, seq):
            return replace(record, state=judge(record.state, seq).state)

        self.assertEqual(first.commit([advance(DeviceRecord("node-1", 1.0, 1.0, "[::1]:1"), 1)]),
                         set())
        self.assertEqual(first.load(["node-1"])["node-1"].state.last_seq, 1)

        self.assertEqual(second.commit([advance(second.load(["node-1"])["node-1"], 2)]), set())
        seen = first.load(["node-1"])["node-1"]
        self.assertEqual((seen.state.last_seq, seen.version), (2, 2))

        self.assertEqual(first.commit([advance(replace(seen, version=1), 3)]), {"node-1"})
        self.assertEqual(second.load(["node-1"])["node-1"].state.last_seq, 2)
        self.assertEqual(first.load(["node-1"])["node-1"].state.last_seq, 2)
