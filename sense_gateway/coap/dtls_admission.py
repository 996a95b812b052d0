"""Who may start a DTLS handshake, without the server keeping state: stateless cookies.

The cookie proves that a client can receive at the address it sends from
(RFC 6347 4.2.1) without the server remembering anything about it; only a
ClientHello that echoes a valid cookie can create state, and even then the
limits of :mod:`~sense_gateway.coap.dtls_limits` (a per-source rate,
handshakes in progress per source, slots) decide whether that source may
start another handshake now.
"""

from __future__ import annotations

import hashlib
import hmac
import os

from sense_gateway.coap.dtls_records import COOKIE_LENGTH, ClientHello


class CookieJar:
    """Makes and checks HelloVerifyRequest cookies.

    A cookie is an HMAC-SHA256, cut to :data:`COOKIE_LENGTH` bytes, over
    the peer's address and the ClientHello parameters a client must repeat
    (version, random, session id, suites, compression), under a secret
    drawn at start-up. The secret is replaced every ``rotate_every``
    seconds; the one before stays valid for ``grace`` seconds past its
    term, so a client answering just before a rotation is not bounced. A
    cookie therefore lives at most ``rotate_every + grace`` seconds, which
    bounds how long a captured ClientHello can be replayed.

    Rotation happens when a cookie is made or checked, not on a timer: an
    idle server keeps no timer running for it.
    """

    def __init__(self, clock, rotate_every: float = 30.0, grace: float = 30.0):
        self._clock = clock
        self.rotate_every = rotate_every
        self.grace = grace
        self._secret = os.urandom(32)
        self._since = clock.seconds()
        self._previous: bytes | None = None
        self._previous_until = 0.0

    def __repr__(self):
        return f"<CookieJar rotate_every={self.rotate_every} grace={self.grace}>"

    def _rotate(self, now: float) -> None:
        due = self._since + self.rotate_every
        if now < due:
            return
        # Cookies made with the old secret were all made before it was due.
        self._previous, self._previous_until = self._secret, due + self.grace
        self._secret, self._since = os.urandom(32), now

    @staticmethod
    def _mac(secret: bytes, addr: tuple, hello: ClientHello) -> bytes:
        peer = "\0".join(str(part) for part in addr).encode()
        return hmac.digest(secret, peer + b"\0" + hello.parameters, hashlib.sha256)[:COOKIE_LENGTH]

    def make(self, addr: tuple, hello: ClientHello) -> bytes:
        """The cookie to send to ``addr`` in answer to ``hello``."""
        self._rotate(self._clock.seconds())
        return self._mac(self._secret, addr, hello)

    def valid(self, addr: tuple, hello: ClientHello) -> bool:
        """Whether ``hello`` echoes a cookie we made for ``addr`` and these parameters."""
        if len(hello.cookie) != COOKIE_LENGTH:
            return False
        now = self._clock.seconds()
        self._rotate(now)
        if hmac.compare_digest(hello.cookie, self._mac(self._secret, addr, hello)):
            return True
        return (self._previous is not None and now < self._previous_until
                and hmac.compare_digest(hello.cookie, self._mac(self._previous, addr, hello)))

