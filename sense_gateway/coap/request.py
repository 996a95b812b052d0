"""A request as the message layer hands it to the dispatcher, the clock
the layer keeps time by, and how the log names a peer."""

from __future__ import annotations

import time

# States of a Request.
WAITING, EMPTY_ACK_SENT, ANSWERED = range(3)


class MonotonicClock:
    """The reactor's timers with a monotonic ``seconds()``: lifetimes and
    delays do not move when the wall clock is stepped."""

    def __init__(self, reactor):
        self.callLater = reactor.callLater

    @staticmethod
    def seconds() -> float:
        return time.monotonic()


class Request:
    """A request received from a peer, until it is answered."""

    __slots__ = ("message", "addr", "identity", "transport", "key", "received", "state",
                 "session")

    def __init__(self, message, addr, identity, transport, key, received, session=None):
        self.message = message
        self.addr = addr
        self.identity = identity
        #: the DTLS session it came over (a number unique to it), or None
        self.session = session
        self.transport = transport
        self.key = key
        self.received = received
        self.state = WAITING

    @property
    def host(self) -> str:
        return self.addr[0]

    @property
    def port(self) -> int:
        return self.addr[1]


def source_text(addr) -> str:
    """``[::1]:5683`` or ``127.0.0.1:5683``, IPv4-mapped addresses unmapped."""
    host, port = addr[0], addr[1]
    if host.startswith("::ffff:") and "." in host:
        host = host[7:]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
