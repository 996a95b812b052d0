"""Where each request goes: readings to the pipeline, anything else to the
resource tree.

A POST to an ingest path (one datagram, or an upload assembled from
blocks) goes to :meth:`IngestPipeline.submit` and nothing else; the answer
goes out when the queue reports the envelope stored. Every other request
goes to txthings' resource tree (:class:`~sense_gateway.coap.tree.ResourceTree`).
The one place a :class:`~sense_gateway.errors.RequestError` becomes a CoAP
response is :func:`answer_error`.
"""

from __future__ import annotations

from twisted.logger import Logger
from twisted.python.failure import Failure

from sense_gateway.coap.blockwise import BlockError, Uploads
from sense_gateway.coap.message import (
    BLOCK1, CHANGED, CONTINUE, MAX_AGE, METHOD_NOT_ALLOWED, NOT_FOUND, POST,
    PROXY_SCHEME, PROXY_URI, PROXYING_NOT_SUPPORTED, SIZE1, Block,
)
from sense_gateway.coap.tree import ResourceTree
from sense_gateway.envelope import RequestContext
from sense_gateway.errors import RequestError, Unavailable

log = Logger()

_METHODS = {1: "GET", 2: "POST", 3: "PUT", 4: "DELETE"}


def answer_error(layer, request, error: BaseException) -> None:
    """Answer *request* with what *error* means for the device: its own
    code and diagnostic for a :class:`RequestError` (with Max-Age for
    :class:`Unavailable`), 5.03 ``queue error`` for anything unexpected."""
    if not isinstance(error, RequestError):
        log.failure("enqueue failed", Failure(error))
        error = Unavailable("queue error")
    options = ((MAX_AGE, error.max_age),) if isinstance(error, Unavailable) else ()
    layer.answer(request, error.code, error.payload, options)


def device_host(host: str) -> str:
    """The peer's address as devices are named by it (IPv4 unmapped)."""
    if host.startswith("::ffff:") and "." in host:
        return host[7:]
    return host


class Dispatcher:
    """The handler of every message layer: see the module docstring."""

    def __init__(self, pipeline, tree: ResourceTree, uploads, wall_clock):
        """*uploads* makes the :class:`Uploads` of a transport (each has its
        own: peers of one cannot take the other's room)."""
        self.pipeline = pipeline
        self.tree = tree
        self._make_uploads = uploads
        self._uploads: dict[str, Uploads] = {}
        #: receive times of readings are wall-clock times
        self.wall_clock = wall_clock
        #: Uri-Path segments -> ingest path
        self.ingest_paths = {
            tuple(p.encode("utf-8") for p in path.strip("/").split("/")): path
            for path in pipeline.paths()
        }

    def request(self, layer, request) -> None:
        message = request.message
        block1 = None
        for number, value in message.options:
            if number == BLOCK1:
                block1 = value
            elif number == PROXY_URI or number == PROXY_SCHEME:
                layer.answer(request, PROXYING_NOT_SUPPORTED, b"proxying not supported")
                return
        path = message.path
        ingest = self.ingest_paths.get(path) if message.code == POST else None
        if block1 is None:
            payload, content_format, options = message.payload, message.content_format, ()
            uploads = self._uploads.get(request.transport)
            if uploads:
                # A plain request to the path of an upload from the same
                # peer ends that upload.
                uploads.discard((path, request.host, request.port, request.session))
            if ingest is None:
                self.tree.handle(layer, request)
                return
        else:
            assembled = self._block(layer, request, block1, ingest)
            if assembled is None:
                return
            payload, content_format, options = assembled
            if ingest is None:
                self.tree.handle(layer, request, payload, options)
                return
        # Readings: to the pipeline, answered 2.04 once they are stored.
        addr = request.addr
        context = RequestContext(ingest, content_format, device_host(addr[0]), addr[1],
                                 self.wall_clock.seconds(), request.transport, request.identity)

        def stored(error) -> None:
            if error is None:
                layer.answer(request, CHANGED, b"", options)
            else:
                answer_error(layer, request, error)
        try:
            self.pipeline.submit(payload, context, stored)
        except RequestError as e:
            answer_error(layer, request, e)

    def uploads(self, transport: str) -> Uploads:
        """The uploads being assembled for peers of *transport*."""
        uploads = self._uploads.get(transport)
        if uploads is None:
            uploads = self._uploads[transport] = self._make_uploads()
        return uploads

    def _block(self, layer, request, block: Block, ingest):
        """One block of an upload (RFC 7959 2.3): answered here unless it
        completes the upload; then ``(payload, content format, options of
        the final answer)``."""
        message = request.message
        uploads = self.uploads(request.transport)
        # An upload is one peer's: over DTLS one session's.
        key = (message.path, request.host, request.port, request.session)
        if block.number == 0 and key not in uploads and ingest is not None:
            policy = self.pipeline.policy
            if policy is not None:
                try:
                    policy.check_transfer(request.identity)
                except RequestError as e:
                    answer_error(layer, request, e)
                    return None
        if block.number == 0 and key not in uploads and ingest is None:
            # Known before the first block is kept: nothing to assemble for.
            resource = self.tree.find(message.path)
            if resource is None:
                layer.answer(request, NOT_FOUND, b"no such resource")
                return None
            method = _METHODS.get(message.code)
            if method is None or not hasattr(resource, f"render_{method}"):
                layer.answer(request, METHOD_NOT_ALLOWED, b"method not allowed")
                return None
        try:
            complete = uploads.receive(key, block, message.payload, message.content_format,
                                       message.option(SIZE1))
        except BlockError as e:
            layer.answer(request, e.code, e.reason.encode(), e.options)
            return None
        if complete is None:
            layer.answer(request, CONTINUE, b"", ((BLOCK1, Block(block.number, True, block.szx)),))
            return None
        payload, content_format = complete
        return payload, content_format, ((BLOCK1, Block(block.number, False, block.szx)),)
