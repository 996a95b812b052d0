"""The sqlite queue backend's own keys, ``[queue.sqlite]``: declared here
with their types and defaults, converted and checked by the core at
start-up like every backend's (:class:`sense_gateway.queues.QueueBackend`)."""

from __future__ import annotations

from dataclasses import dataclass

from sense_gateway.errors import ConfigError


@dataclass(frozen=True)
class SQLiteQueueSettings:
    """The sqlite backend's own keys, ``[queue.sqlite]``."""

    #: the queue file; empty: <data_dir>/queue.sqlite3
    path: str = ""
    #: "full" survives power loss, "normal" survives a crashed process
    synchronous: str = "full"
    #: envelopes per transaction at most
    max_batch: int = 2000

    def __post_init__(self):
        if self.synchronous not in ("full", "normal"):
            raise ConfigError("queue.sqlite.synchronous: must be 'full' or 'normal', "
                              f"got {self.synchronous!r}")
        if not self.max_batch > 0:
            raise ConfigError(f"queue.sqlite.max_batch: must be positive, got {self.max_batch}")
