"""Transports under the message layer: where datagrams come from and go to.

Two exist: :class:`UDPTransport` (plain CoAP, ``coap``, port 5683) and
:class:`DTLSTransport` (CoAP over DTLS 1.2, ``coaps``, port 5684).

A transport hands every datagram it receives to its message layer with the
peer's address and, for a secure transport, the identity it authenticated
(``MessageLayer.datagram_received(data, addr, identity)``), and sends what
the layer gives it (``send(datagram, addr)``). Its ``name`` is what the
envelope records as the transport (``coap``, ``coaps``).

:class:`CoapServer` is the service that binds a transport's socket.
"""

from __future__ import annotations

import socket

from twisted.application.service import Service
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger

from sense_gateway.coap.request import source_text

log = Logger()

#: RFC 7252 sizes a datagram's payload at 1024 bytes without block-wise
#: transfers; the receive buffer only needs to hold whole datagrams.
MAX_DATAGRAM = 8192


class UDPTransport(DatagramProtocol):
    """Plain CoAP: every datagram straight to the message layer, no identity."""

    name = "coap"

    def __init__(self):
        self.layer = None

    def attach(self, layer) -> None:
        self.layer = layer
        # Twisted calls datagramReceived(data, addr) for every datagram:
        # the layer's own method, with no call in between.
        self.datagramReceived = layer.datagram_received

    def makeConnection(self, transport) -> None:
        # send() is the socket's own sendto: Twisted's Port.write checks
        # the address (one from recvfrom, so a valid one) every time.
        sock = getattr(transport, "socket", None)
        self.send = sock.sendto if sock is not None else transport.write
        super().makeConnection(transport)

    def send(self, datagram: bytes, addr) -> None:
        raise OSError("not listening")

    def stopProtocol(self) -> None:
        if self.layer is not None:
            self.layer.stop()


class DTLSTransport(DatagramProtocol):
    """CoAP over DTLS (``coaps``): ciphertext from the socket goes to the
    DTLS engine, each decrypted record to the message layer with the PSK
    identity the session authenticated; what the layer sends is encrypted
    on the peer's session (or dropped if it has none any more)."""

    name = "coaps"

    def __init__(self, engine):
        self.engine = engine
        self.layer = None
        self._sendto = None
        engine.send = self._send_ciphertext
        engine.deliver = self._deliver

    def attach(self, layer) -> None:
        self.layer = layer

    def makeConnection(self, transport) -> None:
        sock = getattr(transport, "socket", None)
        self._sendto = sock.sendto if sock is not None else transport.write
        super().makeConnection(transport)

    def datagramReceived(self, data: bytes, addr) -> None:
        self.engine.datagram_received(data, addr)

    def _deliver(self, plaintext: bytes, addr, identity: str) -> None:
        self.layer.datagram_received(plaintext, addr, identity, self.engine.session_number(addr))

    def _send_ciphertext(self, datagram: bytes, addr) -> None:
        try:
            self._sendto(datagram, addr)
        except OSError as e:
            log.debug("cannot send to {source}: {error}", source=source_text(addr), error=e)

    def send(self, datagram: bytes, addr) -> None:
        if not self.engine.send_to(datagram, addr):
            raise OSError("no DTLS session with this peer")

    def stopProtocol(self) -> None:
        if self.layer is not None:
            self.layer.stop()
        self.engine.stop()


def bind_udp(reactor, protocol, bind: str, port: int, max_packet: int = MAX_DATAGRAM,
             reuse_port: bool = False):
    """Listen on UDP *bind*:*port* with *protocol*; ``::`` serves IPv6 and
    IPv4 (as mapped addresses) on one socket, whatever the host's
    ``bindv6only`` default. With *reuse_port* (``SO_REUSEPORT``) other
    processes of the same user may listen on the port too; Linux hands
    each datagram to one of the sockets by a hash of its 4-tuple, so one
    peer's datagrams keep reaching the same socket."""
    sock = udp_socket(bind, reuse_port)
    family = sock.family
    try:
        # Bursts from many devices arrive faster than one turn of the
        # reactor: a larger buffer turns them into latency, not loss.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
        sock.bind((bind, port))
        sock.setblocking(False)
        return reactor.adoptDatagramPort(sock.fileno(), family, protocol,
                                         maxPacketSize=max_packet)
    finally:
        sock.close()


class CoapServer(Service):
    """Listens on a UDP port with a transport (plain CoAP on 5683 by default)."""

    def __init__(self, transport, bind: str, port: int, reactor, label: str = "CoAP",
                 ready=None, reuse_port: bool = False):
        """*ready*, if given, returns a Deferred that fires when the
        gateway can judge requests: the socket opens only then.
        *reuse_port*: share the port with the other ``--workers``."""
        self.reuse_port = reuse_port
        self.transport = transport
        self.bind = bind
        self.port_number = port
        self.reactor = reactor
        self.label = label
        self.ready = ready
        self.port = None

    def startService(self) -> None:
        super().startService()
        if self.ready is None:
            self._listen()
        else:
            self.ready().addCallback(lambda _: self._listen() if self.running else None)

    def _listen(self) -> None:
        self.port = bind_udp(self.reactor, self.transport, self.bind, self.port_number,
                             reuse_port=self.reuse_port)
        log.info("{label} listening on {address}", label=self.label,
                 address=source_text((self.bind, self.address[1])))

    @property
    def address(self):
        host = self.port.getHost()
        return host.host, host.port

    def stopService(self):
        super().stopService()
        if self.port is not None:
            port, self.port = self.port, None
            return port.stopListening()


def udp_socket(bind: str, reuse_port: bool = False) -> socket.socket:
    """A UDP socket for *bind*, not yet bound (dual-stack for IPv6)."""
    family = socket.AF_INET6 if ":" in bind else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    return sock


def free_shared_port(bind: str) -> int:
    """A UDP port free on *bind* now, for workers that will share it."""
    with udp_socket(bind, reuse_port=True) as sock:
        sock.bind((bind, 0))
        return sock.getsockname()[1]
