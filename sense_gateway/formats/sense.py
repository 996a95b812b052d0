"""Built-in plugin: SENSE v1 readings as JSON or CBOR on ``POST /data``.

Content-Format 50 (application/json) or 60 (application/cbor), the same
structure in both::

    {"id": "node-7", "seq": 42, "ts": 1764300000, "data": {"temperature": 21.5}}

- ``id``: the device id, a string (required: a document without one is
  refused with ``device id missing``);
- ``seq``: optional unsigned 32-bit sequence number, an integer;
- ``boot``: optional unsigned 32-bit boot counter, an integer the device
  increments at every start (kept in flash), only with ``seq``. With it a
  reboot is told from a repeated message without doubt: the same ``seq``
  in a new ``boot`` is a reset, in the same ``boot`` a duplicate (see
  docs/processing.md, "Sequence numbers");
- ``ts``: optional epoch seconds (fractions allowed); absent means the
  time the gateway received the request;
- ``data``: field name -> number, boolean or string;
- ``tags``: optional, name -> string, added to every reading;
- ``units``: optional, field name -> unit (a string, 1 to 64 characters),
  e.g. ``{"temperature": "Cel", "humidity": "%RH"}``. Use SenML's unit
  names (RFC 8428 section 12.1: ``Cel``, ``%RH``, ``Pa``, ``V``, ``W``,
  ``lx``, ...) and the dashboard shows their symbols (°C); any other text
  is shown as it is. A unit is kept with its field in every store
  (InfluxDB: the string field ``<field>_unit`` beside it). Each name must
  be a field of the document (of one of its readings in the batch form).

The batch form carries several readings in one request::

    {"id": "node-7", "seq": 43, "tags": {"room": "lab"},
     "readings": [{"ts": 1764300000, "data": {"temperature": 21.5}},
                  {"ts": 1764300060, "data": {"temperature": 21.6}, "tags": {"probe": "b"}}]}

Each reading has its own optional ``ts``, ``tags`` and ``units`` (merged
over the top-level ones); a top-level ``ts`` is not allowed in this form.

The decoder is strict so a device developer learns about a mistake at
once: unknown keys, a ``null`` or nested value in ``data``, a boolean
``seq`` are refused with a short diagnostic (``data: expected an object``,
``reading 2: unknown key 'tz'``). CBOR must be one item with nothing
after it, map keys must be text, and no CBOR tags are accepted (dates,
bignums, self-describe alike): send plain numbers and strings.

Example::

    coap-client-notls -m post -t 50 -e '{"id":"node-7","seq":1,"data":{"temperature":21.5}}' coap://[::1]/data

No configuration.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NoReturn

import cbor2
import orjson

from sense_gateway.config import ValidationConfig
from sense_gateway.envelope import Decoded, FieldValue, Reading, RequestContext
from sense_gateway.errors import DecodeError
from sense_gateway.formats import CBOR, JSON, Format
from sense_gateway.formats.sense_typed import TypedSenseDecoder
from sense_gateway.hookspecs import hookimpl

_DOCUMENT_KEYS = frozenset({"id", "seq", "boot", "ts", "data", "tags", "units", "readings"})
_READING_KEYS = frozenset({"ts", "data", "tags", "units"})

# Our documents nest four deep at most (batch -> readings -> reading ->
# data); a little slack, and no device can make the decoder recurse far.
_CBOR_MAX_DEPTH = 8


def quoted(name: str) -> str:
    """*name* for a diagnostic: quoted, escaped and clipped so the whole
    message stays under 100 characters whatever the device sent."""
    return repr(name if len(name) <= 20 else name[:20] + "...")


# -- JSON and CBOR loading, strict; the SenML decoder uses these too ------

def load_json(payload: bytes) -> Any:
    """Parse one JSON document or raise a DecodeError saying where it broke."""
    try:
        return orjson.loads(payload)
    except orjson.JSONDecodeError as e:
        raise DecodeError(_json_diagnostic(payload, e.pos)) from None


def _json_diagnostic(payload: bytes, char_position: int) -> str:
    if not payload.strip():
        return "empty payload"
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as e:
        return f"invalid JSON: not UTF-8 at byte {e.start}"
    # orjson counts characters; a device developer looks at bytes.
    return f"invalid JSON at byte {len(text[:char_position].encode('utf-8'))}"


class _EveryTagRefused(Mapping):
    """A cbor2 semantic-decoder table that claims every tag and refuses it.

    cbor2 turns some tags into datetimes, compiled regexes, sets or shared
    (even cyclic) references before its ``tag_hook`` runs. Looking every
    tag up here first keeps that machinery away from device input and
    names the tag in the diagnostic.
    """

    def __getitem__(self, tag: int) -> Callable[..., NoReturn]:
        def refuse(*_ignored: Any) -> NoReturn:
            raise DecodeError(f"CBOR tag {tag} not accepted")
        return refuse

    def __iter__(self) -> Iterator[int]:
        return iter(())

    def __len__(self) -> int:
        return 0


_EVERY_TAG_REFUSED = _EveryTagRefused()


def load_cbor(payload: bytes) -> Any:
    """Decode exactly one CBOR item: no tags, no duplicate map keys, nothing after it."""
    if not payload:
        raise DecodeError("empty payload")
    stream = io.BytesIO(payload)
    decoder = cbor2.CBORDecoder(stream, semantic_decoders=_EVERY_TAG_REFUSED,
                                allow_duplicate_keys=False, max_depth=_CBOR_MAX_DEPTH)
    try:
        item = decoder.decode()
    except cbor2.CBORDecodeEOF:
        raise DecodeError("invalid CBOR: truncated") from None
    except cbor2.CBORDecodeError as e:
        if isinstance(e.__cause__, DecodeError):  # cbor2 wraps what a tag decoder raised
            raise e.__cause__ from None
        raise DecodeError(_cbor_diagnostic(e)) from None
    except (ValueError, TypeError, RecursionError):
        raise DecodeError("invalid CBOR") from None
    after = len(payload) - stream.tell()
    if after:
        raise DecodeError(f"invalid CBOR: {after} bytes after the item")
    return item


def _cbor_diagnostic(error: cbor2.CBORDecodeError) -> str:
    # cbor2 tells these apart only by message; anything else stays generic.
    message = str(error)
    if isinstance(error.__cause__, UnicodeDecodeError):
        return "invalid CBOR: text string not UTF-8"
    if "Duplicate map key" in message:
        return "invalid CBOR: duplicate map key"
    if "nesting depth" in message:
        return "invalid CBOR: nested too deep"
    return "invalid CBOR"


# -- the SENSE v1 structure ------------------------------------------------

def _object(value: Any, where: str) -> dict[str, Any]:
    """*value* as an object whose keys are all strings (CBOR allows others)."""
    if not isinstance(value, dict):
        raise DecodeError(f"{where}: expected an object")
    for key in value:
        if not isinstance(key, str):
            raise DecodeError(f"{where}: keys must be strings")
    return value


def _check_keys(document: dict[str, Any], allowed: frozenset[str], prefix: str) -> None:
    for key in document:
        if key not in allowed:
            raise DecodeError(f"{prefix}unknown key {quoted(key)}")


def _fields(value: Any, where: str) -> dict[str, FieldValue]:
    fields = _object(value, where)
    for name, field_value in fields.items():
        # bool is an int subclass, so it passes; None, lists, objects,
        # CBOR bytes and undefined do not.
        if not isinstance(field_value, (int, float, str)):
            raise DecodeError(f"{where}: {quoted(name)}: not a number, boolean or string")
    return fields


def _tags(value: Any, where: str) -> dict[str, str]:
    tags = _object(value, where)
    for name, tag_value in tags.items():
        if not isinstance(tag_value, str):
            raise DecodeError(f"{where}: {quoted(name)}: expected a string")
    return tags


def _timestamp(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DecodeError(f"{where}: expected epoch seconds")
    return float(value)


def _reading(document: dict[str, Any], common_tags: dict[str, str], prefix: str,
             common_units: dict[str, str] | None = None) -> Reading:
    """One reading from an object holding ``data`` and optional ``ts``/``tags``/``units``."""
    if "data" not in document:
        raise DecodeError(f"{prefix}data missing")
    fields = _fields(document["data"], f"{prefix}data")
    ts = _timestamp(document["ts"], f"{prefix}ts") if "ts" in document else None
    tags = common_tags
    if "tags" in document:
        tags = {**common_tags, **_tags(document["tags"], f"{prefix}tags")}
    # Top-level units name fields of any reading: each keeps its own.
    units = {name: unit for name, unit in (common_units or {}).items() if name in fields}
    if "units" in document and prefix:
        units.update(_tags(document["units"], f"{prefix}units"))
    return Reading(fields=fields, ts=ts, tags=tags, units=units or None)


def decode_document(document: Any) -> Decoded:
    """Turn a parsed SENSE v1 document (from JSON or CBOR) into readings."""
    _object(document, "top level")
    _check_keys(document, _DOCUMENT_KEYS, "")

    device = document.get("id")
    if device is not None and not isinstance(device, str):
        raise DecodeError("id: expected a string")
    seq = document.get("seq")
    if seq is not None and (isinstance(seq, bool) or not isinstance(seq, int)):
        raise DecodeError("seq: expected an integer")
    boot = document.get("boot")
    if boot is not None:
        if isinstance(boot, bool) or not isinstance(boot, int):
            raise DecodeError("boot: expected an integer")
        if seq is None:
            raise DecodeError("boot: only with seq")
    common_tags = _tags(document["tags"], "tags") if "tags" in document else {}
    common_units = _tags(document["units"], "units") if "units" in document else None

    if "data" in document and "readings" in document:
        raise DecodeError("both data and readings given")
    if "readings" in document:
        if "ts" in document:
            raise DecodeError("ts: not allowed with readings; give each reading its ts")
        items = document["readings"]
        if not isinstance(items, list):
            raise DecodeError("readings: expected an array")
        readings = []
        for number, item in enumerate(items, 1):
            prefix = f"reading {number}: "
            _object(item, f"reading {number}")
            _check_keys(item, _READING_KEYS, prefix)
            readings.append(_reading(item, common_tags, prefix, common_units))
    elif "data" in document:
        readings = [_reading(document, common_tags, "", common_units)]
    else:
        raise DecodeError("data or readings missing")
    if common_units:
        named = {name for reading in readings for name in reading.fields}
        for name in common_units:
            if name not in named:
                raise DecodeError(f"units: {quoted(name)} is not a field")
    return Decoded(readings=readings, device=device, seq=seq, boot=boot)


def decode_json(payload: bytes, context: RequestContext) -> Decoded:
    """The strict road: a diagnostic for every mistake."""
    return decode_document(load_json(payload))


def decode_cbor(payload: bytes, context: RequestContext) -> Decoded:
    return decode_document(load_cbor(payload))


# Checked against the default [validation] limits: a gateway configured
# with others validates as before (the pipeline compares the limits).
_TYPED = TypedSenseDecoder(ValidationConfig())


def decode_json_typed(payload: bytes, context: RequestContext) -> Decoded:
    """Decoded and validated in one pass, or the strict road for the diagnostic."""
    return _TYPED.decode_json(payload, context.received) or decode_json(payload, context)


def decode_cbor_typed(payload: bytes, context: RequestContext) -> Decoded:
    item = load_cbor(payload)
    return _TYPED.decode_object(item, context.received) or decode_document(item)


@hookimpl
def sense_register_formats() -> list[Format]:
    return [
        Format("sense-json", (JSON,), ("/data",), decode_json_typed,
               "SENSE v1 readings as JSON"),
        Format("sense-cbor", (CBOR,), ("/data",), decode_cbor_typed,
               "SENSE v1 readings as CBOR"),
    ]
