"""Built-in plugin: RFC 8428 SenML on ``POST /data``.

Content-Format 110 (application/senml+json) or 112 (application/senml+cbor,
integer labels). Records are resolved as RFC 8428 section 4.6 says: base
name, base time and base value carry over to the records that follow,
the name is ``bn + n``, the time ``bt + t``, and times below 2**28 are
relative to when the gateway received the pack.

- The device is the base name with one trailing ``:``, ``/`` or ``.``
  removed (``urn:dev:ow:10e2073a01080063:`` -> ``urn:dev:ow:10e2073a01080063``);
  all records must resolve to the same device.
- The field is the record's ``n`` (``value`` when a record has none).
- ``v`` (plus ``bv``), ``vs`` and ``vb`` become number, string and boolean
  fields; a sum ``s`` (plus ``bs``) becomes the field ``<n>_sum``. ``vd``
  (opaque data) is refused: metrics have no place for it.
- Units (``u``, ``bu``) are not stored; name fields so the unit is clear.
- Records with the same resolved time become one reading.
- There is no sequence number.

Example::

    coap-client-notls -m post -t 110 -e '[{"bn":"urn:dev:mac:0024befffe804ff1:","n":"temperature","u":"Cel","v":23.1}]' coap://[::1]/data

No configuration.
"""

from __future__ import annotations

import orjson

from sense_gateway.envelope import Decoded, Reading, RequestContext
from sense_gateway.errors import DecodeError
from sense_gateway.formats import SENML_CBOR, SENML_JSON, Format
from sense_gateway.formats.sense import decode_cbor_document
from sense_gateway.hookspecs import hookimpl

#: RFC 8428 section 6: CBOR integer labels -> JSON labels.
CBOR_LABELS = {-1: "bver", -2: "bn", -3: "bt", -4: "bu", -5: "bv", -6: "bs",
               0: "n", 1: "u", 2: "v", 3: "vs", 4: "vb", 5: "s", 6: "t", 7: "ut", 8: "vd"}

#: RFC 8428 4.5.3: times below this are relative to "now".
RELATIVE_LIMIT = 2 ** 28

_NUMBER_LABELS = ("bt", "bv", "bs", "v", "s", "t", "bver", "ut")
_STRING_LABELS = ("bn", "bu", "n", "u", "vs", "vd")


def _check(record: dict, i: int) -> None:
    for label, value in record.items():
        if not isinstance(label, str):
            raise DecodeError(f"record {i}: unknown label {label!r}"[:100])
        if label in _NUMBER_LABELS and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise DecodeError(f"record {i}: {label} must be a number")
        if label in _STRING_LABELS and not isinstance(value, str):
            raise DecodeError(f"record {i}: {label} must be a string")
        if label == "vb" and not isinstance(value, bool):
            raise DecodeError(f"record {i}: vb must be a boolean")
        if label.endswith("_"):
            # RFC 8428 4.4: labels ending in _ must be understood.
            raise DecodeError(f"record {i}: unsupported label {label}")


def _device(base_name: str) -> str:
    return base_name[:-1] if base_name[-1:] in (":", "/", ".") else base_name


def from_records(records, received: float) -> Decoded:
    if not isinstance(records, list):
        raise DecodeError("expected an array of records")
    if not records:
        raise DecodeError("empty pack")
    base_name, base_time, base_value, base_sum = "", 0.0, 0.0, 0.0
    device = None
    by_time: dict[float, dict] = {}
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise DecodeError(f"record {i}: expected an object")
        _check(record, i)
        if "vd" in record:
            raise DecodeError(f"record {i}: data values (vd) not accepted")
        base_name = record.get("bn", base_name)
        base_time = record.get("bt", base_time)
        base_value = record.get("bv", base_value)
        base_sum = record.get("bs", base_sum)
        values = [label for label in ("v", "vs", "vb", "s") if label in record]
        if not values:
            if record.keys() <= {"bn", "bt", "bu", "bv", "bs", "bver"}:
                continue  # a record that only sets base values
            raise DecodeError(f"record {i}: no value")
        if len(values) > 1 and values != ["v", "s"]:
            raise DecodeError(f"record {i}: more than one value")
        if base_name:
            record_device = _device(base_name)
            if device is not None and record_device != device:
                raise DecodeError("records name more than one device")
            device = record_device
        name = record.get("n") or "value"
        t = base_time + record.get("t", 0)
        ts = received + t if t < RELATIVE_LIMIT else t
        fields = by_time.setdefault(float(ts), {})
        if "v" in record:
            fields[name] = base_value + record["v"]
        if "s" in record:
            fields[f"{name}_sum"] = base_sum + record["s"]
        if "vs" in record:
            fields[name] = record["vs"]
        if "vb" in record:
            fields[name] = record["vb"]
    if not by_time:
        raise DecodeError("no records with values")
    readings = [Reading(fields=fields, ts=ts) for ts, fields in sorted(by_time.items())]
    return Decoded(readings=readings, device=device, seq=None)


def decode_json(payload: bytes, context: RequestContext) -> Decoded:
    try:
        records = orjson.loads(payload)
    except orjson.JSONDecodeError as e:
        raise DecodeError(f"invalid JSON at byte {e.pos}") from None
    return from_records(records, context.received)


def decode_cbor(payload: bytes, context: RequestContext) -> Decoded:
    records = decode_cbor_document(payload)
    if isinstance(records, list):
        records = [
            {CBOR_LABELS.get(k, k) if isinstance(k, int) else k: v for k, v in r.items()}
            if isinstance(r, dict) else r
            for r in records
        ]
    return from_records(records, context.received)


@hookimpl
def sense_register_formats():
    return [
        Format("senml-json", (SENML_JSON,), ("/data",), decode_json, "RFC 8428 SenML, JSON"),
        Format("senml-cbor", (SENML_CBOR,), ("/data",), decode_cbor, "RFC 8428 SenML, CBOR"),
    ]
