"""Peers for the DTLS engine's tests.

:class:`MemoryClient` is a second DTLS implementation in the same process
(OpenSSL's client, through pyOpenSSL over memory BIOs), so a test can
script a handshake datagram by datagram, drop or replay any of them, and
pretend to be any address. :class:`Wire` carries datagrams between such
clients and one :class:`DTLSServer`. :class:`UDPHarness` puts the server on
a real loopback socket and answers CoAP requests, for libcoap's clients.

Keys are made at run time (:func:`new_key`); none is written down here.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
from collections import defaultdict



from twisted.internet import defer, protocol, reactor, utils

from sense_gateway.bench.dtls_client import DTLSClient
from tests.support import RawCoapPeer
from sense_gateway.coap.dtls import DTLSServer
from sense_gateway.coap.dtls_records import split_records


def new_key() -> bytes:
    """A fresh PSK that libcoap's ``-k`` can take as it is: 32 hex digits."""
    return secrets.token_hex(16).encode()


def records_of(datagram: bytes) -> list[tuple[int, int, bytes]]:
    """(content type, epoch, body) of each record in a datagram."""
    return [(r.content_type, r.epoch, datagram[r.start:r.end]) for r in split_records(datagram)]


def is_hello_verify_request(datagram: bytes) -> bool:
    records = records_of(datagram)
    return len(records) == 1 and records[0][0] == 22 and records[0][2][:1] == b"\x03"


#: a DTLS client scripted by hand (it lives in the package: the bench's
#: simulated devices use it too)
MemoryClient = DTLSClient


class Wire:
    """In-process datagrams between memory clients and one server.

    Whatever the server sends waits in :attr:`outbox` under its address
    until a test passes it on; :attr:`delivered` collects what the server
    decrypted, as (plaintext, address, identity).
    """

    def __init__(self, server: DTLSServer):
        self.server = server
        self.outbox: dict[tuple, list[bytes]] = defaultdict(list)
        self.delivered: list[tuple[bytes, tuple, str]] = []
        server.send = lambda datagram, addr: self.outbox[addr].append(datagram)
        server.deliver = lambda plaintext, addr, identity: self.delivered.append(
            (plaintext, addr, identity))

    def take(self, addr) -> list[bytes]:
        return self.outbox.pop(addr, [])

    def to_server(self, datagrams, addr) -> None:
        for datagram in datagrams:
            self.server.datagram_received(datagram, addr)

    def exchange(self, client: MemoryClient, datagrams, addr, rounds: int = 10) -> None:
        """Pass datagrams back and forth until neither side has more to say."""
        for _ in range(rounds):
            if not datagrams:
                return
            self.to_server(datagrams, addr)
            datagrams = client.receive(self.take(addr))

    def handshake(self, client: MemoryClient, addr) -> bool:
        self.exchange(client, client.start(), addr)
        return client.established

    def client_sends(self, client: MemoryClient, plaintext: bytes, addr) -> None:
        self.to_server(client.send(plaintext), addr)

    def server_sends(self, client: MemoryClient, plaintext: bytes, addr) -> bool:
        sent = self.server.send_to(plaintext, addr)
        client.receive(self.take(addr))
        return sent


# -- a real socket, answered the way a CoAP server would --------------------

def coap_ack_changed(message: bytes) -> bytes | None:
    """An ACK 2.04 for a confirmable CoAP request (RFC 7252 3), else None.

    Only the header and token are read; the gateway's own CoAP modules are
    deliberately not used here.
    """
    if len(message) < 4 or message[0] >> 6 != 1:
        return None
    kind, token_length, code = (message[0] >> 4) & 3, message[0] & 15, message[1]
    if kind != 0 or token_length > 8 or not 1 <= code <= 31 or len(message) < 4 + token_length:
        return None
    return bytes((0x60 | token_length, 0x44)) + message[2:4 + token_length]


class _Datagrams(protocol.DatagramProtocol):
    def __init__(self, server: DTLSServer):
        self.server = server

    def datagramReceived(self, datagram, addr):
        self.server.datagram_received(datagram, addr)


class UDPHarness:
    """A DTLSServer on a loopback UDP port that answers every CON request with 2.04."""

    def __init__(self, testcase, host: str, keys: dict[str, bytes], **options):
        self.host = host
        self.keys = keys
        self.server = DTLSServer(self.keys.get, reactor, **options)
        self.requests: list[tuple[bytes, tuple, str]] = []
        self._protocol = _Datagrams(self.server)
        self._port = reactor.listenUDP(0, self._protocol, interface=host)
        self.port = self._port.getHost().port
        self.server.send = self._protocol.transport.write
        self.server.deliver = self._answer
        testcase.addCleanup(self.stop)

    def _answer(self, plaintext, addr, identity):
        self.requests.append((plaintext, addr, identity))
        answer = coap_ack_changed(plaintext)
        if answer is not None:
            self.server.send_to(answer, addr)

    def url(self, path: str = "/data") -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"coaps://{host}:{self.port}{path}"

    def stop(self):
        self.server.stop()
        return self._port.stopListening()


class LibcoapResult:
    def __init__(self, code: str | None, out: bytes, err: bytes, status: int):
        self.code, self.out, self.err, self.status = code, out, err, status

    def __repr__(self):
        return f"<libcoap {self.code} status={self.status}>"


@defer.inlineCallbacks
def libcoap_post(client: str, url: str, identity: str, key: bytes, wait: int = 5):
    """POST ``x`` with a libcoap client over DTLS PSK; the response code it saw."""
    binary = shutil.which(client)
    if binary is None:
        raise RuntimeError(f"{client} is not installed (Debian package libcoap3-bin)")
    # libcoap 4.3's -k takes the key as a string, byte for byte; its -v 7
    # logs "process incoming 2.04 response" for the answer it got.
    args = ["-m", "post", "-e", "x", "-B", str(wait), "-v", "7",
            "-u", identity, "-k", key.decode("ascii"), url]
    out, err, status = yield utils.getProcessOutputAndValue(binary, args, env=os.environ)
    codes = re.findall(rb"process incoming (\d\.\d\d) response", out + err)
    return LibcoapResult(codes[-1].decode() if codes else None, out, err, status)


class DTLSPeer(RawCoapPeer):
    """A :class:`MemoryClient` on a real UDP socket: a DTLS device talking
    to a gateway over loopback, polled without blocking the reactor."""

    def __init__(self, testcase, identity: str, key: bytes, host: str = "::1"):
        super().__init__(testcase, host)
        self.client = MemoryClient(identity, key)
        self.port = None

    def _send(self, datagrams) -> None:
        for datagram in datagrams:
            self.sock.sendto(datagram, (self.host, self.port))

    def _drain(self) -> list[bytes]:
        got = []
        while True:
            try:
                got.append(self.sock.recvfrom(65535)[0])
            except BlockingIOError:
                return got

    @defer.inlineCallbacks
    def _pump(self, done, timeout: float):
        """Carry datagrams both ways until ``done()`` or *timeout*."""
        import time

        from twisted.internet import task
        deadline = time.monotonic() + timeout
        while not done():
            got = self._drain()
            if got:
                self._send(self.client.receive(got))
            elif time.monotonic() > deadline:
                return False
            else:
                yield task.deferLater(reactor, 0.005, lambda: None)
        return True

    @defer.inlineCallbacks
    def connect(self, port: int, timeout: float = 5.0):
        """Handshake with the gateway at *port*; whether it succeeded."""
        self.port = port
        self._send(self.client.start())
        established = yield self._pump(lambda: self.client.established or self.client.error,
                                       timeout)
        return bool(established) and self.client.established

    @defer.inlineCallbacks
    def request(self, datagram: bytes, timeout: float = 5.0):
        """Send one CoAP request on the session; its response (past an
        empty ACK, acknowledging a separate one), or None."""
        token = datagram[4:4 + (datagram[0] & 0x0F)]
        seen = len(self.client.received)
        self._send(self.client.send(datagram))

        def answered():
            nonlocal seen
            for message in self.client.received[seen:]:
                seen += 1
                if len(message) >= 4 and message[1] != 0 and \
                        message[4:4 + (message[0] & 0x0F)] == token:
                    if (message[0] >> 4) & 3 == 0:  # a separate response: ACK it
                        self._send(self.client.send(bytes([0x60, 0]) + message[2:4]))
                    self.answer = message
                    return True
            return self.client.closed_by_server or self.client.error
        self.answer = None
        yield self._pump(answered, timeout)
        return self.answer

    def send_raw(self, datagrams) -> None:
        """Datagrams from this peer's address that are not its session's."""
        self._send(datagrams)
