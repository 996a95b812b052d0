"""The embedded queue: durable puts with group commit, and the SQS-like
receive / delete / release / dead-letter cycle the processor uses."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

from twisted.internet import defer, reactor, task, threads
from twisted.trial.unittest import SynchronousTestCase, TestCase

from sense_gateway.config import Config, QueueConfig
from sense_gateway.envelope import Envelope, Reading, new_envelope_id
from sense_gateway.errors import ConfigError, Unavailable
from sense_gateway.queues.sqlite import (
    SQLiteQueue,
    SQLiteQueueStore,
    make_sqlite_queue,
    sense_register_queues,
)
from sense_gateway.queues.sqlite_settings import SQLiteQueueSettings
from sense_gateway.queues.sqlite_store import MissingJSONFunctions


def envelope(seq=1) -> Envelope:
    return Envelope(id=new_envelope_id(), device="node-1", seq=seq, received=1764300000.0,
                    source="[::1]:1", transport="coap", identity=None, path="/data",
                    content_format=50, readings=[Reading({"t": float(seq)}, 1764300000.0)])


@defer.inlineCallbacks
def until_committing(queue):
    """Wait for the end of the reactor turn that starts the queue's next
    transaction."""
    while not queue._committing:
        yield task.deferLater(reactor, 0, lambda: None)


class Clock:
    """A time function tests move by hand."""

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
        self.clock.now += 29.9
        self.assertEqual(self.store.receive(10), [])
        self.clock.now += 0.2
        self.assertEqual([(m.envelope.seq, m.receive_count) for m in self.store.receive(10)],
                         [(1, 2), (2, 2)])

    def test_explicit_visibility_timeout_wins_over_the_default(self):
        self.store.receive(10, visibility_timeout=2)
        self.clock.now += 2
        self.assertEqual(len(self.store.receive(10)), 2)

    def test_every_receive_hands_out_a_fresh_receipt(self):
        [first] = self.store.receive(1)
        self.clock.now += 31
        [again] = self.store.receive(1)
        self.assertEqual(first.message_id, again.message_id)
        self.assertNotEqual(first.receipt, again.receipt)

    def test_delete_with_current_receipt(self):
        [first] = self.store.receive(1)
        self.assertEqual(self.store.delete([first.receipt]), 1)
        self.assertEqual(self.store.depth(), {"visible": 1, "in_flight": 0, "dead": 0})

    def test_stale_receipt_deletes_nothing(self):
        [old] = self.store.receive(1)
        self.clock.now += 31
        [new] = self.store.receive(1)
        self.assertEqual(self.store.delete([old.receipt, "junk", "7:nope"]), 0)
        self.assertEqual(self.store.delete([new.receipt]), 1)

    def test_stale_receipt_does_not_release(self):
        [old] = self.store.receive(1)
        self.clock.now += 31
        self.store.receive(1)
        self.store.release(old.receipt, "too late")
        self.assertEqual(self.store.depth(), {"visible": 1, "in_flight": 1, "dead": 0})

    def test_released_message_is_visible_after_its_delay(self):
        [message] = self.store.receive(1)
        self.store.release(message.receipt, "sink down", delay=5)
        self.assertEqual([m.envelope.seq for m in self.store.receive(10)], [2])
        self.clock.now += 5
        self.assertEqual([m.envelope.seq for m in self.store.receive(10)], [1])

    def test_postponed_messages_keep_their_receives(self):
        # An outage of a sink: tried ten times, never any closer to the
        # dead letters (max_receives is 2 here).
        for _ in range(10):
            received = self.store.receive(10)
            self.store.postpone([m.receipt for m in received], "influxdb: cannot reach")
        self.assertEqual([(m.envelope.seq, m.receive_count) for m in self.store.receive(10)],
                         [(1, 1), (2, 1)])
        self.assertEqual(self.store.depth()["dead"], 0)

    def test_a_postponed_message_is_visible_after_its_delay(self):
        [message] = self.store.receive(1)
        self.store.postpone([message.receipt], "sink down", delay=5)
        self.assertEqual([m.envelope.seq for m in self.store.receive(10)], [2])
        self.clock.now += 5
        self.assertEqual([m.envelope.seq for m in self.store.receive(10)], [1])

    def test_a_stale_receipt_postpones_nothing(self):
        [old] = self.store.receive(1)
        self.clock.now += 31
        self.store.receive(1)
        self.store.postpone([old.receipt], "too late")
        self.assertEqual(self.store.depth(), {"visible": 1, "in_flight": 1, "dead": 0})

    def test_dead_letter_moves_a_refused_message_at_once_with_the_reason(self):
        [message, _] = self.store.receive(2)
        self.assertEqual(self.store.dead_letter(message.receipt, "influxdb: HTTP 400: bad"), 1)
        [letter] = self.store.dead_letters()
        self.assertEqual((letter.envelope, letter.reason, letter.receive_count),
                         (self.sent[0], "influxdb: HTTP 400: bad", 1))
        self.assertEqual(self.store.depth(), {"visible": 0, "in_flight": 1, "dead": 1})

    def test_a_stale_receipt_dead_letters_nothing(self):
        [old] = self.store.receive(1)
        self.clock.now += 31
        self.store.receive(1)
        self.assertEqual(self.store.dead_letter(old.receipt, "too late"), 0)
        self.assertEqual(self.store.depth()["dead"], 0)

    def test_the_count_of_waiting_messages_follows_every_change(self):
        self.assertEqual(self.store.waiting, 2)
        self.store.put_many([envelope(3).to_json()])
        [first, second, _] = self.store.receive(3)
        self.assertEqual(self.store.waiting, 3)  # received is still waiting
        self.store.delete([first.receipt])
        self.store.dead_letter(second.receipt, "refused")
        self.assertEqual(self.store.waiting, 1)
        self.store.replay()
        self.assertEqual((self.store.waiting, self.store.count_waiting()), (2, 2))

    def test_too_many_receives_dead_letters_with_last_reason(self):
        for reason in ("influxdb: timeout", "influxdb: HTTP 400: field type conflict"):
            [message] = self.store.receive(1)
            self.store.release(message.receipt, reason)
        self.clock.now += 1
        self.assertEqual([m.envelope.seq for m in self.store.receive(1)], [2])
        [letter] = self.store.dead_letters()
        self.assertEqual((letter.envelope, letter.reason, letter.receive_count),
                         (self.sent[0], "influxdb: HTTP 400: field type conflict", 2))
        self.assertEqual((letter.enqueued_at, letter.failed_at), (1000.0, 1001.0))
        self.assertEqual(self.store.depth(), {"visible": 0, "in_flight": 1, "dead": 1})

    def test_expired_without_release_dead_letters_with_a_reason_still(self):
        for _ in range(2):
            self.store.receive(10)
            self.clock.now += 31
        self.assertEqual(self.store.receive(10), [])
        reasons = {letter.reason for letter in self.store.dead_letters()}
        self.assertEqual(reasons, {"received 2 times without being deleted"})

    def test_replay_brings_dead_letters_back_with_a_fresh_count(self):
        for _ in range(2):
            for message in self.store.receive(10):
                self.store.release(message.receipt, "down")
        self.assertEqual(self.store.receive(10), [])
        letters = self.store.dead_letters()
        self.assertEqual(self.store.replay([letters[0].id]), 1)
        self.assertEqual([(m.envelope.seq, m.receive_count) for m in self.store.receive(10)],
                         [(1, 1)])
        self.assertEqual(self.store.replay(), 1)
        self.assertEqual(self.store.dead_letters(), [])
        self.assertEqual(self.store.replay(), 0)

    def test_replay_of_unknown_ids_moves_nothing(self):
        self.assertEqual(self.store.replay([12345]), 0)
        self.assertEqual(self.store.replay([]), 0)
        self.assertEqual(self.store.depth(), {"visible": 2, "in_flight": 0, "dead": 0})

    def test_undecodable_message_is_dead_lettered_and_still_listable(self):
        self.store.put_many([b"{not json"])
        self.assertEqual(len(self.store.receive(10)), 2)
        [letter] = self.store.dead_letters()
        self.assertIsNone(letter.envelope)
        self.assertEqual(letter.body, b"{not json")
        self.assertTrue(letter.reason.startswith("undecodable envelope"), letter.reason)

    def test_a_body_that_is_not_utf8_is_dead_lettered_intact(self):
        # put_many takes envelopes' UTF-8 JSON only; a damaged row (another
        # writer, a disk) still reaches receive, which must not lose it.
        self.store.db.execute("INSERT INTO messages (body, enqueued_at, visible_at) "
                              "VALUES (?, 0, 0)", (b"\xff\xfe{",))
        self.assertEqual([m.envelope.seq for m in self.store.receive(10)], [1, 2])
        [letter] = self.store.dead_letters()
        self.assertEqual(letter.body, b"\xff\xfe{")
        self.assertTrue(letter.reason.startswith("undecodable envelope"), letter.reason)

    def test_large_batch_received_in_order_and_deleted_at_once(self):
        self.store.put_many([envelope(seq).to_json() for seq in range(3, 2503)])
        received = self.store.receive(1000)
        self.assertEqual([m.envelope.seq for m in received], list(range(1, 1001)))
        self.assertEqual(len({m.receipt for m in received}), 1000)
        self.assertEqual([m.envelope.seq for m in self.store.receive(2)], [1001, 1002])
        self.assertEqual(self.store.delete([m.receipt for m in received[:-1]] + ["1:junk"]), 999)
        self.assertEqual(self.store.depth(), {"visible": 1500, "in_flight": 3, "dead": 0})

    def test_put_many_is_one_transaction(self):
        # A row refused half-way through a batch of ordinary envelopes (a
        # trigger stands in for a full disk) leaves none of the batch.
        poisoned = envelope(4).to_json()
        self.store.db.execute(
            f"CREATE TEMP TRIGGER refuse_one BEFORE INSERT ON messages "
            f"WHEN NEW.body = x'{poisoned.hex()}' BEGIN SELECT RAISE(ABORT, 'refused'); END")
        with self.assertRaises(sqlite3.IntegrityError):
            self.store.put_many([envelope(3).to_json(), poisoned, envelope(5).to_json()])
        self.assertEqual(self.store.depth()["visible"], 2)
        self.assertEqual([m.envelope.seq for m in self.store.receive(10)], [1, 2])

    def test_file_is_in_wal_mode_with_the_configured_synchronous(self):
        self.assertEqual(self.store.db.execute("PRAGMA journal_mode").fetchone()[0], "wal")
        self.assertEqual(self.store.db.execute("PRAGMA synchronous").fetchone()[0], 2)  # FULL
        normal = SQLiteQueueStore(self.path, synchronous="normal")
        self.addCleanup(normal.close)
        self.assertEqual(normal.db.execute("PRAGMA synchronous").fetchone()[0], 1)
        with self.assertRaises(ValueError):
            SQLiteQueueStore(self.path, synchronous="off")

    def test_a_second_store_sees_committed_messages(self):
        reader = SQLiteQueueStore(self.path)
        self.addCleanup(reader.close)
        self.assertEqual([m.envelope for m in reader.peek()], self.sent)


class RecordingQueue(SQLiteQueue):
    """Counts the transactions its store really writes, and on which thread."""

    def open_store(self):
        queue = self
        queue.opened_on = threading.get_ident()
        queue.batches = []

        class RecordingStore(SQLiteQueueStore):
            def put_many(self, bodies):
                queue.batches.append((len(bodies), threading.get_ident()))
                super().put_many(bodies)

        return RecordingStore(self.path, **self._store_options)


class ServiceTests(TestCase):
    """The Twisted service: its own thread, group commit, back-pressure."""

    def start(self, kind=RecordingQueue, **options) -> SQLiteQueue:
        self.path = Path(self.mktemp()).resolve() / "queue.sqlite3"
        queue = kind(self.path, reactor, **options)
        queue.startService()
        self.addCleanup(lambda: queue.running and queue.stopService())
        return queue

    def stored_ids(self) -> set[str]:
        """Envelope ids committed, as a second, independent connection sees them."""
        db = sqlite3.connect(self.path)
        try:
            return {row[0] for row in db.execute(
                "SELECT json_extract(CAST(body AS TEXT), '$.id') FROM messages")}
        finally:
            db.close()

    @defer.inlineCallbacks
    def test_put_then_receive_returns_the_same_envelope(self):
        queue = self.start()
        sent = envelope(7)
        yield queue.put([sent])
        [message] = yield queue.receive(10)
        self.assertEqual((message.envelope, message.receive_count), (sent, 1))

    @defer.inlineCallbacks
    def test_puts_in_one_reactor_turn_share_one_transaction(self):
        queue = self.start()
        sent = [envelope(seq) for seq in range(200)]
        # Issued in one turn of the reactor, as the datagrams one read of
        # the socket brings: one transaction when the turn ends.
        yield defer.gatherResults([queue.put([e]) for e in sent])
        self.assertEqual([size for size, _ in queue.batches], [200])
        self.assertEqual(queue.transactions, 1)
        received = yield queue.receive(200)
        self.assertEqual([m.envelope for m in received], sent)

    @defer.inlineCallbacks
    def test_puts_during_a_commit_go_together_in_the_next_transaction(self):
        queue = self.start()
        sent = [envelope(seq) for seq in range(200)]
        first = queue.put(sent[:1])
        yield until_committing(queue)
        rest = [queue.put([e]) for e in sent[1:]]
        yield defer.gatherResults([first] + rest)
        self.assertEqual([size for size, _ in queue.batches], [1, 199])
        self.assertEqual(queue.transactions, 2)
        received = yield queue.receive(200)
        self.assertEqual([m.envelope for m in received], sent)

    @defer.inlineCallbacks
    def test_put_then_calls_back_once_committed_without_a_deferred(self):
        queue = self.start()
        sent = [envelope(seq) for seq in range(3)]
        seen_at_callback = []
        done = defer.Deferred()

        def stored(error):
            seen_at_callback.append((error, len(self.stored_ids())))
            if len(seen_at_callback) == len(sent):
                done.callback(None)
        for e in sent:
            queue.put_then([e], stored)
        self.assertEqual(seen_at_callback, [])  # nothing before the commit
        yield done
        self.assertEqual(seen_at_callback, [(None, 3)] * 3)

    def test_put_then_reports_a_full_queue_at_once(self):
        queue = self.start(max_pending=1, retry_after=4)
        errors = []
        queue.put_then([envelope(1)], errors.append)
        queue.put_then([envelope(2)], errors.append)
        [error] = errors
        self.assertIsInstance(error, Unavailable)
        self.assertEqual((error.diagnostic, error.max_age), ("queue full", 4))
        return queue.stopService()

    @defer.inlineCallbacks
    def test_each_put_fires_only_after_its_envelopes_are_committed(self):
        queue = self.start()
        unseen_at_ack = []

        def acknowledged(_, envelope_id):
            # What a second connection sees when this put's ACK would go out.
            if envelope_id not in self.stored_ids():
                unseen_at_ack.append(envelope_id)

        puts = []
        for seq in range(50):
            sent = envelope(seq)
            puts.append(queue.put([sent]).addCallback(acknowledged, sent.id))
        yield defer.gatherResults(puts)
        self.assertEqual(unseen_at_ack, [])

    @defer.inlineCallbacks
    def test_the_store_lives_on_the_queues_own_thread(self):
        queue = self.start()
        yield queue.put([envelope(1)])
        main = threading.get_ident()
        self.assertNotEqual(queue.opened_on, main)
        self.assertEqual({thread for _, thread in queue.batches}, {queue.opened_on})
        self.assertEqual(queue.threads.threads, 1)
        # Not a thread of the reactor's own pool (DNS uses that one).
        pooled = yield threads.deferToThread(threading.get_ident)
        self.assertNotEqual(queue.opened_on, pooled)

    @defer.inlineCallbacks
    def test_batches_are_bounded(self):
        queue = self.start(max_batch=50)
        yield defer.gatherResults([queue.put([envelope(i)]) for i in range(200)])
        self.assertEqual([size for size, _ in queue.batches], [50, 50, 50, 50])

    @defer.inlineCallbacks
    def test_a_put_larger_than_max_batch_is_not_split(self):
        queue = self.start(max_batch=3)
        yield defer.gatherResults([queue.put([envelope(1)]),
                                   queue.put([envelope(i) for i in range(5)])])
        self.assertEqual([size for size, _ in queue.batches], [1, 5])

    @defer.inlineCallbacks
    def test_empty_put_succeeds_without_a_transaction(self):
        queue = self.start()
        yield queue.put([])
        self.assertEqual(queue.transactions, 0)

    @defer.inlineCallbacks
    def test_overflow_is_unavailable_with_max_age(self):
        queue = self.start(max_pending=10, retry_after=7)
        in_flight = queue.put([envelope(0)])
        yield until_committing(queue)
        waiting = [queue.put([envelope(i)]) for i in range(1, 11)]
        refused = queue.put([envelope(99)])
        error = yield self.assertFailure(refused, Unavailable)
        self.assertEqual((error.diagnostic, error.max_age), ("queue full", 7))
        yield defer.gatherResults([in_flight] + waiting)
        # Room again once the waiting ones are written.
        yield queue.put([envelope(100)])

    @defer.inlineCallbacks
    def test_failed_write_is_unavailable_for_every_put_in_it_and_logged_once(self):
        queue = self.start(retry_after=3)
        yield queue.put([envelope(0)])
        db = sqlite3.connect(self.path)
        db.execute("CREATE TRIGGER refuse BEFORE INSERT ON messages "
                   "BEGIN SELECT RAISE(ABORT, 'disk says no'); END")
        db.commit()
        # One transaction for the five puts, one log entry for it.
        failed = [self.assertFailure(queue.put([envelope(i)]), Unavailable) for i in range(1, 6)]
        errors = yield defer.gatherResults(failed)
        self.assertEqual({(e.diagnostic, e.max_age) for e in errors}, {("queue write failed", 3)})
        self.assertEqual(len(self.flushLoggedErrors(sqlite3.IntegrityError)), 1)
        # The queue recovers once the disk does.
        db.execute("DROP TRIGGER refuse")
        db.commit()
        db.close()
        yield queue.put([envelope(6)])
        self.assertEqual(len(self.stored_ids()), 2)

    @defer.inlineCallbacks
    def test_unopenable_file_makes_puts_unavailable_not_a_hang(self):
        directory = Path(self.mktemp()).resolve()
        directory.mkdir()
        queue = SQLiteQueue(directory, reactor)  # a directory is no database
        queue.startService()
        self.addCleanup(queue.stopService)
        yield self.assertFailure(queue.put([envelope(1)]), Unavailable)
        self.flushLoggedErrors(sqlite3.OperationalError, RuntimeError)

    @defer.inlineCallbacks
    def test_stop_flushes_pending_puts(self):
        queue = self.start()
        puts = [queue.put([envelope(i)]) for i in range(50)]
        yield queue.stopService()
        self.assertEqual(len(self.stored_ids()), 50)
        yield defer.gatherResults(puts)

    @defer.inlineCallbacks
    def test_everything_after_stop_is_unavailable_not_a_hang(self):
        queue = self.start()
        yield queue.stopService()
        yield self.assertFailure(queue.put([envelope(1)]), Unavailable)
        yield self.assertFailure(queue.receive(10), Unavailable)
        yield self.assertFailure(queue.depth(), Unavailable)

    @defer.inlineCallbacks
    def test_committed_envelopes_survive_a_restart(self):
        queue = self.start(synchronous="normal")
        sent = [envelope(seq) for seq in range(20)]
        yield defer.gatherResults([queue.put(sent[:5])] + [queue.put([e]) for e in sent[5:]])
        yield queue.stopService()
        store = SQLiteQueueStore(self.path)
        self.addCleanup(store.close)
        self.assertEqual([m.envelope for m in store.peek()], sent)
        again = SQLiteQueue(self.path, reactor)
        again.startService()
        self.addCleanup(again.stopService)
        received = yield again.receive(100)
        self.assertEqual([m.envelope for m in received], sent)

    @defer.inlineCallbacks
    def test_visibility_timeout_through_the_service(self):
        clock = Clock()
        queue = self.start(clock=clock, visibility_timeout=30)
        yield queue.put([envelope(1)])
        yield queue.receive(10)
        self.assertEqual((yield queue.receive(10)), [])
        self.assertEqual((yield queue.depth()), {"visible": 0, "in_flight": 1, "dead": 0})
        clock.now += 30
        [again] = yield queue.receive(10)
        self.assertEqual(again.receive_count, 2)

    @defer.inlineCallbacks
    def test_processor_side_through_the_service(self):
        queue = self.start(max_receives=1)
        yield queue.put([envelope(1), envelope(2)])
        messages = yield queue.receive(10)
        deleted = yield queue.delete([messages[0].receipt])
        yield queue.release(messages[1].receipt, "sink down")
        self.assertEqual(deleted, 1)
        self.assertEqual((yield queue.delete([messages[0].receipt])), 0)
        self.assertEqual((yield queue.receive(10)), [])
        depth = yield queue.depth()
        self.assertEqual(depth, {"visible": 0, "in_flight": 0, "dead": 1})
        [letter] = yield queue.dead_letters()
        self.assertEqual((letter.envelope.seq, letter.reason), (2, "sink down"))
        self.assertEqual((yield queue.replay([letter.id])), 1)
        [back] = yield queue.receive(10)
        self.assertEqual((back.envelope.seq, back.receive_count), (2, 1))


class WithoutJSONFunctions(SQLiteQueueStore):
    """A store whose connection cannot run json_each, as on a SQLite built
    without the JSON functions (there the same probe fails with "no such
    table: json_each"; here SQLite's authorizer refuses it)."""

    def open_connection(self):
        db = super().open_connection()

        def authorize(action, table, *_):
            refused = action == sqlite3.SQLITE_READ and table == "json_each"
            return sqlite3.SQLITE_DENY if refused else sqlite3.SQLITE_OK
        db.set_authorizer(authorize)
        return db


class JSONFunctionsTests(SynchronousTestCase):
    def test_a_sqlite_without_json_functions_fails_the_open_naming_them(self):
        path = Path(self.mktemp())
        with self.assertRaises(MissingJSONFunctions) as caught:
            WithoutJSONFunctions(path)
        message = str(caught.exception)
        self.assertIn(f"SQLite {sqlite3.sqlite_version} cannot run json_each", message)
        self.assertIn("the queue needs SQLite's JSON functions", message)
        # Nothing was made of the file: no schema for a store that cannot run.
        check = sqlite3.connect(str(path))
        self.addCleanup(check.close)
        self.assertEqual(check.execute("SELECT count(*) FROM sqlite_master").fetchone(), (0,))


class FactoryTests(SynchronousTestCase):
    """The ``sqlite`` backend as the core finds it: by name, from config."""

    def test_registered_as_sqlite(self):
        [backend] = sense_register_queues().values()
        self.assertEqual(list(sense_register_queues()), ["sqlite"])
        self.assertEqual((backend.open, backend.settings), (make_sqlite_queue, SQLiteQueueSettings))

    def test_factory_takes_its_settings_from_config_and_creates_the_directory(self):
        data_dir = Path(self.mktemp()) / "deep" / "var"
        config = Config(data_dir=str(data_dir),
                        queue=QueueConfig(max_pending=7, retry_after=9))
        queue = make_sqlite_queue(config, SQLiteQueueSettings(max_batch=3), reactor)
        self.assertEqual(queue.path, data_dir / "queue.sqlite3")
        self.assertTrue(queue.path.exists())
        self.assertEqual((queue.max_pending, queue.max_batch, queue.retry_after), (7, 3, 9))
        self.assertFalse(queue.running)

    def test_unopenable_path_is_a_config_error_naming_the_key(self):
        blocker = Path(self.mktemp())
        blocker.write_text("a file where a directory should be")
        with self.assertRaises(ConfigError) as caught:
            make_sqlite_queue(Config(), SQLiteQueueSettings(path=str(blocker / "queue.sqlite3")),
                              reactor)
        self.assertTrue(str(caught.exception).startswith("queue.sqlite.path: "),
                        str(caught.exception))
