"""The OpenSSL side of the DTLS server: one shared context, one Connection per peer.

:class:`ServerContext` configures OpenSSL for the RFC 7925 PSK profile and
hosts the callbacks OpenSSL makes into Python (the PSK lookup, the cookie
callbacks ``DTLSv1_listen`` insists on). :class:`Session` wraps one peer's
``SSL.Connection`` over memory BIOs: datagrams in, plaintext and datagrams
out, never a socket. :mod:`sense_gateway.coap.dtls` decides which session
a datagram belongs to and when sessions end.
"""

from __future__ import annotations

from typing import Callable

from OpenSSL import SSL
from OpenSSL._util import ffi as _ffi
from OpenSSL._util import lib as _lib
from twisted.logger import Logger

from sense_gateway.coap.dtls_records import DTLS_1_2, pack_datagrams

log = Logger()

#: RFC 7925 makes CCM-8 mandatory; OpenSSL 3 and later keep its 64-bit tag
#: below security level 1, hence @SECLEVEL=0 (which admits nothing else here).
CIPHERS = b"PSK-AES128-CCM8:PSK-AES128-CCM:@SECLEVEL=0"
#: The largest datagram we send: the IPv6 minimum MTU less the IPv6 and UDP
#: headers, so a flight crosses any path without IP fragmentation.
DATAGRAM_MTU = 1232
#: RFC 6347 4.1: a record holds at most 2^14 bytes of plaintext.
MAX_PLAINTEXT = 2 ** 14


class ServerContext:
    """The SSL context all sessions of one server share.

    OpenSSL calls back with only its ``SSL *``; since every call into
    OpenSSL goes through a :class:`Session` method that names itself
    :attr:`current` first, the callbacks know whom they are about without
    reaching into pyOpenSSL's private map of connections.
    """

    def __init__(self, psk_for: Callable[[str], bytes | None], identity_hint: bytes | None = None):
        self._psk_for = psk_for
        self.current: Session | None = None
        context = SSL.Context(SSL.DTLS_SERVER_METHOD)
        context.set_min_proto_version(DTLS_1_2)
        context.set_max_proto_version(DTLS_1_2)
        context.set_cipher_list(CIPHERS)
        # No tickets and no session cache: resuming a session would skip the
        # PSK callback, and with it the check that the identity still has a key.
        context.set_options(SSL.OP_NO_TICKET | SSL.OP_NO_RENEGOTIATION | SSL.OP_NO_QUERY_MTU
                            | SSL.OP_NO_COMPRESSION | SSL.OP_CIPHER_SERVER_PREFERENCE)
        context.set_session_cache_mode(SSL.SESS_CACHE_OFF)
        # Read and write buffers go back to the allocator between records:
        # most of what an idle session would otherwise hold.
        context.set_mode(SSL.MODE_RELEASE_BUFFERS)
        # The cookie was checked before any Connection existed (see
        # DTLSServer._client_hello); these only confirm it to DTLSv1_listen.
        context.set_cookie_generate_callback(lambda conn: self.current.hello_cookie)
        context.set_cookie_verify_callback(
            lambda conn, cookie: self.current is not None and cookie == self.current.hello_cookie)
        # pyOpenSSL has no PSK API; cryptography's bindings of the same
        # libssl do. The cffi callback must live as long as the context.
        self._psk_callback = _ffi.callback(
            "unsigned int(*)(SSL *, char *, unsigned char *, unsigned int)", self._psk)
        _lib.SSL_CTX_set_psk_server_callback(context._context, self._psk_callback)
        if identity_hint is not None:
            if not _lib.SSL_CTX_use_psk_identity_hint(context._context, identity_hint):
                raise ValueError("OpenSSL refused the PSK identity hint (at most 128 bytes)")
        self.context = context

    def __repr__(self):
        return "<DTLS ServerContext PSK>"

    def _psk(self, ssl, identity, psk, max_psk_len) -> int:
        # Called by OpenSSL: nothing may raise out of here, and the key goes
        # into OpenSSL's buffer and nowhere else.
        session = self.current
        if session is None:
            return 0
        try:
            claimed = _ffi.string(identity) if identity != _ffi.NULL else b""
            try:
                name = claimed.decode("utf-8")
            except UnicodeDecodeError:
                session.refusal = "undecodable_identity"
                return 0
            session.identity = name
            key = self._psk_for(name)
            if not key:
                session.refusal = "unknown_identity"
                return 0
            if not isinstance(key, (bytes, bytearray)) or len(key) > max_psk_len:
                session.refusal = "bad_key"
                log.error("the key for {identity!r} is not bytes of at most {limit} bytes",
                          identity=name, limit=max_psk_len)
                return 0
            _ffi.memmove(psk, bytes(key), len(key))
            return len(key)
        except BaseException as e:
            session.refusal = "lookup_error"
            # The type only: a message could quote whatever the store held.
            log.error("PSK lookup failed: {error}", error=type(e).__name__)
            return 0


class Session:
    """One peer's DTLS association over memory BIOs, in handshake or established.

    Methods that run OpenSSL raise ``SSL.Error`` when it ends the
    association (``SSL.ZeroReturnError`` for the peer's close_notify); what
    OpenSSL wrote meanwhile, alerts included, waits in :meth:`output`.
    """

    __slots__ = ("addr", "conn", "_owner", "identity", "established", "closed", "deadline",
                 "wakeup", "last_active", "hello_random", "hello_cookie", "refusal", "number",
                 "in_progress")

    def __init__(self, owner: ServerContext, addr: tuple, hello, deadline: float):
        self.addr = addr
        self._owner = owner
        self.conn = SSL.Connection(owner.context, None)
        self.conn.set_ciphertext_mtu(DATAGRAM_MTU)
        self.identity: str | None = None   # set by the PSK callback
        self.established = False
        self.closed = False
        self.deadline = deadline           # the handshake must be done by then
        self.wakeup: float | None = None   # the time it waits on the server's heap for
        self.last_active = 0.0
        # The ClientHello that started it, to tell its retransmissions from a new one.
        self.hello_random = hello.random
        self.hello_cookie = hello.cookie
        self.refusal: str | None = None    # why the PSK callback said no
        self.number = 0                    # unique for the server's lifetime
        self.in_progress: tuple = ()       # the keys counting it as a handshake in progress

    def __repr__(self):
        state = "established" if self.established else "handshake"
        return f"<DTLS session {self.addr!r} {state} identity={self.identity!r}>"

    def listen(self, datagram: bytes) -> None:
        """Take the ClientHello with its checked cookie; OpenSSL picks up from there."""
        self._owner.current = self
        try:
            self.conn.bio_write(datagram)
            self.conn.DTLSv1_listen()
        finally:
            self._owner.current = None

    def handshake(self, datagram: bytes | None = None) -> bool:
        """Advance the handshake; True once it is complete."""
        self._owner.current = self
        try:
            if datagram is not None:
                self.conn.bio_write(datagram)
            self.conn.do_handshake()
        except SSL.WantReadError:
            return False
        finally:
            self._owner.current = None
        if self.identity is None:
            # Only a resumed session skips the PSK callback, and resumption is off.
            raise SSL.Error("handshake completed without a PSK identity")
        return True

    def write(self, datagram: bytes) -> None:
        self.conn.bio_write(datagram)

    def read(self) -> bytes | None:
        """The next record's plaintext, or None when there is none."""
        self._owner.current = self
        try:
            return self.conn.recv(MAX_PLAINTEXT)
        except SSL.WantReadError:
            return None
        finally:
            self._owner.current = None

    def encrypt(self, plaintext: bytes) -> None:
        self.conn.send(plaintext)

    def close_notify(self) -> None:
        try:
            self.conn.shutdown()
        except SSL.Error:
            pass

    def retransmit_in(self) -> float | None:
        """Seconds until OpenSSL wants to resend its last flight (it keeps wall-clock time)."""
        return self.conn.DTLSv1_get_timeout()

    def handle_timeout(self) -> None:
        self._owner.current = self
        try:
            self.conn.DTLSv1_handle_timeout()
        finally:
            self._owner.current = None

    def output(self) -> list[bytes]:
        """The datagrams OpenSSL has written since last asked."""
        chunks = []
        while True:
            try:
                chunks.append(self.conn.bio_read(65536))
            except SSL.WantReadError:
                break
        return pack_datagrams(b"".join(chunks), DATAGRAM_MTU) if chunks else []
