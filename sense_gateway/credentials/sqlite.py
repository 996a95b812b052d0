"""Built-in plugin: device credentials in an SQLite file beside the
embedded registry (``registry.backend = "sqlite"``).

The file is ``registry.credentials_path`` (default
``<data_dir>/credentials.sqlite3``), created readable by its owner only;
SQLite gives its journal files the same permissions.
"""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path

from sense_gateway.credentials import Credential, CredentialStore
from sense_gateway.hookspecs import hookimpl

_SCHEMA = """
CREATE TABLE IF NOT EXISTS credentials (
    device TEXT PRIMARY KEY,
    key BLOB,
    changed REAL NOT NULL,
    serial INTEGER NOT NULL UNIQUE
)
"""


class SQLiteCredentialStore(CredentialStore):
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Owner-only from the first byte: created here, not by SQLite,
        # whose files follow the umask.
        os.close(os.open(self.path, os.O_CREAT | os.O_RDWR, 0o600))
        os.chmod(self.path, 0o600)
        self.db = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA busy_timeout=5000")
        self.db.execute(_SCHEMA)

    def _change(self, device: str, key: bytes | None) -> Credential:
        now = time.time()
        self.db.execute("BEGIN IMMEDIATE")
        try:
            serial = self.db.execute(
                "SELECT coalesce(max(serial), 0) + 1 FROM credentials").fetchone()[0]
            self.db.execute("INSERT INTO credentials (device, key, changed, serial) "
                            "VALUES (?, ?, ?, ?) ON CONFLICT (device) DO UPDATE SET "
                            "key = excluded.key, changed = excluded.changed, "
                            "serial = excluded.serial", (device, key, now, serial))
            self.db.execute("COMMIT")
        except BaseException:
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            raise
        return Credential(device, key, now, serial)

    def set_key(self, device: str, key: bytes) -> Credential:
        return self._change(device, bytes(key))

    def revoke(self, device: str) -> bool:
        row = self.db.execute("SELECT key FROM credentials WHERE device = ?", (device,)).fetchone()
        if row is None or row[0] is None:
            return False
        self._change(device, None)
        return True

    def serial(self) -> int:
        return self.db.execute("SELECT coalesce(max(serial), 0) FROM credentials").fetchone()[0]

    def changes(self, since: int) -> list[Credential]:
        return [Credential(device, key, changed, serial) for device, key, changed, serial in
                self.db.execute("SELECT device, key, changed, serial FROM credentials "
                                "WHERE serial > ? ORDER BY serial", (since,))]

    def close(self) -> None:
        self.db.close()


@hookimpl
def sense_register_credential_stores():
    return {"sqlite": lambda config: SQLiteCredentialStore(config.credentials_path)}
