"""A DTLS 1.2 PSK server for many peers on one UDP socket, driven by datagrams.

:class:`DTLSServer` sits between a UDP transport and the CoAP message
layer: the transport hands it every datagram, it hands back one decrypted
CoAP message at a time with the PSK identity that authenticated it, and it
encrypts what the message layer sends. OpenSSL does the cryptography over
memory BIOs (:mod:`~sense_gateway.coap.dtls_openssl`); this module decides
which datagram goes where and when state may be created (after the
stateless cookie exchange, :mod:`~sense_gateway.coap.dtls_admission`, and
within the limits of :mod:`~sense_gateway.coap.dtls_limits`), and keeps
one timer for every session (:mod:`~sense_gateway.coap.dtls_timing`). References: RFC 6347 (DTLS 1.2),
RFC 7925 (its IoT profile), RFC 7252 section 9 (CoAP over DTLS).
"""

from __future__ import annotations

import itertools
from collections import Counter, OrderedDict
from typing import Callable

from OpenSSL import SSL
from twisted.logger import Logger

from sense_gateway.coap.dtls_admission import CookieJar
from sense_gateway.coap.dtls_limits import HandshakeLimits
from sense_gateway.coap.dtls_timing import Timing
from sense_gateway.coap.dtls_openssl import CIPHERS, DATAGRAM_MTU, MAX_PLAINTEXT, ServerContext, Session
from sense_gateway.limits import TokenBuckets
from sense_gateway.coap.dtls_records import (
    APPLICATION_DATA, acceptable_during_handshake, hello_verify_request, parse_client_hello,
    split_records,
)

__all__ = ["CIPHERS", "DATAGRAM_MTU", "MAX_PLAINTEXT", "DTLSServer"]

log = Logger()

def _peer(addr) -> str:
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class DTLSServer(Timing):
    """Sans-IO DTLS 1.2 server with pre-shared keys, for every peer of one socket.

    Set :attr:`send` (write one datagram to an address) and :attr:`deliver`
    (take one plaintext CoAP message, its address and PSK identity), then
    feed every datagram to :meth:`datagram_received`. ``psk_for`` maps an
    identity to its key (bytes) or None; OpenSSL calls it synchronously
    during the handshake, so it must answer from memory.

    Limits: ``max_sessions`` associations (established and in handshake)
    at once; a handshake must finish within ``handshake_timeout`` seconds;
    an established session without application data either way for
    ``idle_timeout`` seconds is closed; each source host may start
    ``handshakes_per_source`` handshakes a second. Handshakes in progress
    hold at most ``max_handshakes`` of the slots (half by default), at
    most ``handshakes_in_progress_per_source`` from one address and eight
    times that from one IPv6 /64; when the slots are taken, the oldest
    handshake in progress gives way to a new one. One identity holds at most
    ``max_sessions_per_identity`` established sessions; a newer one ends
    its oldest. New handshakes past a limit are refused and counted in
    :attr:`counters`; sessions in place go on.
    """

    send: Callable[[bytes, tuple], None]
    deliver: Callable[[bytes, tuple, str], None]

    def __init__(self, psk_for: Callable[[str], bytes | None], clock, *,
                 max_sessions: int = 1000, handshake_timeout: float = 10.0,
                 idle_timeout: float = 300.0, handshakes_per_source: float = 5.0,
                 identity_hint: bytes | None = None, max_handshakes: int | None = None,
                 handshakes_in_progress_per_source: int = 4,
                 max_sessions_per_identity: int = 4):
        if handshakes_per_source <= 0:
            raise ValueError("handshakes_per_source must be positive")
        self._clock = clock
        self.max_sessions = max_sessions
        self.max_sessions_per_identity = max_sessions_per_identity
        # New handshakes per source host and slots for them, asked after the
        # cookie (so a spoofer cannot fill the tables with addresses it does
        # not hold).
        self._limits = HandshakeLimits(clock, max_sessions,
                                       max_handshakes or max(1, max_sessions // 2),
                                       handshakes_per_source, handshakes_in_progress_per_source)
        # Established sessions of each identity, oldest first.
        self._by_identity: dict[str, OrderedDict] = {}
        self._numbers = itertools.count(1)
        self._log_budget = TokenBuckets(5, 20, clock.seconds)
        self.handshake_timeout = handshake_timeout
        self.idle_timeout = idle_timeout
        self.counters: Counter = Counter()
        self._openssl = ServerContext(psk_for, identity_hint)
        self._cookies = CookieJar(clock)
        # By peer address. A primary session is established or in handshake;
        # a successor is a handshake from the address of an established
        # session, which replaces it only once it completes (RFC 6347 4.2.8),
        # so a replayed ClientHello cannot end a session.
        self._sessions: dict[tuple, Session] = {}
        self._successors: dict[tuple, Session] = {}
        # Established sessions, least recently active first: the first is
        # always the next to expire.
        self._idle: OrderedDict[tuple, Session] = OrderedDict()
        # Handshakes by next wake-up (retransmission or deadline); entries
        # whose session has moved on are skipped when they come up.
        self._wakeups: list = []
        self._order = itertools.count()
        self._timer = None
        self._timer_at = 0.0
        self._stopped = False

    def __repr__(self):
        return (f"<DTLSServer sessions={self.session_count()} "
                f"handshakes={self.handshake_count()} max_sessions={self.max_sessions}>")

    def session_count(self) -> int:
        """Established sessions."""
        return len(self._idle)

    def handshake_count(self) -> int:
        """Handshakes in progress (each passed the cookie exchange)."""
        return len(self._sessions) - len(self._idle) + len(self._successors)

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        """Take one UDP datagram from ``addr``; never raises."""
        if self._stopped:
            return
        try:
            self._route(data, addr)
        except Exception:
            self.counters["internal_errors"] += 1
            log.failure("DTLS datagram from {peer} not handled", peer=_peer(addr))
        self._schedule()

    def send_to(self, plaintext: bytes, addr: tuple) -> bool:
        """Encrypt ``plaintext`` as one record to ``addr``; False if it has no session."""
        if len(plaintext) > MAX_PLAINTEXT:
            raise ValueError(f"a DTLS record holds at most {MAX_PLAINTEXT} bytes")
        session = self._sessions.get(addr)
        if session is None or not session.established or self._stopped:
            return False
        try:
            session.encrypt(plaintext)
        except SSL.Error:
            self._flush(session)
            self._end(session, "sessions_failed")
            return False
        self._flush(session)
        self._touch(session)
        self.counters["records_sent"] += 1
        return True

    def end_sessions(self, identity: str) -> int:
        """Close every session and handshake of ``identity``; how many there were."""
        ended = [s for s in itertools.chain(self._sessions.values(), self._successors.values())
                 if s.identity == identity]
        for session in ended:
            self._close(session, "sessions_revoked")
        if ended:
            log.info("ended {count} DTLS sessions of {identity!r}", count=len(ended), identity=identity)
            self._schedule()
        return len(ended)

    def stop(self) -> None:
        """Close every session (telling established peers) and stop the timer."""
        for session in list(itertools.chain(self._sessions.values(), self._successors.values())):
            self._close(session, "sessions_stopped")
        self._stopped = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._wakeups.clear()

    # -- which datagram goes where ---------------------------------------------

    def _route(self, data: bytes, addr: tuple) -> None:
        records = split_records(data)
        if records is None:
            self.counters["datagrams_not_dtls"] += 1
            return
        first = records[0]
        if len(records) == 1 and first.epoch == 0:
            hello = parse_client_hello(data, first)
            if hello is not None:
                self._client_hello(data, addr, hello)
                return
        current = self._sessions.get(addr)
        successor = self._successors.get(addr)
        if current is None and successor is None:
            self.counters["records_dropped"] += len(records)
            return
        delivered = False
        if successor is not None and (first.epoch == 0 or first.content_type != APPLICATION_DATA):
            # The new handshake's flights start in epoch 0; its Finished and
            # alerts share epoch 1 with the old session's records. A record
            # fed to the wrong one fails its MAC there and is dropped, so all
            # but application data goes to both.
            if acceptable_during_handshake(data, records):
                self._drive(successor, data)
                delivered = True
            if first.epoch == 0 or self._sessions.get(addr) is not current:
                current = None
        if current is not None and not current.closed and (
                current.established or acceptable_during_handshake(data, records)):
            only_data = current.established and all(
                r.content_type == APPLICATION_DATA for r in records)
            self._drive(current, data, len(records) if only_data else 0)
            delivered = True
        if not delivered:
            self.counters["records_dropped"] += len(records)

    def _client_hello(self, data: bytes, addr: tuple, hello) -> None:
        current = self._sessions.get(addr)
        pending = self._successors.get(addr)
        if pending is None and current is not None and not current.established:
            pending = current
        for known in (pending, current):
            if (known is not None and known.hello_random == hello.random
                    and known.hello_cookie == hello.cookie):
                if known.established:
                    # A late copy of the ClientHello that made this session.
                    self.counters["records_dropped"] += 1
                else:
                    # A retransmission: our answer was lost, OpenSSL resends it.
                    self._drive(known, data)
                return
        if not self._cookies.valid(addr, hello):
            self._send(hello_verify_request(hello, self._cookies.make(addr, hello)), addr)
            self.counters["cookies_sent"] += 1
            return
        # The client can receive at addr. Another ClientHello from it means
        # it started over (restarted, or gave up on the attempt in progress).
        if pending is not None:
            self._end(pending, "handshakes_abandoned")
            current = self._sessions.get(addr)
        refusal, gives_way = self._limits.admit(
            addr[0], len(self._sessions) + len(self._successors), self.handshake_count())
        if refusal is not None:
            self._refuse(refusal, addr)
            return
        if gives_way is not None:
            self._end(gives_way, "handshakes_evicted")
        session = Session(self._openssl, addr, hello, self._clock.seconds() + self.handshake_timeout)
        session.number = next(self._numbers)
        self._limits.started(session)
        try:
            session.listen(data)
        except SSL.Error:
            # OpenSSL read the ClientHello differently from us: refused,
            # and no longer in progress for its source.
            self._flush(session)
            self._refuse("failed", addr, session)
            return
        if current is not None and current.established:
            self._successors[addr] = session
        else:
            self._sessions[addr] = session
        self.counters["handshakes_started"] += 1
        self._drive(session)

    def _refuse(self, reason: str, addr, session: Session | None = None) -> None:
        """Count a handshake refused before it started, or one that failed (with its session)."""
        self.counters["handshakes_refused"] += 1
        self.counters["refused_" + reason] += 1
        if not self._log_budget.take("refused"):  # counted; a few lines a second at most
            log.debug("DTLS handshake from {peer} as {identity!r} refused: {reason}",
                      peer=_peer(addr), identity=session.identity if session else None,
                      reason=reason)
        if session is not None:
            self._remove(session)

    # -- one session -------------------------------------------------------------

    def _drive(self, session: Session, data: bytes | None = None,
               application_records: int = 0) -> None:
        """Give OpenSSL the datagram, then act on what it made of it.

        *application_records*: an established session's datagram of only
        that many data records: that many reads at most, and reading data
        writes nothing (a failure raises and is flushed)."""
        try:
            if not session.established:
                if not session.handshake(data):
                    self._flush(session)
                    self._arm(session)
                    return
                self._established(session)
            elif data is not None:
                session.write(data)
            reads = application_records or -1  # -1: until there is none
            while reads and not session.closed:
                plaintext = session.read()
                if plaintext is None:
                    break
                self._deliver(session, plaintext)
                reads -= 1
        except SSL.ZeroReturnError:
            self._flush(session)
            self._end(session, "sessions_closed_by_peer")
            return
        except SSL.Error:
            # A fatal alert, received or sent; OpenSSL's own alert goes out first.
            self._flush(session)
            if session.established:
                self._end(session, "sessions_failed")
            else:
                self._refuse(session.refusal or "failed", session.addr, session)
            return
        if not application_records:
            self._flush(session)

    def _deliver(self, session: Session, plaintext: bytes) -> None:
        self.counters["records_delivered"] += 1
        self._touch(session)
        try:
            self.deliver(plaintext, session.addr, session.identity)
        except Exception:
            self.counters["deliver_errors"] += 1
            log.failure("delivering a DTLS record from {peer} failed", peer=_peer(session.addr))

    def _established(self, session: Session) -> None:
        addr = session.addr
        if self._successors.get(addr) is session:
            del self._successors[addr]
            old = self._sessions.get(addr)
            if old is not None:
                self._end(old, "sessions_replaced")
        session.established = True
        self._limits.finished(session)
        self._sessions[addr] = session
        self._idle[addr] = session
        session.last_active = self._clock.seconds()
        self.counters["handshakes_completed"] += 1
        mine = self._by_identity.setdefault(session.identity, OrderedDict())
        mine[addr] = session
        while len(mine) > self.max_sessions_per_identity:
            _, oldest = next(iter(mine.items()))
            self._close(oldest, "sessions_over_identity_limit")
        log.info("DTLS session with {peer} as {identity!r}, {cipher}", peer=_peer(addr),
                 identity=session.identity, cipher=session.conn.get_cipher_name())

    def _touch(self, session: Session) -> None:
        session.last_active = self._clock.seconds()
        if self._idle.get(session.addr) is session:
            self._idle.move_to_end(session.addr)

    def _close(self, session: Session, counter: str) -> None:
        """End a session, telling an established peer with close_notify."""
        if session.established and not session.closed:
            session.close_notify()
            self._flush(session)
        self._end(session, counter)

    def _end(self, session: Session, counter: str) -> None:
        self.counters[counter] += 1
        self._remove(session)

    def session_number(self, addr: tuple) -> int | None:
        """The established session at *addr*, as a number no other session
        of this server gets (the message layer keys exchanges by it)."""
        session = self._sessions.get(addr)
        return session.number if session is not None and session.established else None

    def _remove(self, session: Session) -> None:
        session.closed = True
        self._limits.finished(session)
        mine = self._by_identity.get(session.identity)
        if mine is not None and mine.get(session.addr) is session:
            del mine[session.addr]
            if not mine:
                del self._by_identity[session.identity]
        addr = session.addr
        if self._sessions.get(addr) is session:
            del self._sessions[addr]
            self._idle.pop(addr, None)
        if self._successors.get(addr) is session:
            del self._successors[addr]

    def _flush(self, session: Session) -> None:
        for datagram in session.output():
            self._send(datagram, session.addr)

    def _send(self, datagram: bytes, addr) -> None:
        try:
            self.send(datagram, addr)
        except Exception as e:
            self.counters["send_errors"] += 1
            log.debug("cannot send to {peer}: {error}", peer=_peer(addr), error=e)
