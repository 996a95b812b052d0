"""The gateway's own confirmable messages (separate responses and
notifications) and the message ids of everything it sends on its own.

:class:`Confirmables` retransmits each confirmable message (ACK_TIMEOUT
times a random factor, doubling, MAX_RETRANSMIT times, RFC 7252 4.2) until
the peer it went to acknowledges or resets it, and hands out message ids
from one sequence per peer, starting at a random value (RFC 7252 4.4), so
no peer sees an id twice within 65,536 messages whatever others get.
"""

from __future__ import annotations

import random
from collections import OrderedDict

from sense_gateway.coap.message import CON, encode

# RFC 7252 4.8 transmission parameters.
ACK_TIMEOUT = 2.0
ACK_RANDOM_FACTOR = 1.5
MAX_RETRANSMIT = 4

#: peers whose next message id is remembered (the oldest forgotten first)
MAX_PEERS = 65536


class _Outgoing:
    """A confirmable message of ours, retransmitted until acknowledged."""

    __slots__ = ("datagram", "addr", "timeout", "count", "timer", "on_end")

    def __init__(self, datagram, addr, timeout, on_end):
        self.datagram, self.addr, self.timeout, self.on_end = datagram, addr, timeout, on_end
        self.count = 0
        self.timer = None


class Confirmables:
    """*send(datagram, addr)* puts a datagram on the wire; *clock* gives
    ``callLater``."""

    def __init__(self, clock, send):
        self.clock = clock
        self._send = send
        # (mid, host, port) -> _Outgoing
        self._outgoing: dict = {}
        # (host, port) -> the next message id for that peer
        self._next_mid: OrderedDict = OrderedDict()

    def next_mid(self, addr) -> int:
        """A message id for a message of ours to *addr*."""
        peer = (addr[0], addr[1])
        table = self._next_mid
        mid = table.get(peer)
        if mid is None:
            mid = random.randrange(0x10000)
            if len(table) >= MAX_PEERS:
                table.popitem(last=False)
        table[peer] = (mid + 1) & 0xFFFF
        return mid

    def send(self, addr, code: int, token: bytes, options=(), payload: bytes = b"",
             on_end=None) -> None:
        """Send a confirmable response; *on_end* is called if the peer
        resets it or never acknowledges it."""
        mid = self.next_mid(addr)
        datagram = encode(CON, code, mid, token, options, payload)
        key = (mid, addr[0], addr[1])
        outgoing = _Outgoing(datagram, addr,
                             random.uniform(ACK_TIMEOUT, ACK_TIMEOUT * ACK_RANDOM_FACTOR), on_end)
        self._cancel(self._outgoing.pop(key, None))
        self._outgoing[key] = outgoing
        outgoing.timer = self.clock.callLater(outgoing.timeout, self._retransmit, key, outgoing)
        self._send(datagram, addr)

    def ended(self, mid: int, addr, reset: bool) -> None:
        """An empty ACK (or a Reset, *reset*) for message *mid* from *addr*:
        only the peer a message went to may end it."""
        outgoing = self._outgoing.pop((mid, addr[0], addr[1]), None)
        if outgoing is None:
            return
        self._cancel(outgoing)
        if reset and outgoing.on_end is not None:
            outgoing.on_end()

    def _retransmit(self, key, outgoing: _Outgoing) -> None:
        if self._outgoing.get(key) is not outgoing:
            return
        if outgoing.count >= MAX_RETRANSMIT:
            del self._outgoing[key]
            if outgoing.on_end is not None:
                outgoing.on_end()
            return
        outgoing.count += 1
        outgoing.timeout *= 2
        outgoing.timer = self.clock.callLater(outgoing.timeout, self._retransmit, key, outgoing)
        self._send(outgoing.datagram, outgoing.addr)

    @staticmethod
    def _cancel(outgoing) -> None:
        if outgoing is not None and outgoing.timer is not None and outgoing.timer.active():
            outgoing.timer.cancel()

    def stop(self) -> None:
        for outgoing in self._outgoing.values():
            self._cancel(outgoing)
        self._outgoing.clear()
