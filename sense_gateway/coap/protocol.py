"""The gateway's CoAP endpoint: txthings' protocol with its gaps closed.

:class:`GatewayProtocol` keeps txthings' request handling (resource
dispatch, piggybacked and separate responses, block-wise transfers,
observation) and replaces the parts that do not hold up on an exposed
server: parsing (strict, never raises), duplicate detection (bounded),
block-wise reassembly (bounded, size-limited), observers (dropped when the
client resets or stops answering), and per-datagram logging.
"""

from __future__ import annotations

import copy

import gc
import socket
from collections import Counter, deque
from ipaddress import ip_address

from twisted.application.service import Service
from twisted.logger import Logger
from twisted.python.failure import Failure
from txthings import coap
from txthings import error as txerror

from sense_gateway.coap.exchanges import ExchangeCache
from sense_gateway.coap.message import BadOption, MalformedMessage, decode, parse_simple_post
from sense_gateway.coap.resources import IngestResource, error_response, source_host, walk
from sense_gateway.errors import RequestError, Unavailable, code_text

log = Logger()

#: RFC 7252 sizes a datagram's payload at 1024 bytes without block-wise
#: transfers; the receive buffer only needs to hold whole datagrams.
MAX_DATAGRAM = 8192

#: Block-wise uploads assembled at once, across all peers...
MAX_ASSEMBLIES = 1024
#: ...and from one source address (any port), so one peer cannot take them all.
MAX_ASSEMBLIES_PER_SOURCE = 16


class _Assemblies(dict):
    """txthings' ``incoming_requests``: pending block-wise transfers.

    txthings pops entries unconditionally when a transfer times out; we may
    already have dropped one (size limit), so a missing key is not an error.
    """

    def pop(self, key, *default):
        return super().pop(key, None)


class GatewayResponder(coap.Responder):
    """txthings' handler of one incoming request.

    When a block-wise upload ends without a complete request (a block out
    of order, or the peer stopped sending), txthings swallows the error and
    then dispatches ``None`` as if it were the request.
    """

    def dispatchRequest(self, request):
        if request is None:
            return None
        d = super().dispatchRequest(request)
        if d is None:
            return None

        def failed(failure):
            # A resource that raised still owes the peer an answer.
            log.failure("resource failed for {source}", failure, source=_source(request.remote))
            self.respondWithError(request, coap.INTERNAL_SERVER_ERROR, b"internal error")
        return d.addErrback(failed)


class _Remote(tuple):
    """A peer as txthings wants it, ``(ip_address(host), port)``, which also
    knows the host as received (``.host``): exchanges are remembered by that
    string, which the garbage collector need not track, and which the hot
    path has without parsing."""


def _exchange_key(mid: int, remote) -> tuple:
    host = remote.host if type(remote) is _Remote else str(remote[0])
    return (mid, host, remote[1])


class _InFlight:
    """A hot-path request whose envelope the queue has not committed yet."""

    __slots__ = ("protocol", "key", "mtype", "mid", "token", "addr", "remote", "received",
                 "state")

    def __init__(self, protocol, key, mtype, mid, token, addr, remote, received):
        self.protocol = protocol
        self.key = key
        self.mtype = mtype
        self.mid = mid
        self.token = token
        self.addr = addr
        self.remote = remote
        self.received = received
        self.state = _WAITING

    def done(self, error) -> None:
        """The queue's answer: ``None`` once committed, else the error."""
        self.protocol._stored(self, error)


# States of an _InFlight request.
_WAITING, _EMPTY_ACK_SENT, _ANSWERED = range(3)

#: Hot-path requests waiting for their commit at once; beyond that, 5.03.
MAX_IN_FLIGHT = 65536

#: Peers whose parsed address is remembered (cleared when full).
_MAX_PEERS = 65536

_CHANGED_ACK = 0x60  # version 1, ACK
_CHANGED_NON = 0x50  # version 1, NON


class GatewayProtocol(coap.Coap):
    """A CoAP server endpoint for a txthings resource tree.

    With *fast_path* (the default), the hot case (a single-datagram CON or
    NON POST to an ingest resource, see :func:`parse_simple_post`) is
    served here without txthings' per-request objects, Deferreds and
    timers: parsed in one pass, deduplicated in the same exchange cache,
    decoded and validated at once, and answered when the queue's group
    commit reports the envelope stored. Everything else takes txthings'
    path.
    """

    def __init__(self, endpoint, *, clock, exchange_lifetime: float, max_exchanges: int,
                 max_payload: int, fast_path: bool = True, max_in_flight: int = MAX_IN_FLIGHT):
        super().__init__(endpoint)
        self.clock = clock
        self.max_payload = max_payload
        self.exchanges = ExchangeCache(exchange_lifetime, max_exchanges, clock.seconds)
        # Our own confirmable messages (observe notifications) are few, so
        # their ACK/RST dedup can share the same mechanism with a small cap.
        self.acknowledgements = ExchangeCache(exchange_lifetime, 4096, clock.seconds)
        self.incoming_requests = _Assemblies()
        #: resources whose observers must be dropped when a peer goes away
        self.observable_resources: list = []
        self.responses: Counter[int] = Counter()
        self.malformed = 0
        self.duplicates = 0
        self._stopped = False
        #: ingest resources by Uri-Path segments, for the hot path
        self.ingest_routes = _ingest_routes(endpoint) if fast_path else {}
        self.max_in_flight = max_in_flight
        #: requests served on the hot path (retransmissions not counted)
        self.hot_path = 0
        #: hot-path requests waiting for their commit
        self.in_flight = 0
        #: hot-path requests waiting for their commit, by exchange key: the
        #: bounded exchange cache may drop a key under load, this may not
        self._pending: dict = {}
        # Confirmable hot-path requests in arrival order, for the empty ACK
        # of those still waiting after EMPTY_ACK_DELAY: one timer for all.
        self._waiting: deque[_InFlight] = deque()
        self._empty_ack_timer = None
        # (host, port) as received -> (_Remote, device address)
        self._peers: dict = {}

    # -- receiving ---------------------------------------------------------

    def datagramReceived(self, data: bytes, addr) -> None:
        if self.ingest_routes:
            request = parse_simple_post(data)
            if request is not None:
                ingest = self.ingest_routes.get(request[3])
                if ingest is not None and self._ingest(ingest, request, addr):
                    return
        host, port = addr[0], addr[1]
        try:
            message = decode(data, host, port, self, self._peer(addr)[0])
        except MalformedMessage as e:
            self.malformed += 1
            log.debug("malformed datagram from {host} port {port}: {reason}",
                      host=host, port=port, reason=e.reason)
            if e.mtype == coap.CON and e.message_id is not None:
                self._send_reset(e.message_id, (host, port))
            return
        except BadOption as e:
            message = e.message
            if message.mtype != coap.CON:
                # RFC 7252 5.4.1: a non-confirmable message with an unknown
                # critical option is rejected (4.3), not answered with 4.02.
                self.malformed += 1
                if message.mtype == coap.NON:
                    self._send_reset(message.mid, (host, port))
                return
            if not self.deduplicateMessage(message):
                code = coap.PROXYING_NOT_SUPPORTED if e.number in (
                    coap.PROXY_URI, coap.PROXY_SCHEME) else coap.BAD_OPTION
                self.respond_directly(message, code, e.reason)
            return
        try:
            if self.deduplicateMessage(message):
                return
            if coap.isRequest(message.code):
                if message.mtype in (coap.ACK, coap.RST):
                    # A request must be CON or NON; this cannot be answered.
                    self.malformed += 1
                    return
                self.processRequest(message)
            elif coap.isResponse(message.code):
                self.processResponse(message)
            else:
                self.processEmpty(message)
        except Exception:
            log.failure("failed to handle a message from {host} port {port}", host=host, port=port)
            if coap.isRequest(message.code) and self.exchanges.response(
                    _exchange_key(message.mid, message.remote)) is None:
                self.respond_directly(message, coap.INTERNAL_SERVER_ERROR, "internal error")

    # -- the hot path --------------------------------------------------------

    def _peer(self, addr):
        """``(_Remote, device address)`` for a received address; each peer's
        address is parsed once, not once per datagram."""
        peer = self._peers.get(addr)
        if peer is None:
            parsed = ip_address(addr[0])
            remote = _Remote((parsed, addr[1]))
            remote.host = addr[0]
            peer = (remote, source_host(parsed))
            if len(self._peers) >= _MAX_PEERS:
                self._peers.clear()
            self._peers[addr] = peer
        return peer

    def _ingest(self, ingest, request, addr) -> bool:
        """Serve a parsed hot-path request; ``False`` leaves it to txthings."""
        mtype, mid, token, segments, content_format, payload = request
        remote, device_host = self._peer(addr)
        if self.incoming_requests and (
                coap.uriPathAsString(segments), remote) in self.incoming_requests:
            # A plain request in the middle of a block-wise upload to the
            # same path ends that upload: txthings' rules.
            return False
        key = (mid, addr[0], addr[1])
        waiting = self._pending.get(key)
        if waiting is not None:
            # A retransmission while the first copy is being stored.
            self.duplicates += 1
            if mtype == coap.CON and waiting.state == _EMPTY_ACK_SENT:
                self._send_to(bytes((0x60, 0x00, mid >> 8, mid & 0xFF)), addr)
            return True
        exchanges = self.exchanges
        if exchanges.seen(key):
            self.duplicates += 1
            if mtype == coap.CON:
                datagram = exchanges.response(key)
                if datagram is not None:
                    self._send_to(datagram, addr)
            return True
        self.hot_path += 1
        received = self.clock.seconds()
        pending = _InFlight(self, key, mtype, mid, token, addr, remote, received)
        # Counted until answered, exactly once, whichever way.
        self.in_flight += 1
        self._pending[key] = pending
        if self.in_flight > self.max_in_flight:
            self._answer_error(pending, Unavailable("too many requests in flight", max_age=1))
            return True
        try:
            ingest.submit(payload, content_format, device_host, addr[1], received, pending.done)
        except RequestError as e:
            self._answer_error(pending, e)
        except Exception:
            log.failure("failed to handle a message from {host} port {port}",
                        host=addr[0], port=addr[1])
            self._answer_error(pending, None)
        else:
            if pending.state == _WAITING and mtype == coap.CON:
                self._waiting.append(pending)
                if self._empty_ack_timer is None:
                    self._empty_ack_timer = self.clock.callLater(
                        coap.EMPTY_ACK_DELAY, self._send_empty_acks)
        return True

    def _stored(self, pending: _InFlight, error) -> None:
        """The queue answered for *pending*: send its response."""
        if self._stopped:
            return  # nobody to answer, and no retransmission timers to leave
        if error is not None:
            if not isinstance(error, RequestError):
                log.failure("enqueue failed", Failure(error))
                error = Unavailable("queue error")
            self._answer_error(pending, error)
            return
        state = pending.state
        if state == _ANSWERED:
            return
        pending.state = _ANSWERED
        self.in_flight -= 1
        self._pending.pop(pending.key, None)
        if state == _WAITING:
            token, mid = pending.token, pending.mid
            if pending.mtype == coap.CON:
                datagram = bytes((_CHANGED_ACK | len(token), coap.CHANGED, mid >> 8, mid & 0xFF)) + token
                self.exchanges.record_response(pending.key, datagram)
            else:
                mid = self.nextMessageID()
                datagram = bytes((_CHANGED_NON | len(token), coap.CHANGED, mid >> 8, mid & 0xFF)) + token
            self.responses[coap.CHANGED] += 1
            self._send_to(datagram, pending.addr)
        else:
            # The device has its empty ACK: the answer goes separately, as
            # a confirmable message, retransmitted until acknowledged.
            self.sendMessage(self._response_to(pending, coap.Message(code=coap.CHANGED), True))

    def _answer_error(self, pending: _InFlight, error) -> None:
        """Answer *pending* with *error* (``None``: 5.00), as the resource would."""
        state = pending.state
        if state == _ANSWERED or self._stopped:
            return
        pending.state = _ANSWERED
        self.in_flight -= 1
        self._pending.pop(pending.key, None)
        if error is None:
            response = coap.Message(code=coap.INTERNAL_SERVER_ERROR, payload=b"internal error")
        else:
            response = error_response(error)
        self.sendMessage(self._response_to(pending, response, state == _EMPTY_ACK_SENT))

    @staticmethod
    def _response_to(pending: _InFlight, response, separate: bool):
        """Address *response* the way txthings' ``Responder.sendResponse`` does:
        piggybacked on the ACK, separate (CON) after an empty ACK, NON for NON."""
        response.token = pending.token
        response.remote = pending.remote
        if separate:
            response.mtype = coap.CON
        elif pending.mtype == coap.CON:
            response.mtype, response.mid = coap.ACK, pending.mid
        else:
            response.mtype = coap.NON
        return response

    def _send_empty_acks(self) -> None:
        """Acknowledge, empty, every confirmable request still waiting for
        the queue after EMPTY_ACK_DELAY, so the device stops retransmitting
        (RFC 7252 5.2.2); then wait for the next one to come due."""
        self._empty_ack_timer = None
        waiting = self._waiting
        now = self.clock.seconds()
        while waiting:
            pending = waiting[0]
            if pending.state != _WAITING:
                waiting.popleft()
                continue
            due = pending.received + coap.EMPTY_ACK_DELAY
            if due > now:
                self._empty_ack_timer = self.clock.callLater(due - now, self._send_empty_acks)
                return
            waiting.popleft()
            pending.state = _EMPTY_ACK_SENT
            ack = coap.Message(mtype=coap.ACK, mid=pending.mid, code=coap.EMPTY)
            ack.remote = pending.remote
            self.sendMessage(ack)

    def deduplicateMessage(self, message) -> bool:
        key = _exchange_key(message.mid, message.remote)
        if message.mtype in (coap.CON, coap.NON):
            if not self.exchanges.seen(key):
                return False
            self.duplicates += 1
            if message.mtype == coap.CON:
                # Answer a retransmitted CON with the response already sent;
                # if it is still being prepared, the peer will ask again.
                datagram = self.exchanges.response(key)
                if datagram is not None:
                    self._write(datagram, message.remote)
            return True
        return self.acknowledgements.seen(key)

    def processRequest(self, request) -> None:
        key = (coap.uriPathAsString(request.opt.uri_path), request.remote)
        ongoing = self.incoming_requests.get(key)
        block1 = request.opt.block1
        problem = None
        if ongoing is not None and ongoing.app_response is not None:
            # A response is being sent block by block: only the next block
            # may be asked for. (txthings fails a Deferred without an
            # exception here, which raises on Python 3.)
            if not _is_next_block2(request, ongoing.app_response):
                problem = (coap.BAD_REQUEST, "block-wise transfer out of step")
        elif block1 is not None:
            offset = block1.block_number * 2 ** (block1.size_exponent + 4)
            announced = request.opt.getOption(coap.SIZE1)
            assembled = ongoing.assembled_request if ongoing is not None else None
            expected = len(assembled.payload) if assembled is not None else 0
            if offset + len(request.payload) > self.max_payload or (
                    announced is not None and announced[0].value > self.max_payload):
                problem = (coap.REQUEST_ENTITY_TOO_LARGE, f"over {self.max_payload} bytes")
            elif block1.block_number and offset != expected:
                # RFC 7959 2.3: a block that does not continue the upload.
                problem = (coap.REQUEST_ENTITY_INCOMPLETE, f"expected the block at byte {expected}")
        if problem is not None:
            self._end_transfer(key)
            code, reason = problem
            self.respond_directly(request, code, reason, size1=self.max_payload
                                  if code == coap.REQUEST_ENTITY_TOO_LARGE else None)
            return
        if ongoing is not None:
            self.incoming_requests.pop(key).handleNextRequest(request)
            return
        if block1 is not None or request.code == coap.GET:
            # Requests that may start a block-wise transfer are limited in
            # number, overall and per source; single-datagram uploads never are.
            if self._refuse_transfer(request, key, block1):
                return
        GatewayResponder(self, request)

    def _refuse_transfer(self, request, key, block1) -> bool:
        """Answer and return True when a block-wise transfer may not start."""
        if block1 is not None and self._missing_resource(request):
            # Known before the first block is kept: nothing to assemble for.
            self.respond_directly(request, coap.NOT_FOUND, "no such resource")
            return True
        source = key[1][0]
        if len(self.incoming_requests) >= MAX_ASSEMBLIES:
            reason = "too many block-wise transfers"
        elif sum(1 for _, remote in self.incoming_requests
                 if remote[0] == source) >= MAX_ASSEMBLIES_PER_SOURCE:
            reason = "too many block-wise transfers from this address"
        else:
            return False
        self.respond_directly(request, coap.SERVICE_UNAVAILABLE, reason, max_age=10)
        return True

    def _missing_resource(self, request) -> bool:
        probe = copy.copy(request)  # the lookup consumes the path it walks
        probe.prepath, probe.postpath = [], list(request.opt.uri_path)
        try:
            self.endpoint.getResourceFor(probe)
        except txerror.NoResource:
            return True
        return False

    def processEmpty(self, message) -> None:
        exchange = self.active_exchanges.get(message.mid)
        if exchange is not None and exchange[0].remote != message.remote:
            # Only the peer the message went to may acknowledge or reset it;
            # txthings would let anyone cancel its retransmissions.
            return
        if message.mtype == coap.RST and exchange is not None and exchange[0].remote == message.remote:
            # A reset answering a notification cancels the observation
            # (RFC 7641 3.6); txthings would keep notifying forever.
            self._forget_observer(self.active_exchanges[message.mid][0])
        super().processEmpty(message)

    def stopProtocol(self) -> None:
        """End every exchange still holding a timer, so a stopped gateway
        leaves nothing behind in the reactor."""
        self._stopped = True
        if self._empty_ack_timer is not None:
            if self._empty_ack_timer.active():
                self._empty_ack_timer.cancel()
            self._empty_ack_timer = None
        self._waiting.clear()
        self._pending.clear()
        for key in list(self.incoming_requests):
            self._end_transfer(key)
        for _, retransmission in self.active_exchanges.values():
            if retransmission.active():
                retransmission.cancel()
        self.active_exchanges.clear()

    # -- sending -----------------------------------------------------------

    def sendMessage(self, message) -> None:
        if message.code == coap.EMPTY:
            # txthings copies the request's token into its empty ACK; an
            # empty message with a token is a format error (RFC 7252 4.1)
            # that strict peers reject.
            message.token = b""
        if message.mid is None:
            message.mid = self.nextMessageID()
        datagram = message.encode()
        if message.mtype in (coap.ACK, coap.RST):
            self.exchanges.record_response(_exchange_key(message.mid, message.remote), datagram)
        if coap.isResponse(message.code):
            self.responses[message.code] += 1
            if message.code >= coap.BAD_REQUEST:
                log.info("rejected {source}: {code} {reason}", source=_source(message.remote),
                         code=code_text(message.code),
                         reason=message.payload.decode("utf-8", "replace"))
        self._write(datagram, message.remote)
        if message.mtype == coap.CON:
            self.addExchange(message)

    def retransmit(self, message, timeout, retransmission_counter) -> None:
        if retransmission_counter >= coap.MAX_RETRANSMIT:
            self.active_exchanges.pop(message.mid, None)
            self._forget_observer(message)
            return
        super().retransmit(message, timeout, retransmission_counter)

    def respond_directly(self, request, code: int, reason: str, *, max_age: int | None = None,
                         size1: int | None = None) -> None:
        """Answer *request* with an error without involving a resource."""
        response = coap.Message(code=code, payload=reason.encode("utf-8")[:120])
        response.token = request.token
        response.remote = request.remote
        if request.mtype == coap.CON:
            response.mtype, response.mid = coap.ACK, request.mid
        else:
            response.mtype = coap.NON
        if max_age is not None:
            response.opt.addOption(coap.UintOption(coap.MAX_AGE, max_age))
        if size1 is not None:
            response.opt.addOption(coap.UintOption(coap.SIZE1, size1))
        self.sendMessage(response)

    def _send_reset(self, message_id: int, addr) -> None:
        rst = coap.Message(mtype=coap.RST, mid=message_id, code=coap.EMPTY)
        self._write(rst.encode(), addr)

    def makeConnection(self, transport) -> None:
        # Straight to the socket on the hot path: Twisted's Port.write checks
        # the address (a string from recvfrom, so a valid one) every time.
        sock = getattr(transport, "socket", None)
        self._sendto = sock.sendto if sock is not None else transport.write
        super().makeConnection(transport)

    def _send_to(self, datagram: bytes, addr) -> None:
        """Send to an address as received (no parsing, no checks)."""
        if self._stopped:
            return
        try:
            self._sendto(datagram, addr)
        except OSError as e:
            # Full socket buffer or unreachable peer: like a lost datagram,
            # the device retransmits.
            log.debug("cannot send to {source}: {error}", source=addr, error=e)

    def _write(self, datagram: bytes, remote) -> None:
        if self._stopped:
            return
        try:
            self.transport.write(datagram, (str(remote[0]), remote[1]))
        except OSError as e:
            # An unreachable peer must not abort the exchange for others.
            log.debug("cannot send to {source}: {error}", source=_source(remote), error=e)

    def _end_transfer(self, key) -> None:
        """Abandon a block-wise transfer the way its own timeout would, which
        also cancels that timeout."""
        responder = self.incoming_requests.pop(key)
        waiting = responder.deferred if responder is not None else None
        if waiting is not None and not waiting.called:
            waiting.errback(txerror.WaitingForClientTimedOut())

    def _forget_observer(self, message) -> None:
        key = (message.remote, message.token)
        for resource in self.observable_resources:
            resource.observers.pop(key, None)


def _ingest_routes(endpoint) -> dict:
    """Uri-Path segments -> ingest resource, for every ingest resource that
    txthings' own lookup would find at that path."""
    routes = {}
    for path, res in walk(endpoint.resource):
        # A subclass that renders POST its own way keeps txthings' path.
        if not isinstance(res, IngestResource) or (
                type(res).render_POST is not IngestResource.render_POST):
            continue
        segments = tuple(path.encode("utf-8").strip(b"/").split(b"/"))
        probe = coap.Message(code=coap.POST)
        probe.prepath, probe.postpath = [], list(segments)
        try:
            found = endpoint.getResourceFor(probe)
        except Exception:
            continue
        if found is res:
            routes[segments] = res
    return routes


def _is_next_block2(request, app_response) -> bool:
    """Whether *request* asks for the block after the last one sent."""
    wanted, sent = request.opt.block2, app_response.opt.block2
    if request.code != coap.GET or wanted is None or sent is None:
        return False
    next_offset = 2 ** (sent.size_exponent + 4) * (sent.block_number + 1)
    offset = 2 ** (wanted.size_exponent + 4) * wanted.block_number
    return offset == next_offset and offset < len(app_response.payload)


def _source(remote) -> str:
    host, port = remote
    host = getattr(host, "ipv4_mapped", None) or host
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


class CoapServer(Service):
    """Listens on the CoAP UDP port and feeds datagrams to a protocol.

    Binding ``::`` serves IPv6 and IPv4 (as mapped addresses) on one
    socket: we clear IPV6_V6ONLY ourselves rather than rely on the host's
    ``bindv6only`` default.
    """

    def __init__(self, protocol: GatewayProtocol, bind: str, port: int, reactor):
        self.protocol = protocol
        self.bind = bind
        self.port_number = port
        self.reactor = reactor
        self.port = None

    def startService(self) -> None:
        family = socket.AF_INET6 if ":" in self.bind else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            # Bursts from many devices arrive faster than one turn of the
            # reactor: a larger buffer turns them into latency, not loss.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
            sock.bind((self.bind, self.port_number))
            sock.setblocking(False)
            self.port = self.reactor.adoptDatagramPort(
                sock.fileno(), family, self.protocol, maxPacketSize=MAX_DATAGRAM)
        finally:
            sock.close()
        super().startService()
        # What exists once the gateway is up (modules, plugins, resources)
        # lives as long as the process: out of the garbage collector's way,
        # so its full collections, which stop the reactor, scan only what
        # requests left behind (tens of ms less at a time).
        gc.freeze()
        log.info("CoAP listening on {address}", address=_source((self.bind, self.address[1])))

    @property
    def address(self):
        host = self.port.getHost()
        return host.host, host.port

    def stopService(self):
        super().stopService()
        gc.unfreeze()  # what start-up made may be garbage from now on
        if self.port is not None:
            port, self.port = self.port, None
            return port.stopListening()
