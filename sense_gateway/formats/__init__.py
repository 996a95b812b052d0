"""Payload formats: what a decoder plugin registers.

Built-in formats live in this package as plugins of their own; a
third-party format returns :class:`Format` objects from its
``sense_register_formats`` hook.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from sense_gateway.envelope import Decoded, RequestContext

#: Registered CoAP Content-Format numbers the built-ins use.
TEXT_PLAIN = 0
JSON = 50
CBOR = 60
SENML_JSON = 110
SENML_CBOR = 112


@dataclass(frozen=True)
class Format:
    """A payload format the gateway accepts.

    ``decode(payload, context)`` returns :class:`Decoded` or raises
    :class:`~sense_gateway.errors.DecodeError` with a short reason.
    ``content_formats`` may include ``None`` for requests that carry no
    Content-Format option. Each path in ``paths`` becomes a POST resource.
    """

    name: str
    content_formats: tuple[int | None, ...]
    paths: tuple[str, ...]
    decode: Callable[[bytes, RequestContext], Decoded]
    description: str = ""
