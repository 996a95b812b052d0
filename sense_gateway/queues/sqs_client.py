"""The synchronous SQS calls of the ``sqs`` queue backend, through boto3.

:class:`SQSQueueClient` is usable from any thread: the queue service
(:mod:`sense_gateway.queues.sqs`) calls it on its own pool, the CLI
directly.
"""

from __future__ import annotations

import json

import boto3
from botocore.config import Config as BotoConfig
from botocore.exceptions import BotoCoreError, ClientError

from sense_gateway.envelope import Envelope
from sense_gateway.errors import ConfigError
from sense_gateway.queues import DeadLetter, Received

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

    def release_many(self, receipts: list[str], delay: float) -> None:
        for start in range(0, len(receipts), 10):
            self.client.change_message_visibility_batch(QueueUrl=self.url, Entries=[
                {"Id": str(i), "ReceiptHandle": r, "VisibilityTimeout": int(min(delay, 43200))}
                for i, r in enumerate(receipts[start:start + 10])])

    def waiting(self) -> int:
        """The queue's approximate count of messages, visible and in flight."""
        names = ["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"]
        attributes = self.client.get_queue_attributes(QueueUrl=self.url,
                                                      AttributeNames=names)["Attributes"]
        return sum(int(attributes[name]) for name in names)

    @property
    def dead_letter_url(self) -> str:
        if self._dead_letter_url is None:
            # No "Attributes" at all when the queue has none of those asked.
            attributes = self.client.get_queue_attributes(
                QueueUrl=self.url, AttributeNames=["RedrivePolicy"]).get("Attributes", {})
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
