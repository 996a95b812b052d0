"""Built-in plugin: the original SENSE devices' text format.

``POST /temperature`` or ``POST /temp``, Content-Format 0 (text/plain) or
no Content-Format option at all. The payload is ``v1,p1,v2,p2,...,``:
temperatures as integers in hundredths of a degree Celsius, each
followed by its odd-parity bit. The bit makes the number of ones in the
value's low 16 bits (two's complement for negative values, so -5 is
``0xFFFB``) plus the bit itself odd. Values must fit in 16 bits
(-32768 to 32767). The devices send ten values, one per second, the last
one measured when the request leaves; 1 to 60 pairs are accepted, the
trailing comma is optional and whitespace around the payload and its
items is ignored.

A value whose parity fails is replaced by the mean of its two immediate
neighbours when both passed; that reading gets the extra field
``interpolated = true``. Otherwise (first or last value, or a neighbour
failed too) it is dropped. If every value is dropped the request gets
4.00 ``no value passed its parity check``.

Each reading has the field ``temperature`` in degrees Celsius (the value
divided by 100, unit ``Cel`` as SenML names it) in the measurement
``sense``. There is no device id in
the payload: over DTLS the device is the PSK identity, over plain CoAP the
sender's IP address (``2001:db8::7``, or ``192.0.2.7`` for IPv4). Timestamps: the last value at the receive time,
each earlier one a second before the next.

Diagnostics number the comma-separated items from 1:
``item 3: not an integer``, ``item 4: parity bit must be 0 or 1``.

Example (21.50, 21.51 and 21.53 °C)::

    coap-client-notls -m post -e '2150,0,2151,1,2153,0,' coap://[::1]/temperature

No configuration.
"""

from __future__ import annotations

from sense_gateway.envelope import Decoded, Reading, RequestContext
from sense_gateway.errors import DecodeError
from sense_gateway.formats import TEXT_PLAIN, Format

#: shared by every reading: nothing changes it once decoded
_UNITS = {"temperature": "Cel"}
from sense_gateway.hookspecs import hookimpl

MAX_PAIRS = 60
MEASUREMENT = "sense"
VALUE_MIN, VALUE_MAX = -(2 ** 15), 2 ** 15 - 1


def parity_holds(value: int, parity_bit: int) -> bool:
    """Odd parity over the value's 16-bit two's complement and the bit."""
    return (bin(value & 0xFFFF).count("1") + parity_bit) % 2 == 1


def _integer(item: str, number: int) -> int:
    # int() alone would also take "+5", "1_000" and other spellings no
    # SENSE device produces; accept exactly an optional minus and digits.
    text = item.strip()
    digits = text[1:] if text.startswith("-") else text
    if not (digits.isascii() and digits.isdigit()):
        raise DecodeError(f"item {number}: not an integer")
    return int(text)


def _items(payload: bytes) -> list[str]:
    try:
        text = payload.decode("ascii").strip()
    except UnicodeDecodeError:
        raise DecodeError("not ASCII text") from None
    if not text:
        raise DecodeError("no values")
    items = text.split(",")
    if items[-1].strip() == "":
        items.pop()  # the devices end every pair with a comma
    if len(items) % 2:
        raise DecodeError(f"{len(items)} items: expected value,parity pairs")
    if len(items) > 2 * MAX_PAIRS:
        raise DecodeError(f"{len(items) // 2} values: at most {MAX_PAIRS}")
    return items


def decode(payload: bytes, context: RequestContext) -> Decoded:
    items = _items(payload)
    values: list[int] = []
    passed: list[bool] = []
    for index in range(0, len(items), 2):
        value = _integer(items[index], index + 1)
        parity_bit = _integer(items[index + 1], index + 2)
        if not VALUE_MIN <= value <= VALUE_MAX:
            raise DecodeError(f"item {index + 1}: out of 16-bit range")
        if parity_bit not in (0, 1):
            raise DecodeError(f"item {index + 2}: parity bit must be 0 or 1")
        values.append(value)
        passed.append(parity_holds(value, parity_bit))

    count = len(values)
    readings = []
    for i, value in enumerate(values):
        ts = context.received - (count - 1 - i)
        if passed[i]:
            readings.append(Reading(fields={"temperature": value / 100}, ts=ts,
                                    measurement=MEASUREMENT, units=_UNITS))
        elif 0 < i < count - 1 and passed[i - 1] and passed[i + 1]:
            mean = (values[i - 1] + values[i + 1]) / 2
            readings.append(Reading(fields={"temperature": mean / 100, "interpolated": True},
                                    ts=ts, measurement=MEASUREMENT, units=_UNITS))
    if not readings:
        raise DecodeError("no value passed its parity check")
    # No id in the payload: the DTLS identity, or else the sender's address.
    return Decoded(readings=readings, device=context.identity or context.source_host, seq=None)


@hookimpl
def sense_register_formats() -> list[Format]:
    return [Format("sense-text", (TEXT_PLAIN, None), ("/temperature", "/temp"), decode,
                   "the original SENSE devices' value,parity text")]
