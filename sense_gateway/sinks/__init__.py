"""The metric sink contract, and the points every sink receives.

A reading becomes one point: its measurement (``sense`` by default), the
tag ``device`` plus the reading's tags, its fields, its timestamp. Numbers
are always written as floats, so a field sent once as ``21`` and once as
``21.5`` never conflicts in InfluxDB. Per-device counters become points of
the measurement ``sense_device``, with the device's liveness at the
point's time (sense_gateway/liveness.py): ``state`` (text: online, late,
offline, new), ``silent`` (seconds since its last message) and
``interval`` (the expected interval in seconds, when known). A field's
unit, when the device named one, travels with the point (``units``);
each sink keeps it its own way.

Sinks are synchronous objects called from the processor's thread. Every
enabled sink gets every batch; a batch counts as written only when all of
them took it. Writing the same points again must be harmless (same
series and timestamp overwrite).
"""

from __future__ import annotations

from dataclasses import dataclass

from sense_gateway.envelope import Envelope
from sense_gateway.registry import DeviceRecord

DEVICE_MEASUREMENT = "sense_device"


# Made twice per reading by the processor: a plain slotted dataclass, as
# the envelope's records are (a frozen one sets each field through
# object.__setattr__, three times the cost). Nothing changes a point once
# built; sinks treat them as values.
@dataclass(slots=True)
class MetricPoint:
    measurement: str
    tags: dict[str, str]
    fields: dict[str, float | int | bool | str]
    #: nanoseconds since the epoch
    time_ns: int
    #: field -> unit, for the fields the device named a unit of
    units: dict[str, str] | None = None


class SinkError(Exception):
    """A sink could not take a batch.

    ``retryable`` says whether the same points may succeed later (server
    down, overloaded) or will fail again (the server refused them).
    ``refused``, for a refusal, holds the indices (into the points given
    to ``write``) of the points the server named as the ones at fault;
    empty when it did not say. The processor then writes the others
    again and sends only the messages those points came from to the
    dead letters.
    """

    def __init__(self, message: str, retryable: bool = True, refused: frozenset[int] = frozenset()):
        super().__init__(message)
        self.retryable = retryable
        self.refused = refused


class MetricSink:
    """What a sink backend provides."""

    name = "sink"

    def write(self, points: list[MetricPoint]) -> None:
        """Store *points* or raise :class:`SinkError`."""
        raise NotImplementedError

    def check(self) -> None:
        """Raise :class:`SinkError` if the sink cannot be reached."""

    def close(self) -> None:
        pass


def to_ns(seconds: float) -> int:
    # Round through microseconds: the same float always gives the same
    # integer, so a rewritten point lands on the same timestamp.
    return round(seconds * 1_000_000) * 1000


def _field(value):
    if isinstance(value, bool) or isinstance(value, str):
        return value
    return float(value)


def reading_points(envelope: Envelope) -> list[MetricPoint]:
    # Runs once per reading: the common case (no tags of its own, float
    # fields) builds no more than it must, and the fields dict is shared
    # with the reading when nothing in it needs converting.
    device = envelope.device
    points = []
    for reading in envelope.readings:
        tags = {**reading.tags, "device": device} if reading.tags else {"device": device}
        fields = reading.fields
        for value in fields.values():
            if type(value) is not float:
                fields = {name: _field(value) for name, value in fields.items()}
                break
        points.append(MetricPoint(reading.measurement, tags, fields,
                                  round(reading.ts * 1_000_000) * 1000, reading.units))
    return points


def device_point(record: DeviceRecord, at: float, judged=None) -> MetricPoint:
    """The device's counters at *at*, and its liveness *judged* then."""
    c = record.state.counters
    fields = {"received": c.received, "duplicates": c.duplicates, "lost": c.lost,
              "resets": c.resets, "unsequenced": c.unsequenced}
    if judged is not None:
        fields["state"] = judged.state.value
        # Always a float: an integer once would conflict in InfluxDB later.
        fields["silent"] = round(float(judged.silent), 3)
        if judged.interval is not None:
            fields["interval"] = float(judged.interval)
    return MetricPoint(DEVICE_MEASUREMENT, {"device": record.id}, fields,
                       round(at * 1_000_000) * 1000)  # to_ns, once per device per batch
