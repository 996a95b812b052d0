"""The few DTLS 1.2 wire structures the server reads before OpenSSL does.

:mod:`sense_gateway.coap.dtls` looks at every datagram before it spends
any work on it: record headers (RFC 6347 4.1) to throw away what is not
DTLS, and the ClientHello (4.2.1) to run the stateless cookie exchange
itself, so that a ClientHello without a valid cookie costs an HMAC and one
small reply, never an OpenSSL object. It also regroups OpenSSL's output
into datagrams, because a memory BIO keeps no datagram boundaries.
"""

from __future__ import annotations

from typing import NamedTuple

CHANGE_CIPHER_SPEC, ALERT, HANDSHAKE, APPLICATION_DATA = 20, 21, 22, 23
CONTENT_TYPES = frozenset((CHANGE_CIPHER_SPEC, ALERT, HANDSHAKE, APPLICATION_DATA))

DTLS_1_0, DTLS_1_2 = 0xFEFF, 0xFEFD
#: DTLS 1.2 clients may send their first flight with the 1.0 record version.
RECORD_VERSIONS = frozenset((DTLS_1_0, DTLS_1_2))

RECORD_HEADER = 13          # type, version, epoch, 48-bit sequence number, length
HANDSHAKE_HEADER = 12       # type, length, message_seq, fragment offset, fragment length
#: RFC 6347 4.1: a record carries at most 2^14 bytes of plaintext plus 2048
#: of expansion; anything longer is not a record we will ever accept.
MAX_RECORD_BODY = 2 ** 14 + 2048

CLIENT_HELLO, HELLO_VERIFY_REQUEST = 1, 3
#: RFC 6347 4.2.1 allows up to 255 bytes; 16 bytes of HMAC are plenty and
#: fit the smallest clients (tinydtls keeps 32 at most).
COOKIE_LENGTH = 16


class Record(NamedTuple):
    """One record's header, and where its body lies in the datagram."""

    content_type: int
    epoch: int
    start: int      # offset of the body
    end: int        # offset just past the body


def split_records(datagram: bytes) -> list[Record] | None:
    """The records a datagram holds, or None if it is not a run of DTLS records.

    A datagram may carry several records back to back; every header must
    name a known content type and version, and the lengths must add up to
    the datagram exactly, so random bytes are rejected after a few
    comparisons.
    """
    records = []
    offset, size = 0, len(datagram)
    if size < RECORD_HEADER:
        return None
    while offset < size:
        if size - offset < RECORD_HEADER:
            return None
        content_type = datagram[offset]
        version = (datagram[offset + 1] << 8) | datagram[offset + 2]
        if content_type not in CONTENT_TYPES or version not in RECORD_VERSIONS:
            return None
        length = (datagram[offset + 11] << 8) | datagram[offset + 12]
        start = offset + RECORD_HEADER
        end = start + length
        if length > MAX_RECORD_BODY or end > size:
            return None
        epoch = (datagram[offset + 3] << 8) | datagram[offset + 4]
        records.append(Record(content_type, epoch, start, end))
        offset = end
    return records


def pack_datagrams(stream: bytes, mtu: int) -> list[bytes]:
    """OpenSSL's output, regrouped into datagrams of at most ``mtu`` bytes.

    OpenSSL already cuts handshake messages to the MTU it was given, so
    each record fits; consecutive records share a datagram while they fit
    (RFC 6347 4.1.1 allows several records per datagram). Application data
    is written one record at a time, so one CoAP message stays one record.
    """
    records = split_records(stream)
    if records is None:
        # Cannot happen with OpenSSL's own output; sending it whole beats losing it.
        return [stream]
    datagrams = []
    begin = 0
    for record in records:
        record_start = record.start - RECORD_HEADER
        if record.end - begin > mtu and record_start > begin:
            datagrams.append(stream[begin:record_start])
            begin = record_start
    datagrams.append(stream[begin:])
    return datagrams


#: What a PSK client sends in epoch 0 of a handshake: ClientHello (again,
#: if our answer was lost) and ClientKeyExchange, whose PSK identity is
#: at most 128 bytes. OpenSSL would allocate whatever length a fragment
#: claims (up to 100 kB) and keep ten future messages, so a peer that only
#: passed the cookie exchange could make each handshake hold a megabyte.
CLIENT_HANDSHAKE_MESSAGES = frozenset((CLIENT_HELLO, 16))
MAX_CLIENT_HANDSHAKE_MESSAGE = 2048
#: Records of the next epoch are buffered during a handshake (up to 100);
#: a PSK client's only one is its Finished (40 bytes with CCM), or an alert.
MAX_HANDSHAKE_EPOCH_1_RECORD = 128


def acceptable_during_handshake(datagram: bytes, records: list[Record]) -> bool:
    """Whether the records are what a PSK client sends while it handshakes."""
    for record in records:
        length = record.end - record.start
        if record.epoch == 1:
            if record.content_type == APPLICATION_DATA or length > MAX_HANDSHAKE_EPOCH_1_RECORD:
                return False
        elif record.epoch != 0:
            return False
        elif record.content_type == CHANGE_CIPHER_SPEC:
            if length != 1:
                return False
        elif record.content_type == ALERT:
            if length != 2:
                return False
        elif record.content_type != HANDSHAKE:
            return False
        else:
            # A record may carry several handshake fragments back to back.
            offset = record.start
            while offset < record.end:
                if record.end - offset < HANDSHAKE_HEADER:
                    return False
                message_length = int.from_bytes(datagram[offset + 1:offset + 4], "big")
                fragment_offset = int.from_bytes(datagram[offset + 6:offset + 9], "big")
                fragment_length = int.from_bytes(datagram[offset + 9:offset + 12], "big")
                if (datagram[offset] not in CLIENT_HANDSHAKE_MESSAGES
                        or message_length > MAX_CLIENT_HANDSHAKE_MESSAGE
                        or fragment_offset + fragment_length > message_length):
                    return False
                offset += HANDSHAKE_HEADER + fragment_length
            if offset != record.end:
                return False
    return True


class ClientHello(NamedTuple):
    """What the cookie exchange needs from a ClientHello."""

    record_sequence: bytes   # epoch and sequence number, echoed in the HelloVerifyRequest
    message_seq: int         # echoed too (RFC 6347 erratum 5186)
    random: bytes
    cookie: bytes
    #: version, random, session id, cipher suites and compression methods,
    #: the parameters a client must repeat with its cookie (RFC 6347 4.2.1).
    parameters: bytes


def parse_client_hello(datagram: bytes, record: Record) -> ClientHello | None:
    """The ClientHello in ``record``, or None if it is not one, whole and well-formed.

    Fragmented ClientHellos are refused: with PSK suites they are far
    smaller than any MTU, and reassembling them would need state before
    the cookie is checked.
    """
    if record.content_type != HANDSHAKE or record.epoch != 0:
        return None
    start, end = record.start, record.end
    if end - start < HANDSHAKE_HEADER or datagram[start] != CLIENT_HELLO:
        return None
    length = int.from_bytes(datagram[start + 1:start + 4], "big")
    message_seq = (datagram[start + 4] << 8) | datagram[start + 5]
    fragment_offset = int.from_bytes(datagram[start + 6:start + 9], "big")
    fragment_length = int.from_bytes(datagram[start + 9:start + 12], "big")
    body = datagram[start + HANDSHAKE_HEADER:end]
    if fragment_offset != 0 or fragment_length != length or length != len(body):
        return None
    # client_version (2), random (32), session_id <0..32>, cookie <0..255>,
    # cipher_suites <2..2^16-2>, compression_methods <1..255>, extensions.
    position = 34
    if len(body) < position + 1:
        return None
    session_id_end = position + 1 + body[position]
    if body[position] > 32 or len(body) < session_id_end + 1:
        return None
    cookie_end = session_id_end + 1 + body[session_id_end]
    if len(body) < cookie_end + 2:
        return None
    suites_length = (body[cookie_end] << 8) | body[cookie_end + 1]
    suites_end = cookie_end + 2 + suites_length
    if suites_length < 2 or suites_length % 2 or len(body) < suites_end + 1:
        return None
    compression_end = suites_end + 1 + body[suites_end]
    if body[suites_end] < 1 or len(body) < compression_end:
        return None
    record_header = start - RECORD_HEADER
    return ClientHello(
        record_sequence=datagram[record_header + 3:record_header + 11],
        message_seq=message_seq,
        random=body[2:34],
        cookie=body[session_id_end + 1:cookie_end],
        parameters=body[:session_id_end] + body[cookie_end:compression_end],
    )


def hello_verify_request(hello: ClientHello, cookie: bytes) -> bytes:
    """The HelloVerifyRequest datagram that answers ``hello`` with ``cookie``.

    RFC 6347 4.2.1: the record takes the ClientHello's sequence number and
    the handshake message its message_seq, so the server keeps no counter
    of its own; the version is DTLS 1.0, as the RFC advises for any client.
    """
    body = DTLS_1_0.to_bytes(2, "big") + bytes((len(cookie),)) + cookie
    message = (bytes((HELLO_VERIFY_REQUEST,)) + len(body).to_bytes(3, "big")
               + hello.message_seq.to_bytes(2, "big") + b"\0\0\0" + len(body).to_bytes(3, "big")
               + body)
    return (bytes((HANDSHAKE,)) + DTLS_1_0.to_bytes(2, "big") + hello.record_sequence
            + len(message).to_bytes(2, "big") + message)
