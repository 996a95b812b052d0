"""What travels through the queue: one accepted request as a versioned document.

An :class:`Envelope` holds everything the processor needs (device, sequence
number, decoded readings, where and when it came from), so the processor
never needs a device-format decoder.
"""

from __future__ import annotations

import base64
import os
import random
from dataclasses import dataclass, field
from typing import Union

import orjson

ENVELOPE_VERSION = 1

FieldValue = Union[float, int, bool, str]

# These records are made several times per request on the reactor thread,
# so they are plain (not frozen) slotted dataclasses: a frozen dataclass
# sets every field through object.__setattr__, which made building one
# about eight times slower (2.2 us against 0.25 us for seven fields here).
# Nothing changes them once built; treat them as values.


@dataclass(slots=True)
class Reading:
    """One point: a measurement with fields and tags at a time (epoch s),
    and the unit of some fields (field -> unit as the device named it,
    e.g. SenML's ``Cel``), if it said."""

    fields: dict[str, FieldValue]
    ts: float | None = None
    measurement: str = "sense"
    tags: dict[str, str] = field(default_factory=dict)
    #: None rather than an empty dict: most readings carry no units
    units: dict[str, str] | None = None


@dataclass(slots=True)
class Decoded:
    """What a decoder returns: readings and, if the payload says, who sent them."""

    readings: list[Reading]
    device: str | None = None
    seq: int | None = None
    #: the device's boot counter, if it sends one (see sense_gateway.sequence)
    boot: int | None = None
    #: the ValidationConfig the decoder already checked every rule of the
    #: built-in validation against (at the request's receive time), if it did
    checked: object = field(default=None, compare=False, repr=False)


@dataclass(slots=True)
class RequestContext:
    """What a decoder or validator may know about the request besides its payload."""

    path: str
    content_format: int | None
    source_host: str
    source_port: int
    received: float
    transport: str = "coap"
    identity: str | None = None


@dataclass(slots=True)
class Envelope:
    """An accepted request, as stored in the queue."""

    id: str
    device: str
    seq: int | None
    received: float
    source: str
    transport: str
    identity: str | None
    path: str
    content_format: int | None
    readings: list[Reading]
    raw: bytes | None = None
    #: the device's boot counter, if it sends one
    boot: int | None = None

    def to_json(self) -> bytes:
        doc = {
            "v": ENVELOPE_VERSION,
            "id": self.id,
            "device": self.device,
            "seq": self.seq,
            "received": self.received,
            "source": self.source,
            "transport": self.transport,
            "identity": self.identity,
            "path": self.path,
            "cf": self.content_format,
            "readings": [
                {"m": r.measurement, "ts": r.ts, "f": r.fields, "t": r.tags, "u": r.units}
                if r.units else {"m": r.measurement, "ts": r.ts, "f": r.fields, "t": r.tags}
                for r in self.readings
            ],
        }
        if self.raw is not None:
            doc["raw"] = base64.b64encode(self.raw).decode("ascii")
        if self.boot is not None:
            doc["boot"] = self.boot
        return orjson.dumps(doc)

    @classmethod
    def from_json(cls, data: bytes | str) -> "Envelope":
        doc = orjson.loads(data)
        version = doc.get("v")
        if version != ENVELOPE_VERSION:
            raise ValueError(f"unknown envelope version {version!r}")
        raw = doc.get("raw")
        # Positional arguments: this runs once per message the processor
        # receives, and keywords cost a dataclass's __init__ more.
        return cls(
            doc["id"], doc["device"], doc["seq"], doc["received"], doc["source"],
            doc["transport"], doc["identity"], doc["path"], doc["cf"],
            [Reading(r["f"], r["ts"], r["m"], r["t"], r.get("u")) for r in doc["readings"]],
            base64.b64decode(raw) if raw is not None else None,
            doc.get("boot"),
        )


# Ids come from a generator seeded from the OS (and reseeded in a forked
# child): os.urandom per id is a system call that lets go of the GIL, and
# the queue's writer thread then holds the busy reactor thread up.
_ids = random.Random(os.urandom(32))
os.register_at_fork(after_in_child=lambda: _ids.seed(os.urandom(32)))
_id_bits = _ids.getrandbits


def new_envelope_id() -> str:
    """A 96-bit random id, unique enough across gateways without coordination."""
    return "%024x" % _id_bits(96)
