"""CoAP messages (RFC 7252 section 3): the one parser and the one encoder.

Every datagram the gateway receives, on any transport, is parsed here once,
strictly, into a :class:`Message` that every later stage uses. Options are
typed from the registries of RFC 7252, 7641 (Observe), 7959 (block-wise)
and 7967 (No-Response): integers for uint options, bytes for string and
opaque ones, :class:`Block` for Block1/Block2. Options the registry does
not know, or known ones with an impossible length or repeated where they
may not be, are dropped when elective and recorded as the message's
``problem`` when critical (RFC 7252 5.4.1, 5.4.3, 5.4.5), so the message
layer can answer 4.02 or reject the message.
"""

from __future__ import annotations

from typing import NamedTuple

# The error codes a request can end in are the error hierarchy's.
from sense_gateway.errors import (  # noqa: F401 (re-exported)
    BAD_OPTION, BAD_REQUEST, FORBIDDEN, INTERNAL_SERVER_ERROR, METHOD_NOT_ALLOWED, NOT_FOUND,
    REQUEST_ENTITY_TOO_LARGE, SERVICE_UNAVAILABLE, TOO_MANY_REQUESTS, UNAUTHORIZED,
    UNSUPPORTED_CONTENT_FORMAT, code_text,
)

# Message types.
CON, NON, ACK, RST = range(4)

# Codes as the single byte on the wire (class << 5 | detail).
EMPTY = 0x00
GET, POST, PUT, DELETE, FETCH, PATCH, IPATCH = 1, 2, 3, 4, 5, 6, 7
CHANGED = 0x44  # 2.04
CONTENT = 0x45  # 2.05
CONTINUE = 0x5F  # 2.31
NOT_ACCEPTABLE = 0x86  # 4.06
REQUEST_ENTITY_INCOMPLETE = 0x88  # 4.08
PROXYING_NOT_SUPPORTED = 0xA5  # 5.05


class Block(NamedTuple):
    """A Block1 or Block2 value (RFC 7959 2.2)."""

    number: int
    more: bool
    szx: int

    @property
    def size(self) -> int:
        return 1 << (self.szx + 4)

    @property
    def offset(self) -> int:
        return self.number << (self.szx + 4)


# Option value formats (RFC 7252 3.2).
UINT, STRING, OPAQUE, EMPTY_VALUE, BLOCK = range(5)


class OptionSpec(NamedTuple):
    number: int
    name: str
    format: int
    min_length: int
    max_length: int
    repeatable: bool


IF_MATCH, URI_HOST, ETAG, IF_NONE_MATCH, OBSERVE, URI_PORT, LOCATION_PATH = 1, 3, 4, 5, 6, 7, 8
URI_PATH, CONTENT_FORMAT, MAX_AGE, URI_QUERY, ACCEPT, LOCATION_QUERY = 11, 12, 14, 15, 17, 20
BLOCK2, BLOCK1, SIZE2, PROXY_URI, PROXY_SCHEME, SIZE1, NO_RESPONSE = 23, 27, 28, 35, 39, 60, 258

#: The options the gateway understands, by number.
OPTIONS: dict[int, OptionSpec] = {spec.number: spec for spec in (
    OptionSpec(IF_MATCH, "If-Match", OPAQUE, 0, 8, True),
    OptionSpec(URI_HOST, "Uri-Host", STRING, 1, 255, False),
    OptionSpec(ETAG, "ETag", OPAQUE, 1, 8, True),
    OptionSpec(IF_NONE_MATCH, "If-None-Match", EMPTY_VALUE, 0, 0, False),
    OptionSpec(OBSERVE, "Observe", UINT, 0, 3, False),
    OptionSpec(URI_PORT, "Uri-Port", UINT, 0, 2, False),
    OptionSpec(LOCATION_PATH, "Location-Path", STRING, 0, 255, True),
    OptionSpec(URI_PATH, "Uri-Path", STRING, 0, 255, True),
    OptionSpec(CONTENT_FORMAT, "Content-Format", UINT, 0, 2, False),
    OptionSpec(MAX_AGE, "Max-Age", UINT, 0, 4, False),
    OptionSpec(URI_QUERY, "Uri-Query", STRING, 0, 255, True),
    OptionSpec(ACCEPT, "Accept", UINT, 0, 2, False),
    OptionSpec(LOCATION_QUERY, "Location-Query", STRING, 0, 255, True),
    OptionSpec(BLOCK2, "Block2", BLOCK, 0, 3, False),
    OptionSpec(BLOCK1, "Block1", BLOCK, 0, 3, False),
    OptionSpec(SIZE2, "Size2", UINT, 0, 4, False),
    OptionSpec(PROXY_URI, "Proxy-Uri", STRING, 1, 1034, False),
    OptionSpec(PROXY_SCHEME, "Proxy-Scheme", STRING, 1, 255, False),
    OptionSpec(SIZE1, "Size1", UINT, 0, 4, False),
    OptionSpec(NO_RESPONSE, "No-Response", UINT, 0, 1, False),
)}

_UINT_OPTIONS = frozenset(n for n, s in OPTIONS.items() if s.format == UINT)


class MalformedMessage(Exception):
    """The datagram is not a well-formed CoAP message (a message format
    error, RFC 7252 4.2/4.3).

    ``mtype`` and ``mid`` are set when the header could be read, so a
    confirmable message can be rejected with a Reset.
    """

    def __init__(self, reason: str, mtype: int | None = None, mid: int | None = None):
        super().__init__(reason)
        self.reason = reason
        self.mtype = mtype
        self.mid = mid


class Message:
    """One parsed CoAP message.

    ``path`` (the Uri-Path segments, bytes) and ``content_format`` (or
    ``None``) are taken out while parsing, because every request needs
    them; ``options`` holds every other option as ``(number, value)``
    pairs in wire order, typed (for most readings it is empty).
    ``problem`` is ``None`` or ``(number, reason)`` for the first critical
    option the gateway cannot honour.
    """

    __slots__ = ("mtype", "code", "mid", "token", "options", "payload", "path",
                 "content_format", "problem")

    def __init__(self, mtype, code, mid, token=b"", options=(), payload=b"", path=(),
                 content_format=None, problem=None):
        self.mtype = mtype
        self.code = code
        self.mid = mid
        self.token = token
        self.options = options
        self.payload = payload
        self.path = path
        self.content_format = content_format
        self.problem = problem

    def option(self, number: int, default=None):
        """The (first) value of option *number*, or *default*."""
        if number == CONTENT_FORMAT:
            return default if self.content_format is None else self.content_format
        if number == URI_PATH:
            return self.path[0] if self.path else default
        for n, value in self.options:
            if n == number:
                return value
        return default

    def values(self, number: int) -> list:
        """Every value of a repeatable option, in order."""
        if number == URI_PATH:
            return list(self.path)
        return [value for n, value in self.options if n == number]

    def all_options(self) -> list:
        """Every option, Uri-Path and Content-Format included, by number."""
        options = [(URI_PATH, segment) for segment in self.path]
        if self.content_format is not None:
            options.append((CONTENT_FORMAT, self.content_format))
        return sorted([*options, *self.options], key=lambda option: option[0])

    @property
    def is_request(self) -> bool:
        return 1 <= self.code < 32

    def __repr__(self) -> str:
        return (f"<Message {'CON NON ACK RST'.split()[self.mtype]} {code_text(self.code)} "
                f"mid={self.mid} token={self.token.hex()} options={len(self.options)} "
                f"payload={len(self.payload)} bytes>")


def _typed(spec: OptionSpec, raw: bytes):
    fmt = spec.format
    if fmt == UINT:
        return int.from_bytes(raw, "big")
    if fmt == BLOCK:
        value = int.from_bytes(raw, "big")
        return Block(value >> 4, bool(value & 0x08), value & 0x07)
    return raw


def _read_extended(nibble: int, data: bytes, at: int, what: str, mtype: int, mid: int):
    """An option delta or length over 12 (RFC 7252 3.1): its value, and
    where the option goes on."""
    if nibble == 13:
        if at >= len(data):
            raise MalformedMessage(f"truncated option {what}", mtype, mid)
        return data[at] + 13, at + 1
    if nibble == 14:
        if at + 2 > len(data):
            raise MalformedMessage(f"truncated option {what}", mtype, mid)
        return ((data[at] << 8) | data[at + 1]) + 269, at + 2
    raise MalformedMessage(f"reserved option {what} 15", mtype, mid)


def parse(data: bytes) -> Message:
    """Parse one datagram, or raise :class:`MalformedMessage`."""
    size = len(data)
    if size < 4:
        raise MalformedMessage("shorter than the CoAP header")
    first = data[0]
    if first >> 6 != 1:
        # RFC 7252 3: messages with unknown version numbers are silently ignored.
        raise MalformedMessage("unknown CoAP version")
    mtype = (first >> 4) & 0x03
    mid = (data[2] << 8) | data[3]
    token_length = first & 0x0F
    code = data[1]
    if token_length > 8:
        raise MalformedMessage("token length over 8", mtype, mid)
    if code == EMPTY:
        if size != 4 or token_length:
            raise MalformedMessage("empty message with content", mtype, mid)
        return Message(mtype, EMPTY, mid)
    code_class = code >> 5
    if code_class not in (0, 2, 4, 5):
        raise MalformedMessage(f"reserved code class {code_class}", mtype, mid)
    at = 4 + token_length
    if at > size:
        raise MalformedMessage("truncated token", mtype, mid)
    token = data[4:at]
    options = []
    path = []
    content_format = None
    problem = None
    number, last = 0, -1
    payload = b""
    registry = OPTIONS
    while at < size:
        byte = data[at]
        at += 1
        if byte == 0xFF:
            if at == size:
                raise MalformedMessage("payload marker without payload", mtype, mid)
            payload = data[at:]
            break
        delta = byte >> 4
        length = byte & 0x0F
        if delta > 12:
            delta, at = _read_extended(delta, data, at, "delta", mtype, mid)
        if length > 12:
            length, at = _read_extended(length, data, at, "length", mtype, mid)
        end = at + length
        if end > size:
            raise MalformedMessage("truncated option value", mtype, mid)
        number += delta
        raw = data[at:end]
        at = end
        spec = registry.get(number)
        if spec is None:
            reason = f"unknown critical option {number}"
        elif not spec.min_length <= length <= spec.max_length:
            reason = f"option {number}: bad length {length}"
        elif number == last and not spec.repeatable:
            reason = f"option {number} repeated"
        else:
            last = number
            if number == URI_PATH:
                path.append(raw)
            elif number == CONTENT_FORMAT:
                content_format = int.from_bytes(raw, "big")
            elif number in _UINT_OPTIONS:
                options.append((number, int.from_bytes(raw, "big")))
            else:
                options.append((number, _typed(spec, raw)))
            continue
        # Not understood: elective options are ignored, the first critical
        # one makes the message unacceptable.
        if number & 1 and problem is None:
            problem = (number, reason)
    return Message(mtype, code, mid, token, options, payload, tuple(path), content_format, problem)


def _option_value(number: int, value) -> bytes:
    spec = OPTIONS.get(number)
    fmt = spec.format if spec is not None else OPAQUE
    if fmt == UINT:
        return value.to_bytes((value.bit_length() + 7) // 8, "big")
    if fmt == BLOCK:
        number_, more, szx = value
        as_int = (number_ << 4) | (0x08 if more else 0) | szx
        return as_int.to_bytes((as_int.bit_length() + 7) // 8, "big")
    if isinstance(value, str):
        return value.encode("utf-8")
    return bytes(value)


def _extended(value: int) -> tuple[int, bytes]:
    if value < 13:
        return value, b""
    if value < 269:
        return 13, bytes((value - 13,))
    return 14, (value - 269).to_bytes(2, "big")


def encode(mtype: int, code: int, mid: int, token: bytes = b"", options=(),
           payload: bytes = b"") -> bytes:
    """One message as a datagram; *options* are ``(number, value)`` pairs,
    typed as :func:`parse` gives them, in any order."""
    head = bytes((0x40 | (mtype << 4) | len(token), code, mid >> 8, mid & 0xFF)) + token
    if not options and not payload:
        return head
    parts = [head]
    previous = 0
    for number, value in sorted(options, key=lambda option: option[0]):
        raw = _option_value(number, value)
        delta, delta_ext = _extended(number - previous)
        length, length_ext = _extended(len(raw))
        parts.append(bytes(((delta << 4) | length,)) + delta_ext + length_ext + raw)
        previous = number
    if payload:
        parts.append(b"\xff")
        parts.append(payload)
    return b"".join(parts)
