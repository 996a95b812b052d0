"""The cloud backends for real: the gateway queueing to SQS, the Lambda
handler processing what SQS hands out, the registry in DynamoDB (moto in
server mode for both), metrics in VictoriaMetrics."""

from __future__ import annotations

import json
import os

import orjson
from twisted.internet import defer
from twisted.trial.unittest import TestCase

import sense_gateway.aws.lambda_handler as lambda_handler
from sense_gateway.registry.dynamodb import DynamoDBRegistry
from tests.servers import MotoServer, VictoriaMetrics
from tests.test_processor import RebootSequenceChecks
from tests.support import AWS_ENV, set_environ, coap_url, eventually, libcoap_request, start_gateway

NOW = 1764300000

class CloudTestCase(TestCase):
    timeout = 120

    def setUp(self):
        set_environ(self, AWS_ENV)
        self.moto = MotoServer(self)
        self.vm = VictoriaMetrics(self)
        self.sqs = self.moto.client("sqs")
        dead = self.sqs.create_queue(QueueName="sense-dlq")["QueueUrl"]
        dead_arn = self.sqs.get_queue_attributes(
            QueueUrl=dead, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
        self.queue_url = self.sqs.create_queue(QueueName="sense", Attributes={
            "VisibilityTimeout": "30",
            "RedrivePolicy": json.dumps({"deadLetterTargetArn": dead_arn, "maxReceiveCount": "5"}),
        })["QueueUrl"]
        self.moto.client("dynamodb").create_table(
            TableName="sense-devices", BillingMode="PAY_PER_REQUEST",
            KeySchema=[{"AttributeName": "id", "KeyType": "HASH"}],
            AttributeDefinitions=[{"AttributeName": "id", "AttributeType": "S"}])
        self.moto.client("dynamodb").create_table(
            TableName="sense-credentials", BillingMode="PAY_PER_REQUEST",
            KeySchema=[{"AttributeName": "device", "KeyType": "HASH"}],
            AttributeDefinitions=[{"AttributeName": "device", "AttributeType": "S"}])
        # The Lambda is configured from SENSE_* variables only.
        set_environ(self, {
            "SENSE_REGISTRY_BACKEND": "dynamodb", "SENSE_REGISTRY_TABLE": "sense-devices",
            "SENSE_AWS_ENDPOINT_URL": self.moto.url, **self.vm.environment(),
        })
        self.patch(lambda_handler, "_processor", None)
        self.addCleanup(lambda: lambda_handler._processor and lambda_handler._processor.close())

    def gateway(self, **overrides):
        """``--role all`` in this process on the cloud backends: the worker
        drains SQS itself."""
        settings = {"role": "all", "queue.backend": "sqs", "aws.queue_url": self.queue_url,
                    "aws.endpoint_url": self.moto.url, "registry.backend": "dynamodb",
                    **self.vm.settings(), "processor.poll_interval": 0.0,
                    "processor.retry_base": 0.05}
        settings.update(overrides)
        # The gateway's own SENSE_* settings come from here, not the Lambda's.
        for name in [n for n in os.environ if n.startswith("SENSE_")]:
            set_environ(self, {name: os.environ[name]})
            del os.environ[name]
        return start_gateway(self, **settings)

    def sqs_event(self, max_messages=10) -> dict:
        """What the SQS event-source mapping hands a Lambda."""
        response = self.sqs.receive_message(QueueUrl=self.queue_url, MaxNumberOfMessages=max_messages,
                                            AttributeNames=["All"], WaitTimeSeconds=1)
        records = [{
            "messageId": m["MessageId"], "receiptHandle": m["ReceiptHandle"], "body": m["Body"],
            "attributes": m["Attributes"], "messageAttributes": {}, "md5OfBody": m["MD5OfBody"],
            "eventSource": "aws:sqs", "awsRegion": "us-east-1",
            "eventSourceARN": "arn:aws:sqs:us-east-1:123456789012:sense",
        } for m in response.get("Messages", [])]
        return {"Records": records}


class GatewayToLambdaTests(CloudTestCase):
    @defer.inlineCallbacks
    def test_gateway_sqs_lambda_dynamodb_victoriametrics(self):
        gateway = yield start_gateway(self, **{"queue.backend": "sqs", "aws.queue_url": self.queue_url,
                                         "aws.endpoint_url": self.moto.url})
        url = coap_url("::1", gateway.port, "/data")
        for device, seq in (("node-1", 1), ("node-1", 2), ("node-2", 9)):
            body = orjson.dumps({"id": device, "seq": seq, "ts": NOW + seq, "data": {"t": seq / 2}})
            response = yield libcoap_request("post", url, body, 50)
            self.assertEqual(response.code, "2.04", response)

        event = self.sqs_event()
        self.assertEqual(len(event["Records"]), 3)
        self.assertEqual(lambda_handler.handler(event, None), {"batchItemFailures": []})

        points = self.vm.points()
        self.assertEqual(points[("sense_t", "node-1")], {(NOW + 1) * 1000: 0.5, (NOW + 2) * 1000: 1.0})
        self.assertEqual(points[("sense_t", "node-2")], {(NOW + 9) * 1000: 4.5})
        registry = DynamoDBRegistry("sense-devices", "us-east-1", self.moto.url)
        devices = {r.id: r for r in registry.devices()}
        self.assertEqual({d: (r.state.last_seq, r.state.counters.received) for d, r in devices.items()},
                         {"node-1": (2, 2), "node-2": (9, 1)})
        self.assertEqual(registry.count(), 2)

    def test_poison_record_alone_is_reported(self):
        good = {"v": 1, "id": "e1", "device": "node-3", "seq": 1, "received": NOW, "source": "x",
                "transport": "coap", "identity": None, "path": "/data", "cf": 50,
                "readings": [{"m": "sense", "ts": NOW, "f": {"t": 1.0}, "t": {}}]}
        self.sqs.send_message(QueueUrl=self.queue_url, MessageBody=orjson.dumps(good).decode())
        self.sqs.send_message(QueueUrl=self.queue_url, MessageBody="not an envelope")
        self.sqs.send_message(QueueUrl=self.queue_url, MessageBody=orjson.dumps(
            {**good, "id": "e2", "seq": 2, "readings": [
                {"m": "sense", "ts": NOW + 1, "f": {"t": 2.0}, "t": {}}]}).decode())
        event = self.sqs_event()
        poison = [r["messageId"] for r in event["Records"] if r["body"] == "not an envelope"]
        self.assertEqual(lambda_handler.handler(event, None),
                         {"batchItemFailures": [{"itemIdentifier": poison[0]}]})
        self.assertEqual(len(self.vm.points()[("sense_t", "node-3")]), 2)

    def test_unreachable_registry_fails_the_whole_batch(self):
        os.environ["SENSE_AWS_ENDPOINT_URL"] = "http://127.0.0.1:9"  # restored by cleanup
        self.sqs.send_message(QueueUrl=self.queue_url, MessageBody=orjson.dumps({
            "v": 1, "id": "e1", "device": "node-4", "seq": 1, "received": NOW, "source": "x",
            "transport": "coap", "identity": None, "path": "/data", "cf": 50,
            "readings": [{"m": "sense", "ts": NOW, "f": {"t": 1.0}, "t": {}}]}).decode())
        from sense_gateway.registry import RegistryUnavailable

        self.assertRaises(RegistryUnavailable, lambda_handler.handler, self.sqs_event(), None)

    def test_redelivered_batch_counts_once(self):
        envelope = {"v": 1, "id": "e1", "device": "node-5", "seq": 1, "received": NOW,
                    "source": "x", "transport": "coap", "identity": None, "path": "/data",
                    "cf": 50, "readings": [{"m": "sense", "ts": NOW, "f": {"t": 1.0}, "t": {}}]}
        record = {"messageId": "m-1", "receiptHandle": "r", "body": orjson.dumps(envelope).decode(),
                  "attributes": {}, "eventSource": "aws:sqs"}
        for _ in range(2):
            self.assertEqual(lambda_handler.handler({"Records": [record]}, None),
                             {"batchItemFailures": []})
        registry = DynamoDBRegistry("sense-devices", "us-east-1", self.moto.url)
        [device] = registry.devices()
        self.assertEqual((device.state.counters.received, device.state.counters.duplicates), (1, 0))
        self.assertEqual(self.vm.points()[("sense_t", "node-5")], {NOW * 1000: 1.0})


class InProcessSQSTests(CloudTestCase):
    """``--role all`` on the cloud backends: the worker drains SQS itself."""

    def sense(self, *args) -> bytes:
        import subprocess

        from tests.support import BIN

        env = {**os.environ, "SENSE_QUEUE_BACKEND": "sqs", "SENSE_AWS_QUEUE_URL": self.queue_url,
               "SENSE_AWS_ENDPOINT_URL": self.moto.url}
        return subprocess.run([str(BIN / "sense"), *args], env=env, check=True,
                              capture_output=True, timeout=60).stdout

    @defer.inlineCallbacks
    def test_worker_drains_sqs(self):
        gateway = yield self.gateway()
        response = yield libcoap_request("post", coap_url("127.0.0.1", gateway.port, "/data"),
                                         b'{"id": "node-s", "seq": 1, "ts": 1764300000, "data": {"t": 3}}', 50)
        self.assertEqual(response.code, "2.04")
        yield eventually(lambda: ("sense_t", "node-s") in self.vm.points())
        self.assertEqual(self.vm.points()[("sense_t", "node-s")], {NOW * 1000: 3.0})

    @defer.inlineCallbacks
    def test_refused_message_dead_lettered_with_reason_and_replayed(self):
        from tests.servers import InfluxDB1

        influx = InfluxDB1(self)
        gateway = yield self.gateway(**{"influxdb.url": influx.url, "influxdb.api": "v1"})
        url = coap_url("::1", gateway.port, "/data")
        response = yield libcoap_request("post", url, b'{"id": "node-x", "seq": 1, "ts": 1764300000, '
                                                      b'"data": {"t": 1}}', 50)
        self.assertEqual(response.code, "2.04")
        yield eventually(lambda: influx.rows('SELECT "t" FROM "sense"') != [], timeout=30)
        # A string where InfluxDB has a float: refused, dead-lettered at once.
        response = yield libcoap_request("post", url, b'{"id": "node-x", "seq": 2, "ts": 1764300001, '
                                                      b'"data": {"t": "warm"}}', 50)
        self.assertEqual(response.code, "2.04")
        yield eventually(lambda: orjson.loads(self.sense("queue", "--json"))["dead"] == 1, timeout=30)
        [letter] = orjson.loads(self.sense("dlq", "list", "--json"))
        self.assertEqual(letter["device"], "node-x")
        self.assertIn("field type conflict", letter["reason"])
        influx.query('DROP MEASUREMENT "sense"')
        self.assertEqual(self.sense("dlq", "replay"), b"1 message back in the queue\n")
        yield eventually(lambda: influx.rows('SELECT "t" FROM "sense"') != [], timeout=30)
        self.assertEqual([r["t"] for r in influx.rows('SELECT "t" FROM "sense"')], ["warm"])

    @defer.inlineCallbacks
    def test_metrics_server_down_keeps_messages_out_of_the_dead_letters(self):
        self.vm.stop()
        gateway = yield self.gateway(**{"queue.max_receives": 2, "processor.retry_max": 0.2})
        response = yield libcoap_request("post", coap_url("::1", gateway.port, "/data"),
                                         b'{"id": "node-y", "seq": 1, "ts": 1764300000, "data": {"t": 1}}', 50)
        self.assertEqual(response.code, "2.04")
        yield eventually(lambda: gateway.worker.problem is not None, timeout=30)
        self.assertIn("cannot reach", gateway.worker.problem)
        # Many backoffs later: asked the sink, never received the message again.
        yield eventually(lambda: gateway.worker._failures >= 6, timeout=30)
        self.assertEqual(orjson.loads(self.sense("queue", "--json"))["dead"], 0)
        self.vm.start()
        yield eventually(lambda: ("sense_t", "node-y") in self.vm.points(), timeout=30)
        yield eventually(lambda: gateway.worker.problem is None)


class RegistryRaceTests(CloudTestCase):
    """Two processors judging the same device at once: one commit wins."""

    def test_second_commit_from_a_stale_read_loses(self):
        from dataclasses import replace

        from sense_gateway.registry import DeviceRecord

        first = DynamoDBRegistry("sense-devices", "us-east-1", self.moto.url)
        second = DynamoDBRegistry("sense-devices", "us-east-1", self.moto.url)
        new = DeviceRecord("node-r", NOW, NOW, "x")
        self.assertEqual(first.commit([new]), set())
        self.assertEqual(second.commit([new]), {"node-r"})  # both saw it as unknown
        seen_by_first = first.load(["node-r"])["node-r"]
        seen_by_second = second.load(["node-r"])["node-r"]
        self.assertEqual(first.commit([replace(seen_by_first, last_seen=NOW + 1)]), set())
        self.assertEqual(second.commit([replace(seen_by_second, last_seen=NOW + 2)]), {"node-r"})
        self.assertEqual(first.load(["node-r"])["node-r"].last_seen, NOW + 1)


class SQSBatchingTests(CloudTestCase):
    @defer.inlineCallbacks
    def test_many_puts_at_once_are_all_stored_before_their_acks(self):
        from sense_gateway.config import load_config
        from sense_gateway.envelope import Envelope, Reading, new_envelope_id
        from sense_gateway.queues.sqs import SQSQueue
        from twisted.internet import reactor

        config = load_config(environ={}, overrides={"aws.queue_url": self.queue_url,
                                                    "aws.endpoint_url": self.moto.url})
        queue = SQSQueue(config, reactor)
        queue.startService()
        self.addCleanup(queue.stopService)
        envelopes = [Envelope(new_envelope_id(), "node-b", i, NOW, "x", "coap", None, "/data", 50,
                              [Reading({"t": float(i)}, NOW)]) for i in range(25)]
        yield defer.gatherResults([queue.put([e]) for e in envelopes])
        attributes = self.sqs.get_queue_attributes(
            QueueUrl=self.queue_url, AttributeNames=["ApproximateNumberOfMessages"])["Attributes"]
        self.assertEqual(attributes["ApproximateNumberOfMessages"], "25")


class DynamoDBRebootTests(RebootSequenceChecks, TestCase):
    """The reboot rules with the registry in DynamoDB (moto)."""

    timeout = 120

    def setUp(self):
        from pathlib import Path

        from sense_gateway.processor import BatchProcessor
        from sense_gateway.sinks.sqlite import SQLiteStore

        set_environ(self, AWS_ENV)
        self.moto = MotoServer(self)
        self.moto.client("dynamodb").create_table(
            TableName="sense-devices", BillingMode="PAY_PER_REQUEST",
            KeySchema=[{"AttributeName": "id", "KeyType": "HASH"}],
            AttributeDefinitions=[{"AttributeName": "id", "AttributeType": "S"}])
        self.registry = DynamoDBRegistry("sense-devices", "us-east-1", self.moto.url)
        self.store = SQLiteStore(Path(self.mktemp()).resolve() / "readings.sqlite3",
                                 retention_days=36500)
        self.processor = BatchProcessor(self.registry, [self.store], clock=lambda: NOW + 60)
        self.addCleanup(self.processor.close)

    def test_an_item_keeps_the_digests_as_one_binary_attribute(self):
        from tests.test_processor import stamped

        self.processor.process_batch([stamped("n9", seq, 1.0 + seq, NOW + seq, boot=2)
                                      for seq in range(1, 100)])
        item = self.moto.client("dynamodb").get_item(
            TableName="sense-devices", Key={"id": {"S": "n9"}})["Item"]
        self.assertEqual((len(item["digests"]["B"]), item["boot"]["N"]), (260, "2"))


class SQSLimitTests(CloudTestCase):
    """``queue.max_depth``, postponing and dead-lettering with SQS (moto)."""

    def queue(self, **overrides):
        from twisted.internet import reactor

        from sense_gateway.config import load_config
        from sense_gateway.queues.sqs import SQSQueue

        config = load_config(environ={}, overrides={"aws.queue_url": self.queue_url,
                                                    "aws.endpoint_url": self.moto.url,
                                                    "queue.retry_after": 3, **overrides})
        queue = SQSQueue(config, reactor)
        queue.startService()
        self.addCleanup(queue.stopService)
        return queue

    def envelopes(self, count):
        from sense_gateway.envelope import Envelope, Reading, new_envelope_id

        return [Envelope(new_envelope_id(), "node-l", i, NOW, "x", "coap", None, "/data", 50,
                         [Reading({"t": float(i)}, NOW)]) for i in range(count)]

    @defer.inlineCallbacks
    def test_beyond_max_depth_puts_are_refused_until_the_queue_has_room(self):
        from sense_gateway.errors import Unavailable

        queue = self.queue(**{"queue.max_depth": 5})
        first, sixth = self.envelopes(5), self.envelopes(1)
        yield defer.gatherResults([queue.put([e]) for e in first])
        error = yield self.assertFailure(queue.put(sixth), Unavailable)
        self.assertEqual((error.diagnostic, error.max_age), ("queue full", 3))
        error = yield self.assertFailure(queue.check(), Unavailable)
        self.assertEqual(error.diagnostic, "queue full: 5 envelopes waiting (queue.max_depth 5)")
        self.assertEqual(queue.refusals["full"], 1)
        # Another processor (a Lambda) drains two; the next count shows it.
        response = self.sqs.receive_message(QueueUrl=self.queue_url, MaxNumberOfMessages=2)
        for m in response["Messages"]:
            self.sqs.delete_message(QueueUrl=self.queue_url, ReceiptHandle=m["ReceiptHandle"])
        yield queue.check()
        yield queue.put(sixth)

    @defer.inlineCallbacks
    def test_postponed_messages_are_visible_again_at_once(self):
        queue = self.queue(**{"queue.visibility_timeout": 300.0})
        yield queue.put(self.envelopes(2))
        received = yield queue.receive(10)
        self.assertEqual(len(received), 2)
        yield queue.postpone([m.receipt for m in received], "influxdb: cannot reach")
        again = yield queue.receive(10)
        self.assertEqual(sorted(m.envelope.seq for m in again), [0, 1])

    @defer.inlineCallbacks
    def test_a_refused_message_goes_to_the_dead_letter_queue_at_once_with_its_reason(self):
        queue = self.queue()
        yield queue.put(self.envelopes(1))
        [message] = yield queue.receive(10)
        yield queue.dead_letter(message.receipt, "influxdb: HTTP 400: field type conflict")
        [letter] = yield queue.dead_letters()
        self.assertEqual((letter.envelope.device, letter.reason),
                         ("node-l", "influxdb: HTTP 400: field type conflict"))
        depth = yield queue.depth()
        self.assertEqual(depth, {"visible": 0, "in_flight": 0, "dead": 1})


class DynamoDBCheckTests(CloudTestCase):
    def test_check_fails_for_a_missing_table_until_it_exists(self):
        from botocore.exceptions import ClientError

        registry = DynamoDBRegistry("sense-later", "us-east-1", self.moto.url)
        error = self.assertRaises(ClientError, registry.check)
        self.assertEqual(error.response["Error"]["Code"], "ResourceNotFoundException")
        self.moto.client("dynamodb").create_table(
            TableName="sense-later", BillingMode="PAY_PER_REQUEST",
            KeySchema=[{"AttributeName": "id", "KeyType": "HASH"}],
            AttributeDefinitions=[{"AttributeName": "id", "AttributeType": "S"}])
        registry.check()
        self.assertEqual(registry.devices(), [])

    @defer.inlineCallbacks
    def test_the_processor_starts_once_its_table_exists(self):
        gateway = yield self.gateway(**{"registry.table": "sense-later",
                                  "processor.retry_base": 0.1, "processor.retry_max": 0.3})
        yield eventually(lambda: (gateway.worker.problem or "").startswith("not started"))
        self.assertIn("ResourceNotFoundException", gateway.worker.problem)
        self.moto.client("dynamodb").create_table(
            TableName="sense-later", BillingMode="PAY_PER_REQUEST",
            KeySchema=[{"AttributeName": "id", "KeyType": "HASH"}],
            AttributeDefinitions=[{"AttributeName": "id", "AttributeType": "S"}])
        yield eventually(lambda: gateway.worker.processor is not None
                         and gateway.worker.problem is None)
