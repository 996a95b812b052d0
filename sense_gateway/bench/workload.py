"""What the load generator sends: CoAP POST datagrams from simulated devices.

Each simulated device has its own id and its own increasing sequence
number. Everything that does not change from one request to the next
(the options, the parts of the payload around the sequence number) is
encoded once, so building a request costs a few byte concatenations.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

FORMATS = ("json", "cbor", "senml", "senml-cbor", "text")

#: Content-Format numbers (RFC 7252 12.3, RFC 8428)
_CONTENT_FORMAT = {"json": 50, "cbor": 60, "senml": 110, "senml-cbor": 112, "text": 0}
_PATH = {"json": "data", "cbor": "data", "senml": "data", "senml-cbor": "data",
         "text": "temperature"}

CON, NON, ACK, RST = 0, 1, 2, 3
POST = 2


def _option(delta: int, value: bytes) -> bytes:
    """One option (RFC 7252 3.1), for deltas and lengths below 269."""
    def nibble(n: int) -> tuple[int, bytes]:
        if n < 13:
            return n, b""
        if n < 269:
            return 13, bytes([n - 13])
        raise ValueError(n)

    d, d_ext = nibble(delta)
    length, l_ext = nibble(len(value))
    return bytes([(d << 4) | length]) + d_ext + l_ext + value


def _uint(n: int) -> bytes:
    """A CoAP uint option value: big-endian, no leading zero bytes."""
    return n.to_bytes((n.bit_length() + 7) // 8, "big")


def request_options(path: str, content_format: int | None) -> bytes:
    """Uri-Path (11) segments then Content-Format (12), already encoded."""
    out, last = b"", 0
    for segment in path.strip("/").split("/"):
        out += _option(11 - last, segment.encode())
        last = 11
    if content_format is not None:
        out += _option(12 - last, _uint(content_format))
    return out


def cbor_uint(n: int) -> bytes:
    if n < 24:
        return bytes([n])
    if n < 0x100:
        return bytes([24, n])
    if n < 0x10000:
        return b"\x19" + struct.pack(">H", n)
    return b"\x1a" + struct.pack(">I", n)


def cbor_text(s: str) -> bytes:
    raw = s.encode()
    if len(raw) < 24:
        return bytes([0x60 | len(raw)]) + raw
    return bytes([0x78, len(raw)]) + raw


def _parity_bit(value: int) -> int:
    """The odd-parity bit of the original text format."""
    return (bin(value & 0xFFFF).count("1") + 1) % 2


@dataclass(frozen=True)
class Workload:
    """Builds the options+payload part of each request (everything after
    the token), per device and sequence number."""

    format: str = "json"
    devices: int = 100
    prefix: str = "bench"
    #: when set, each reading carries ``ts = timestamp_base + seq`` (so each
    #: reading of a device is a distinct point in a time-series database)
    timestamp_base: int | None = None
    path: str | None = None

    def __post_init__(self):
        if self.format not in FORMATS:
            raise ValueError(f"format: one of {', '.join(FORMATS)}, not {self.format!r}")
        if self.devices < 1:
            raise ValueError("devices: at least 1")

    def device_id(self, index: int) -> str:
        width = max(5, len(str(self.devices - 1)))
        return f"{self.prefix}-{index:0{width}d}"

    @property
    def content_format(self) -> int:
        return _CONTENT_FORMAT[self.format]

    def builders(self) -> list:
        """One callable per device: ``seq -> bytes`` (options, 0xFF, payload)."""
        head = request_options(self.path or _PATH[self.format], self.content_format) + b"\xff"
        return [self._builder(head, i) for i in range(self.devices)]

    def _builder(self, head: bytes, index: int):
        device = self.device_id(index)
        value = 20 + (index % 100) / 10
        base = self.timestamp_base
        if self.format == "json":
            start = head + b'{"id":"' + device.encode() + b'","seq":'
            if base is None:
                end = b',"data":{"t":' + repr(value).encode() + b"}}"
                return lambda seq: start + str(seq).encode() + end
            end = b',"data":{"t":' + repr(value).encode() + b"}}"
            return lambda seq: (start + str(seq).encode() + b',"ts":' + str(base + seq).encode()
                                + end)
        if self.format == "cbor":
            fields = 3 if base is None else 4
            start = (head + bytes([0xA0 | fields]) + cbor_text("id") + cbor_text(device)
                     + cbor_text("seq"))
            data = cbor_text("data") + b"\xa1" + cbor_text("t") + b"\xfb" + struct.pack(">d", value)
            if base is None:
                return lambda seq: start + cbor_uint(seq) + data
            return lambda seq: start + cbor_uint(seq) + cbor_text("ts") + cbor_uint(base + seq) + data
        if self.format == "senml":
            # SenML has no sequence number: the seq rides in the time (bt).
            start = head + b'[{"bn":"' + device.encode() + b':","bt":'
            end = b',"n":"t","v":' + repr(value).encode() + b"}]"
            offset = base if base is not None else 1_700_000_000
            return lambda seq: start + str(offset + seq).encode() + end
        if self.format == "senml-cbor":
            start = head + b"\x81\xa4" + b"\x21" + cbor_text(device + ":") + b"\x22"
            end = b"\x00" + cbor_text("t") + b"\x02\xfb" + struct.pack(">d", value)
            offset = base if base is not None else 1_700_000_000
            return lambda seq: start + cbor_uint(offset + seq) + end
        # text: ten values in hundredths of a degree, each with its parity
        # bit; the device is the source address, so seq only varies values.
        def text(seq: int) -> bytes:
            items = []
            for k in range(10):
                v = 2000 + (seq + k) % 500
                items.append(f"{v},{_parity_bit(v)}")
            return head + (",".join(items) + ",").encode()
        return text


def header(mtype: int, code: int, mid: int, token: bytes) -> bytes:
    return bytes([0x40 | (mtype << 4) | len(token), code]) + mid.to_bytes(2, "big") + token
