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

Configuration: ``aws.queue_url`` (required), ``aws.region``,
``aws.endpoint_url`` (an AWS-compatible endpoint, for tests); credentials
come from the usual AWS chain (environment, profile, instance role).
"""

from __future__ import annotations

import json

import boto3
from botocore.config import Config as BotoConfig
from botocore.exceptions import BotoCoreError, ClientError
from twisted.internet import defer, task
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from sense_gateway.envelope import Envelope
from sense_gateway.errors import ConfigError, Unavailable
from sense_gateway.hookspecs import hookimpl
from sense_gateway.queues import DeadLetter, EnvelopeQueue, Received

log = Logger()

MAX_ENTRIES = 10
MAX_BATCH_BYTES = 256 * 1024
REASON_ATTRIBUTE = "sense-reason"
#: SendMessageBatch calls in flight at once
SENDERS = 8
#: seconds a receive waits for messages at most (SQS allows 20)
LONG_POLL = 20


def sqs_client(aws):
    return boto3.client(
        "sqs", region_name=aws.region, endpoint_url=aws.endpoint_url or None,
        config=BotoConfig(retries={"mode": "standard", "max_attempts": 3},
                          connect_timeout=5, read_timeout=LONG_POLL + 10,
                          max_pool_connections=SENDERS + 2))


class SQSQueueClient:
    """The synchronous SQS calls, usable from any thread (and from the CLI)."""

    def __init__(self, aws, max_receives: int = 5, visibility_timeout: float = 30.0,
                 wait: float = 1.0):
        self.client = sqs_client(aws)
        #: long-polling wait of a receive, whole seconds
        self.wait = min(LONG_POLL, max(0, round(wait)))
        self.url = aws.queue_url
        self.max_receives = max_receives
        self.visibility_timeout = visibility_timeout
        self._dead_letter_url: str | None = None

    def close(self) -> None:
        self.client.close()

    def send_batch(self, bodies: list[str]) -> list[str | None]:
        """Send up to 10 bodies; returns, per body, None or why it failed."""
        entries = [{"Id": str(i), "MessageBody": body} for i, body in enumerate(bodies)]
        try:
            response = self.client.send_message_batch(QueueUrl=self.url, Entries=entries)
        except (BotoCoreError, ClientError) as e:
            return [f"{type(e).__name__}"] * len(bodies)
        errors: list[str | None] = [None] * len(bodies)
        for failed in response.get("Failed", []):
            errors[int(failed["Id"])] = failed.get("Code", "failed")
        # Retry what failed, each on its own.
        for i, error in enumerate(errors):
            if error is not None:
                try:
                    self.client.send_message(QueueUrl=self.url, MessageBody=bodies[i])
                    errors[i] = None
                except (BotoCoreError, ClientError) as e:
                    errors[i] = f"{error}, then {type(e).__name__}"
        return errors

    def receive(self, max_messages: int, visibility_timeout: float | None = None) -> list[Received]:
        response = self.client.receive_message(
            QueueUrl=self.url, MaxNumberOfMessages=min(max_messages, 10), WaitTimeSeconds=self.wait,
            VisibilityTimeout=int(self.visibility_timeout if visibility_timeout is None
                                  else visibility_timeout),
            AttributeNames=["ApproximateReceiveCount"])
        out = []
        for message in response.get("Messages", []):
            count = int(message["Attributes"].get("ApproximateReceiveCount", 1))
            try:
                envelope = Envelope.from_json(message["Body"])
            except (ValueError, KeyError, TypeError) as e:
                self.bury(message["ReceiptHandle"], message["Body"], f"undecodable envelope: {e}")
                continue
            out.append(Received(message["MessageId"], message["ReceiptHandle"], envelope, count))
        return out

    def delete(self, receipts: list[str]) -> int:
        deleted = 0
        for start in range(0, len(receipts), 10):
            chunk = receipts[start:start + 10]
            response = self.client.delete_message_batch(QueueUrl=self.url, Entries=[
                {"Id": str(i), "ReceiptHandle": r} for i, r in enumerate(chunk)])
            deleted += len(response.get("Successful", []))
        return deleted

    def release(self, receipt: str, delay: float) -> None:
        self.client.change_message_visibility(QueueUrl=self.url, ReceiptHandle=receipt,
                                              VisibilityTimeout=int(min(delay, 43200)))

    @property
    def dead_letter_url(self) -> str:
        if self._dead_letter_url is None:
            attributes = self.client.get_queue_attributes(
                QueueUrl=self.url, AttributeNames=["RedrivePolicy"])["Attributes"]
            if "RedrivePolicy" not in attributes:
                raise ConfigError(f"aws.queue_url: {self.url} has no redrive policy "
                                  "(no dead-letter queue)")
            arn = json.loads(attributes["RedrivePolicy"])["deadLetterTargetArn"]
            self._dead_letter_url = self.client.get_queue_url(QueueName=arn.rsplit(":", 1)[1])["QueueUrl"]
        return self._dead_letter_url

    def bury(self, receipt: str, body: str, reason: str) -> None:
        """Move a message to the dead-letter queue with *reason*."""
        self.client.send_message(QueueUrl=self.dead_letter_url, MessageBody=body,
                                 MessageAttributes={REASON_ATTRIBUTE: {
                                     "DataType": "String", "StringValue": reason[:1000]}})
        self.client.delete_message(QueueUrl=self.url, ReceiptHandle=receipt)

    def depth(self) -> dict[str, int]:
        names = ["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"]
        main = self.client.get_queue_attributes(QueueUrl=self.url, AttributeNames=names)["Attributes"]
        dead = self.client.get_queue_attributes(QueueUrl=self.dead_letter_url,
                                                AttributeNames=names[:1])["Attributes"]
        return {"visible": int(main[names[0]]), "in_flight": int(main[names[1]]),
                "dead": int(dead[names[0]])}

    def _dead_messages(self, limit: int, visibility: int):
        messages = []
        while len(messages) < limit:
            response = self.client.receive_message(
                QueueUrl=self.dead_letter_url, MaxNumberOfMessages=min(10, limit - len(messages)),
                VisibilityTimeout=visibility, WaitTimeSeconds=0,
                AttributeNames=["All"], MessageAttributeNames=[REASON_ATTRIBUTE])
            batch = response.get("Messages", [])
            if not batch:
                break
            messages.extend(batch)
        return messages

    def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        # Reading a message hides it; listing gives each back at once.
        messages = self._dead_messages(limit, visibility=30)
        for start in range(0, len(messages), 10):
            self.client.change_message_visibility_batch(QueueUrl=self.dead_letter_url, Entries=[
                {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"], "VisibilityTimeout": 0}
                for i, m in enumerate(messages[start:start + 10])])
        out = []
        for m in messages:
            reason = m.get("MessageAttributes", {}).get(REASON_ATTRIBUTE, {}).get(
                "StringValue", "moved by the queue's redrive policy")
            sent = int(m["Attributes"].get("SentTimestamp", 0)) / 1000
            try:
                envelope = Envelope.from_json(m["Body"])
            except (ValueError, KeyError, TypeError):
                continue
            out.append(DeadLetter(m["MessageId"], envelope, reason,
                                  int(m["Attributes"].get("ApproximateReceiveCount", 0)), sent, sent))
        return out

    def replay(self, ids: list | None = None) -> int:
        moved = 0
        for m in self._dead_messages(10_000, visibility=30):
            if ids is not None and m["MessageId"] not in ids:
                self.client.change_message_visibility(
                    QueueUrl=self.dead_letter_url, ReceiptHandle=m["ReceiptHandle"], VisibilityTimeout=0)
                continue
            self.client.send_message(QueueUrl=self.url, MessageBody=m["Body"])
            self.client.delete_message(QueueUrl=self.dead_letter_url, ReceiptHandle=m["ReceiptHandle"])
            moved += 1
        return moved


class SQSQueue(EnvelopeQueue):
    """The SQS client on a pool of threads, with batched sends."""

    def __init__(self, config, reactor):
        self.config = config
        self.reactor = reactor
        self.retry_after = config.queue.retry_after
        self.max_pending = config.queue.max_pending
        self.client: SQSQueueClient | None = None
        self._pool: ThreadPool | None = None
        self._pending: list[tuple[str, defer.Deferred]] = []
        self._flush_call = None
        self._in_flight = 0
        self._received: dict[str, Received] = {}

    def startService(self) -> None:
        super().startService()
        self._pool = ThreadPool(1, SENDERS + 1, name="sense-queue-sqs")
        self._pool.start()
        self.client = SQSQueueClient(self.config.aws, self.config.queue.max_receives,
                                     self.config.queue.visibility_timeout,
                                     wait=self.config.processor.poll_interval)

    def stopService(self):
        super().stopService()
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
            self._flush()
        return self._drain().addCallback(lambda _: self._pool.stop())

    @defer.inlineCallbacks
    def _drain(self):
        while self._in_flight:
            yield task.deferLater(self.reactor, 0.01, lambda: None)

    def _call(self, function, *args) -> defer.Deferred:
        if self._pool is None or self._pool.joined:
            # A stopped pool drops work silently: fail rather than never fire.
            return defer.fail(Unavailable("queue stopped", max_age=self.retry_after))
        return deferToThreadPool(self.reactor, self._pool, function, *args)

    # -- puts: batched, several calls in flight -------------------------------

    def put(self, envelopes: list[Envelope]) -> defer.Deferred:
        if not self.running:
            return defer.fail(Unavailable("queue stopped", max_age=self.retry_after))
        if len(self._pending) + self._in_flight * MAX_ENTRIES >= self.max_pending:
            return defer.fail(Unavailable("queue full", max_age=self.retry_after))
        waiting = [self._enqueue(e.to_json().decode("utf-8")) for e in envelopes]
        if len(waiting) == 1:
            return waiting[0]
        return defer.gatherResults(waiting, consumeErrors=True).addCallbacks(
            lambda _: None, lambda f: f.value.subFailure)

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
                    d.callback(None)
                else:
                    log.warn("SQS did not take a message: {error}", error=error)
                    d.errback(Unavailable("queue unavailable", max_age=self.retry_after))

        def failed(failure):
            self._in_flight -= 1
            log.failure("SQS send failed", failure)
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

    def depth(self):
        return self._call(self.client.depth)

    def dead_letters(self, limit: int = 100):
        return self._call(self.client.dead_letters, limit)

    def replay(self, ids: list | None = None):
        return self._call(self.client.replay, ids)


def make_sqs_queue(config, reactor) -> SQSQueue:
    if not config.aws.queue_url:
        raise ConfigError("aws.queue_url: required for queue.backend = \"sqs\"")
    return SQSQueue(config, reactor)


@hookimpl
def sense_register_queues():
    return {"sqs": make_sqs_queue}
