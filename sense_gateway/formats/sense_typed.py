"""SENSE v1 decoded and validated in one pass, for the common case.

msgspec parses a document straight into typed structures whose
constraints are the ``[validation]`` limits (names, lengths, ranges,
counts), so a good document costs one C pass instead of a parse, a walk
that checks its structure and a second walk that validates it. The fast
path never words a diagnostic: anything it does not accept (a bad
document, or a rule it does not express, such as a unit naming no field)
makes :meth:`TypedSenseDecoder.decode` return ``None``, and the caller
runs the strict decoder of :mod:`sense_gateway.formats.sense` and the
validators, which say exactly what is wrong (byte offsets, key names).
The fast path may refuse more than they do, never less.
"""

# No "from __future__ import annotations": msgspec reads the structures'
# annotations, which name types local to _structures().
from typing import Annotated, Any, Union

import msgspec

from sense_gateway.config import ValidationConfig
from sense_gateway.envelope import Decoded, Reading

# Anchored with \Z: "$" would let a trailing newline through.
_NAME_PATTERN = r"^(?!time\Z)[A-Za-z0-9.:/-][A-Za-z0-9_.:/-]*\Z"
_NO_CONTROL_PATTERN = r"^[^\x00-\x1f\x7f]*\Z"
_DEVICE_PATTERN = r"^[!-~]+\Z"
_FLOAT_MAX = 1.7976931348623157e308


def _structures(limits: ValidationConfig):
    """The document types for *limits*: built per limits, as msgspec's
    constraints are part of the type."""
    name = Annotated[str, msgspec.Meta(min_length=1, max_length=limits.max_name_length,
                                       pattern=_NAME_PATTERN)]
    text = Annotated[str, msgspec.Meta(max_length=limits.max_string_length,
                                       pattern=_NO_CONTROL_PATTERN)]
    tag_value = Annotated[str, msgspec.Meta(min_length=1, max_length=limits.max_string_length,
                                            pattern=_NO_CONTROL_PATTERN)]
    unit = Annotated[str, msgspec.Meta(min_length=1, max_length=limits.max_name_length,
                                       pattern=_NO_CONTROL_PATTERN)]
    int64 = Annotated[int, msgspec.Meta(ge=-(2 ** 63), le=2 ** 63 - 1)]
    finite = Annotated[float, msgspec.Meta(ge=-_FLOAT_MAX, le=_FLOAT_MAX)]
    uint32 = Annotated[int, msgspec.Meta(ge=0, lt=2 ** 32)]
    fields = Annotated[dict[name, Union[bool, int64, finite, text]],
                       msgspec.Meta(min_length=1, max_length=limits.max_fields)]
    # Not named like the fields below: a class body would see its own
    # attribute (None) instead.
    tag_map = dict[name, tag_value]
    unit_map = dict[str, unit]
    timestamp = Union[int, finite, None]

    class TypedReading(msgspec.Struct, forbid_unknown_fields=True):
        data: fields
        ts: timestamp = None
        tags: Union[tag_map, None] = None
        units: Union[unit_map, None] = None

    class TypedDocument(msgspec.Struct, forbid_unknown_fields=True):
        id: Annotated[str, msgspec.Meta(max_length=limits.max_device_length,
                                        pattern=_DEVICE_PATTERN)]
        seq: Union[uint32, None] = None
        boot: Union[uint32, None] = None
        ts: timestamp = None
        data: Union[fields, None] = None
        tags: Union[tag_map, None] = None
        units: Union[unit_map, None] = None
        readings: Union[Annotated[list[TypedReading],
                                  msgspec.Meta(min_length=1, max_length=limits.max_readings)],
                        None] = None

    return TypedDocument


class TypedSenseDecoder:
    """Decodes and validates a SENSE v1 document against *limits* at once.

    A :class:`Decoded` it returns has ``checked`` set to *limits*: the
    built-in validation would find nothing wrong with it (timestamps
    included, for the receive time given)."""

    def __init__(self, limits: ValidationConfig):
        self.limits = limits
        self._document = _structures(limits)
        self._json = msgspec.json.Decoder(self._document)
        self._min_ts = limits.min_timestamp
        self._max_future = limits.max_future

    def decode_json(self, payload: bytes, received: float) -> Decoded | None:
        try:
            document = self._json.decode(payload)
        except msgspec.MsgspecError:
            return None
        return self._decoded(document, received)

    def decode_object(self, item: Any, received: float) -> Decoded | None:
        """The same for a document already parsed (from CBOR): strict types,
        so a CBOR byte string or integer key is no text."""
        try:
            document = msgspec.convert(item, self._document, strict=True)
        except msgspec.MsgspecError:
            return None
        return self._decoded(document, received)

    def _decoded(self, document, received: float) -> Decoded | None:
        # What the types cannot say, in the order the strict decoder
        # refuses it; any of it sends the request down the strict road.
        if not document.id or (document.boot is not None and document.seq is None):
            return None
        latest = received + self._max_future
        if not self._min_ts <= received <= latest:
            return None  # a reading without ts gets the receive time
        common_tags = document.tags if document.tags is not None else {}
        common_units = document.units
        if document.readings is not None:
            if document.data is not None or document.ts is not None:
                return None
            readings = []
            named: set[str] = set()
            for item in document.readings:
                fields = item.data
                tags = common_tags if item.tags is None else {**common_tags, **item.tags}
                units = None
                if common_units:
                    units = {n: u for n, u in common_units.items() if n in fields}
                    named.update(fields)
                if item.units:
                    for n in item.units:
                        if n not in fields:
                            return None
                    units = {**units, **item.units} if units else item.units
                ts = None if item.ts is None else float(item.ts)
                readings.append(Reading(fields, ts, "sense", tags, units or None))
            if common_units:
                for n in common_units:
                    if n not in named:
                        return None
        elif document.data is not None:
            fields = document.data
            ts = None if document.ts is None else float(document.ts)
            units = None
            if common_units:
                for n in common_units:
                    if n not in fields:
                        return None
                units = dict(common_units)
            readings = [Reading(fields, ts, "sense", common_tags, units)]
        else:
            return None
        for reading in readings:
            if reading.ts is not None and not self._min_ts <= reading.ts <= latest:
                return None
        return Decoded(readings, document.id, document.seq, document.boot, self.limits)
