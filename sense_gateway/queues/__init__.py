"""The queue contract: where accepted envelopes wait for the processor.

Every backend (the embedded SQLite queue here, SQS later) is an
:class:`EnvelopeQueue`: a Twisted service with at-least-once, SQS-like
semantics. All methods return Deferreds and never block the reactor.
"""

from __future__ import annotations

from dataclasses import dataclass

from twisted.application.service import Service
from twisted.internet.defer import Deferred

from sense_gateway.envelope import Envelope


@dataclass(frozen=True, slots=True)
class Received:
    """A message handed out by :meth:`EnvelopeQueue.receive`."""

    message_id: int | str
    receipt: str
    envelope: Envelope
    receive_count: int


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A message that was received too often without being deleted."""

    id: int | str
    envelope: Envelope
    reason: str
    receive_count: int
    enqueued_at: float
    failed_at: float


class EnvelopeQueue(Service):
    """What a queue backend provides (all methods return Deferreds)."""

    def put(self, envelopes: list[Envelope]) -> Deferred:
        """Store *envelopes*; fire (with ``None``) only once they are durable.

        Fail with :class:`~sense_gateway.errors.Unavailable` (its
        ``max_age`` tells the device when to retry) when the queue cannot
        take them.
        """
        raise NotImplementedError

    def receive(self, max_messages: int, visibility_timeout: float | None = None) -> Deferred:
        """Hand out up to *max_messages* :class:`Received` messages.

        Each becomes invisible for *visibility_timeout* seconds (the
        backend's default when ``None``) and gets a fresh receipt. A message
        already received ``max_receives`` times is moved to the dead letters
        instead, with the last reason given to :meth:`release`.
        """
        raise NotImplementedError

    def delete(self, receipts: list[str]) -> Deferred:
        """Delete processed messages; fires with how many were deleted
        (a receipt from an earlier receive of the same message deletes
        nothing)."""
        raise NotImplementedError

    def release(self, receipt: str, reason: str, delay: float = 0.0) -> Deferred:
        """Give a message back, visible again after *delay* seconds, and
        remember *reason* as its last failure."""
        raise NotImplementedError

    def depth(self) -> Deferred:
        """Fire with ``{"visible": n, "in_flight": n, "dead": n}``."""
        raise NotImplementedError

    def dead_letters(self, limit: int = 100) -> Deferred:
        """Fire with up to *limit* :class:`DeadLetter`, oldest first."""
        raise NotImplementedError

    def replay(self, ids: list | None = None) -> Deferred:
        """Move dead letters (all, or those with *ids*) back into the queue
        with their receive count reset; fires with how many moved."""
        raise NotImplementedError
