"""The pieces of ``sense bench --crash-loop`` and ``--soak``: the lossy
relay, devices that retransmit and give up as RFC 7252 says, and both
modes run as a user runs them (tiny runs of the ``sense`` command)."""

from __future__ import annotations

import socket
import threading
import time
from collections import Counter

import orjson
from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase, TestCase

from sense_gateway.bench.fleet import DeviceFleet
from sense_gateway.bench.lossy_proxy import LossyProxy
from sense_gateway.bench.soak import BUCKET, percentiles, rss_trend
from sense_gateway.coap.message import parse
from tests.test_bench import sense_bench


class UdpServer:
    """A socket on a thread that records what it gets and, with
    ``answer``, answers each confirmable request with a 2.04 ACK."""

    def __init__(self, testcase, answer: bool):
        self.sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        self.sock.bind(("::1", 0))
        self.sock.settimeout(0.05)
        self.port = self.sock.getsockname()[1]
        self.answer = answer
        self.received: list[tuple[bytes, tuple]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        testcase.addCleanup(self.stop)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data, peer = self.sock.recvfrom(2048)
            except (TimeoutError, socket.timeout):
                continue
            self.received.append((data, peer))
            if self.answer:
                tkl = data[0] & 0x0F
                self.sock.sendto(bytes([0x60 | tkl, 0x44]) + data[2:4 + tkl], peer)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


def wait(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)


class LossyProxyTests(SynchronousTestCase):
    def relay(self, loss: float, seed: int = 1, **kw) -> tuple[LossyProxy, UdpServer]:
        server = UdpServer(self, answer=True)
        proxy = LossyProxy(("::1", server.port), loss, seed=seed, **kw).start()
        self.addCleanup(proxy.stop)
        return proxy, server

    def client(self) -> socket.socket:
        sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        sock.settimeout(0.2)
        self.addCleanup(sock.close)
        return sock

    def test_without_loss_everything_goes_both_ways_and_each_client_has_its_own_port(self):
        proxy, server = self.relay(0.0)
        clients = [self.client() for _ in range(3)]
        for n, sock in enumerate(clients):
            sock.sendto(bytes([0x41, 0x02, 0, n, n]), ("::1", proxy.port))
            answer = sock.recv(100)
            self.assertEqual(answer, bytes([0x61, 0x44, 0, n, n]))
        self.assertEqual(len({peer for _, peer in server.received}), 3)
        self.assertEqual(proxy.counters.as_dict(), {"up_forwarded": 3, "up_dropped": 0,
                                                     "down_forwarded": 3, "down_dropped": 0})

    def test_drops_the_fraction_each_way_and_the_seed_decides_which(self):
        def run(seed: int) -> set[int]:
            proxy, server = self.relay(0.3, seed=seed)
            sock = self.client()
            for n in range(400):
                sock.sendto(bytes([0x41, 0x02, n >> 8, n & 0xFF, 7]), ("::1", proxy.port))
                time.sleep(0.0005)  # the relay's one thread keeps up
            wait(lambda: proxy.counters.down_forwarded + proxy.counters.down_dropped
                 == proxy.counters.up_forwarded and proxy.counters.up_forwarded
                 + proxy.counters.up_dropped == 400)
            got = set()
            sock.settimeout(0.5)
            for _ in range(proxy.counters.down_forwarded):
                got.add(int.from_bytes(sock.recv(100)[2:4], "big"))
            c = proxy.counters
            self.assertEqual(c.up_forwarded + c.up_dropped, 400)
            self.assertEqual(c.down_forwarded + c.down_dropped, c.up_forwarded)
            # 30 % each way: 0.7 x 0.7 of the requests come back.
            self.assertTrue(0.2 < c.up_dropped / 400 < 0.4, c)
            self.assertTrue(0.2 < c.down_dropped / c.up_forwarded < 0.4, c)
            return got
        first = run(5)
        self.assertTrue(0.4 < len(first) / 400 < 0.6, len(first))
        self.assertEqual(run(5), first)
        self.assertNotEqual(run(6), first)

    def test_a_loss_of_one_or_more_is_refused(self):
        self.assertRaises(ValueError, LossyProxy, ("::1", 9), 1.0)


class FleetTests(SynchronousTestCase):
    def test_a_silent_server_gets_each_message_five_times_then_a_new_one_for_the_same_reading(self):
        server = UdpServer(self, answer=False)
        fleet = DeviceFleet(("::1", server.port), 1, ack_timeout=0.02, seed=3).start()
        self.addCleanup(fleet.stop)
        # 0.02-0.03 s doubling, 4 retransmissions: 0.62-0.93 s per message.
        wait(lambda: fleet.devices[0].gave_up >= 2)
        fleet.stop()
        messages = [parse(data) for data, _ in server.received]
        by_mid = Counter(m.mid for m in messages)
        first, second = list(by_mid)[:2]
        self.assertEqual((by_mid[first], by_mid[second]), (5, 5))
        self.assertEqual(second, (first + 1) & 0xFFFF)
        tokens = {m.mid: m.token for m in messages}
        self.assertNotEqual(tokens[first], tokens[second])
        # The same reading, sent again as a new message.
        payloads = {m.payload for m in messages}
        self.assertEqual(len(payloads), 1)
        self.assertEqual(orjson.loads(payloads.pop())["seq"], 1)

    def test_through_a_lossy_relay_every_device_moves_on_reading_by_reading(self):
        server = UdpServer(self, answer=True)
        proxy = LossyProxy(("::1", server.port), 0.3, seed=2).start()
        self.addCleanup(proxy.stop)
        fleet = DeviceFleet(("::1", proxy.port), 5, ack_timeout=0.02, interval=0.0,
                            seed=4).start()
        self.addCleanup(fleet.stop)
        wait(lambda: all(len(d.acknowledged) >= 20 for d in fleet.devices))
        self.assertTrue(fleet.drain(10))
        for numbers in fleet.acknowledged.values():
            self.assertEqual(numbers, list(range(1, len(numbers) + 1)))
        summary = fleet.summary()
        self.assertGreater(summary["retransmissions"], 10)
        self.assertEqual(summary["errors"], {})
        seqs = [orjson.loads(parse(d).payload)["seq"] for d, _ in server.received]
        self.assertEqual(max(seqs), max(len(n) for n in fleet.acknowledged.values()))


class SoakFiguresTests(SynchronousTestCase):
    def test_percentiles_from_the_histogram(self):
        histogram = Counter({round(0.001 * k / BUCKET): 1 for k in range(1, 101)})  # 1..100 ms
        got = percentiles(histogram)
        self.assertEqual((got["p50"], got["p90"], got["p99"], got["max"]), (51, 91, 100, 100))
        self.assertEqual(percentiles(Counter())["p50"], None)

    def test_rss_trend_leaves_the_first_row_out(self):
        rows = [{"t_s": 60 * i, "rss_mb": rss} for i, rss in enumerate([50, 100, 101, 100, 101])]
        trend = rss_trend(rows)
        self.assertEqual((trend["growth_mb"], trend["min_mb"], trend["max_mb"]), (1, 100, 101))
        self.assertLess(abs(trend["slope_mb_per_10min"]), 5)


class BenchModesTests(TestCase):
    timeout = 180

    @defer.inlineCallbacks
    def test_crash_loop_accounts_for_every_reading(self):
        out, _ = yield sense_bench("--crash-loop", "--kills", "2", "--uptime", "0.5:1",
                                   "--ack-timeout", "0.1", "--devices", "10", "--seed", "5",
                                   "--json")
        result = orjson.loads(out)["result"]
        self.assertTrue(result["ok"], result)
        self.assertEqual((result["kills"], result["devices"], result["loss"]), (2, 10, 0.2))
        self.assertGreater(result["acknowledged"], 0)
        self.assertEqual(result["stored"], result["acknowledged"])
        self.assertEqual((result["duplicates"], result["registry"]["lost"]), (0, 0))
        self.assertEqual(result["missing"], {})
        self.assertGreater(result["proxy"]["up_dropped"], 0)

    @defer.inlineCallbacks
    def test_soak_prints_a_row_per_interval_with_memory_latency_and_queue(self):
        out, err = yield sense_bench("--soak", "--duration", "4", "--every", "2", "--rate", "200",
                                     "--devices", "20", "--json")
        document = orjson.loads(out)
        rows = document["rows"]
        self.assertEqual([row["t_s"] for row in rows], [2, 4])
        for row in rows:
            self.assertGreater(row["rss_mb"], 10)
            self.assertIsNotNone(row["latency_ms"]["p99"])
            self.assertIsNotNone(row["queue_waiting"])
            self.assertGreater(row["ok"], 300)
        self.assertLessEqual(abs(document["result"]["sent"] - 800), 1)
        self.assertEqual(document["result"]["lost"], 0)
        self.assertIn("| t s | 2.xx/s |", err)  # the rows, as they came, on stderr
