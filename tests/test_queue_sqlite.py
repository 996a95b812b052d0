"""The embedded queue: durable puts with group commit, and the SQS-like
receive / delete / release / dead-letter cycle the processor uses."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from twisted.internet import defer, reactor
from twisted.trial.unittest import SynchronousTestCase, TestCase

from sense_gateway.envelope import Envelope, Reading, new_envelope_id
from sense_gateway.errors import Unavailable
from sense_gateway.queues.sqlite import SQLiteQueue, SQLiteQueueStore


def envelope(seq=1) -> Envelope:
    return Envelope(id=new_envelope_id(), device="node-1", seq=seq, received=1764300000.0,
                    source="[::1]:1", transport="coap", identity=None, path="/data",
                    content_format=50, readings=[Reading({"t": float(seq)}, 1764300000.0)])


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


class StoreTests(SynchronousTestCase):
    """The synchronous store, with a controlled clock."""

    def setUp(self):
        self.clock = Clock()
        self.path = Path(self.mktemp())
        self.store = SQLiteQueueStore(self.path, max_receives=2, visibility_timeout=30,
                                      clock=self.clock)
        self.addCleanup(self.store.close)
        self.sent = [envelope(1), envelope(2)]
        self.store.put_many([e.to_json() for e in self.sent])

    def test_receive_returns_envelopes_in_order(self):
        received = self.store.receive(10)
        self.assertEqual([m.envelope for m in received], self.sent)
        self.assertEqual([m.receive_count for m in received], [1, 1])

    def test_received_messages_are_hidden_until_the_timeout(self):
        self.store.receive(1)
        self.assertEqual([m.envelope.seq for m in self.store.receive(10)], [2])
        self.assertEqual(self.store.receive(10), [])
        self.clock.now += 31
        self.assertEqual([(m.envelope.seq, m.receive_count) for m in self.store.receive(10)],
                         [(1, 2), (2, 2)])

    def test_delete_with_current_receipt(self):
        [first] = self.store.receive(1)
        self.assertEqual(self.store.delete([first.receipt]), 1)
        self.assertEqual(self.store.depth(), {"visible": 1, "in_flight": 0, "dead": 0})

    def test_stale_receipt_deletes_nothing(self):
        [old] = self.store.receive(1)
        self.clock.now += 31
        [new] = self.store.receive(1)
        self.assertEqual(self.store.delete([old.receipt]), 0)
        self.assertEqual(self.store.delete([new.receipt]), 1)

    def test_released_message_is_visible_after_its_delay(self):
        [message] = self.store.receive(1)
        self.store.release(message.receipt, "sink down", delay=5)
        self.assertEqual([m.envelope.seq for m in self.store.receive(10)], [2])
        self.clock.now += 5
        self.assertEqual([m.envelope.seq for m in self.store.receive(10)], [1])

    def test_too_many_receives_dead_letters_with_last_reason(self):
        for _ in range(2):
            [message] = self.store.receive(1)
            self.store.release(message.receipt, "influxdb: HTTP 400: field type conflict")
        self.assertEqual([m.envelope.seq for m in self.store.receive(1)], [2])
        [letter] = self.store.dead_letters()
        self.assertEqual((letter.envelope, letter.reason, letter.receive_count),
                         (self.sent[0], "influxdb: HTTP 400: field type conflict", 2))
        self.assertEqual(self.store.depth()["dead"], 1)

    def test_replay_brings_dead_letters_back_with_a_fresh_count(self):
        for _ in range(2):
            for message in self.store.receive(10):
                self.store.release(message.receipt, "down")
        self.assertEqual(self.store.receive(10), [])
        letters = self.store.dead_letters()
        self.assertEqual(self.store.replay([letters[0].id]), 1)
        self.assertEqual([(m.envelope.seq, m.receive_count) for m in self.store.receive(10)], [(1, 1)])
        self.assertEqual(self.store.replay(), 1)
        self.assertEqual(self.store.dead_letters(), [])

    def test_undecodable_message_goes_straight_to_dead_letters(self):
        self.store.put_many([b"{not json"])
        self.assertEqual(len(self.store.receive(10)), 2)
        [letter] = self.store.db.execute("SELECT reason FROM dead_letters").fetchall()
        self.assertTrue(letter[0].startswith("undecodable envelope"))


class ServiceTests(TestCase):
    """The Twisted service: its own thread, group commit, back-pressure."""

    def start(self, **options) -> SQLiteQueue:
        self.path = Path(self.mktemp()).resolve() / "queue.sqlite3"
        queue = SQLiteQueue(self.path, reactor, **options)
        queue.startService()
        self.addCleanup(lambda: queue.running and queue.stopService())
        return queue

    def committed(self) -> int:
        db = sqlite3.connect(self.path)
        try:
            return db.execute("SELECT COUNT(*) FROM messages").fetchone()[0]
        finally:
            db.close()

    @defer.inlineCallbacks
    def test_put_fires_after_commit_and_puts_are_grouped(self):
        queue = self.start()
        seen_at_ack = []
        puts = []
        for seq in range(200):
            d = queue.put([envelope(seq)])
            # What a second connection sees when this put's ACK would go out.
            d.addCallback(lambda _, s=seq: seen_at_ack.append((s, self.committed())))
            puts.append(d)
        yield defer.gatherResults(puts)
        self.assertTrue(all(count > seq for seq, count in seen_at_ack))
        self.assertLessEqual(queue.transactions, 3)
        received = yield queue.receive(200)
        self.assertEqual([m.envelope.seq for m in received], list(range(200)))

    @defer.inlineCallbacks
    def test_batches_are_bounded(self):
        queue = self.start(max_batch=50)
        yield defer.gatherResults([queue.put([envelope(i)]) for i in range(200)])
        self.assertGreaterEqual(queue.transactions, 4)

    @defer.inlineCallbacks
    def test_overflow_is_unavailable_with_max_age(self):
        queue = self.start(max_pending=10, retry_after=7)
        accepted = [queue.put([envelope(i)]) for i in range(11)]
        refused = queue.put([envelope(99)])
        error = yield self.assertFailure(refused, Unavailable)
        self.assertEqual((error.diagnostic, error.max_age), ("queue full", 7))
        yield defer.gatherResults(accepted)

    @defer.inlineCallbacks
    def test_failed_write_is_unavailable_not_a_hang(self):
        queue = self.start(retry_after=3)
        yield queue.put([envelope(0)])
        db = sqlite3.connect(self.path)
        db.execute("CREATE TRIGGER refuse BEFORE INSERT ON messages "
                   "BEGIN SELECT RAISE(ABORT, 'disk says no'); END")
        db.commit()
        db.close()
        error = yield self.assertFailure(queue.put([envelope(1)]), Unavailable)
        self.assertEqual((error.diagnostic, error.max_age), ("queue write failed", 3))
        self.flushLoggedErrors(sqlite3.IntegrityError, sqlite3.OperationalError)

    @defer.inlineCallbacks
    def test_stop_flushes_pending_puts(self):
        queue = self.start()
        puts = [queue.put([envelope(i)]) for i in range(50)]
        yield queue.stopService()
        yield defer.gatherResults(puts)
        self.assertEqual(self.committed(), 50)

    @defer.inlineCallbacks
    def test_put_after_stop_is_unavailable(self):
        queue = self.start()
        yield queue.stopService()
        yield self.assertFailure(queue.put([envelope(1)]), Unavailable)

    @defer.inlineCallbacks
    def test_processor_side_through_the_service(self):
        queue = self.start(max_receives=1)
        yield queue.put([envelope(1), envelope(2)])
        messages = yield queue.receive(10)
        deleted = yield queue.delete([messages[0].receipt])
        yield queue.release(messages[1].receipt, "sink down")
        self.assertEqual(deleted, 1)
        self.assertEqual((yield queue.receive(10)), [])
        depth = yield queue.depth()
        self.assertEqual(depth, {"visible": 0, "in_flight": 0, "dead": 1})
        [letter] = yield queue.dead_letters()
        self.assertEqual(letter.reason, "sink down")
        self.assertEqual((yield queue.replay()), 1)
