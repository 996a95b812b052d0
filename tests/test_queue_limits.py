"""The queue at its limits: a disk that cannot take a write, and the bound
on the backlog (``queue.max_depth``), in the queue service and in a
``twistd`` gateway spoken to over CoAP.

A full disk is made with ``RLIMIT_FSIZE`` on the gateway process (a write
past it fails, as on a full disk) or SQLite's ``max_page_count``.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import orjson
from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase
from txthings import coap

from sense_gateway.errors import Unavailable
from sense_gateway.queues.sqlite import SQLiteQueue, SQLiteQueueStore
from tests.servers import VictoriaMetrics
from tests.test_dashboard import BrowserSession
from tests.support import (GatewayProcess, RawCoapPeer, deferLater, eventually, queued,
                           request_datagram)
from tests.test_queue_sqlite import envelope


class LimitedStore(SQLiteQueueStore):
    def limit_pages(self, pages: int | None) -> None:
        """No page more than *pages* in the file (None: the current count)."""
        if pages is None:
            pages = self.db.execute("PRAGMA page_count").fetchone()[0]
        self.db.execute(f"PRAGMA max_page_count = {pages}")


class LimitedQueue(SQLiteQueue):
    def open_store(self):
        return LimitedStore(self.path, **self._store_options)


class QueueServiceLimitTests(TestCase):
    def start(self, **options) -> SQLiteQueue:
        queue = LimitedQueue(Path(self.mktemp()).resolve() / "queue.sqlite3", reactor,
                             retry_after=3, **options)
        queue.startService()
        self.addCleanup(queue.stopService)
        return queue

    @defer.inlineCallbacks
    def assertUnavailable(self, d, diagnostic: str):
        error = yield self.assertFailure(d, Unavailable)
        self.assertEqual((error.diagnostic, error.max_age), (diagnostic, 3))

    @defer.inlineCallbacks
    def test_a_full_file_refuses_puts_says_why_and_takes_them_again_with_room(self):
        queue = self.start()
        yield queue.put([envelope(1)])
        yield queue.with_store(lambda store: store.limit_pages(None))
        yield self.assertUnavailable(queue.put([envelope(i) for i in range(2, 400)]),
                                     "queue write failed")
        yield self.assertUnavailable(queue.put([envelope(401)] * 300), "queue write failed")
        error = yield self.assertFailure(queue.check(), Unavailable)
        self.assertEqual(error.diagnostic,
                         "queue write failed: OperationalError: database or disk is full")
        self.assertEqual(queue.refusals["write failed"], 2)
        # Logged when writing started failing, not again for each commit.
        self.assertEqual(len(self.flushLoggedErrors(sqlite3.OperationalError)), 1)

        yield queue.with_store(lambda store: store.limit_pages(1_000_000))
        yield queue.put([envelope(402)])
        yield queue.check()
        self.assertIsNone(queue.write_error)
        self.assertEqual([e.seq for e in queued(queue.path)], [1, 402])

    @defer.inlineCallbacks
    def test_beyond_max_depth_puts_are_refused_until_the_processor_makes_room(self):
        queue = self.start(max_depth=5)
        yield queue.put([envelope(i) for i in range(1, 5)])
        yield self.assertUnavailable(queue.put([envelope(5), envelope(6)]), "queue full")
        yield queue.put([envelope(5)])
        yield self.assertUnavailable(queue.put([envelope(6)]), "queue full")
        error = yield self.assertFailure(queue.check(), Unavailable)
        self.assertEqual(error.diagnostic, "queue full: 5 envelopes waiting (queue.max_depth 5)")
        self.assertEqual(queue.refusals["full"], 2)

        # Received is still in the queue; deleted makes room.
        received = yield queue.receive(2)
        yield self.assertUnavailable(queue.put([envelope(6)]), "queue full")
        yield queue.delete([m.receipt for m in received])
        yield queue.put([envelope(6), envelope(7)])
        yield queue.check().addErrback(lambda f: None)  # full again, and says so
        self.assertEqual(sorted(e.seq for e in queued(queue.path)), [3, 4, 5, 6, 7])

    @defer.inlineCallbacks
    def test_room_made_by_another_process_is_noticed(self):
        queue = self.start(max_depth=3)
        yield queue.put([envelope(i) for i in range(3)])
        yield self.assertUnavailable(queue.put([envelope(3)]), "queue full")
        # A processor of its own (role processor) drains the same file.
        other = SQLiteQueueStore(queue.path)
        self.addCleanup(other.close)
        other.delete([m.receipt for m in other.receive(3)])
        # Refusing, the queue counts again from the file within a second or two.
        yield eventually(lambda: queue.waiting == 0, timeout=5)
        yield queue.put([envelope(4)])

    @defer.inlineCallbacks
    def test_a_dead_letter_and_a_replay_change_the_count(self):
        queue = self.start(max_depth=2)
        yield queue.put([envelope(1), envelope(2)])
        [first, _] = yield queue.receive(2)
        yield queue.dead_letter(first.receipt, "refused: HTTP 400")
        yield queue.put([envelope(3)])
        yield self.assertUnavailable(queue.put([envelope(4)]), "queue full")
        self.assertEqual((yield queue.replay()), 1)
        self.assertEqual(queue.waiting, 3)


def coap_post(peer: RawCoapPeer, port: int, body: dict, mid: int):
    datagram = request_datagram(payload=orjson.dumps(body), content_format=50, mid=mid,
                                token=mid.to_bytes(2, "big"))
    return peer.request(datagram, port)


def max_age(response) -> int | None:
    return response.option(coap.MAX_AGE)


class FullDiskProcessTests(TestCase):
    """``twistd`` whose files cannot grow (RLIMIT_FSIZE), as on a full disk."""

    timeout = 120

    @defer.inlineCallbacks
    def test_full_disk_answers_503_with_max_age_never_204_and_resumes_by_itself(self):
        gateway = GatewayProcess(self, "--role", "gateway", env={"SENSE_QUEUE_RETRY_AFTER": "7"})
        yield gateway.wait_listening()
        peer = RawCoapPeer(self)
        acknowledged, refused = [], []

        def post(seq):
            return coap_post(peer, gateway.port, {"id": "node-f", "seq": seq, "data": {"t": seq}},
                             mid=seq)

        response = yield post(1)
        self.assertEqual(response.code, coap.CHANGED)
        acknowledged.append(1)
        # No file may grow by more than a page now: the next commits fail.
        files = [f for f in gateway.data_dir.iterdir() if f.is_file()]
        gateway.limit_file_size(max(f.stat().st_size for f in files) + 4096)
        for seq in range(2, 30):
            response = yield post(seq)
            self.assertIn(response.code, (coap.CHANGED, coap.SERVICE_UNAVAILABLE))
            if response.code == coap.CHANGED:
                acknowledged.append(seq)
            else:
                self.assertEqual((response.payload, max_age(response)), (b"queue write failed", 7))
                refused.append(seq)
        self.assertGreater(len(refused), 20)
        status, health = yield gateway.get_json("/healthz")
        self.assertEqual(status, 503)
        self.assertEqual(list(health["failing"]), ["queue"])
        self.assertIn("queue write failed: OperationalError: disk I/O error",
                      health["failing"]["queue"])

        # Room again: the next request is stored, without a restart.
        gateway.limit_file_size(None)
        response = yield post(100)
        self.assertEqual(response.code, coap.CHANGED)
        acknowledged.append(100)
        status, health = yield gateway.get_json("/healthz")
        self.assertEqual((status, health), (200, {"status": "ok"}))
        status, metrics = yield gateway.get("/metrics")
        self.assertIn(f'sense_queue_refusals_total{{reason="write failed"}} {len(refused)}.0',
                      metrics.decode())
        gateway.kill()
        self.assertEqual(sorted(e.seq for e in queued(gateway.queue_path)), acknowledged)


class BacklogTests(TestCase):
    """``queue.max_depth`` while the metrics server is down, in ``twistd``."""

    timeout = 180

    @defer.inlineCallbacks
    def test_an_outage_fills_the_queue_to_its_bound_then_everything_is_delivered(self):
        vm = VictoriaMetrics(self)
        vm.stop()
        gateway = GatewayProcess(self, "--role", "all", env={
            "SENSE_QUEUE_MAX_DEPTH": "40", "SENSE_QUEUE_RETRY_AFTER": "2",
            "SENSE_QUEUE_MAX_RECEIVES": "3",
            **vm.environment("sqlite"), "SENSE_PROCESSOR_POLL_INTERVAL": "0.05",
            "SENSE_PROCESSOR_RETRY_BASE": "0.1", "SENSE_PROCESSOR_RETRY_MAX": "0.5",
            "SENSE_STORE_RETENTION_DAYS": "36500"})
        yield gateway.wait_listening()
        peer = RawCoapPeer(self)
        sent = {}
        refused = []
        for seq in range(1, 61):
            body = {"id": f"node-{seq % 4}", "seq": seq, "ts": 1764300000 + seq, "data": {"t": seq}}
            response = yield coap_post(peer, gateway.port, body, mid=seq)
            sent[seq] = body
            if response.code == coap.SERVICE_UNAVAILABLE:
                self.assertEqual((response.payload, max_age(response)), (b"queue full", 2))
                refused.append(seq)
            else:
                self.assertEqual(response.code, coap.CHANGED)
        # The bound held: 40 stored and waiting, the other 20 refused.
        self.assertEqual(refused, list(range(41, 61)))
        status, health = yield gateway.get_json("/healthz")
        self.assertEqual(status, 503)
        self.assertEqual(health["failing"]["queue"],
                         "queue full: 40 envelopes waiting (queue.max_depth 40)")
        self.assertIn("cannot reach", health["failing"]["processor"])
        status, stats = yield gateway.get_json("/api/stats")
        self.assertEqual(stats["backlog"], {"waiting": 40, "max_depth": 40})
        self.assertEqual(stats["queue"]["dead"], 0)
        # The dashboard shows it, marked as full.
        base = yield gateway.web_url()
        browser = BrowserSession(self, base + "?refresh=0.5",
                                 Path(self.mktemp()).resolve().with_suffix(".png"))
        seen = yield browser.look(stats={"backlog": "40 of 40"})
        self.assertNotIn("error", seen, seen)
        self.assertEqual(seen["highlighted"], ["backlog"])
        yield browser.close()

        # Seconds of backoff later, nothing has used up its receives.
        yield eventually(lambda: gateway.log_path.read_bytes().count(b"messages wait in the queue") >= 1)
        yield deferLater(3)
        status, stats = yield gateway.get_json("/api/stats")
        self.assertEqual(stats["queue"]["dead"], 0)

        vm.start()
        # The devices that were refused try again once Max-Age has passed.
        pending = list(refused)
        while pending:
            yield deferLater(2)
            for seq in list(pending):
                response = yield coap_post(peer, gateway.port, sent[seq], mid=1000 + seq)
                if response.code == coap.CHANGED:
                    pending.remove(seq)
        yield eventually(lambda: sum(len(v) for (name, _), v in vm.points().items()
                                     if name == "sense_t") == 60, timeout=60)
        points = vm.points()
        delivered = {(device, ts // 1000 - 1764300000): value
                     for (name, device), values in points.items() if name == "sense_t"
                     for ts, value in values.items()}
        self.assertEqual(delivered, {(b["id"], seq): float(seq) for seq, b in sent.items()})
        status, health = yield gateway.get_json("/healthz")
        self.assertEqual((status, health), (200, {"status": "ok"}))
        status, stats = yield gateway.get_json("/api/stats")
        self.assertEqual((stats["processor"]["written"], stats["processor"]["duplicate"],
                          stats["queue"]["dead"]), (60, 0, 0))
