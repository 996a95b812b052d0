"""Messages held by a processor that was killed are received again at once.

Each receiving store of the SQLite queue locks a file of its own; a real
child process receives a batch and is SIGKILLed (or keeps running), and a
store in this process must see the difference."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from sense_gateway.queues.sqlite_store import SQLiteQueueStore
from tests.test_queue_sqlite import envelope

HOLDER = textwrap.dedent("""
    import sys
    from sense_gateway.queues.sqlite_store import SQLiteQueueStore
    store = SQLiteQueueStore(sys.argv[1])
    received = store.receive(int(sys.argv[2]))
    print(" ".join(str(m.envelope.seq) for m in received), flush=True)
    if sys.argv[3] == "release":
        store.release(received[0].receipt, "try later", delay=600)
        print("released", flush=True)
    sys.stdin.read()  # hold them until killed
    """)


class HolderProcess:
    """A child process that receives *count* messages and holds them."""

    def __init__(self, testcase, path: Path, count: int, then: str = "hold"):
        self.process = subprocess.Popen([sys.executable, "-c", HOLDER, str(path), str(count), then],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        testcase.addCleanup(self.kill)
        self.received = [int(seq) for seq in self.process.stdout.readline().split()]
        if then == "release":
            assert self.process.stdout.readline().strip() == "released"

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)
        for stream in (self.process.stdin, self.process.stdout):
            stream.close()


class HeldMessagesTests(SynchronousTestCase):
    def setUp(self):
        self.path = Path(self.mktemp())
        store = SQLiteQueueStore(self.path)
        store.put_many([envelope(seq).to_json() for seq in (1, 2, 3)])
        store.close()

    def store(self) -> SQLiteQueueStore:
        store = SQLiteQueueStore(self.path)
        self.addCleanup(store.close)
        return store

    def test_messages_of_a_killed_holder_are_received_again_at_once_in_order(self):
        holder = HolderProcess(self, self.path, 2)
        self.assertEqual(holder.received, [1, 2])
        holder.kill()
        store = self.store()
        received = store.receive(10)
        self.assertEqual([m.envelope.seq for m in received], [1, 2, 3])
        # The killed holder's receive still counts (a message that kills
        # its processor must end in the dead letters, not loop for ever).
        self.assertEqual([m.receive_count for m in received], [2, 2, 1])
        self.assertEqual(store.reclaimed, 2)

    def test_messages_of_a_running_holder_stay_hidden(self):
        holder = HolderProcess(self, self.path, 2)
        store = self.store()
        self.assertEqual([m.envelope.seq for m in store.receive(10)], [3])
        self.assertEqual(store.reclaimed, 0)
        holder.kill()

    def test_a_message_released_with_a_delay_keeps_its_delay_after_its_holder_dies(self):
        # Released (a failed write, retried later): nobody holds it any more.
        holder = HolderProcess(self, self.path, 2, then="release")
        holder.kill()
        store = self.store()
        self.assertEqual([m.envelope.seq for m in store.receive(10)], [2, 3])

    def test_a_later_look_finds_a_holder_that_died_meanwhile(self):
        holder = HolderProcess(self, self.path, 1)
        store = self.store()
        self.assertEqual([m.envelope.seq for m in store.receive(1)], [2])
        holder.kill()
        # Not at once: the next look comes RECLAIM_INTERVAL after the last.
        self.assertEqual([m.envelope.seq for m in store.receive(10)], [3])
        store._next_reclaim = 0.5  # as if the interval had passed
        self.assertEqual([m.envelope.seq for m in store.receive(10)], [1])

    def test_holder_files_are_removed_by_their_store_and_for_killed_processes(self):
        store = self.store()
        store.receive(1)
        holders = store.holders.directory
        self.assertEqual(len(list(holders.iterdir())), 1)
        store.close()
        self.assertEqual(list(holders.iterdir()), [])
        # A killed holder whose messages were since deleted leaves its file;
        # the next store's first look removes it.
        HolderProcess(self, self.path, 1).kill()
        self.assertEqual(len(list(holders.iterdir())), 1)
        cleaner = self.store()
        for message in cleaner.receive(10):
            cleaner.delete([message.receipt])
        self.assertEqual({p.name for p in holders.iterdir()}, {cleaner.holders.name})

    def test_a_queue_file_from_before_holders_gets_the_column(self):
        path = Path(self.mktemp())
        db = sqlite3.connect(path)
        db.executescript("""
            CREATE TABLE messages (id INTEGER PRIMARY KEY, body BLOB NOT NULL,
                enqueued_at REAL NOT NULL, visible_at REAL NOT NULL,
                receive_count INTEGER NOT NULL DEFAULT 0, receipt TEXT, last_error TEXT);
            """)
        db.execute("INSERT INTO messages (body, enqueued_at, visible_at) VALUES (?, 0, 0)",
                   (envelope(7).to_json(),))
        db.commit()
        db.close()
        store = SQLiteQueueStore(path)
        self.addCleanup(store.close)
        self.assertEqual([m.envelope.seq for m in store.receive(10)], [7])
