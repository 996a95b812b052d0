"""Example plugin: ``key=value`` text readings on ``POST /kv``.

Copy this file into your plugins directory (``plugins/`` by default,
``--plugins-dir`` or ``plugins_dir`` in the configuration) and change it:
the gateway imports every ``.py`` file there at start-up, serves the
paths its formats name, and lists them in ``/.well-known/core``. It uses
only the public plugin API: ``hookimpl``, ``Format``, the envelope types
and the errors.

Format: Content-Format 0 (text/plain), UTF-8 text of ``key=value`` pairs
separated by ``;`` or newlines, whitespace around keys and values
ignored. ``id`` names the device (required), ``seq`` is the optional
sequence number (decimal digits), ``ts`` the optional time in epoch
seconds; every other key is a field of one reading, its value a number
when it reads as one, ``true`` / ``false`` as booleans, a string
otherwise. A pair without ``=``, an empty key or a key given twice gets
4.00 with a short diagnostic; everything else (device id, names, value
sizes, timestamps) is checked by the gateway's validators as for any
format.

Configuration (optional), a table of its own in the TOML file::

    [example_kv]
    measurement = "kv"

``measurement`` is where the readings go (default ``sense``).

Example::

    coap-client-notls -m post -t 0 -e 'id=pump-3;seq=12;pressure=2.4;running=true' coap://[::1]/kv

stores one reading of device ``pump-3`` with the fields ``pressure = 2.4``
and ``running = true``.
"""

from __future__ import annotations

import functools

from sense_gateway.envelope import Decoded, FieldValue, Reading, RequestContext
from sense_gateway.errors import ConfigError, DecodeError
from sense_gateway.formats import TEXT_PLAIN, Format
from sense_gateway.hookspecs import hookimpl

PATH = "/kv"
DEFAULT_MEASUREMENT = "sense"


def field_value(text: str) -> FieldValue:
    """``true``/``false`` as booleans, numbers as numbers, the rest as text."""
    if text in ("true", "false"):
        return text == "true"
    for number in (int, float):
        try:
            return number(text)
        except ValueError:
            pass
    return text


def parse_pairs(text: str) -> dict[str, str]:
    pairs: dict[str, str] = {}
    for part in text.replace("\n", ";").split(";"):
        if not part.strip():
            continue  # tolerate "a=1;;b=2" and a trailing separator
        key, equals, value = part.partition("=")
        key = key.strip()
        if not equals:
            raise DecodeError(f"{part.strip()[:20]!r}: expected key=value")
        if not key:
            raise DecodeError("empty key")
        if key in pairs:
            raise DecodeError(f"{key[:20]!r} given twice")
        pairs[key] = value.strip()
    return pairs


def decode_kv(payload: bytes, context: RequestContext, measurement: str) -> Decoded:
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        raise DecodeError("not UTF-8 text") from None
    pairs = parse_pairs(text)
    device = pairs.pop("id", None)
    seq = None
    if "seq" in pairs:
        seq_text = pairs.pop("seq")
        if not (seq_text.isascii() and seq_text.isdigit()):
            raise DecodeError("seq: expected decimal digits")
        seq = int(seq_text)
    ts = None
    if "ts" in pairs:
        try:
            ts = float(pairs.pop("ts"))
        except ValueError:
            raise DecodeError("ts: expected epoch seconds") from None
    fields = {key: field_value(value) for key, value in pairs.items()}
    reading = Reading(fields=fields, ts=ts, measurement=measurement)
    return Decoded(readings=[reading], device=device, seq=seq)


@hookimpl
def sense_register_formats(config) -> list[Format]:
    # Check the configuration once, at start-up: a wrong value stops the
    # gateway with a message naming the key instead of failing requests.
    measurement = config.section("example_kv").get("measurement", DEFAULT_MEASUREMENT)
    if not isinstance(measurement, str) or not measurement:
        raise ConfigError(f"example_kv.measurement: expected a name, got {measurement!r}")
    decode = functools.partial(decode_kv, measurement=measurement)
    return [Format("example-kv", (TEXT_PLAIN,), (PATH,), decode, "key=value text (example)")]
