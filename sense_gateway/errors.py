"""Errors a request can end in, each carrying the CoAP response it becomes.

The CoAP layer maps any :class:`RequestError` to its code and a short
diagnostic payload in one place; everything else raises these.
"""

from __future__ import annotations

# CoAP response codes as the single byte on the wire (class << 5 | detail).
BAD_REQUEST = 0x80  # 4.00
UNAUTHORIZED = 0x81  # 4.01
BAD_OPTION = 0x82  # 4.02
FORBIDDEN = 0x83  # 4.03
NOT_FOUND = 0x84  # 4.04
METHOD_NOT_ALLOWED = 0x85  # 4.05
REQUEST_ENTITY_TOO_LARGE = 0x8D  # 4.13
UNSUPPORTED_CONTENT_FORMAT = 0x8F  # 4.15
TOO_MANY_REQUESTS = 0x9D  # 4.29 (RFC 8516)
INTERNAL_SERVER_ERROR = 0xA0  # 5.00
SERVICE_UNAVAILABLE = 0xA3  # 5.03


def code_text(code: int) -> str:
    """``0x84`` -> ``"4.04"``."""
    return f"{code >> 5}.{code & 0x1F:02d}"


class RequestError(Exception):
    """A request that gets a CoAP error response instead of being stored."""

    code = BAD_REQUEST

    def __init__(self, diagnostic: str):
        super().__init__(diagnostic)
        self.diagnostic = diagnostic

    @property
    def payload(self) -> bytes:
        # Diagnostic payloads stay short (RFC 7252 5.5.2: they are for
        # humans, and an unauthenticated peer must not get an amplifier).
        return self.diagnostic.encode("utf-8", "replace")[:120]


class DecodeError(RequestError):
    """The payload is not valid in the format its Content-Format names."""


class ValidationError(RequestError):
    """The payload decoded but breaks a rule (missing id, bad field...)."""


class UnsupportedFormat(RequestError):
    """No decoder handles this Content-Format on this path."""

    code = UNSUPPORTED_CONTENT_FORMAT


class TooLarge(RequestError):
    """The payload is over the configured size limit."""

    code = REQUEST_ENTITY_TOO_LARGE


class Unauthorized(RequestError):
    """The request needs an authenticated peer (a DTLS session) it has not."""

    code = UNAUTHORIZED


class Forbidden(RequestError):
    """The peer may not do this: write as another device, or create more
    devices than the limits allow."""

    code = FORBIDDEN


class Unavailable(RequestError):
    """The queue cannot take the message now; the device should retry."""

    code = SERVICE_UNAVAILABLE

    def __init__(self, diagnostic: str, max_age: int = 5):
        super().__init__(diagnostic)
        self.max_age = max_age


def failure_text(error: BaseException, limit: int = 300) -> str:
    """Why a part failed, short, for ``/healthz`` and ``/api/stats``: an
    :class:`Unavailable` says it in its own words, anything else with its
    type."""
    text = str(error) if isinstance(error, Unavailable) else f"{type(error).__name__}: {error}"
    return text[:limit]


class ConfigError(Exception):
    """A configuration value is wrong; the message names the key."""


class PluginLoadError(Exception):
    """A plugin could not be imported or registered.

    The message is one line naming the plugin (file or distribution) and
    the cause, so start-up fails readably.
    """
