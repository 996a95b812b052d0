"""Device credentials: the same contract from the SQLite file (owner-only)
and from DynamoDB (moto in server mode), and ``sense devices add | rotate
| revoke``, which never shows a key except the one it just generated."""

from __future__ import annotations

import contextlib
import os
import stat
import subprocess
import threading
from pathlib import Path

import orjson
from twisted.trial.unittest import TestCase

from sense_gateway.credentials.dynamodb import DynamoDBCredentialStore
from sense_gateway.credentials.sqlite import SQLiteCredentialStore
from tests.servers import MotoServer
from tests.support import AWS_ENV, BIN, set_environ


class StoreContract:
    """What every credential store does (the subclass makes ``self.store``)."""

    #: held around each write by the concurrent writers (a no-op by default)
    writers_take_turns = contextlib.nullcontext()

    def test_a_new_store_has_no_changes(self):
        self.assertEqual((self.store.serial(), self.store.changes(0)), (0, []))

    def test_set_rotate_revoke_are_numbered_changes(self):
        first = self.store.set_key("node-7", b"\x01" * 16)
        self.store.set_key("node-8", b"\x02" * 16)
        self.assertEqual(self.store.serial(), first.serial + 1)
        self.store.set_key("node-7", b"\x03" * 16)  # rotated
        self.assertTrue(self.store.revoke("node-8"))
        self.assertFalse(self.store.revoke("node-8"))  # already
        self.assertFalse(self.store.revoke("nobody"))
        latest = {c.device: c for c in self.store.changes(0)}
        self.assertEqual(latest["node-7"].key, b"\x03" * 16)
        self.assertTrue(latest["node-8"].revoked)
        # Only what changed after a serial comes back.
        since = self.store.serial()
        self.assertEqual(self.store.changes(since), [])
        self.store.set_key("node-9", b"\x04" * 16)
        self.assertEqual([c.device for c in self.store.changes(since)], ["node-9"])

    def test_concurrent_writers_never_share_a_serial_or_lose_a_change(self):
        def write(store, prefix):
            for n in range(15):
                with self.writers_take_turns:
                    store.set_key(f"{prefix}-{n}", bytes([n]) * 16)
        other, watcher = self.another_store(), self.another_store()
        threads = [threading.Thread(target=write, args=(store, prefix))
                   for store, prefix in ((self.store, "a"), (other, "b"))]
        for thread in threads:
            thread.start()
        # A gateway's way of following the store: poll the serial, read
        # what changed since the last one it saw.
        seen, since = {}, 0
        while True:
            writing = any(thread.is_alive() for thread in threads)
            serial = watcher.serial()
            if serial != since:
                seen.update((c.device, c.key) for c in watcher.changes(since))
                since = serial
            if not writing:
                break
        changes = self.store.changes(0)
        self.assertEqual(seen, {c.device: c.key for c in changes})
        self.assertEqual(len(changes), 30)
        self.assertEqual(sorted(c.serial for c in changes), list(range(1, 31)))
        self.assertEqual(self.store.serial(), 30)

    def test_a_credential_never_shows_its_key(self):
        credential = self.store.set_key("node-7", b"secret-key-bytes")
        self.assertNotIn("secret", repr(credential))
        self.assertNotIn("secret", repr(self.store.changes(0)))


class SQLiteStoreTests(StoreContract, TestCase):
    def setUp(self):
        self.path = Path(self.mktemp()) / "credentials.sqlite3"
        self.store = self.another_store()

    def another_store(self):
        store = SQLiteCredentialStore(self.path)
        self.addCleanup(store.close)
        return store

    def test_the_file_is_readable_by_its_owner_only(self):
        self.store.set_key("node-7", b"\x01" * 16)
        for path in self.path.parent.iterdir():
            self.assertEqual(stat.S_IMODE(path.stat().st_mode) & 0o077, 0, path.name)


class DynamoDBStoreTests(StoreContract, TestCase):
    timeout = 60
    # moto's transactions are not isolated from each other (two can both
    # pass one condition, and a cancelled one's rollback can undo the
    # other's write); DynamoDB's are serializable. Writers take turns here,
    # so the test checks what the store itself must get right: a reader
    # polling the serial never misses a change.
    writers_take_turns = threading.Lock()

    def setUp(self):
        set_environ(self, AWS_ENV)
        moto = MotoServer(self)
        moto.client("dynamodb").create_table(
            TableName="creds", BillingMode="PAY_PER_REQUEST",
            KeySchema=[{"AttributeName": "device", "KeyType": "HASH"}],
            AttributeDefinitions=[{"AttributeName": "device", "AttributeType": "S"}])
        self.url = moto.url
        self.store = self.another_store()

    def another_store(self):
        return DynamoDBCredentialStore("creds", "us-east-1", self.url)


class DevicesCommandTests(TestCase):
    timeout = 60

    def setUp(self):
        self.data_dir = Path(self.mktemp()).resolve()
        self.data_dir.mkdir(parents=True)

    def sense(self, *args, check=True, stdin=None):
        env = {k: v for k, v in os.environ.items() if not k.startswith("SENSE_")}
        result = subprocess.run([str(BIN / "sense"), "--data-dir", str(self.data_dir),
                                 "--plugins-dir", str(self.data_dir / "none"), "devices", *args],
                                capture_output=True, text=True, timeout=60, env=env, input=stdin)
        if check:
            self.assertEqual(result.returncode, 0, result.stderr)
        return result

    def test_generated_key_is_printed_once_and_never_listed(self):
        out = self.sense("add", "node-7", "--generate").stdout
        key = out.rsplit(": ", 1)[1].strip()
        self.assertEqual(len(bytes.fromhex(key)), 16)
        listing = self.sense().stdout + self.sense("--json").stdout
        self.assertNotIn(key, listing)
        [row] = orjson.loads(self.sense("--json").stdout)
        self.assertEqual((row["id"], row["credential"]), ("node-7", "psk"))

    def test_given_key_is_not_echoed(self):
        out = self.sense("add", "node-8", "--psk-hex", "00112233445566778899aabbccddeeff").stdout
        self.assertNotIn("00112233", out)
        store = SQLiteCredentialStore(self.data_dir / "credentials.sqlite3")
        self.addCleanup(store.close)
        [credential] = store.changes(0)
        self.assertEqual(credential.key, bytes.fromhex("00112233445566778899aabbccddeeff"))

    def test_key_from_standard_input_stays_off_the_command_line(self):
        self.sense("add", "node-9", "--psk-file", "-", stdin="a0a1a2a3a4a5a6a7\n")
        store = SQLiteCredentialStore(self.data_dir / "credentials.sqlite3")
        self.addCleanup(store.close)
        [credential] = store.changes(0)
        self.assertEqual(credential.key, bytes.fromhex("a0a1a2a3a4a5a6a7"))

    def test_rotate_and_revoke(self):
        self.sense("add", "node-7", "--psk-hex", "0011")
        rotated = self.sense("rotate", "node-7").stdout
        self.assertIn("pre-shared key", rotated)
        self.assertIn("revoked", self.sense("revoke", "node-7").stdout)
        [row] = orjson.loads(self.sense("--json").stdout)
        self.assertEqual(row["credential"], "revoked")
        self.assertEqual(self.sense("revoke", "node-7", check=False).returncode, 1)
        self.assertEqual(self.sense("rotate", "node-7", check=False).returncode, 1)

    def test_bad_input_is_refused_without_repeating_the_key(self):
        bad = self.sense("add", "node-7", "--psk-hex", "secretzz", check=False)
        self.assertEqual(bad.returncode, 2)
        self.assertNotIn("secretzz", bad.stderr)
        self.assertEqual(self.sense("add", "two words", "--generate", check=False).returncode, 2)
        self.assertEqual(self.sense("add", "node-7", check=False).returncode, 2)
