"""``--workers N``: processes each with a queue shard of its own,
ingesting on shared CoAP ports and processing their own shards."""

from __future__ import annotations

import os
import re
import signal
import socket
import sqlite3
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import orjson
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer
from twisted.internet.error import ProcessTerminated
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from txthings import coap

from sense_gateway.coap.transport import free_shared_port, udp_socket
from sense_gateway.envelope import Envelope, Reading, new_envelope_id
from sense_gateway.queues.sqlite import SQLiteQueueStore
from sense_gateway.worker_reports import CounterReporter
from sense_gateway.workers import WorkerSupervisor
from tests.support import (BIN, GatewayProcess, RawCoapPeer, deferLater, eventually,
                           libcoap_request, queued, request_datagram)


class SharedPortTests(SynchronousTestCase):
    """What the design rests on: with SO_REUSEPORT, Linux hands all of one
    peer's datagrams to the same socket (a hash of the 4-tuple)."""

    def test_each_peer_sticks_to_one_socket(self):
        port = free_shared_port("127.0.0.1")
        servers = []
        for _ in range(2):
            server = udp_socket("127.0.0.1", reuse_port=True)
            server.bind(("127.0.0.1", port))
            server.setblocking(False)
            self.addCleanup(server.close)
            servers.append(server)
        peers = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(32)]
        for peer in peers:
            self.addCleanup(peer.close)
            peer.bind(("127.0.0.1", 0))
        for round_ in range(20):
            for number, peer in enumerate(peers):
                peer.sendto(b"%d" % number, ("127.0.0.1", port))
        time.sleep(0.2)
        reached: dict[bytes, set[int]] = {}
        for index, server in enumerate(servers):
            while True:
                try:
                    data, _ = server.recvfrom(100)
                except BlockingIOError:
                    break
                reached.setdefault(data, set()).add(index)
        self.assertEqual(len(reached), len(peers))
        self.assertEqual([p for p, sockets in reached.items() if len(sockets) > 1], [])
        # Both sockets take peers (all 32 on one: a chance of 2**-31).
        self.assertEqual({i for sockets in reached.values() for i in sockets}, {0, 1})


class FakeProcessReactor(Clock):
    """A clock that records spawned processes and the signals sent to them."""

    def __init__(self):
        super().__init__()
        self.spawned = []
        #: how many spawns fail next, as without file descriptors
        self.refuse = 0

    def spawnProcess(self, proto, executable, args, env=None, **kwargs):
        reactor = self
        if self.refuse:
            self.refuse -= 1
            raise OSError(24, "Too many open files")

        class Transport:
            pid = 1000 + len(reactor.spawned)
            signals = []

            def signalProcess(self, name):
                self.signals.append(name)

            def closeStdin(self):
                pass
        transport = Transport()
        proto.makeConnection(transport)
        self.spawned.append((proto, transport, args))
        return transport


class SupervisorTests(SynchronousTestCase):
    """Respawn and stop, on a fake reactor."""

    def setUp(self):
        self.reactor = FakeProcessReactor()
        self.supervisor = WorkerSupervisor(self.reactor, 2, lambda i: ["--worker", str(i)],
                                           stop_timeout=15)
        self.supervisor.startService()

    def end(self, number: int) -> None:
        proto = self.reactor.spawned[number][0]
        proto.processEnded(Failure(ProcessTerminated(signal=signal.SIGKILL)))

    def test_a_dead_worker_is_started_again_later_and_later_while_it_dies_young(self):
        self.assertEqual([a[-1] for _, _, a in self.reactor.spawned], ["0", "1"])
        latest = 0  # worker 0's process
        for delay in (1.0, 2.0, 4.0):
            before = len(self.reactor.spawned)
            self.end(latest)
            self.reactor.advance(delay - 0.01)
            self.assertEqual(len(self.reactor.spawned), before)
            self.reactor.advance(0.01)
            self.assertEqual(self.reactor.spawned[-1][2][-1], "0")
            latest = len(self.reactor.spawned) - 1
        self.assertEqual(self.supervisor.starts, {0: 4, 1: 1})
        # One that lived a while is started again after a second.
        self.reactor.advance(60)
        self.end(len(self.reactor.spawned) - 1)
        self.reactor.advance(1.0)
        self.assertEqual(self.supervisor.starts, {0: 5, 1: 1})

    def test_a_worker_that_could_not_be_spawned_is_tried_again(self):
        self.reactor.refuse = 2
        self.end(0)
        self.reactor.advance(1.0)  # first try fails: no process
        self.reactor.advance(2.0)  # second too
        self.assertEqual(len(self.reactor.spawned), 2)
        self.assertIsNotNone(self.failureResultOf(self.supervisor.check()))
        self.reactor.advance(4.0)
        self.assertEqual(self.reactor.spawned[-1][2][-1], "0")
        self.assertEqual(self.supervisor.starts, {0: 2, 1: 1})
        self.successResultOf(self.supervisor.check())

    def test_worker_output_is_logged_by_line_and_its_reports_are_kept(self):
        from twisted.logger import capturedLogs, formatEvent

        proto = self.reactor.spawned[0][0]
        with capturedLogs() as events:
            proto.childDataReceived(1, b"2026-12-01T10:00:00+0000 [x#info] half of ")
            proto.childDataReceived(2, b"Traceback (most recent call last):\n")
            proto.childDataReceived(3, b'{"coap": {"requests": 4, "resp')
            proto.childDataReceived(1, b"a line\n")
            proto.childDataReceived(3, b'onses": {"2.04": 4}}}\n')
            proto.childDataReceived(2, b"SystemExit: no port")
            self.end(0)
        lines = [formatEvent(e) for e in events]
        self.assertEqual(lines[:3], ["worker 0: Traceback (most recent call last):",
                                     "worker 0: [x#info] half of a line",
                                     "worker 0: SystemExit: no port"])
        self.assertEqual(self.supervisor.reports.by_worker(),
                         {"0": {"coap": {"requests": 4, "responses": {"2.04": 4}}}})

    def test_a_restarted_workers_counts_add_to_its_last_ones_but_not_its_states(self):
        def report(number, sessions, completed):
            self.reactor.spawned[number][0].childDataReceived(3, orjson.dumps({"security": {
                "credentialed_devices": 7, "refused": {"identity": completed},
                "dtls": {"sessions": sessions, "handshakes_completed": completed}}}) + b"\n")
        report(0, sessions=3, completed=5)
        report(1, sessions=1, completed=2)
        self.end(0)
        self.assertEqual(self.supervisor.reports.by_worker()["0"]["security"],
                         {"refused": {"identity": 5}, "dtls": {"handshakes_completed": 5}})
        self.reactor.advance(1.0)
        report(2, sessions=1, completed=1)  # worker 0 again
        self.assertEqual(self.supervisor.reports.by_worker()["0"]["security"], {
            "credentialed_devices": 7, "refused": {"identity": 6},
            "dtls": {"sessions": 1, "handshakes_completed": 6}})
        # Summed: counts and sessions add up, the devices known stay 7.
        self.assertEqual(self.supervisor.reports.summed()["security"], {
            "credentialed_devices": 7, "refused": {"identity": 8},
            "dtls": {"sessions": 2, "handshakes_completed": 8}})

    def test_stop_terminates_every_worker_and_waits_for_them(self):
        stopped = self.supervisor.stopService()
        self.assertEqual([t.signals for _, t, _ in self.reactor.spawned], [["TERM"], ["TERM"]])
        self.assertNoResult(stopped)
        self.end(0)
        self.assertNoResult(stopped)
        self.end(1)
        self.successResultOf(stopped)
        self.assertEqual(self.reactor.getDelayedCalls(), [])  # nothing started again

    def test_a_worker_that_does_not_stop_is_killed(self):
        stopped = self.supervisor.stopService()
        self.end(0)
        self.reactor.advance(15)
        self.assertEqual(self.reactor.spawned[1][1].signals, ["TERM", "KILL"])
        self.end(1)
        self.successResultOf(stopped)


class StoppableClock(Clock):
    stopped = 0

    def stop(self):
        self.stopped += 1


class CounterReporterTests(SynchronousTestCase):
    """A worker's side of the report pipe."""

    def setUp(self):
        self.read_end, write_end = os.pipe()
        self.addCleanup(os.close, write_end)
        self.reactor = StoppableClock()
        self.counts = {"coap": {"requests": 0}}
        self.reporter = CounterReporter(self.reactor, lambda: self.counts, fd=write_end)
        self.reporter.startService()

    def test_a_line_four_times_a_second_and_a_last_one_on_stop(self):
        self.addCleanup(os.close, self.read_end)
        self.reactor.advance(0.25)
        self.counts = {"coap": {"requests": 3}}
        self.reactor.advance(0.25)
        self.counts = {"coap": {"requests": 5}}
        self.reporter.stopService()
        lines = os.read(self.read_end, 1000).splitlines()
        self.assertEqual([orjson.loads(line)["coap"]["requests"] for line in lines], [0, 3, 5])
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_a_worker_whose_master_is_gone_stops(self):
        os.close(self.read_end)
        self.reactor.advance(0.25)
        self.assertEqual(self.reactor.stopped, 1)
        self.reporter.stopService()
        self.assertEqual(self.reactor.stopped, 1)


class ShardCommandTests(SynchronousTestCase):
    """``sense queue`` and ``sense dlq`` over the shards workers left."""

    def sense(self, data_dir, *args) -> str:
        return subprocess.run([str(BIN / "sense"), "--data-dir", str(data_dir),
                               "--plugins-dir", str(data_dir / "none"), *args],
                              check=True, capture_output=True, timeout=60, text=True).stdout

    def test_dead_letters_of_every_shard_are_listed_and_replayed_by_shard(self):
        from tests.test_queue_sqlite import envelope

        data_dir = Path(self.mktemp())
        for name, count, device in (("queue.sqlite3", 2, "s-0"), ("queue-1.sqlite3", 1, "s-1")):
            store = SQLiteQueueStore(data_dir / name)
            store.put_many([replace(envelope(seq), device=device).to_json()
                            for seq in range(1, count + 1)])
            [first, *_] = store.receive(1)
            store.dead_letter(first.receipt, f"refused in {name}")
            store.close()
        letters = orjson.loads(self.sense(data_dir, "dlq", "list", "--json"))
        self.assertEqual(sorted((d["id"], d["device"], d["reason"]) for d in letters),
                         [("0:1", "s-0", "refused in queue.sqlite3"),
                          ("1:1", "s-1", "refused in queue-1.sqlite3")])
        self.assertEqual(self.sense(data_dir, "dlq", "replay", "--id", "1:1"),
                         "1 message back in the queue\n")
        self.assertEqual(orjson.loads(self.sense(data_dir, "queue", "--json")),
                         {"visible": 2, "in_flight": 0, "dead": 1})
        # An id without its shard replays nothing, and says why.
        for bare in ("1", "2:1", "x:1"):
            refused = subprocess.run([str(BIN / "sense"), "--data-dir", str(data_dir),
                                      "--plugins-dir", str(data_dir / "none"), "dlq", "replay",
                                      "--id", bare], capture_output=True, timeout=60, text=True)
            self.assertEqual((refused.returncode, refused.stderr),
                             (2, f"sense: --id {bare}: a dead letter's id names its shard, "
                                 "0 to 1 (SHARD:ID, as `sense dlq list` shows it)\n"))
        self.assertEqual(orjson.loads(self.sense(data_dir, "queue", "--json"))["dead"], 1)


class LeftShardTests(TestCase):
    """A shard left by an earlier run with more workers is drained, and
    seen by ``sense queue``, whatever ``--workers`` says now."""

    timeout = 120

    @staticmethod
    def leave_shards(data_dir: Path) -> None:
        """What ``--workers 3`` left: three readings in shard 2, none elsewhere."""
        from sense_gateway.envelope import Reading
        from tests.test_queue_sqlite import envelope

        store = SQLiteQueueStore(data_dir / "queue-2.sqlite3")
        now = time.time()  # within the store's retention
        store.put_many([replace(envelope(seq), device="left-2", readings=[
            Reading({"t": float(seq)}, now + seq)]).to_json() for seq in (1, 2, 3)])
        store.close()

    @defer.inlineCallbacks
    def drained_by(self, *args):
        gateway = GatewayProcess(self, *args, prepare=self.leave_shards)
        sense = [str(BIN / "sense"), "--data-dir", str(gateway.data_dir), "--plugins-dir",
                 str(gateway.data_dir / "plugins")]

        yield eventually(lambda: stored(gateway, "t")
                         == {("left-2", 1.0), ("left-2", 2.0), ("left-2", 3.0)},
                         timeout=40)
        depth = subprocess.run([*sense, "queue", "--json"], check=True, capture_output=True,
                               timeout=60).stdout
        self.assertEqual(orjson.loads(depth), {"visible": 0, "in_flight": 0, "dead": 0})

    def test_one_process_drains_a_shard_left_by_more_workers(self):
        return self.drained_by()

    def test_fewer_workers_drain_a_shard_left_by_more_workers(self):
        return self.drained_by("--workers", "2")


def stored(gateway, field: str) -> set[tuple[str, float]]:
    """(device, value) of every reading of *field* in the gateway's
    embedded store, read by a second connection (none before it exists)."""
    path = gateway.data_dir / "readings.sqlite3"
    if not path.exists():
        return set()
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return set(db.execute("SELECT device, value FROM readings WHERE field = ?", (field,)))
    except sqlite3.OperationalError:  # its table not created yet
        return set()
    finally:
        db.close()


def per_worker(metrics: bytes, name: str, **labels: str) -> dict[str, float]:
    """{worker: value} of the samples *name* with *labels* in a /metrics page."""
    return {s.labels["worker"]: s.value
            for family in text_string_to_metric_families(metrics.decode())
            for s in family.samples
            if s.name == name and {k: s.labels.get(k) for k in labels} == labels}


def workers_started(gateway) -> list[tuple[int, int]]:
    """(index, pid) of every worker start the master logged, in order."""
    return [(int(i), int(pid)) for i, pid in re.findall(
        rb"worker (\d+) started, pid (\d+)", gateway.log_path.read_bytes())]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead too: our own child that has not been reaped.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


class WorkersTests(TestCase):
    """A real ``twistd sense-gateway --workers 2``, devices on their own ports."""

    timeout = 120

    @defer.inlineCallbacks
    def start(self, *args, env=None):
        gateway = GatewayProcess(self, "--workers", "2", *args, env=env)
        yield eventually(lambda: gateway.log_path.exists() and gateway.log_path.read_bytes()
                         .count(b"CoAP listening") == 2, timeout=40)
        return gateway

    @defer.inlineCallbacks
    def post(self, gateway, peer, device: str, seq: int, mid: int):
        """Post one reading until it is acknowledged (a request that
        reached a worker being killed is sent again, as a device would)."""
        datagram = request_datagram(payload=orjson.dumps(
            {"id": device, "seq": seq, "data": {"n": seq}}), content_format=50, mid=mid,
            token=mid.to_bytes(2, "big"))
        for _ in range(40):
            try:
                response = yield peer.request(datagram, gateway.port, timeout=0.5)
            except TimeoutError:
                continue
            if response.code == coap.CHANGED and response.mid == mid:
                return
            yield deferLater(0.2)  # 5.03 while a worker stops: try again
        self.fail(f"{device} seq {seq} never acknowledged")

    def sense(self, gateway, *args) -> str:
        return subprocess.run([str(BIN / "sense"), "--data-dir", str(gateway.data_dir), *args],
                              check=True, capture_output=True, timeout=60, text=True).stdout

    @defer.inlineCallbacks
    def test_peers_stay_on_one_worker_and_every_shard_is_seen(self):
        gateway = yield self.start("--role", "gateway")
        peers = {f"w-{n}": RawCoapPeer(self) for n in range(24)}
        for seq in range(1, 5):
            for n, (device, peer) in enumerate(peers.items()):
                yield self.post(gateway, peer, device, seq, 100 * seq + n)
        shards = {path.name: [e.device for e in queued(path)]
                  for path in (gateway.data_dir / "queue.sqlite3",
                               gateway.data_dir / "queue-1.sqlite3")}
        # Every device's readings in one shard: each one peer, one worker.
        homes = {d: [name for name, devices in shards.items() if d in devices] for d in peers}
        self.assertEqual({d: len(h) for d, h in homes.items()}, dict.fromkeys(peers, 1))
        self.assertTrue(all(shards.values()), shards)  # both workers took some
        self.assertEqual(orjson.loads(self.sense(gateway, "queue", "--json")),
                         {"visible": 96, "in_flight": 0, "dead": 0})
        self.assertEqual(self.sense(gateway, "dlq", "list"), "no dead letters\n")
        status, health = yield gateway.get_json("/healthz")
        self.assertEqual(status, 200, health)
        status, metrics = yield gateway.get("/metrics")
        self.assertIn(b'sense_queue_messages{state="visible"} 96.0', metrics)

        # SIGTERM: the master stops its workers, then itself.
        pids = [pid for _, pid in workers_started(gateway)]
        gateway.process.terminate()
        # twistd stops cleanly, then reports the signal that stopped it.
        self.assertIn(gateway.process.wait(30), (0, -signal.SIGTERM))
        self.assertEqual([pid for pid in pids if alive(pid)], [])
        log = gateway.log_path.read_bytes()
        for index in (0, 1):
            self.assertIn(b"worker %d: [twisted.scripts._twistd_unix.UnixAppLogger#info] "
                          b"Server Shut Down." % index, log)
        self.assertTrue(log.rstrip().endswith(b"Server Shut Down."), log[-300:])

    @defer.inlineCallbacks
    def test_dtls_handshakes_and_requests_complete_on_one_worker(self):
        # A handshake takes several flights from one source port: every one
        # must reach the worker holding that peer's DTLS state.
        gateway = yield self.start("--role", "gateway",
                                   env={"SENSE_SECURITY_REFRESH_INTERVAL": "0.1"})
        keys = {f"d-{n}": f"{n:02d}".encode() * 8 for n in range(8)}
        for device, key in keys.items():
            self.sense(gateway, "devices", "add", device, "--psk-hex", key.hex())
        yield deferLater(2.0)  # both workers have the keys by now
        url = f"coaps://[::1]:{gateway.coaps_port}/data"

        def post(device):
            return libcoap_request("post", url, b'{"id": "%s", "data": {"t": 1}}' % device.encode(),
                                   50, extra=("-u", device, "-k", keys[device].decode()),
                                   client="coap-client-openssl")
        for device in keys:
            response = yield post(device)
            self.assertEqual(response.code, "2.04", (device, response))
        stored = [e for name in ("queue.sqlite3", "queue-1.sqlite3")
                  for e in queued(gateway.data_dir / name)]
        self.assertEqual(sorted((e.transport, e.identity) for e in stored),
                         [("coaps", d) for d in keys])

    @defer.inlineCallbacks
    def test_sigkill_of_a_worker_loses_nothing_it_acknowledged(self):
        gateway = yield self.start()
        peers = {f"k-{n}": RawCoapPeer(self) for n in range(16)}
        acknowledged = set()
        for seq in range(1, 9):
            if seq == 4:
                [(index, pid), _] = workers_started(gateway)
                os.kill(pid, signal.SIGKILL)
                # Down until the master starts it again (1 s): /healthz says so.
                for _ in range(50):
                    status, health = yield gateway.get_json("/healthz")
                    if status != 200:
                        break
                self.assertEqual((status, health["failing"]["workers"]),
                                 (503, f"WorkersDown: 1 of 2 running; down: {index}"))
            for n, (device, peer) in enumerate(peers.items()):
                yield self.post(gateway, peer, device, seq, 100 * seq + n)
                acknowledged.add((device, float(seq)))
        # The master starts the killed worker again.
        yield eventually(lambda: [i for i, _ in workers_started(gateway)].count(index) == 2,
                         timeout=20)
        status, metrics = yield gateway.get("/metrics")
        self.assertIn(b'sense_worker_starts_total{worker="%d"} 2.0' % index, metrics)
        self.assertIn(b"sense_workers_running 2.0", metrics)
        status, health = yield gateway.get_json("/healthz")
        self.assertEqual(status, 200, health)

        yield eventually(lambda: acknowledged <= stored(gateway, "n"), timeout=40)
        self.assertEqual(stored(gateway, "n"), acknowledged)
        yield eventually(lambda: orjson.loads(self.sense(gateway, "queue", "--json"))
                         == {"visible": 0, "in_flight": 0, "dead": 0}, timeout=20)

    @defer.inlineCallbacks
    def metrics_once(self, gateway, name: str, total: float, **labels: str):
        """The master's /metrics, once the workers' *name* series sum to *total*."""
        deadline = time.monotonic() + 10
        while True:
            status, metrics = yield gateway.get("/metrics")
            found = per_worker(metrics, name, **labels)
            if sum(found.values()) == total:
                return metrics
            if time.monotonic() > deadline:
                self.fail(f"{name} {labels} never summed to {total}: {found}")
            yield deferLater(0.2)

    @defer.inlineCallbacks
    def test_masters_metrics_count_every_workers_requests_and_never_go_back(self):
        gateway = yield self.start("--role", "gateway")
        peers = {f"m-{n}": RawCoapPeer(self) for n in range(12)}
        for seq in range(1, 4):
            for n, (device, peer) in enumerate(peers.items()):
                yield self.post(gateway, peer, device, seq, 100 * seq + n)
        peers["m-0"].send(b"\x00", gateway.port)  # not CoAP: counted as malformed
        metrics = yield self.metrics_once(gateway, "sense_coap_requests_total", 36)
        requests = per_worker(metrics, "sense_coap_requests_total")
        self.assertEqual(sorted(requests), ["0", "1"])
        self.assertTrue(all(requests.values()), requests)  # both workers took some
        self.assertEqual(per_worker(metrics, "sense_coap_responses_total", code="2.04"), requests)
        self.assertEqual(sum(per_worker(metrics, "sense_coap_malformed_total").values()), 1)
        self.assertEqual(sum(per_worker(metrics, "sense_enqueue_latency_seconds_count").values()),
                         36)
        status, stats = yield gateway.get_json("/api/stats")
        self.assertEqual((stats["coap"]["requests"], stats["coap"]["responses"]),
                         (36, {"2.04": 36}))
        self.assertEqual({i: c["coap"]["requests"] for i, c in stats["workers"]["counters"].items()},
                         requests)

        # A worker stopped and started again: its counts stay and grow.
        [(index, pid), _] = workers_started(gateway)
        os.kill(pid, signal.SIGTERM)
        yield eventually(lambda: [i for i, _ in workers_started(gateway)].count(index) == 2,
                         timeout=20)
        for n, (device, peer) in enumerate(peers.items()):
            yield self.post(gateway, peer, device, 4, 400 + n)
        metrics = yield self.metrics_once(gateway, "sense_coap_responses_total", 48, code="2.04")
        again = per_worker(metrics, "sense_coap_requests_total")
        self.assertTrue(all(again[i] >= requests[i] for i in requests), (requests, again))
        self.assertEqual(sum(again.values()), 48)

def fill_shard(path: Path, devices: list[str], readings: int) -> set[tuple[str, float]]:
    """*readings* numbered readings of each device into the queue file
    *path*; the (device, value) pairs the store should end up with."""
    store = SQLiteQueueStore(path)
    try:
        now = time.time()
        store.put_many([Envelope(new_envelope_id(), device, seq, now, "[::1]:1", "coap", None,
                                 "/data", 50, [Reading({"n": float(seq)}, now - 100 + seq)]
                                 ).to_json()
                        for device in devices for seq in range(1, readings + 1)])
    finally:
        store.close()
    return {(device, float(seq)) for device in devices for seq in range(1, readings + 1)}


class ProcessorWorkersTests(TestCase):
    """``--role processor --workers 2``: each worker drains its own shards."""

    timeout = 120

    @defer.inlineCallbacks
    def test_each_worker_processes_its_own_shards(self):
        expected = {}

        def prepare(data_dir):
            # Shard 2 is left from a run with three workers: worker 0's now.
            for shard, name in enumerate(("queue.sqlite3", "queue-1.sqlite3", "queue-2.sqlite3")):
                expected[name] = fill_shard(data_dir / name, [f"s{shard}-{n}" for n in range(5)],
                                            40)
        gateway = GatewayProcess(self, "--role", "processor", "--workers", "2", prepare=prepare)
        yield eventually(lambda: gateway.log_path.exists() and gateway.log_path.read_bytes()
                         .count(b"processor started") == 2, timeout=40)

        everything = set().union(*expected.values())
        yield eventually(lambda: stored(gateway, "n") == everything, timeout=60)
        yield eventually(lambda: orjson.loads(self.sense(gateway, "queue", "--json"))
                         == {"visible": 0, "in_flight": 0, "dead": 0}, timeout=20)
        log = gateway.log_path.read_bytes()
        # The workers started processors; the master, none of its own.
        self.assertEqual(sorted(re.findall(rb"worker (\d): \S+ processor started", log)),
                         [b"0", b"1"])
        self.assertEqual(len(re.findall(rb"processor started", log)), 2)
        # Every device judged once in order: nothing lost, nothing twice.
        devices = orjson.loads(self.sense(gateway, "devices", "--json"))
        self.assertEqual({d["id"]: (d["received"], d["duplicates"], d["lost"]) for d in devices},
                         {device: (40, 0, 0) for device, _ in everything})

        # The master tells of its workers' processors (each reports four times a second).
        @defer.inlineCallbacks
        def written():
            status, stats = yield gateway.get_json("/api/stats")
            return stats.get("processor", {}).get("written")
        for _ in range(100):
            if (yield written()) == 600:
                break
            yield deferLater(0.1)
        status, stats = yield gateway.get_json("/api/stats")
        self.assertEqual(stats["processor"], {"written": 600, "duplicate": 0, "failed": 0,
                                              "refused": 0})
        self.assertEqual({i: c["processor"]["written"] > 0
                          for i, c in stats["workers"]["counters"].items()},
                         {"0": True, "1": True})
        status, metrics = yield gateway.get("/metrics")
        self.assertIn(b'sense_processed_messages_total{outcome="written"} 600.0', metrics)
        for index in (0, 1):
            self.assertIn(b'sense_processor_running{worker="%d"} 1.0' % index, metrics)
        status, health = yield gateway.get_json("/healthz")
        self.assertEqual(status, 200, health)

    @defer.inlineCallbacks
    def test_the_masters_healthz_names_a_worker_whose_sink_is_down(self):
        def prepare(data_dir):
            for shard, name in enumerate(("queue.sqlite3", "queue-1.sqlite3")):
                fill_shard(data_dir / name, [f"h{shard}"], 3)
        # Nothing listens on port 1: every write fails, the readings wait.
        gateway = GatewayProcess(self, "--role", "processor", "--workers", "2", prepare=prepare,
                                 env={"SENSE_SINKS_ENABLED": "influxdb",
                                      "SENSE_INFLUXDB_URL": "http://127.0.0.1:1",
                                      "SENSE_INFLUXDB_RETRIES": "0"})
        for _ in range(200):
            status, health = yield gateway.get_json("/healthz")
            named = health.get("failing", {}).get("processor", "")
            if status != 200 and "worker 0:" in named and "worker 1:" in named:
                break
            yield deferLater(0.1)
        self.assertEqual(status, 503, health)
        self.assertRegex(health["failing"]["processor"],
                         r"^worker 0: unavailable: .*; worker 1: unavailable: ")
        status, metrics = yield gateway.get("/metrics")
        self.assertIn(b'sense_processor_running{worker="1"} 0.0', metrics)
        self.assertEqual(orjson.loads(self.sense(gateway, "queue", "--json"))["dead"], 0)

    def sense(self, gateway, *args) -> str:
        return subprocess.run([str(BIN / "sense"), "--data-dir", str(gateway.data_dir), *args],
                              check=True, capture_output=True, timeout=60, text=True).stdout


class QueueWithoutShardsTests(SynchronousTestCase):
    """SQS has no shards: the master keeps the one processor."""

    def config(self, role: str):
        from sense_gateway.config import load_config
        return load_config(environ={"SENSE_WORKERS": "2", "SENSE_ROLE": role,
                                    "SENSE_QUEUE_BACKEND": "sqs",
                                    "SENSE_AWS_QUEUE_URL": "http://127.0.0.1:1/000000000000/q",
                                    "SENSE_DATA_DIR": self.mktemp()})

    def test_the_master_processes_and_the_workers_ingest(self):
        from sense_gateway.service import make_service
        master = make_service(self.config("all"), Clock(), worker_args=lambda i: [])
        worker = make_service(self.config("all"), Clock(), worker=0)
        self.assertIsNotNone(master.worker)
        self.assertIsNone(master.coap_server)
        self.assertIsNone(worker.worker)
        self.assertIsNotNone(worker.coap_server)

    def test_processor_workers_are_refused_with_why(self):
        from sense_gateway.errors import ConfigError
        from sense_gateway.service import make_service
        error = self.assertRaises(ConfigError, make_service, self.config("processor"), Clock(),
                                  worker_args=lambda i: [])
        self.assertIn("queue.backend 'sqs' has no shards", str(error))
