"""Requests for txthings' resource tree: ``/time``, ``/.well-known/core``
and the resources plugins add.

txthings stays our resource layer: resources are its ``CoAPResource``
objects, found by its ``Endpoint`` and rendered by their ``render_GET``
and friends, which get a txthings ``Message`` and return a Deferred
response. :class:`ResourceTree` builds that request from the message we
parsed (options typed the way txthings' own option table would, Accept
among them), turns the response back into code, options and payload for
the message layer, and does what txthings' protocol used to do around the
resource: observations (RFC 7641) and large responses sent in blocks
(RFC 7959 Block2, stateless: each block request renders again).
"""

from __future__ import annotations

from ipaddress import ip_address

from twisted.internet import defer
from twisted.logger import Logger
from txthings import coap as txcoap
from txthings import error as txerror

from sense_gateway.coap.message import (
    BAD_REQUEST, BLOCK, BLOCK1, BLOCK2, GET, INTERNAL_SERVER_ERROR, METHOD_NOT_ALLOWED, NOT_FOUND,
    OBSERVE, OPTIONS, SIZE2, STRING, UINT, Block,
)

log = Logger()

#: largest Block2 size we send (64 bytes, SZX 2): an unauthenticated peer
#: never gets much more than it sent (RFC 7252 11.3)
MAX_BLOCK_SZX = 2

_VALID, _CONTENT = 0x43, 0x45


def txthings_request(request, payload: bytes | None = None) -> txcoap.Message:
    """A txthings request built from what the message layer parsed."""
    message = request.message
    tx = txcoap.Message(mtype=message.mtype, mid=message.mid, code=message.code,
                        payload=message.payload if payload is None else payload,
                        token=message.token)
    for number, value in message.all_options():
        fmt = OPTIONS[number].format
        if fmt == UINT:
            option = txcoap.UintOption(number, value)
        elif fmt == BLOCK:
            option = txcoap.BlockOption(number, tuple(value))
        elif fmt == STRING:
            option = txcoap.StringOption(number, value)
        else:
            option = txcoap.OpaqueOption(number, value)
        tx.opt.addOption(option)
    tx.remote = (ip_address(request.host), request.port)
    tx.addr = request.addr  # as received: where answers go
    tx.prepath, tx.postpath = [], list(message.path)
    # What plugins may want to know about the peer.
    tx.transport, tx.identity = request.transport, request.identity
    return tx


def _options(response: txcoap.Message) -> list:
    """A txthings response's options, typed as ours (Observe is ours to set)."""
    out = []
    for option in response.opt.optionList():
        if option.number == OBSERVE:
            continue
        value = option.value
        if option.number in (BLOCK1, BLOCK2):
            value = Block(*value)
        elif isinstance(value, str):
            value = value.encode("utf-8")
        out.append((option.number, value))
    return out


class _Observation:
    """One observer of one resource (txthings calls ``trigger()`` on every
    observer when the resource's state changes)."""

    def __init__(self, tree, layer, request, resource, key):
        self.tree, self.layer, self.resource, self.key = tree, layer, resource, key
        self.original_request = request

    def trigger(self) -> None:
        self.tree.notify(self)

    def end(self) -> None:
        if self.resource.observers.get(self.key) is self:
            del self.resource.observers[self.key]


class ResourceTree:
    """Render requests on a txthings endpoint and answer through the layer."""

    def __init__(self, endpoint, *, max_observers: int = 256):
        self.endpoint = endpoint
        self.max_observers = max_observers

    def find(self, path) -> object | None:
        """The resource at *path* (Uri-Path segments), or ``None``."""
        probe = txcoap.Message(code=GET)
        probe.prepath, probe.postpath = [], list(path)
        try:
            return self.endpoint.getResourceFor(probe)
        except txerror.NoResource:
            return None

    def handle(self, layer, request, payload: bytes | None = None, extra_options=()) -> None:
        """Render *request* (with an assembled *payload*, after a
        block-wise upload) and answer it."""
        tx = txthings_request(request, payload)
        try:
            resource = self.endpoint.getResourceFor(tx)
        except txerror.NoResource:
            layer.answer(request, NOT_FOUND, b"no such resource")
            return
        # An observation belongs to its peer: over DTLS, to its session (a
        # plain datagram from the same address cannot end it).
        key = (tx.remote, tx.token, request.transport, request.session)
        observe = tx.opt.observe if tx.code == GET else None
        if observe is not None:
            observers = getattr(resource, "observers", {})
            if not (observe == 0 and getattr(resource, "observable", False) and (
                    key in observers or len(observers) < self.max_observers)):
                # Deregistration (RFC 7641 3.6), a resource that cannot be
                # observed, or too many observers: a plain answer.
                if observe == 1:
                    self._forget(resource, key)
                tx.opt.observe = None
        try:
            rendered = resource.render(tx)
        except (txerror.UnallowedMethod, txerror.UnsupportedMethod):
            layer.answer(request, METHOD_NOT_ALLOWED, b"method not allowed")
            return
        except Exception:
            log.failure("resource failed for {host}", host=request.host)
            layer.answer(request, INTERNAL_SERVER_ERROR, b"internal error")
            return
        d = rendered if isinstance(rendered, defer.Deferred) else defer.succeed(rendered)
        d.addCallback(self._rendered, layer, request, tx, resource, key, extra_options)
        d.addErrback(self._failed, layer, request)

    def _rendered(self, response, layer, request, tx, resource, key, extra_options):
        options = _options(response)
        if tx.opt.observe == 0 and getattr(resource, "observable", False):
            if response.code in (_VALID, _CONTENT):
                if key not in resource.observers:
                    resource.observers[key] = _Observation(self, layer, tx, resource, key)
                options.append((OBSERVE, resource.observe_index))
            else:
                self._forget(resource, key)
        code, payload, options = self._block2(tx, response.code, response.payload, options)
        layer.answer(request, code, payload, [*options, *extra_options])

    def _failed(self, failure, layer, request):
        log.failure("resource failed for {host}", failure, host=request.host)
        layer.answer(request, INTERNAL_SERVER_ERROR, b"internal error")

    @staticmethod
    def _block2(tx, code, payload, options):
        """The block of a large response the request asks for (block 0 by
        default), RFC 7959 2.4; small responses go whole."""
        wanted = tx.opt.block2
        szx = min(wanted.size_exponent, MAX_BLOCK_SZX) if wanted is not None else MAX_BLOCK_SZX
        size = 1 << (szx + 4)
        if len(payload) <= size and (wanted is None or wanted.block_number == 0):
            return code, payload, options
        number = wanted.block_number if wanted is not None else 0
        if wanted is not None and wanted.size_exponent > szx:
            # The peer asked for larger blocks: the same offset in ours.
            number <<= wanted.size_exponent - szx
        offset = number * size
        if offset >= len(payload):
            return BAD_REQUEST, f"block {number} out of range".encode(), []
        more = offset + size < len(payload)
        options = [o for o in options if o[0] != BLOCK2]
        options.append((BLOCK2, Block(number, more, szx)))
        if tx.opt.getOption(SIZE2) is not None:
            options.append((SIZE2, len(payload)))
        return code, payload[offset:offset + size], options

    def notify(self, observation: _Observation) -> None:
        """Send *observation*'s observer the resource as it is now, as a
        confirmable notification; a Reset or no acknowledgement ends it."""
        tx, resource, layer = observation.original_request, observation.resource, observation.layer
        d = defer.maybeDeferred(resource.render, tx)

        def send(response):
            if resource.observers.get(observation.key) is not observation:
                return
            options = _options(response)
            if response.code in (_VALID, _CONTENT):
                options.append((OBSERVE, resource.observe_index))
            else:
                observation.end()  # an error ends the observation (RFC 7641 3.2)
            code, payload, options = self._block2(tx, response.code, response.payload, options)
            layer.send_confirmable(tx.addr, code, tx.token, options, payload, on_end=observation.end)

        def failed(failure):
            log.failure("notification failed", failure)
            observation.end()
        d.addCallbacks(send, failed)

    @staticmethod
    def _forget(resource, key) -> None:
        observers = getattr(resource, "observers", None)
        if observers is not None:
            observers.pop(key, None)
