"""How many DTLS handshakes may start, and from where: the per-source rate,
the handshakes in progress per address and per IPv6 /64, and the slots for
handshakes, where the oldest in progress gives way to a new one.

A part of :class:`~sense_gateway.coap.dtls.DTLSServer`, asked only after
the cookie exchange (:mod:`~sense_gateway.coap.dtls_admission`), so the
source is proven and spoofed addresses cannot fill its tables. It counts;
the server owns the sessions, ends the one that gives way and counts the
refusals.
"""

from __future__ import annotations

import ipaddress
from collections import Counter, OrderedDict

from sense_gateway.coap.dtls_openssl import Session
from sense_gateway.limits import TokenBuckets


def source_keys(host: str) -> tuple[str, ...]:
    """What a handshake from *host* counts against: the address, and for
    IPv6 its /64 too (one subscriber is easily given a whole /64)."""
    if ":" not in host or host.startswith("::ffff:"):
        return (host,)
    try:
        prefix = ipaddress.IPv6Network(f"{host.split('%')[0]}/64", strict=False)
    except ValueError:
        return (host,)
    return (host, str(prefix))


class HandshakeLimits:
    """Each source host may start ``per_source`` handshakes a second (burst
    the same, at least 1; the most recently seen max(4096, 4 x
    ``max_sessions``) hosts are remembered) and have
    ``in_progress_per_source`` in progress, eight times that from one IPv6
    /64. Handshakes in progress hold at most ``max_handshakes`` slots, and
    with established sessions at most ``max_sessions``."""

    def __init__(self, clock, max_sessions: int, max_handshakes: int, per_source: float,
                 in_progress_per_source: int):
        self.max_sessions = max_sessions
        self.max_handshakes = max_handshakes
        self.in_progress_per_source = in_progress_per_source
        self.rate = TokenBuckets(per_source, max(1.0, per_source), clock.seconds,
                                 max_keys=max(4096, 4 * max_sessions))
        # Handshakes in progress by source address and IPv6 /64, and all
        # of them oldest first.
        self._in_progress: Counter[str] = Counter()
        self._handshaking: OrderedDict[int, Session] = OrderedDict()

    def admit(self, host: str, associations: int, handshakes: int):
        """Whether a new handshake from *host* may start, with *associations*
        (sessions and handshakes) and *handshakes* (in progress) in place:
        (the refusal, or None; the handshake in progress to end for it, or
        None). Takes one of the host's tokens unless refused for rate."""
        if self.rate.take(host):
            return "rate", None
        limits = (self.in_progress_per_source, 8 * self.in_progress_per_source)
        if any(self._in_progress[key] >= limit for key, limit in zip(source_keys(host), limits)):
            return "source_busy", None
        # The oldest in progress gives way to the new one (a real handshake
        # is done in a few round trips; one that stalls is most likely not a
        # device), so peers that pass the cookie exchange and go quiet
        # cannot lock new devices out.
        full = associations >= self.max_sessions
        if (full or handshakes >= self.max_handshakes) and self._handshaking:
            return None, next(iter(self._handshaking.values()))
        return ("full" if full else None), None

    def started(self, session: Session) -> None:
        """Count *session*'s handshake (it has its ``number``) as in progress."""
        session.in_progress = keys = source_keys(session.addr[0])
        self._in_progress.update(keys)
        self._handshaking[session.number] = session

    def finished(self, session: Session) -> None:
        """*session*'s handshake is no longer in progress (done, failed or
        ended); nothing if it was not."""
        self._handshaking.pop(session.number, None)
        keys, session.in_progress = session.in_progress, ()
        for key in keys:
            self._in_progress[key] -= 1
            if not self._in_progress[key]:
                del self._in_progress[key]
