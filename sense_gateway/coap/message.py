"""Strict parsing of CoAP datagrams (RFC 7252 section 3) into txthings messages.

txthings' ``Message.decode`` trusts its input: a truncated option, a token
length over 8 or a payload marker with nothing after it come out as a
half-built message (or an exception deep inside the protocol), and a
message without payload gets ``''`` (str) as payload. We check the
structure first and only hand well-formed datagrams to txthings.
"""

from __future__ import annotations

from ipaddress import ip_address

from txthings import coap

# Options the gateway understands (RFC 7252, 7641, 7959, 7967 No-Response).
KNOWN_OPTIONS = frozenset(coap.options) | {258}

# Lengths allowed for the options whose format fixes them (RFC 7252 5.10).
_OPTION_LENGTHS = {
    coap.IF_MATCH: (0, 8),
    coap.URI_HOST: (1, 255),
    coap.ETAG: (1, 8),
    coap.IF_NONE_MATCH: (0, 0),
    coap.OBSERVE: (0, 3),
    coap.URI_PORT: (0, 2),
    coap.LOCATION_PATH: (0, 255),
    coap.URI_PATH: (0, 255),
    coap.CONTENT_FORMAT: (0, 2),
    coap.MAX_AGE: (0, 4),
    coap.URI_QUERY: (0, 255),
    coap.ACCEPT: (0, 2),
    coap.LOCATION_QUERY: (0, 255),
    coap.BLOCK2: (0, 3),
    coap.BLOCK1: (0, 3),
    coap.SIZE2: (0, 4),
    coap.PROXY_URI: (1, 1034),
    coap.PROXY_SCHEME: (1, 255),
    coap.SIZE1: (0, 4),
}


class MalformedMessage(Exception):
    """The datagram is not a well-formed CoAP message.

    ``message_id`` and ``mtype`` are set when the header could be read, so
    a confirmable message can be rejected with a Reset (RFC 7252 4.2).
    """

    def __init__(self, reason: str, mtype: int | None = None, message_id: int | None = None):
        super().__init__(reason)
        self.reason = reason
        self.mtype = mtype
        self.message_id = message_id


class BadOption(Exception):
    """A well-formed request carries a critical option we cannot honour."""

    def __init__(self, number: int, reason: str):
        super().__init__(reason)
        self.number = number
        self.reason = reason


def _extended(nibble: int, data: bytes, at: int, what: str, header):
    """Read an option delta or length (RFC 7252 3.1); returns (value, next offset)."""
    if nibble < 13:
        return nibble, at
    if nibble == 13:
        if at + 1 > len(data):
            raise MalformedMessage(f"truncated option {what}", *header)
        return data[at] + 13, at + 1
    if nibble == 14:
        if at + 2 > len(data):
            raise MalformedMessage(f"truncated option {what}", *header)
        return int.from_bytes(data[at : at + 2], "big") + 269, at + 2
    raise MalformedMessage(f"reserved option {what} 15", *header)


def check_datagram(data: bytes) -> list[int]:
    """Raise :class:`MalformedMessage` unless *data* is well-formed CoAP.

    Returns the option numbers found, in order, so the caller can judge
    critical options without decoding again.
    """
    if len(data) < 4:
        raise MalformedMessage("shorter than the CoAP header")
    first = data[0]
    mtype = (first >> 4) & 0x03
    message_id = int.from_bytes(data[2:4], "big")
    header = (mtype, message_id)
    if first >> 6 != 1:
        # RFC 7252 3: messages with unknown version numbers are silently ignored.
        raise MalformedMessage("unknown CoAP version")
    token_length = first & 0x0F
    code = data[1]
    if token_length > 8:
        raise MalformedMessage("token length over 8", *header)
    if code == coap.EMPTY:
        if len(data) != 4 or token_length:
            raise MalformedMessage("empty message with content", *header)
        return []
    code_class = code >> 5
    if code_class not in (0, 2, 4, 5):
        raise MalformedMessage(f"reserved code class {code_class}", *header)
    at = 4 + token_length
    if at > len(data):
        raise MalformedMessage("truncated token", *header)
    numbers = []
    number = 0
    while at < len(data):
        byte = data[at]
        at += 1
        if byte == 0xFF:
            if at == len(data):
                raise MalformedMessage("payload marker without payload", *header)
            return numbers
        delta, at = _extended(byte >> 4, data, at, "delta", header)
        length, at = _extended(byte & 0x0F, data, at, "length", header)
        if at + length > len(data):
            raise MalformedMessage("truncated option value", *header)
        number += delta
        numbers.append((number, length))
        at += length
    return numbers


def decode_request_options(numbers) -> None:
    """Raise :class:`BadOption` for a critical option we do not know, or a
    known one with an impossible length (RFC 7252 5.4.1 and 5.4.3)."""
    for number, length in numbers:
        critical = number & 1
        if number in (coap.PROXY_URI, coap.PROXY_SCHEME):
            raise BadOption(number, "proxying not supported")
        if number not in KNOWN_OPTIONS:
            if critical:
                raise BadOption(number, f"unknown critical option {number}")
            continue
        bounds = _OPTION_LENGTHS.get(number)
        if bounds and not bounds[0] <= length <= bounds[1] and critical:
            raise BadOption(number, f"option {number}: bad length {length}")


class Request(coap.Message):
    """A received request.

    txthings acknowledges each intermediate block of a block-wise upload
    with 2.04 Changed; RFC 7959 2.3 asks for 2.31 Continue, and clients
    such as libcoap take a 2.04 as the final answer.
    """

    def generateNextBlock1Response(self):
        response = super().generateNextBlock1Response()
        response.code = coap.CONTINUE
        return response


def decode(data: bytes, host: str, port: int, protocol, remote=None) -> coap.Message:
    """Parse a datagram into a txthings :class:`~txthings.coap.Message`.

    Raises :class:`MalformedMessage` for anything RFC 7252 calls a message
    format error, and :class:`BadOption` for requests whose options we
    must refuse; the message is attached to the latter as ``.message``.
    *remote*, if given, is the ``(ip_address(host), port)`` to use.
    """
    numbers = check_datagram(data)
    message = coap.Message.decode(data, remote or (ip_address(host), port), protocol)
    if not isinstance(message.payload, bytes):
        message.payload = b""
    if coap.isRequest(message.code):
        # txthings' decoder always builds a plain Message; a request is
        # the same object with our Block1 behaviour.
        message.__class__ = Request
        try:
            decode_request_options(numbers)
        except BadOption as e:
            e.message = message
            raise
    return message


# Options a request may carry and still take the hot path, with the
# lengths RFC 7252 5.10 allows them. Uri-Host and Uri-Port name this
# server and change nothing.
_INGEST_OPTIONS = {
    coap.URI_HOST: (1, 255),
    coap.URI_PORT: (0, 2),
    coap.URI_PATH: (0, 255),
    coap.CONTENT_FORMAT: (0, 2),
}


def parse_simple_post(data: bytes):
    """The hot case, parsed in one pass: a well-formed CON or NON POST in one
    datagram whose options are only Uri-Host, Uri-Port, Uri-Path and
    Content-Format, each of a valid length.

    Returns ``(mtype, message id, token, path segments, content format or
    None, payload)``, or ``None`` for anything else (other codes or
    options, Block1, Observe, anything malformed), which the caller hands
    to the full path: that one parses again and answers exactly as it
    always does.
    """
    size = len(data)
    if size < 4:
        return None
    first = data[0]
    token_length = first & 0x0F
    # Version 1, CON (0) or NON (1), token length 0..8; code 0.02 POST.
    if first & 0xE0 != 0x40 or token_length > 8 or data[1] != 2:
        return None
    at = 4 + token_length
    if at > size:
        return None
    segments = []
    content_format = None
    number = 0
    payload = b""
    while at < size:
        byte = data[at]
        at += 1
        if byte == 0xFF:
            if at == size:
                return None  # payload marker without payload
            payload = data[at:]
            break
        delta = byte >> 4
        length = byte & 0x0F
        if delta > 12 or length > 12:
            # Extended deltas only reach options we leave to the full path
            # (or reserved values); long values: only Uri-Host and Uri-Path
            # may be that long, and rarely are.
            if delta > 12:
                return None
            if length == 13:
                if at >= size:
                    return None
                length = data[at] + 13
                at += 1
            else:
                return None
        number += delta
        bounds = _INGEST_OPTIONS.get(number)
        if bounds is None or not bounds[0] <= length <= bounds[1] or at + length > size:
            return None
        if number == coap.URI_PATH:
            segments.append(data[at:at + length])
        elif number == coap.CONTENT_FORMAT:
            if content_format is not None:
                return None  # repeated: the full path decides
            content_format = int.from_bytes(data[at:at + length], "big")
        at += length
    return (first >> 4) & 0x03, (data[2] << 8) | data[3], data[4:4 + token_length], \
        tuple(segments), content_format, payload
