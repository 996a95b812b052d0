"""The sqlite queue backend's own keys, ``[queue.sqlite]``: declared here
with their types and defaults, converted and checked by the core at
start-up like every backend's (:class:`sense_gateway.queues.QueueBackend`)."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path

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


def queue_file(config, settings: SQLiteQueueSettings) -> Path:
    """The file of the queue (or of the shard) *settings* describe."""
    return Path(settings.path) if settings.path else Path(config.data_dir) / "queue.sqlite3"


def sqlite_shards(config, settings: SQLiteQueueSettings, count: int) -> list:
    """Shard *i* of ``queue.sqlite3`` is ``queue-i.sqlite3`` beside it (the
    first is the file itself): *count* of them, or as many as are there."""
    first = queue_file(config, settings)
    pattern = re.compile(re.escape(first.stem) + r"-([0-9]+)" + re.escape(first.suffix) + "$")
    found = [int(m.group(1)) for p in first.parent.glob(f"{first.stem}-*{first.suffix}")
             if (m := pattern.match(p.name))]
    total = max([count, *(n + 1 for n in found)])
    return [settings] + [dataclasses.replace(
        settings, path=str(first.with_name(f"{first.stem}-{i}{first.suffix}")))
        for i in range(1, total)]
