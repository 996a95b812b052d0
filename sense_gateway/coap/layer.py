"""The CoAP message layer (RFC 7252 section 4): the one place that deals in
message types and message ids.

:class:`MessageLayer` takes datagrams from a transport (plain UDP, or DTLS
which also names the authenticated peer), parses each once, answers pings
and malformed messages, recognises retransmissions, and hands each new
request to a handler (the dispatcher) as a :class:`Request`. Every
response leaves through :meth:`MessageLayer.answer`, which decides between
a piggybacked ACK, a separate confirmable response after an empty ACK, and
a non-confirmable response, remembers what was sent so a retransmission
gets the same bytes, and honours No-Response (RFC 7967). Confirmable
messages of our own (separate responses, notifications) are retransmitted
until the peer acknowledges them.

Time comes from *clock*: its ``seconds()`` must be monotonic (the
gateway's :class:`MonotonicClock`; ``task.Clock`` in tests).
"""

from __future__ import annotations

import math
from collections import Counter, OrderedDict, deque

from twisted.internet import defer
from twisted.logger import Logger

from sense_gateway.coap.confirmable import MAX_PEERS, Confirmables
from sense_gateway.coap.exchanges import ExchangeMemory
from sense_gateway.coap.request import ANSWERED, EMPTY_ACK_SENT, WAITING, Request, source_text
from sense_gateway.limits import TokenBuckets
from sense_gateway.coap.message import (
    ACK, CON, EMPTY, INTERNAL_SERVER_ERROR, MAX_AGE, NO_RESPONSE, NON, RST,
    SERVICE_UNAVAILABLE, BAD_OPTION, TOO_MANY_REQUESTS, MalformedMessage, code_text, encode,
    parse,
)

log = Logger()

#: a confirmable request still unanswered after this gets an empty ACK
EMPTY_ACK_DELAY = 0.1

#: requests received and not yet answered, at most; beyond that, 5.03
MAX_IN_FLIGHT = 65536
#: rejections logged a second at most (the rest are counted)
REJECTIONS_LOGGED_PER_SECOND = 5


# No-Response (RFC 7967 2.1): bit per response class to suppress.
_NO_RESPONSE_BITS = {2: 0x02, 4: 0x08, 5: 0x10}


class MessageLayer:
    """Message types and ids for one transport; see the module docstring.

    *handler* has ``request(layer, request)``, called once per new request; it
    must eventually call :meth:`answer` for it (or the peer retransmits in
    vain). *transport* has ``send(datagram, addr)`` and a ``name``.
    """

    def __init__(self, transport, handler, clock, *, exchange_lifetime: float = 247.0,
                 max_exchanges: int = 65536, exchanges_per_source: int = 4096,
                 max_in_flight: int = MAX_IN_FLIGHT, rate_limit=None):
        """*rate_limit*, if given, is a :class:`~sense_gateway.limits.TokenBuckets`
        by source address (it may be shared by several layers): a request
        over it gets 4.29 Too Many Requests with Max-Age (RFC 8516)."""
        self.transport = transport
        self.handler = handler
        self.clock = clock
        self._seconds = clock.seconds
        self._transport_name = transport.name
        self.exchanges = ExchangeMemory(exchange_lifetime, max_exchanges, exchanges_per_source,
                                        clock.seconds)
        self.max_in_flight = max_in_flight
        self.rate_limit = rate_limit
        #: requests refused (4.29, or dropped) because their source was over its rate
        self.rate_limited = 0
        # address -> when it was last told it is over its rate
        self._told_over_rate: OrderedDict = OrderedDict()
        self._log_budget = TokenBuckets(REJECTIONS_LOGGED_PER_SECOND,
                                        4 * REJECTIONS_LOGGED_PER_SECOND, clock.seconds)
        self._rejections_not_logged = 0
        #: new requests handed to the handler
        self.requests = 0
        #: retransmitted requests recognised (answered again, not handled again)
        self.retransmissions = 0
        #: datagrams that are not well-formed CoAP, or not acceptable as sent
        self.malformed = 0
        #: responses sent, by code
        self.responses: Counter[int] = Counter()
        #: requests not answered yet
        self.in_flight = 0
        # Unanswered requests by exchange key: the bounded exchange memory
        # may forget a key under load, this may not.
        self._pending: dict = {}
        # Confirmable requests in arrival order, for the empty ACK of those
        # still waiting after EMPTY_ACK_DELAY: one timer for all.
        self._waiting: deque[Request] = deque()
        self._empty_ack_timer = None
        # Separate responses and notifications, and our message ids.
        self.confirmables = Confirmables(clock, self._send)
        self.next_mid = self.confirmables.next_mid
        self._stopped = False
        #: shutting down: new requests get 5.03, those taken are answered
        self.draining = False
        self._drained: list[defer.Deferred] = []

    # -- receiving -----------------------------------------------------------

    def datagram_received(self, data: bytes, addr, identity: str | None = None,
                          session=None) -> None:
        """One datagram from *addr*; *identity* is who the transport
        authenticated the peer as (``None`` for plain UDP), *session* the
        secure session it came over (RFC 7252 9.1.2: an exchange belongs
        to one session; ``None`` for plain UDP)."""
        try:
            message = parse(data)
        except MalformedMessage as e:
            # Counted, not logged: anyone can send these, from any address.
            self.malformed += 1
            if e.mtype == CON and e.mid is not None:
                self._send(encode(RST, EMPTY, e.mid), addr)
            return
        mtype, code = message.mtype, message.code
        if code == EMPTY:
            self._empty_received(message, addr)
            return
        if code >= 32:
            # We send no requests: a confirmable response is unexpected
            # (reset), any other is ignored.
            if mtype == CON:
                self._send(encode(RST, EMPTY, message.mid), addr)
            return
        if mtype > NON:
            self.malformed += 1  # a request must be CON or NON
            return
        if self.rate_limit is not None:
            # Every request datagram costs a token, retransmissions and
            # unacceptable ones too: what the gateway sends to an address
            # (possibly spoofed) is bounded by that address's rate.
            wait = self.rate_limit.take(addr[0])
            if wait:
                self._over_rate(message, addr, identity, session, wait)
                return
        # An exchange is the peer's (RFC 7252 4.5), and over DTLS the peer
        # is its session: a device that handshakes again from the same
        # address (or another that takes it over) never gets a
        # predecessor's answers.
        key = (message.mid, addr[0], addr[1], session)
        pending = self._pending.get(key)
        if pending is not None:
            # A retransmission while the first copy is still being handled.
            self.retransmissions += 1
            if mtype == CON and pending.state == EMPTY_ACK_SENT:
                self._send(encode(ACK, EMPTY, message.mid), addr)
            return
        if self.exchanges.seen(key):
            self.retransmissions += 1
            if mtype == CON:
                datagram = self.exchanges.response(key)
                if datagram is not None:
                    self._send(datagram, addr)
            return
        if message.problem is not None and mtype == NON:
            # RFC 7252 5.4.1: a non-confirmable message with an unknown
            # critical option is rejected (4.3), not answered 4.02.
            self.malformed += 1
            self._send(encode(RST, EMPTY, message.mid), addr)
            return
        request = Request(message, addr, identity, self._transport_name, key,
                          self._seconds(), session)
        # Counted until answered, exactly once, whichever way.
        self.in_flight += 1
        self._pending[key] = request
        if message.problem is not None:
            self.answer(request, BAD_OPTION, message.problem[1].encode())
            return
        if self.draining:
            self.answer(request, SERVICE_UNAVAILABLE, b"shutting down", ((MAX_AGE, 5),))
            return
        if self.in_flight > self.max_in_flight:
            self.answer(request, SERVICE_UNAVAILABLE, b"too many requests in flight",
                        ((MAX_AGE, 1),))
            return
        self.requests += 1
        try:
            self.handler.request(self, request)
        except Exception:
            log.failure("failed to handle a request from {host} port {port}",
                        host=addr[0], port=addr[1])
            self.answer(request, INTERNAL_SERVER_ERROR, b"internal error")
            return
        if request.state == WAITING and mtype == CON:
            self._waiting.append(request)
            if self._empty_ack_timer is None:
                self._empty_ack_timer = self.clock.callLater(EMPTY_ACK_DELAY,
                                                             self._send_empty_acks)

    def _over_rate(self, message, addr, identity, session, wait: float) -> None:
        """A request from an address over its rate: 4.29 with Max-Age and no
        payload (RFC 8516), at most once a second to that address, else
        nothing; not handled, not remembered."""
        self.rate_limited += 1
        now = self._seconds()
        told = self._told_over_rate
        host = addr[0]
        if told.get(host, float("-inf")) > now - 1.0:
            return
        told.pop(host, None)
        if len(told) >= MAX_PEERS:
            told.popitem(last=False)
        told[host] = now
        request = Request(message, addr, identity, self._transport_name, None, now, session)
        self.in_flight += 1
        self.answer(request, TOO_MANY_REQUESTS, b"",
                    ((MAX_AGE, min(max(1, math.ceil(wait)), 3600)),))

    def _empty_received(self, message, addr) -> None:
        mtype = message.mtype
        if mtype == CON:
            self._send(encode(RST, EMPTY, message.mid), addr)  # a ping (RFC 7252 4.3)
            return
        if mtype == NON:
            self.malformed += 1  # RFC 7252 4.3: a NON is never empty
            return
        self.confirmables.ended(message.mid, addr, reset=mtype == RST)

    # -- answering -----------------------------------------------------------

    def answer(self, request: Request, code: int, payload: bytes = b"", options=()) -> None:
        """Send the response to *request* (once; later calls are ignored)."""
        state = request.state
        if state == ANSWERED:
            return
        request.state = ANSWERED
        self.in_flight -= 1
        self._pending.pop(request.key, None)
        if self._stopped:
            return
        if self.draining and not self.in_flight:
            self.reactor_call_soon(self._fire_drained)
        message = request.message
        self.responses[code] += 1
        if code >= 0x80 and code != TOO_MANY_REQUESTS:  # those are counted, not logged
            self._log_rejection(request, code, payload)
        if message.options and _suppressed(message, code):
            # RFC 7967: the peer does not want this answer; a confirmable
            # request still gets its (empty) acknowledgement.
            if message.mtype == CON and state == WAITING:
                datagram = encode(ACK, EMPTY, message.mid)
                self.exchanges.record_response(request.key, datagram)
                self._send(datagram, request.addr)
            return
        token, addr = message.token, request.addr
        if state == EMPTY_ACK_SENT:
            # The peer has its empty ACK: the answer goes separately, as a
            # confirmable message, retransmitted until acknowledged.
            self.send_confirmable(addr, code, token, options, payload)
        elif message.mtype == CON:
            datagram = encode(ACK, code, message.mid, token, options, payload)
            self.exchanges.record_response(request.key, datagram)
            self._send(datagram, addr)
        else:
            self._send(encode(NON, code, self.next_mid(addr), token, options, payload), addr)

    def _log_rejection(self, request: Request, code: int, payload: bytes) -> None:
        """A line per refused request helps a device's developer; a flood of
        them must not fill the disk: at most a few a second, with a count
        of those left out."""
        if self._log_budget.take("rejected"):
            self._rejections_not_logged += 1
            return
        left_out, self._rejections_not_logged = self._rejections_not_logged, 0
        log.info("rejected {source}: {code} {reason}{more}", source=source_text(request.addr),
                 code=code_text(code), reason=payload.decode("utf-8", "replace"),
                 more=f" ({left_out} more not logged)" if left_out else "")

    def send_confirmable(self, addr, code: int, token: bytes, options=(), payload: bytes = b"",
                         on_end=None) -> None:
        """Send a confirmable response (a separate one, or a notification),
        retransmitted until acknowledged; *on_end* is called if the peer
        resets it or never acknowledges it."""
        if not self._stopped:
            self.confirmables.send(addr, code, token, options, payload, on_end)

    def _send_empty_acks(self) -> None:
        """Acknowledge, empty, every confirmable request still waiting after
        EMPTY_ACK_DELAY, so the peer stops retransmitting (RFC 7252 5.2.2);
        then wait for the next one to come due."""
        self._empty_ack_timer = None
        waiting = self._waiting
        now = self.clock.seconds()
        while waiting:
            request = waiting[0]
            if request.state != WAITING:
                waiting.popleft()
                continue
            due = request.received + EMPTY_ACK_DELAY
            if due > now:
                self._empty_ack_timer = self.clock.callLater(due - now, self._send_empty_acks)
                return
            waiting.popleft()
            request.state = EMPTY_ACK_SENT
            datagram = encode(ACK, EMPTY, request.message.mid)
            self.exchanges.record_response(request.key, datagram)
            self._send(datagram, request.addr)

    # -- sending and stopping ------------------------------------------------

    def drain(self) -> defer.Deferred:
        """Refuse new requests from now on (5.03 with Max-Age) and fire once
        every request already taken has been answered: a graceful stop
        answers what the queue has committed."""
        self.draining = True
        d = defer.Deferred()
        self._drained.append(d)
        if not self.in_flight:
            self._fire_drained()
        return d

    def reactor_call_soon(self, f) -> None:
        # After the answer that emptied the layer has been sent.
        self.clock.callLater(0, f)

    def _fire_drained(self) -> None:
        waiting, self._drained = self._drained, []
        for d in waiting:
            if not d.called:
                d.callback(None)

    def _send(self, datagram: bytes, addr) -> None:
        if self._stopped:
            return
        try:
            self.transport.send(datagram, addr)
        except OSError as e:
            # Full socket buffer or unreachable peer: like a lost datagram,
            # the peer retransmits.
            log.debug("cannot send to {source}: {error}", source=source_text(addr), error=e)

    def stop(self) -> None:
        """Send nothing more and leave no timer behind in the reactor."""
        self._stopped = True
        self._fire_drained()
        if self._empty_ack_timer is not None and self._empty_ack_timer.active():
            self._empty_ack_timer.cancel()
        self._empty_ack_timer = None
        self._waiting.clear()
        self._pending.clear()
        self.confirmables.stop()


def _suppressed(message, code: int) -> bool:
    """Whether the request's No-Response option suppresses *code*."""
    for number, value in message.options:
        if number == NO_RESPONSE:
            return bool(value & _NO_RESPONSE_BITS.get(code >> 5, 0))
    return False
