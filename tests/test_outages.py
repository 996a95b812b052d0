"""The processor when a backend lets it down: the embedded store on a full
disk, a registry it cannot open at start, and an SQS round whose dead
letter cannot be written. Real gateways (in this process or ``twistd``),
real SQLite files, moto, influxd."""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import replace
from pathlib import Path

import orjson
from twisted.internet import defer, reactor
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import TestCase
from txthings import coap

from sense_gateway.envelope import Reading
from sense_gateway.queues.sqlite import SQLiteQueueStore
from sense_gateway.registry.sqlite import SQLiteRegistry
from sense_gateway.sinks.sqlite import SQLiteStore
from tests.servers import InfluxDB1, MotoServer, http
from tests.support import (GatewayProcess, RawCoapPeer, coap_url, deferLater, eventually, http_get,
                           libcoap_request, metric_samples, request_datagram, start_gateway,
                           web_base)
from tests.test_cloud import AWS_ENV, set_environ

NOW = 1764300000


def batch(seq: int, count: int = 100) -> bytes:
    """One request of *count* readings, a second apart, three fields each."""
    return orjson.dumps({"id": "node-s", "seq": seq, "readings": [
        {"ts": NOW + seq * 1000 + i, "data": {"t": 20 + i / 10, "h": 40.5 + i, "p": 1000.25 - i}}
        for i in range(count)]})


@defer.inlineCallbacks
def get_json(gateway, path: str):
    response = yield http_get(web_base(gateway) + path)
    return response.code, response.json()


class StoreFullTests(TestCase):
    timeout = 120

    def queue_rows(self, gateway) -> list[tuple[int, int]]:
        store = SQLiteQueueStore(gateway.config.queue_path)
        try:
            return [(m.envelope.seq, m.receive_count) for m in store.peek()]
        finally:
            store.close()

    @defer.inlineCallbacks
    def test_readings_stay_in_the_queue_while_the_store_is_full_then_are_written(self):
        gateway = yield start_gateway(self, role="all", **{
            "sinks.enabled": ("sqlite",), "store.retention_days": 36500.0,
            "coap.max_payload": 8192,
            "queue.max_receives": 2, "processor.poll_interval": 0.05,
            "processor.retry_base": 0.05, "processor.retry_max": 0.2})
        yield eventually(lambda: gateway.worker.processor is not None)
        [store] = gateway.worker.processor.sinks
        # The store's file may not grow by one page (its thread: the worker's).
        yield gateway.worker._in_thread(lambda: store.db.execute(
            f"PRAGMA max_page_count = {store.db.execute('PRAGMA page_count').fetchone()[0]}"))
        peer = RawCoapPeer(self)
        for seq in (1, 2, 3):
            # One datagram each (6 KB): more rows than the store's page holds.
            response = yield peer.request(request_datagram(payload=batch(seq), content_format=50,
                                                           mid=seq), gateway.port)
            self.assertEqual(response.code, coap.CHANGED, response.payload)
        yield eventually(lambda: gateway.worker.problem is not None)
        self.assertIn("sqlite store: database or disk is full", gateway.worker.problem)
        status, health = yield get_json(gateway, "/healthz")
        self.assertEqual(status, 503)
        self.assertIn("database or disk is full", health["failing"]["processor"])
        # Backoff after backoff: nothing dead-lettered, no receive used up.
        yield eventually(lambda: gateway.worker._failures >= 5)
        self.assertEqual(self.queue_rows(gateway), [(1, 0), (2, 0), (3, 0)])

        yield gateway.worker._in_thread(lambda: store.db.execute("PRAGMA max_page_count = 1000000"))
        yield eventually(lambda: self.queue_rows(gateway) == [])
        readings = SQLiteStore(gateway.config.store_path)
        self.addCleanup(readings.close)
        self.assertEqual(len(readings.query("node-s", "t")), 300)
        self.assertIsNone(gateway.worker.problem)
        status, _ = yield get_json(gateway, "/healthz")
        self.assertEqual(status, 200)


class UnreadableQueueTests(TestCase):
    """A queue, or one shard of it, that cannot be read (its file damaged
    under the running gateway): the other shards are processed meanwhile,
    the processor tries again with the backoff, ``/healthz`` names it, and
    once it can be read again its messages are processed too."""

    timeout = 120

    @staticmethod
    def put_outside(path: Path, device: str, values) -> None:
        """Readings of *device* into the shard at *path*, by a second connection
        (as the worker that owns the shard would)."""
        from tests.test_queue_sqlite import envelope

        store = SQLiteQueueStore(path)  # creates the table if it is missing
        try:
            store.put_many([replace(envelope(seq), device=device, readings=[
                Reading({"t": value}, time.time())]).to_json()
                for seq, value in enumerate(values, 1)])
        finally:
            store.close()

    @staticmethod
    def damage(path: Path) -> None:
        """The queue file at *path* loses its table under the running gateway."""
        db = sqlite3.connect(path)
        db.execute("DROP TABLE messages")
        db.commit()
        db.close()

    @defer.inlineCallbacks
    def test_a_shard_that_cannot_be_read_holds_back_only_its_own_messages(self):
        shards = Path(self.mktemp()).resolve()
        shards.mkdir(parents=True)
        # What a run with three workers left: two more shards beside the first.
        for n in (1, 2):
            SQLiteQueueStore(shards / f"queue-{n}.sqlite3").close()
        gateway = yield start_gateway(self, role="all", **{
            "queue.sqlite.path": str(shards / "queue.sqlite3"), "sinks.enabled": ("sqlite",),
            "processor.poll_interval": 0.05})
        yield eventually(lambda: gateway.worker.processor is not None)
        # Shard 1 is damaged under the running gateway.
        self.damage(shards / "queue-1.sqlite3")
        readings = SQLiteStore(gateway.config.store_path)
        self.addCleanup(readings.close)

        def values(device: str) -> list[float]:
            return sorted(value for _, value in readings.query(device, "t"))

        peer = RawCoapPeer(self)
        for seq in (1, 2, 3):
            response = yield peer.request(request_datagram(payload=orjson.dumps(
                {"id": "node-a", "seq": seq, "data": {"t": seq}}), content_format=50, mid=seq),
                gateway.port)
            self.assertEqual(response.code, coap.CHANGED, response.payload)
        self.put_outside(shards / "queue-2.sqlite3", "node-b", (4.0, 5.0))
        yield eventually(lambda: (values("node-a"), values("node-b"))
                         == ([1.0, 2.0, 3.0], [4.0, 5.0]))
        status, health = yield get_json(gateway, "/healthz")
        self.assertEqual(status, 503)
        self.assertEqual(health["failing"]["processor"],
                         f"queue shard {shards / 'queue-1.sqlite3'}: receiving fails: "
                         "OperationalError: no such table: messages")
        # The queue's depth cannot be read: left out and named, the rest served.
        status, stats = yield get_json(gateway, "/api/stats")
        self.assertEqual(status, 200)
        self.assertNotIn("queue", stats)
        self.assertEqual(stats["unavailable"]["queue"],
                         "OperationalError: no such table: messages")
        self.assertEqual(stats["processor"]["written"], 5)
        self.assertEqual(stats["devices"], 2)
        metrics = yield metrics_of(gateway)
        self.assertEqual(metrics[("sense_stats_unavailable", (("part", "queue"),))], 1)
        self.assertEqual(metrics[("sense_processed_messages_total", (("outcome", "written"),))], 5)
        self.assertNotIn(("sense_dead_letters", ()), metrics)

        # Repaired (the table back, a reading waiting in it): processed, healthy.
        self.put_outside(shards / "queue-1.sqlite3", "node-c", (6.0,))
        yield eventually(lambda: values("node-c") == [6.0])
        yield eventually(lambda: gateway.worker.problem is None)
        status, health = yield get_json(gateway, "/healthz")
        self.assertEqual((status, health), (200, {"status": "ok"}))
        metrics = yield metrics_of(gateway)
        self.assertEqual(metrics[("sense_dead_letters", ())], 0)
        self.assertFalse([key for key in metrics if key[0] == "sense_stats_unavailable"])

    @defer.inlineCallbacks
    def test_a_queue_that_cannot_be_read_is_tried_again_with_the_backoff(self):
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        queue = Path(self.mktemp()).resolve() / "queue.sqlite3"
        queue.parent.mkdir(parents=True)
        gateway = yield start_gateway(self, role="all", **{
            "queue.sqlite.path": str(queue), "sinks.enabled": ("sqlite",),
            "processor.poll_interval": 0.05, "processor.retry_base": 0.05,
            "processor.retry_max": 0.2})
        yield eventually(lambda: gateway.worker.processor is not None)
        self.damage(queue)
        yield eventually(lambda: gateway.worker._receive_failures >= 1)
        # Tried again with the backoff (0.05, 0.1, then 0.2 s), not every poll.
        yield deferLater(1.0)
        self.assertIn(gateway.worker._receive_failures, range(4, 10))
        self.assertEqual(gateway.worker.problem,
                         "receiving failed: OperationalError: no such table: messages")
        status, health = yield get_json(gateway, "/healthz")
        self.assertEqual(status, 503)
        self.assertEqual(health["failing"]["processor"], gateway.worker.problem)
        # Logged once, not every try.
        failed = [e for e in events
                  if e.get("log_format", "").startswith("receiving from the queue failed")]
        self.assertEqual(len(failed), 1)

        self.put_outside(queue, "node-d", (7.0,))
        readings = SQLiteStore(gateway.config.store_path)
        self.addCleanup(readings.close)
        yield eventually(lambda: [v for _, v in readings.query("node-d", "t")] == [7.0])
        self.assertIsNone(gateway.worker.problem)
        status, _ = yield get_json(gateway, "/healthz")
        self.assertEqual(status, 200)

    @defer.inlineCallbacks
    def test_a_stop_while_receiving_fails_does_not_wait_for_the_backoff(self):
        queue = Path(self.mktemp()).resolve() / "queue.sqlite3"
        queue.parent.mkdir(parents=True)
        gateway = yield start_gateway(self, role="all", **{
            "queue.sqlite.path": str(queue), "processor.poll_interval": 0.05,
            "processor.retry_base": 300.0, "processor.retry_max": 300.0})
        yield eventually(lambda: gateway.worker.processor is not None)
        self.damage(queue)
        yield eventually(lambda: gateway.worker._receive_failures >= 1)
        started = time.monotonic()
        # (Without the cut, this waits for the 300 s pause and times out.)
        yield gateway.worker.stopService().addTimeout(10, reactor)
        self.assertLess(time.monotonic() - started, 5.0)


@defer.inlineCallbacks
def metrics_of(gateway) -> dict:
    """The samples of an in-process gateway's /metrics."""
    response = yield http_get(web_base(gateway) + "/metrics")
    assert response.code == 200, response
    return metric_samples(response.body)


class ProcessorStartTests(TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def test_start_is_retried_with_the_backoff_and_healthz_says_why_meanwhile(self):
        blocked = Path(self.mktemp()).resolve()
        blocked.parent.mkdir(parents=True, exist_ok=True)
        blocked.write_text("a file where the registry's directory should be\n")
        gateway = GatewayProcess(self, "--role", "all", env={
            "SENSE_REGISTRY_PATH": str(blocked / "registry.sqlite3"),
            "SENSE_PROCESSOR_RETRY_BASE": "0.2", "SENSE_PROCESSOR_RETRY_MAX": "0.5",
            "SENSE_PROCESSOR_POLL_INTERVAL": "0.05"})
        yield gateway.wait_listening()
        # Ingest works meanwhile: the queue keeps what comes.
        response = yield libcoap_request("post", coap_url("::1", gateway.port, "/data"),
                                         b'{"id": "node-p", "seq": 1, "data": {"t": 1}}', 50)
        self.assertEqual(response.code, "2.04", response)
        status, health = yield gateway.get_json("/healthz")
        self.assertEqual(status, 503)
        self.assertTrue(health["failing"]["processor"].startswith("not started: FileExistsError"),
                        health)
        yield eventually(lambda: gateway.log_path.read_bytes().count(
            b"processor could not start, trying again") >= 3)

        blocked.unlink()
        yield eventually(lambda: (blocked / "registry.sqlite3").exists())
        registry = blocked / "registry.sqlite3"
        yield eventually(lambda: "node-p" in {r.id for r in SQLiteRegistry(registry).devices()})
        # The device directory reads the registry too: it recovers at its
        # next refresh (security.refresh_interval).
        for _ in range(50):
            status, health = yield gateway.get_json("/healthz")
            if status == 200:
                break
            yield deferLater(0.1)
        self.assertEqual((status, health), (200, {"status": "ok"}))


class SQSRoundTests(TestCase):
    """With SQS, a round's deletes are written whatever else fails in it."""

    timeout = 120

    @defer.inlineCallbacks
    def test_a_dead_letter_that_fails_does_not_keep_the_written_ones_from_being_deleted(self):
        set_environ(self, AWS_ENV)
        moto = MotoServer(self)
        influx = InfluxDB1(self)
        sqs = moto.client("sqs")
        # No redrive policy: nowhere to put a dead letter.
        url = sqs.create_queue(QueueName="sense-no-dlq",
                               Attributes={"VisibilityTimeout": "30"})["QueueUrl"]
        # InfluxDB knows "t" as a float.
        status, _ = http("POST", f"{influx.url}/write?db=sense",
                         b"sense,device=other t=1 1764299000000000000")
        self.assertEqual(status, 204)
        bodies = [{"v": 1, "id": f"e{seq}", "device": "node-q", "seq": seq, "received": NOW + seq,
                   "source": "x", "transport": "coap", "identity": None, "path": "/data", "cf": 50,
                   "readings": [{"m": "sense", "ts": NOW + seq,
                                 "f": {"t": "warm" if seq == 2 else float(seq)}, "t": {}}]}
                  for seq in (1, 2, 3)]
        sqs.send_message_batch(QueueUrl=url, Entries=[
            {"Id": str(i), "MessageBody": json.dumps(b)} for i, b in enumerate(bodies)])

        gateway = yield start_gateway(self, role="all", **{
            "queue.backend": "sqs", "aws.queue_url": url, "aws.endpoint_url": moto.url,
            "sinks.enabled": ("influxdb",), "influxdb.url": influx.url, "influxdb.api": "v1",
            "influxdb.retries": 0, "processor.poll_interval": 0.0})
        yield eventually(lambda: gateway.worker.settle_failures >= 1, timeout=30)
        from sense_gateway.errors import ConfigError

        [failure] = self.flushLoggedErrors(ConfigError)
        self.assertIn("has no redrive policy", str(failure.value))
        self.assertEqual(gateway.worker.counts[_outcome("REFUSED")], 1)
        self.assertEqual(gateway.worker.counts[_outcome("WRITTEN")], 2)
        yield deferLater(0.5)
        attributes = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=[
            "ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"])["Attributes"]
        # Only the refused one is left (in flight); the two written are gone.
        self.assertEqual((attributes["ApproximateNumberOfMessages"],
                          attributes["ApproximateNumberOfMessagesNotVisible"]), ("0", "1"))
        self.assertEqual(sorted(r["t"] for r in influx.rows(
            "SELECT \"t\" FROM \"sense\" WHERE \"device\" = 'node-q'")), [1.0, 3.0])


def _outcome(name: str):
    from sense_gateway.processor import Outcome

    return Outcome[name]
