"""Who holds received messages of an SQLite queue file, and whether they
still run: one locked file per receiving store.

A processor killed while it holds a batch (received, not yet deleted)
would leave those messages hidden for the visibility timeout, while the
device's later messages are processed: its readings then come out of
order, and one more than 64 numbers late looks like a reboot. The SQLite
queue serves processes on one machine only, so it can ask the kernel
instead of waiting: every store that receives takes an exclusive
``flock`` on a file of its own in ``<queue file>-holders/`` and marks the
messages it takes with that file's name. A lock is let go when its
process ends, however it ends; a file nobody holds a lock on is a holder
that is gone, and its messages can be received again at once.
"""

from __future__ import annotations

import fcntl
import os
import secrets
from collections.abc import Iterable
from pathlib import Path


class Holders:
    """This store's holder name (taken on first use) and the others' fate."""

    def __init__(self, queue_path: Path):
        self.directory = queue_path.with_name(queue_path.name + "-holders")
        self._name: str | None = None
        self._fd: int | None = None

    @property
    def name(self) -> str:
        """This store's holder name; the lock is taken the first time."""
        if self._name is None:
            self.directory.mkdir(exist_ok=True)
            name = secrets.token_hex(6)
            # Locked under a temporary name, then renamed: a file that bears
            # a holder's name is locked from the moment it exists, so no one
            # can take a starting holder for a dead one.
            scratch = self.directory / f".{name}.new"
            fd = os.open(scratch, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                os.rename(scratch, self.directory / name)
            except BaseException:
                os.close(fd)
                raise
            self._name, self._fd = name, fd
        return self._name

    def gone(self, names: Iterable[str]) -> set[str]:
        """Which of *names* no running process holds (their files removed)."""
        out = set()
        for name in names:
            if name != self._name and self._is_gone(self.directory / name):
                out.add(name)
        return out

    def sweep(self) -> int:
        """Remove the files of holders that are gone; how many."""
        try:
            entries = list(self.directory.iterdir())
        except FileNotFoundError:
            return 0
        return sum(1 for path in entries
                   if not path.name.startswith(".") and path.name != self._name
                   and self._is_gone(path))

    @staticmethod
    def _is_gone(path: Path) -> bool:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            return True  # removed by whoever found it gone first
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        finally:
            os.close(fd)  # lets go of the lock if it was taken
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        return True

    def close(self) -> None:
        if self._fd is not None:
            try:
                (self.directory / self._name).unlink()
            except FileNotFoundError:
                pass
            os.close(self._fd)
            self._fd = self._name = None
