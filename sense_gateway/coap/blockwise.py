"""Block-wise uploads (RFC 7959 Block1), assembled within bounds.

A device whose readings do not fit in one datagram sends them block by
block; :class:`Uploads` puts them together, one upload per (path, peer),
up to ``max_payload`` bytes, at most ``max_uploads`` at a time and
``max_per_source`` from one source address (any port), so one peer cannot
take every slot. An upload nobody continues is forgotten after
``lifetime`` seconds (RFC 7252 MAX_TRANSMIT_WAIT), lazily: no timer per
upload.
"""

from __future__ import annotations

from collections import Counter

from sense_gateway.coap.message import (
    BAD_REQUEST, REQUEST_ENTITY_INCOMPLETE, REQUEST_ENTITY_TOO_LARGE, SERVICE_UNAVAILABLE,
    MAX_AGE, SIZE1, Block,
)

#: RFC 7252 MAX_TRANSMIT_WAIT: how long to wait for the next block
UPLOAD_LIFETIME = 93.0


class BlockError(Exception):
    """A block that ends its upload with an error response."""

    def __init__(self, code: int, reason: str, options=()):
        super().__init__(reason)
        self.code, self.reason, self.options = code, reason, options


class _Upload:
    __slots__ = ("parts", "size", "expires", "content_format")

    def __init__(self, content_format, expires):
        self.parts: list[bytes] = []
        self.size = 0
        self.content_format = content_format
        self.expires = expires


class Uploads:
    """Block-wise uploads being assembled, keyed ``(path, host, port)``."""

    def __init__(self, max_payload: int, clock, *, max_uploads: int = 1024,
                 max_per_source: int = 16, lifetime: float = UPLOAD_LIFETIME):
        self.max_payload = max_payload
        self.clock = clock
        self.max_uploads = max_uploads
        self.max_per_source = max_per_source
        self.lifetime = lifetime
        self._uploads: dict[tuple, _Upload] = {}
        self._per_source: Counter[str] = Counter()

    def __len__(self) -> int:
        return len(self._uploads)

    def __contains__(self, key) -> bool:
        return key in self._uploads

    def discard(self, key) -> None:
        """End the upload at *key*, if any (a plain request to the same
        path from the same peer ends it, as does an error)."""
        if self._uploads.pop(key, None) is not None:
            host = key[1]
            self._per_source[host] -= 1
            if not self._per_source[host]:
                del self._per_source[host]

    def _expire(self, now: float) -> None:
        for key in [k for k, u in self._uploads.items() if u.expires <= now]:
            self.discard(key)

    def receive(self, key, block: Block, payload: bytes, content_format, size1):
        """Take one block of the upload at *key*.

        Returns ``None`` when more blocks are expected (the caller answers
        2.31 Continue), or ``(payload, content_format)`` once the upload is
        complete. Raises :class:`BlockError` for a block that cannot be
        taken; the upload is then abandoned.
        """
        now = self.clock.seconds()
        if block.szx == 7:
            self.discard(key)
            raise BlockError(BAD_REQUEST, "reserved block size (SZX 7)")
        limit = ((SIZE1, self.max_payload),)
        if (size1 is not None and size1 > self.max_payload) or (
                block.offset + len(payload) > self.max_payload):
            self.discard(key)
            raise BlockError(REQUEST_ENTITY_TOO_LARGE, f"over {self.max_payload} bytes", limit)
        if block.more and len(payload) != block.size:
            self.discard(key)
            raise BlockError(BAD_REQUEST, f"block {block.number} is not {block.size} bytes")
        upload = self._uploads.get(key)
        if upload is not None and upload.expires <= now:
            self.discard(key)
            upload = None
        if block.number == 0:
            if upload is None:
                self._admit(key, now)
            upload = self._uploads[key] = _Upload(content_format, now + self.lifetime)
        elif upload is None or block.offset != upload.size:
            # RFC 7959 2.3: a block that does not continue the upload.
            expected = upload.size if upload is not None else 0
            self.discard(key)
            raise BlockError(REQUEST_ENTITY_INCOMPLETE, f"expected the block at byte {expected}")
        upload.parts.append(payload)
        upload.size += len(payload)
        upload.expires = now + self.lifetime
        if block.more:
            return None
        self.discard(key)
        return b"".join(upload.parts), upload.content_format

    def _admit(self, key, now: float) -> None:
        """Make room for a new upload, or refuse it with 5.03."""
        host = key[1]
        if len(self._uploads) >= self.max_uploads or (
                self._per_source[host] >= self.max_per_source):
            self._expire(now)
        if len(self._uploads) >= self.max_uploads:
            reason = "too many block-wise transfers"
        elif self._per_source[host] >= self.max_per_source:
            reason = "too many block-wise transfers from this address"
        else:
            self._per_source[host] += 1
            return
        raise BlockError(SERVICE_UNAVAILABLE, reason, ((MAX_AGE, 10),))
