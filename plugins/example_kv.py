"""Example plugin: ``key=value`` text readings on ``POST /kv``.

Copy this file into your plugins directory (``plugins/`` by default) and
change it: the gateway loads every ``.py`` file there at start-up, serves
the paths its formats name, and lists them in ``/.well-known/core``.

Format: ``key=value`` pairs separated by ``;`` or newlines, Content-Format
0 (text/plain). ``id`` names the device (required), ``seq`` is the
optional sequence number, ``ts`` the optional epoch seconds; every other
key is a field, its value a number when it parses as one, ``true`` /
``false`` as booleans, a string otherwise.

Configuration (optional), a table of its own in the TOML file::

    [example_kv]
    measurement = "kv"

Example::

    coap-client-notls -m post -t 0 -e 'id=pump-3;seq=12;pressure=2.4;running=true' coap://[::1]/kv
"""

from __future__ import annotations

from sense_gateway.envelope import Decoded, Reading, RequestContext
from sense_gateway.errors import DecodeError
from sense_gateway.formats import TEXT_PLAIN, Format
from sense_gateway.hookspecs import hookimpl

PATH = "/kv"


def _value(text: str):
    if text in ("true", "false"):
        return text == "true"
    for number in (int, float):
        try:
            return number(text)
        except ValueError:
            pass
    return text


def decode(payload: bytes, context: RequestContext, measurement: str = "sense") -> Decoded:
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        raise DecodeError("not UTF-8 text") from None
    pairs = {}
    for part in text.replace("\n", ";").split(";"):
        if not part.strip():
            continue
        key, sep, value = part.partition("=")
        if not sep:
            raise DecodeError(f"{part.strip()[:20]!r}: expected key=value")
        pairs[key.strip()] = value.strip()
    device = pairs.pop("id", None)
    try:
        seq = int(pairs.pop("seq")) if "seq" in pairs else None
        ts = float(pairs.pop("ts")) if "ts" in pairs else None
    except ValueError:
        raise DecodeError("seq and ts must be numbers") from None
    fields = {key: _value(value) for key, value in pairs.items()}
    return Decoded(readings=[Reading(fields=fields, ts=ts, measurement=measurement)],
                   device=device, seq=seq)


@hookimpl
def sense_register_formats(config):
    measurement = config.section("example_kv").get("measurement", "sense")
    return [Format("example-kv", (TEXT_PLAIN,), (PATH,),
                   lambda payload, context: decode(payload, context, measurement),
                   "key=value text (example)")]
