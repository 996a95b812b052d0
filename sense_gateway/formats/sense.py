"""Built-in plugin: SENSE v1 readings as JSON or CBOR on ``POST /data``.

Content-Format 50 (application/json) or 60 (application/cbor), the same
structure in both::

    {"id": "node-7", "seq": 42, "ts": 1764300000, "data": {"temperature": 21.5}}

- ``id``: the device id (a string; required, checked by the validators);
- ``seq``: optional unsigned 32-bit sequence number;
- ``ts``: optional epoch seconds (float allowed); the receive time if absent;
- ``data``: field name -> number, boolean or string;
- ``tags``: optional, name -> string, added to every reading.

The batch form carries several readings in one request::

    {"id": "node-7", "seq": 43, "readings": [{"ts": 1764300000, "data": {...}}, ...]}

each reading with its own optional ``ts`` and ``tags``. Example::

    coap-client-notls -m post -t 50 -e '{"id":"node-7","seq":1,"data":{"temperature":21.5}}' coap://[::1]/data

No configuration.
"""

from __future__ import annotations

import io

import cbor2
import orjson

from sense_gateway.envelope import Decoded, Reading, RequestContext
from sense_gateway.errors import DecodeError
from sense_gateway.formats import CBOR, JSON, Format
from sense_gateway.hookspecs import hookimpl

_VALUE_TYPES = (int, float, bool, str)


def _fields(data, where: str) -> dict:
    if not isinstance(data, dict):
        raise DecodeError(f"{where}: expected an object")
    for name, value in data.items():
        if not isinstance(name, str):
            raise DecodeError(f"{where}: field names must be strings")
        if not isinstance(value, _VALUE_TYPES):
            raise DecodeError(f"{where}.{name}: expected a number, boolean or string"[:100])
    return data


def _tags(tags, where: str) -> dict:
    if tags is None:
        return {}
    if not isinstance(tags, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in tags.items()):
        raise DecodeError(f"{where}: expected an object of strings")
    return tags


def _timestamp(ts, where: str) -> float | None:
    if ts is None:
        return None
    if isinstance(ts, bool) or not isinstance(ts, (int, float)):
        raise DecodeError(f"{where}: expected epoch seconds")
    return float(ts)


def from_document(doc) -> Decoded:
    """Turn a decoded JSON/CBOR document into readings."""
    if not isinstance(doc, dict):
        raise DecodeError("expected an object")
    device = doc.get("id")
    if device is not None and not isinstance(device, str):
        raise DecodeError("id: expected a string")
    seq = doc.get("seq")
    if seq is not None and (isinstance(seq, bool) or not isinstance(seq, int)):
        raise DecodeError("seq: expected an integer")
    tags = _tags(doc.get("tags"), "tags")
    if "data" in doc and "readings" in doc:
        raise DecodeError("both data and readings given")
    if "data" in doc:
        readings = [Reading(fields=_fields(doc["data"], "data"),
                            ts=_timestamp(doc.get("ts"), "ts"), tags=tags)]
    elif "readings" in doc:
        items = doc["readings"]
        if not isinstance(items, list):
            raise DecodeError("readings: expected an array")
        readings = []
        for i, item in enumerate(items):
            where = f"readings[{i}]"
            if not isinstance(item, dict):
                raise DecodeError(f"{where}: expected an object")
            if "data" not in item:
                raise DecodeError(f"{where}: data missing")
            readings.append(Reading(
                fields=_fields(item["data"], f"{where}.data"),
                ts=_timestamp(item.get("ts"), f"{where}.ts"),
                tags={**tags, **_tags(item.get("tags"), f"{where}.tags")}))
    else:
        raise DecodeError("data missing")
    return Decoded(readings=readings, device=device, seq=seq)


def decode_json(payload: bytes, context: RequestContext) -> Decoded:
    try:
        doc = orjson.loads(payload)
    except orjson.JSONDecodeError as e:
        raise DecodeError(f"invalid JSON at byte {e.pos}") from None
    return from_document(doc)


def _refuse_tag(*args):
    # cbor2 5 calls tag_hook(decoder, tag), cbor2 6 tag_hook(tag, immutable).
    tag = next(a for a in args if isinstance(a, cbor2.CBORTag))
    raise DecodeError(f"CBOR tag {tag.tag} not accepted")


def decode_cbor_document(payload: bytes):
    """One CBOR item and nothing after it.

    Unknown tags are refused here; the tags cbor2 knows (dates, bignums...)
    decode to values that the type checks of the callers then refuse or
    bound.
    """
    stream = io.BytesIO(payload)
    try:
        doc = cbor2.CBORDecoder(stream, tag_hook=_refuse_tag).decode()
    except DecodeError:
        raise
    except cbor2.CBORDecodeEOF:
        raise DecodeError("invalid CBOR: truncated") from None
    except (cbor2.CBORDecodeError, ValueError, TypeError, EOFError, RecursionError) as e:
        if isinstance(e.__cause__, DecodeError):  # cbor2 wraps what the tag hook raised
            raise e.__cause__ from None
        raise DecodeError(f"invalid CBOR: {type(e).__name__}") from None
    if stream.tell() != len(payload):
        raise DecodeError(f"invalid CBOR: {len(payload) - stream.tell()} bytes after the item")
    return doc


def decode_cbor(payload: bytes, context: RequestContext) -> Decoded:
    doc = decode_cbor_document(payload)
    return from_document(doc)


@hookimpl
def sense_register_formats():
    return [
        Format("sense-json", (JSON,), ("/data",), decode_json,
               "SENSE v1 readings as JSON"),
        Format("sense-cbor", (CBOR,), ("/data",), decode_cbor,
               "SENSE v1 readings as CBOR"),
    ]
