"""The queue contract: where accepted envelopes wait for the processor.

Every backend (the embedded SQLite queue, SQS) is an :class:`EnvelopeQueue`:
a Twisted service with at-least-once, SQS-like semantics. All methods
return Deferreds and never block the reactor; a backend does its blocking
I/O on a thread pool of its own.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from twisted.application.service import Service
from twisted.internet.defer import Deferred, gatherResults
from twisted.python.failure import Failure

from sense_gateway.backends import choose, named_factories
from sense_gateway.config import backend_settings, check_backend_env
from sense_gateway.envelope import Envelope


@dataclass(frozen=True, slots=True)
class Received:
    """A message handed out by :meth:`EnvelopeQueue.receive`.

    ``receipt`` is valid for this receive only: once the message has been
    received again, deleting or releasing with the old receipt does nothing.
    """

    message_id: int | str
    receipt: str
    envelope: Envelope
    receive_count: int


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A message that was received too often without being deleted.

    ``body`` is the message as stored, when the backend has it.
    ``envelope`` is ``None`` when that body is not an envelope this
    version can read (written by a newer gateway, or damaged), so such a
    letter can still be listed, and replayed to a gateway that reads it.
    """

    id: int | str
    envelope: Envelope | None
    reason: str
    receive_count: int
    enqueued_at: float
    failed_at: float
    body: bytes | None = None


class EnvelopeQueue(Service):
    """What a queue backend provides (all methods return Deferreds).

    Started and stopped with the gateway. While stopped, :meth:`put` fails
    with :class:`~sense_gateway.errors.Unavailable`; the other methods
    should fail the same way rather than leave a Deferred that never fires.
    """

    #: envelopes the queue holds at most (``queue.max_depth``); None: unbounded
    max_depth: int | None = None

    def put(self, envelopes: list[Envelope]) -> Deferred[None]:
        """Store *envelopes*; fire (with ``None``) only once they are durable
        (a committed transaction, an acknowledged send).

        Fail with :class:`~sense_gateway.errors.Unavailable` (its
        ``max_age`` is ``queue.retry_after``, telling the device when to
        retry) when the queue cannot take them: too much is waiting already,
        or the write failed.
        """
        raise NotImplementedError

    def put_then(self, envelopes: list[Envelope],
                 done: Callable[[BaseException | None], object]) -> None:
        """Store *envelopes* like :meth:`put`, then call ``done(None)``, or
        ``done(error)`` with the exception :meth:`put` would fail with.

        For the gateway's CoAP layer: no Deferred per request. *done* may be
        called before this returns (a full queue says so at once). This
        default goes through :meth:`put`; a backend that groups puts can
        call *done* straight from its batch.
        """
        self.put(envelopes).addBoth(_report, done)

    def receive(self, max_messages: int,
                visibility_timeout: float | None = None) -> Deferred[list[Received]]:
        """Hand out up to *max_messages* :class:`Received` messages.

        Each becomes invisible for *visibility_timeout* seconds (the
        backend's default when ``None``), has its receive count incremented
        and gets a fresh random receipt. A message already received
        ``max_receives`` times without being deleted is moved to the dead
        letters instead, with the last reason given to :meth:`release`.
        """
        raise NotImplementedError

    def delete(self, receipts: list[str]) -> Deferred[int]:
        """Delete processed messages; fire with how many were deleted
        (a receipt from an earlier receive of the same message deletes
        nothing)."""
        raise NotImplementedError

    def release(self, receipt: str, reason: str, delay: float = 0.0) -> Deferred[None]:
        """Give a message back, visible again after *delay* seconds, and
        remember *reason* as its last failure (the dead-letter reason if it
        never succeeds)."""
        raise NotImplementedError

    def postpone(self, receipts: list[str], reason: str, delay: float = 0.0) -> Deferred[None]:
        """Give messages back like :meth:`release`, but without counting
        this receive towards ``max_receives`` where the backend can (a
        sink or the registry was unavailable: no fault of the messages).
        This default releases each one."""
        return _each(self.release, receipts, reason, delay)

    def dead_letter(self, receipt: str, reason: str) -> Deferred[None]:
        """Move a received message to the dead letters at once, with
        *reason* (a sink refused it; trying again cannot help). This
        default releases it, so it gets there after ``max_receives``."""
        return self.release(receipt, reason)

    def check(self) -> Deferred[None]:
        """Fail with an error saying why the queue cannot take puts now (for
        ``/healthz``); this default only asks for the depth."""
        return self.depth().addCallback(lambda _: None)

    def depth(self) -> Deferred[dict[str, int]]:
        """Fire with ``{"visible": n, "in_flight": n, "dead": n}``."""
        raise NotImplementedError

    def dead_letters(self, limit: int = 100) -> Deferred[list[DeadLetter]]:
        """Fire with up to *limit* :class:`DeadLetter`, oldest first."""
        raise NotImplementedError

    def replay(self, ids: list | None = None) -> Deferred[int]:
        """Move dead letters (all, or those with *ids*) back into the queue
        with their receive count reset; fire with how many moved."""
        raise NotImplementedError


class QueueStore(Protocol):
    """A synchronous handle on a queue for the ``sense queue`` and ``sense
    dlq`` commands (no reactor runs there): the same answers as the
    :class:`EnvelopeQueue` methods of the same names, returned directly."""

    def depth(self) -> dict[str, int]: ...

    def dead_letters(self, limit: int = 100) -> list[DeadLetter]: ...

    def replay(self, ids: list | None = None) -> int: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class QueueBackend:
    """What a queue backend brings, registered by ``sense_register_queues``.

    ``open(config, settings, reactor)`` returns the :class:`EnvelopeQueue`
    the gateway runs. ``open_store(config, settings)`` returns a
    :class:`QueueStore` for the ``sense`` commands, or raises
    :class:`~sense_gateway.errors.ConfigError` (no queue there); ``None``
    means the backend offers the commands nothing. ``settings`` is a frozen
    dataclass whose fields (``bool``, ``int``, ``float``, ``str`` or
    ``tuple[str, ...]``, each with a default) are the keys of the backend's
    own table ``[queue.NAME]`` (environment: ``SENSE_QUEUE_NAME_KEY``); the
    core converts and checks them at start-up and hands the instance to
    both callables. A ``__post_init__`` raising ``ConfigError`` checks
    values beyond their type. ``None``: the backend has no keys of its own.

    ``shards(config, settings, count)`` returns the settings of each shard
    of the queue for ``--workers`` (each ingest worker writes one; the
    processor drains them all): at least *count*, more when more are
    there from an earlier run, the first one the queue of a single
    process. ``None``: every worker shares the one queue (SQS).
    """

    open: Callable[[Any, Any, Any], EnvelopeQueue]
    open_store: Callable[[Any, Any], QueueStore] | None = None
    settings: type | None = None
    shards: Callable[[Any, Any, int], list] | None = None


# Choosing one: here, not in sense_gateway.backends, which the Lambda
# handler imports without Twisted.

def queue_backends(config, pm) -> dict:
    """Every registered queue backend by name, as a
    :class:`~sense_gateway.queues.QueueBackend` (a bare ``factory(config,
    reactor)`` becomes one without settings or commands); fails on a
    ``[queue.NAME]`` table or ``SENSE_QUEUE_*`` variable none claims."""
    backends = {}
    for name, offered in named_factories(pm, "sense_register_queues", "queue backend").items():
        if not isinstance(offered, QueueBackend):
            offered = QueueBackend(open=lambda config, settings, reactor, make=offered:
                                   make(config, reactor))
        backends[name] = offered
    check_backend_env(config, {name: b.settings for name, b in backends.items()})
    return backends


def queue_backend(config, pm) -> tuple:
    """The backend ``queue.backend`` names and its typed settings (every
    present ``[queue.NAME]`` table is checked, used or not)."""
    backends = queue_backends(config, pm)
    backend = choose(backends, config.queue.backend, "queue.backend")
    for name, other in backends.items():
        if name != config.queue.backend:
            backend_settings(config, name, other.settings)
    return backend, backend_settings(config, config.queue.backend, backend.settings)


def _each(release, receipts: list[str], reason: str, delay: float) -> Deferred[None]:
    return gatherResults([release(r, reason, delay) for r in receipts],
                         consumeErrors=True).addCallback(lambda _: None)


def _report(result: object, done: Callable[[BaseException | None], object]) -> None:
    done(result.value if isinstance(result, Failure) else None)
