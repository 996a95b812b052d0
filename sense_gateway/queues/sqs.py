"""Built-in plugin: the ``sqs`` queue backend, Amazon SQS through boto3.

For gateways on many machines, or a processor running as AWS Lambda
(``queue.backend = "sqs"``). The gateway sends envelopes with
SendMessageBatch: up to 10 entries and 256 KiB per call, several calls in
flight, an entry that comes back in ``Failed`` retried on its own; each
device gets its 2.04 only once its own entry was accepted by SQS, and 5.03
with Max-Age ``queue.retry_after`` when it could not be.

The in-process processor receives with long polling (waiting up to
``processor.poll_interval`` seconds, at most 20), deletes what it
processed, and gives failed messages back with a delay (ChangeMessageVisibility).
A message that failed ``queue.max_receives`` times is moved by the
processor to the dead-letter queue with its reason (a message attribute
``sense-reason``); the queue's redrive policy is the safety net for
messages no processor could judge. ``sense dlq list`` and ``sense dlq
replay`` work on that dead-letter queue.

``queue.max_depth`` bounds the backlog: a put is refused with 5.03 and
Max-Age while the queue's approximate count of messages (visible and in
flight, read with GetQueueAttributes at most every ``DEPTH_INTERVAL``
seconds while puts arrive) is at the bound; a failed send is refused
the same way, and both are counted by reason (``refusals``). A message a
sink refused goes to the dead-letter queue at once. Messages given back
because a sink or the registry was unavailable are visible again at
once, but SQS cannot take back their receive: the in-process processor
then asks the sinks before it receives again (see docs/processing.md).

Configuration: ``aws.queue_url`` (required), ``aws.region``,
``aws.endpoint_url`` (an AWS-compatible endpoint, for tests); credentials
come from the usual AWS chain (environment, profile, instance role).
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from sense_gateway.envelope import Envelope
from sense_gateway.errors import ConfigError, Unavailable
from sense_gateway.hookspecs import hookimpl
from sense_gateway.queues import EnvelopeQueue, QueueBackend, Received
from sense_gateway.queues.sqs_client import (
    MAX_BATCH_BYTES,
    MAX_ENTRIES,
    SENDERS,
    SQSQueueClient,
)
from sense_gateway.threads import BlockingThreads

__all__ = ["SQSQueue", "SQSQueueClient", "make_sqs_queue"]

log = Logger()

#: seconds the queue's approximate count is trusted for ``queue.max_depth``
DEPTH_INTERVAL = 5.0


class SQSQueue(EnvelopeQueue):
    """The SQS client on a pool of threads, with batched sends."""

    def __init__(self, config, reactor):
        self.config = config
        self.reactor = reactor
        self.retry_after = config.queue.retry_after
        self.max_pending = config.queue.max_pending
        self.max_depth = config.queue.max_depth
        #: the queue's approximate count when last read, and when
        self.waiting = 0
        self._counted_at: float | None = None
        self._counting = False
        #: why the last send failed, until one succeeds
        self.write_error: str | None = None
        self.refusals = {"stopped": 0, "busy": 0, "full": 0, "write failed": 0}
        self.client: SQSQueueClient | None = None
        #: boto3's calls: one receiving, SENDERS sending side by side
        self.threads = BlockingThreads("sense-queue-sqs", reactor, threads=SENDERS + 1,
                                       refusal="queue stopped", max_age=self.retry_after)
        self._pending: list[tuple[str, defer.Deferred]] = []
        self._flush_call = None
        self._in_flight = 0
        self._received: dict[str, Received] = {}

    def startService(self) -> None:
        super().startService()
        self.threads.startService()
        self.client = SQSQueueClient(self.config.aws, self.config.queue.max_receives,
                                     self.config.queue.visibility_timeout,
                                     wait=self.config.processor.poll_interval)

    def stopService(self):
        super().stopService()
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
            self._flush()
        # Sends in flight were promised an answer: the stop waits for them.
        return self.threads.stopService()

    def _call(self, function, *args) -> defer.Deferred:
        return self.threads.run(function, *args)

    # -- puts: batched, several calls in flight -------------------------------

    def put(self, envelopes: list[Envelope]) -> defer.Deferred:
        if not self.running:
            self.refusals["stopped"] += 1
            return defer.fail(Unavailable("queue stopped", max_age=self.retry_after))
        unsent = len(self._pending) + self._in_flight * MAX_ENTRIES
        if unsent >= self.max_pending:
            self.refusals["busy"] += 1
            return defer.fail(Unavailable("queue full", max_age=self.retry_after))
        self._count()
        if self.waiting + unsent + len(envelopes) > self.max_depth:
            self.refusals["full"] += 1
            return defer.fail(Unavailable("queue full", max_age=self.retry_after))
        waiting = [self._enqueue(e.to_json().decode("utf-8")) for e in envelopes]
        if len(waiting) == 1:
            return waiting[0]
        return defer.gatherResults(waiting, consumeErrors=True).addCallbacks(
            lambda _: None, lambda f: f.value.subFailure)

    def _count(self) -> None:
        """Read the queue's count again if it is older than DEPTH_INTERVAL
        (in the background: this put is judged by the count known now)."""
        now = self.reactor.seconds()
        if self._counting or (self._counted_at is not None
                              and now - self._counted_at < DEPTH_INTERVAL):
            return
        self._counting = True

        def counted(result):
            self._counting = False
            self._counted_at = self.reactor.seconds()
            if isinstance(result, Failure):
                log.warn("SQS: cannot read the queue's depth: {error}", error=result.value)
            else:
                self.waiting = result
        self._call(self.client.waiting).addBoth(counted)

    def check(self):
        if self.write_error is not None:
            return defer.fail(Unavailable(f"queue write failed: {self.write_error}",
                                          max_age=self.retry_after))

        def full(waiting):
            self.waiting, self._counted_at = waiting, self.reactor.seconds()
            if waiting >= self.max_depth:
                raise Unavailable(f"queue full: {waiting} envelopes waiting "
                                  f"(queue.max_depth {self.max_depth})", max_age=self.retry_after)
        return self._call(self.client.waiting).addCallback(full)

    def _enqueue(self, body: str) -> defer.Deferred:
        d = defer.Deferred()
        self._pending.append((body, d))
        if len(self._pending) >= MAX_ENTRIES:
            self._flush()
        elif self._flush_call is None:
            # Whatever else arrives in this reactor turn joins the batch.
            self._flush_call = self.reactor.callLater(0, self._flush)
        return d

    def _flush(self) -> None:
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush_call = None
        while self._pending:
            batch, size = [], 0
            while self._pending and len(batch) < MAX_ENTRIES:
                body_size = len(self._pending[0][0].encode("utf-8"))
                if batch and size + body_size > MAX_BATCH_BYTES:
                    break
                batch.append(self._pending.pop(0))
                size += body_size
            self._send(batch)

    def _send(self, batch) -> None:
        self._in_flight += 1

        def sent(errors):
            self._in_flight -= 1
            for (_, d), error in zip(batch, errors):
                if error is None:
                    self.write_error = None
                    self.waiting += 1
                    d.callback(None)
                else:
                    log.warn("SQS did not take a message: {error}", error=error)
                    self.write_error = error[:200]
                    self.refusals["write failed"] += 1
                    d.errback(Unavailable("queue unavailable", max_age=self.retry_after))

        def failed(failure):
            self._in_flight -= 1
            log.failure("SQS send failed", failure)
            self.write_error = f"{type(failure.value).__name__}: {failure.value}"[:200]
            self.refusals["write failed"] += len(batch)
            for _, d in batch:
                d.errback(Unavailable("queue unavailable", max_age=self.retry_after))

        self._call(self.client.send_batch, [body for body, _ in batch]).addCallbacks(sent, failed)

    # -- the processor's side ----------------------------------------------

    def receive(self, max_messages: int, visibility_timeout: float | None = None):
        def remember(messages):
            for m in messages:
                self._received[m.receipt] = m
            return messages
        return self._call(self.client.receive, max_messages, visibility_timeout).addCallback(remember)

    def delete(self, receipts: list[str]):
        for r in receipts:
            self._received.pop(r, None)
        return self._call(self.client.delete, list(receipts))

    def release(self, receipt: str, reason: str, delay: float = 0.0):
        message = self._received.pop(receipt, None)
        if message is not None and message.receive_count >= self.client.max_receives:
            return self._call(self.client.bury, receipt, message.envelope.to_json().decode(), reason)
        return self._call(self.client.release, receipt, delay)

    def postpone(self, receipts: list[str], reason: str, delay: float = 0.0):
        # SQS counts every receive: the receipts can only be made visible.
        for r in receipts:
            self._received.pop(r, None)
        return self._call(self.client.release_many, list(receipts), delay)

    def dead_letter(self, receipt: str, reason: str):
        message = self._received.pop(receipt, None)
        if message is None:
            return self._call(self.client.release, receipt, 0.0)
        return self._call(self.client.bury, receipt, message.envelope.to_json().decode(), reason)

    def depth(self):
        return self._call(self.client.depth)

    def dead_letters(self, limit: int = 100):
        return self._call(self.client.dead_letters, limit)

    def replay(self, ids: list | None = None):
        return self._call(self.client.replay, ids)


def make_sqs_queue(config, settings, reactor) -> SQSQueue:
    """The ``sqs`` backend's queue: ``open(config, settings, reactor)``."""
    _require_url(config)
    return SQSQueue(config, reactor)


def open_sqs_store(config, settings) -> SQSQueueClient:
    """The ``sqs`` backend's store for ``sense queue`` and ``sense dlq``."""
    _require_url(config)
    return SQSQueueClient(config.aws, config.queue.max_receives)


def _require_url(config) -> None:
    if not config.aws.queue_url:
        raise ConfigError("aws.queue_url: required for queue.backend = \"sqs\"")


@hookimpl
def sense_register_queues():
    # Its settings are aws.* (shared with the DynamoDB registry and the
    # Lambda deployment), so no [queue.sqs] table of its own.
    return {"sqs": QueueBackend(make_sqs_queue, open_sqs_store)}
