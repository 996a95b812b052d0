"""Device credentials: the pre-shared key each device proves itself with
over DTLS (docs/security.md).

A :class:`CredentialStore` lives with the registry backend (the embedded
SQLite file, or DynamoDB in AWS; a plugin registry may bring its own,
``sense_register_credential_stores``). Stores are synchronous: the
``sense devices`` commands call them directly, the gateway only from its
directory's own thread. Every change (a key set, rotated or revoked) gets
the next number of a store-wide serial, so a gateway polls one number to
learn that something changed and then reads only what did. Keys are bytes
and never leave the store except to the gateway's memory: no repr, log
line or error message shows one.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

#: bytes of a generated key (RFC 7925 asks for at least 128 bits)
GENERATED_KEY_BYTES = 16
#: longest key accepted (OpenSSL's PSK limit)
MAX_KEY_BYTES = 64


@dataclass(slots=True)
class Credential:
    """One device's credential; ``key`` is ``None`` once revoked."""

    device: str
    key: bytes | None = field(repr=False)
    changed: float
    serial: int

    @property
    def revoked(self) -> bool:
        return self.key is None


class CredentialStore:
    """What a credential backend provides."""

    def set_key(self, device: str, key: bytes) -> Credential:
        """Give *device* this key (a new credential, or a rotation: the old
        key stops working)."""
        raise NotImplementedError

    def revoke(self, device: str) -> bool:
        """Revoke *device*'s credential; ``False`` if it had none."""
        raise NotImplementedError

    def serial(self) -> int:
        """The number of the latest change (0: none yet); cheap to poll."""
        raise NotImplementedError

    def changes(self, since: int) -> list[Credential]:
        """Every credential changed after serial *since*, revoked ones
        included (``key`` ``None``)."""
        raise NotImplementedError

    def close(self) -> None:
        pass


def generate_key() -> bytes:
    return secrets.token_bytes(GENERATED_KEY_BYTES)


def parse_key_hex(text: str) -> bytes:
    """A key given as hex on the command line; ``ValueError`` says why not
    (without repeating the key)."""
    try:
        key = bytes.fromhex(text.strip())
    except ValueError:
        raise ValueError("--psk-hex: not hexadecimal") from None
    if not 1 <= len(key) <= MAX_KEY_BYTES:
        raise ValueError(f"--psk-hex: a key is 1 to {MAX_KEY_BYTES} bytes, got {len(key)}")
    return key
