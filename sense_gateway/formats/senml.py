"""Built-in plugin: RFC 8428 SenML on ``POST /data``.

Content-Format 110 (application/senml+json) or 112 (application/senml+cbor,
with the integer labels of RFC 8428 section 6). Records are resolved as
RFC 8428 section 4.6 says: base name, base time, base value and base sum
carry over to the records that follow until a record sets them again;
the name is ``bn + n``, the time ``bt + t`` (times below 2**28, zero and
negative ones included, count from when the gateway received the pack),
the value ``bv + v`` and the sum ``bs + s``.

How records become readings:

- The device is the base name without one trailing ``:``, ``/`` or ``.``
  (``urn:dev:ow:10e2073a01080063:`` -> ``urn:dev:ow:10e2073a01080063``).
  Records may repeat or change ``bn`` only if it still names the same
  device. A pack without a base name names no device and is refused
  (``device id missing``).
- The field is the record's ``n``; a record without ``n`` is the base
  name's own value and goes into the field ``value``.
- ``v`` becomes a number field (always a float: SenML values are
  floating point), ``vs`` a string field, ``vb`` a boolean field. A sum
  ``s`` becomes the field ``<n>_sum`` (``value_sum`` without ``n``); it
  may come with a value or alone.
- ``vd`` (opaque data) is refused: it has no place among metrics, and
  dropping it quietly would lose data.
- A record's unit ``u`` (or the base unit ``bu`` for a record without
  one) is kept with its field as it is written (``Cel``, ``%RH``,
  ``Pa``: RFC 8428 section 12.1 registers them); the sum field gets the
  same unit. Stores and dashboards show it (the dashboard as a symbol,
  ``Cel`` as °C). ``ut`` is checked to be a number and otherwise ignored.
- Records with the same resolved time become one reading with several
  fields; the same field twice at the same time is refused.
- ``bver`` above 10 and unknown labels ending in ``_`` (must-understand)
  are refused; other unknown text labels are ignored, as RFC 8428 asks.
- There is no sequence number.

Diagnostics number the records from 1: ``record 3: more than one value``.

Example::

    coap-client-notls -m post -t 110 -e '[{"bn":"urn:dev:mac:0024befffe804ff1:","n":"temperature","u":"Cel","v":23.1}]' coap://[::1]/data

No configuration.
"""

from __future__ import annotations

from typing import Any

from sense_gateway.envelope import Decoded, FieldValue, Reading, RequestContext
from sense_gateway.errors import DecodeError
from sense_gateway.formats import SENML_CBOR, SENML_JSON, Format
from sense_gateway.formats.sense import load_cbor, load_json, quoted
from sense_gateway.hookspecs import hookimpl

#: RFC 8428 section 6: the integer labels of the CBOR representation.
#: The table is closed; extensions use text labels.
CBOR_LABELS = {-1: "bver", -2: "bn", -3: "bt", -4: "bu", -5: "bv", -6: "bs",
               0: "n", 1: "u", 2: "v", 3: "vs", 4: "vb", 5: "s", 6: "t", 7: "ut", 8: "vd"}

#: The highest SenML version (``bver``) this decoder understands.
SENML_VERSION = 10

#: RFC 8428 section 4.5.3: a resolved time below this is relative to now.
RELATIVE_TIME_LIMIT = 2 ** 28

#: What separates a device's base name from the names of its sensors.
DEVICE_SEPARATORS = (":", "/", ".")

#: Field for a record that has no name of its own.
UNNAMED_FIELD = "value"

_NUMBER_LABELS = frozenset({"bver", "bt", "bv", "bs", "v", "s", "t", "ut"})
_TEXT_LABELS = frozenset({"bn", "bu", "n", "u", "vs"})
_VALUE_LABELS = ("v", "vs", "vb", "vd")


def _check_types(record: dict[str, Any], where: str) -> None:
    for label, value in record.items():
        if label in _NUMBER_LABELS:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise DecodeError(f"{where}: {label} must be a number")
        elif label in _TEXT_LABELS:
            if not isinstance(value, str):
                raise DecodeError(f"{where}: {label} must be a string")
        elif label == "vb":
            if not isinstance(value, bool):
                raise DecodeError(f"{where}: vb must be a boolean")
        elif label.endswith("_"):
            # RFC 8428 section 4.4: such labels must be understood or the pack refused.
            raise DecodeError(f"{where}: unsupported label {quoted(label)}")
    if "bver" in record and record["bver"] > SENML_VERSION:
        raise DecodeError(f"{where}: bver {record['bver']} not supported (max {SENML_VERSION})")


def _device(base_name: str) -> str | None:
    if base_name[-1:] in DEVICE_SEPARATORS:
        base_name = base_name[:-1]
    return base_name or None


class _PackResolver:
    """Walks the records of one pack, carrying the base values along."""

    def __init__(self, received: float):
        self.received = received
        self.base_name = ""
        self.base_time = 0.0
        self.base_value = 0.0
        self.base_sum = 0.0
        self.base_unit = ""
        self.device: str | None = None
        self.fields_by_time: dict[float, dict[str, FieldValue]] = {}
        self.units_by_time: dict[float, dict[str, str]] = {}

    def add(self, record: dict[str, Any], number: int) -> None:
        where = f"record {number}"
        _check_types(record, where)
        self.base_name = record.get("bn", self.base_name)
        self.base_time = record.get("bt", self.base_time)
        self.base_value = record.get("bv", self.base_value)
        self.base_sum = record.get("bs", self.base_sum)
        self.base_unit = record.get("bu", self.base_unit)

        values = [label for label in _VALUE_LABELS if label in record]
        if len(values) > 1:
            raise DecodeError(f"{where}: more than one value ({', '.join(values)})")
        if values == ["vd"]:
            raise DecodeError(f"{where}: data values (vd) not accepted")
        if not values and "s" not in record:
            raise DecodeError(f"{where}: no value (v, vs, vb or s)")

        device = _device(self.base_name)
        if number == 1:
            self.device = device
        elif device != self.device:
            raise DecodeError("records name more than one device")

        time = self._time(record)
        fields = self.fields_by_time.setdefault(time, {})
        name = record.get("n") or UNNAMED_FIELD
        unit = record.get("u") or self.base_unit
        if values:
            self._put(fields, name, self._value(record, values[0]), where)
            if unit:
                self.units_by_time.setdefault(time, {})[name] = unit
        if "s" in record:
            self._put(fields, f"{name}_sum", float(self.base_sum + record["s"]), where)
            if unit:
                self.units_by_time.setdefault(time, {})[f"{name}_sum"] = unit

    def _time(self, record: dict[str, Any]) -> float:
        time = self.base_time + record.get("t", 0)
        return float(self.received + time if time < RELATIVE_TIME_LIMIT else time)

    def _value(self, record: dict[str, Any], label: str) -> FieldValue:
        if label == "v":
            # Always a float, so a sensor that reports 21 and then 21.5
            # does not change its field's type in the time-series store.
            return float(self.base_value + record["v"])
        return record[label]

    @staticmethod
    def _put(fields: dict[str, FieldValue], name: str, value: FieldValue, where: str) -> None:
        if name in fields:
            raise DecodeError(f"{where}: {quoted(name)} twice at the same time")
        fields[name] = value

    def decoded(self) -> Decoded:
        units = self.units_by_time
        readings = [Reading(fields=fields, ts=ts, units=units.get(ts))
                    for ts, fields in sorted(self.fields_by_time.items())]
        return Decoded(readings=readings, device=self.device, seq=None)


def decode_records(records: Any, received: float) -> Decoded:
    """Resolve a parsed pack (records with text labels) into readings."""
    if not isinstance(records, list):
        raise DecodeError("expected an array of records")
    if not records:
        raise DecodeError("empty pack")
    resolver = _PackResolver(received)
    for number, record in enumerate(records, 1):
        if not isinstance(record, dict):
            raise DecodeError(f"record {number}: expected an object")
        resolver.add(record, number)
    return resolver.decoded()


def _text_labels(record: Any, number: int) -> Any:
    """A CBOR record with its integer labels replaced by their text names."""
    if not isinstance(record, dict):
        return record  # decode_records names the problem
    labelled: dict[str, Any] = {}
    for label, value in record.items():
        if isinstance(label, int) and not isinstance(label, bool):
            if label not in CBOR_LABELS:
                raise DecodeError(f"record {number}: unknown label {label}")
            label = CBOR_LABELS[label]
        elif not isinstance(label, str):
            raise DecodeError(f"record {number}: labels must be integers or strings")
        if label in labelled:
            raise DecodeError(f"record {number}: label {quoted(label)} given twice")
        labelled[label] = value
    return labelled


def decode_json(payload: bytes, context: RequestContext) -> Decoded:
    return decode_records(load_json(payload), context.received)


def decode_cbor(payload: bytes, context: RequestContext) -> Decoded:
    records = load_cbor(payload)
    if isinstance(records, list):
        records = [_text_labels(record, number) for number, record in enumerate(records, 1)]
    return decode_records(records, context.received)


@hookimpl
def sense_register_formats() -> list[Format]:
    return [
        Format("senml-json", (SENML_JSON,), ("/data",), decode_json, "RFC 8428 SenML, JSON"),
        Format("senml-cbor", (SENML_CBOR,), ("/data",), decode_cbor, "RFC 8428 SenML, CBOR"),
    ]
