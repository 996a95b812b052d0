"""A DTLS 1.2 PSK client over memory BIOs (OpenSSL's, through pyOpenSSL),
for the bench's simulated devices and for the tests: datagrams in,
datagrams out, no socket of its own."""

from __future__ import annotations

from OpenSSL import SSL
from OpenSSL._util import ffi, lib

from sense_gateway.coap.dtls_openssl import CIPHERS, DATAGRAM_MTU
from sense_gateway.coap.dtls_records import DTLS_1_2


class DTLSClient:
    """A DTLS 1.2 PSK client driven by hand: datagrams in, datagrams out."""

    def __init__(self, identity: bytes | str, key: bytes, ciphers: bytes = CIPHERS,
                 max_version: int = DTLS_1_2, min_version: int | None = None,
                 resume: DTLSClient | None = None):
        """``resume``: offer that client's session, to try an abbreviated handshake."""
        self.identity = identity.encode() if isinstance(identity, str) else identity
        self.key = key
        if resume is not None:
            # A session resumes only with the context that made it (and its callback).
            context = resume._context
        else:
            context = SSL.Context(SSL.DTLS_CLIENT_METHOD)
            context.set_cipher_list(ciphers)
            context.set_max_proto_version(max_version)
            if min_version is not None:
                context.set_min_proto_version(min_version)
            context.set_options(SSL.OP_NO_QUERY_MTU)
            self._callback = ffi.callback(
                "unsigned int(*)(SSL *, char *, char *, unsigned int, unsigned char *, unsigned int)",
                self._psk)
            lib.SSL_CTX_set_psk_client_callback(context._context, self._callback)
        self._context = context
        self.conn = SSL.Connection(context, None)
        self.conn.set_ciphertext_mtu(DATAGRAM_MTU)
        self.conn.set_connect_state()
        if resume is not None:
            self.conn.set_session(resume.conn.get_session())
        self.received: list[bytes] = []
        self.established = False
        self.closed_by_server = False
        self.error: Exception | None = None
        self.hints_seen: list[bytes | None] = []

    def __repr__(self):
        return f"<DTLSClient {self.identity!r} established={self.established}>"

    def _psk(self, ssl, hint, identity, max_identity, psk, max_psk):
        self.hints_seen.append(None if hint == ffi.NULL else ffi.string(hint))
        ffi.memmove(identity, self.identity + b"\0", len(self.identity) + 1)
        ffi.memmove(psk, self.key, len(self.key))
        return len(self.key)

    def _output(self) -> list[bytes]:
        out = b""
        while True:
            try:
                out += self.conn.bio_read(65536)
            except SSL.WantReadError:
                break
        if not out:
            return []
        # One datagram per flight is what OpenSSL would have sent here too.
        return [out]

    def _step(self) -> None:
        try:
            if not self.established:
                self.conn.do_handshake()
                self.established = True
            while True:
                self.received.append(self.conn.recv(16384))
        except SSL.WantReadError:
            pass
        except SSL.ZeroReturnError:
            self.closed_by_server = True
        except SSL.Error as e:
            self.error = e

    def start(self) -> list[bytes]:
        """The first flight: a ClientHello without a cookie."""
        self._step()
        return self._output()

    def receive(self, datagrams) -> list[bytes]:
        """Take the server's datagrams; what the client sends in answer."""
        for datagram in datagrams:
            self.conn.bio_write(datagram)
            self._step()
        return self._output()

    def send(self, plaintext: bytes) -> list[bytes]:
        self.conn.send(plaintext)
        return self._output()

    def close(self) -> list[bytes]:
        """close_notify, as a client going away politely sends it."""
        self.conn.shutdown()
        return self._output()

    def renegotiate(self) -> list[bytes]:
        self.conn.renegotiate()
        self._step()
        return self._output()
