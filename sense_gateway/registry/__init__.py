"""The device registry contract: who the devices are and where their
sequence numbers stand.

Registries are synchronous objects used from the processor's thread (or a
Lambda invocation). ``commit`` is conditional on the version each record
was loaded with, so two processors can never both advance one device.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from sense_gateway.sequence import SequenceState

#: envelope ids remembered per device, to recognise a queue redelivery
RECENT_ENVELOPES = 32


# Rebuilt per device for every batch: not frozen, for the reason given in
# sense_gateway/sequence.py. Treat it as a value.
@dataclass(slots=True)
class DeviceRecord:
    id: str
    first_seen: float
    last_seen: float
    last_source: str
    state: SequenceState = field(default_factory=SequenceState)
    recent: tuple[str, ...] = ()
    #: 0 for a device not stored yet; otherwise bumped by every commit
    version: int = 0
    #: the newest inter-arrival times, seconds (sense_gateway.liveness)
    intervals: tuple[float, ...] = ()
    #: the reporting interval set by hand (``sense devices set``), seconds
    interval: float | None = None


class RegistryUnavailable(Exception):
    """The registry cannot be reached: nothing can be judged."""


class DeviceRegistry:
    """What a registry backend provides."""

    def load(self, device_ids: Iterable[str]) -> dict[str, DeviceRecord]:
        """The stored records of those devices that exist."""
        raise NotImplementedError

    def commit(self, records: list[DeviceRecord]) -> set[str]:
        """Store *records*, each only if the stored version is still the one
        it was loaded with (0: not stored yet). Returns the ids whose write
        lost to a concurrent one (those records are not stored)."""
        raise NotImplementedError

    def devices(self) -> list[DeviceRecord]:
        """Every device, ordered by id."""
        raise NotImplementedError

    def ids(self) -> list[str]:
        """Every device id (backends that can, without reading the records)."""
        return [record.id for record in self.devices()]

    def set_interval(self, device: str, seconds: float | None) -> bool:
        """Set (``None``: clear) the interval *device* is expected to report
        at. Returns False if the device is not registered. Bumps the
        record's version: a processor holding the older one loses its
        commit for that device once and retries its messages."""
        raise NotImplementedError

    def check(self) -> None:
        """Raise if the registry cannot be used now (the processor does not
        start until it can). Backends that connect when opened need not
        check again."""

    def count(self) -> int:
        """How many devices there are (backends that can, count without
        reading the records)."""
        return len(self.devices())

    def close(self) -> None:
        pass
