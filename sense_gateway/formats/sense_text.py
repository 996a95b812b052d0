"""Built-in plugin: the original SENSE devices' text format.

``POST /temperature`` or ``POST /temp``, Content-Format 0 (text/plain) or
none at all. The payload is ``v1,p1,v2,p2,...,``: temperatures in
hundredths of a degree Celsius, each followed by an odd-parity bit (the
bit makes the number of ones in the value's 16 bits, two's complement for
negative values, plus the bit itself odd). The devices send ten values,
one per second, the last one measured when the request leaves; we accept
1 to 60 pairs, a missing trailing comma and surrounding whitespace.

A value whose parity fails is replaced by the mean of its two neighbours
when both passed (the reading gets the extra field ``interpolated =
true``) and dropped otherwise. If every value is dropped the request gets
4.00.

There is no device id in the payload: the device is the sender's IP
address (``2001:db8::7``, or ``192.0.2.7`` for IPv4). Timestamps: the
last value at the receive time, each earlier one a second before.

Example (21.50, 21.51 and 21.53 °C)::

    coap-client-notls -m post -e '2150,0,2151,1,2153,0,' coap://[::1]/temperature

No configuration.
"""

from __future__ import annotations

from sense_gateway.envelope import Decoded, Reading, RequestContext
from sense_gateway.errors import DecodeError
from sense_gateway.formats import TEXT_PLAIN, Format
from sense_gateway.hookspecs import hookimpl

MAX_PAIRS = 60


def parity_ok(value: int, bit: int) -> bool:
    return (bin(value & 0xFFFF).count("1") + bit) % 2 == 1


def decode(payload: bytes, context: RequestContext) -> Decoded:
    try:
        text = payload.decode("ascii").strip()
    except UnicodeDecodeError:
        raise DecodeError("not ASCII text") from None
    items = text.split(",")
    if items and items[-1] == "":
        items.pop()
    if not items:
        raise DecodeError("no values")
    if len(items) % 2:
        raise DecodeError(f"{len(items)} items: expected value,parity pairs")
    if len(items) > 2 * MAX_PAIRS:
        raise DecodeError(f"more than {MAX_PAIRS} values")
    numbers = []
    for i, item in enumerate(items, 1):
        try:
            numbers.append(int(item.strip(), 10))
        except ValueError:
            raise DecodeError(f"item {i}: not an integer") from None
    values = numbers[0::2]
    good = []
    for i, (value, bit) in enumerate(zip(values, numbers[1::2])):
        if bit not in (0, 1):
            raise DecodeError(f"item {2 * i + 2}: parity bit must be 0 or 1")
        if not -32768 <= value <= 32767:
            raise DecodeError(f"item {2 * i + 1}: out of range")
        good.append(parity_ok(value, bit))

    n = len(values)
    readings = []
    for i, value in enumerate(values):
        ts = context.received - (n - 1 - i)
        if good[i]:
            readings.append(Reading(fields={"temperature": value / 100}, ts=ts))
        elif 0 < i < n - 1 and good[i - 1] and good[i + 1]:
            mean = (values[i - 1] + values[i + 1]) / 2
            readings.append(Reading(fields={"temperature": mean / 100, "interpolated": True}, ts=ts))
    if not readings:
        raise DecodeError("no value passed its parity check")
    return Decoded(readings=readings, device=context.source_host, seq=None)


@hookimpl
def sense_register_formats():
    return [Format("sense-text", (TEXT_PLAIN, None), ("/temperature", "/temp"), decode,
                   "the original SENSE devices' value,parity text")]
