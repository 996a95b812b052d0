"""AWS Lambda entry point: ``sense_gateway.aws.lambda_handler.handler``.

For an SQS event-source mapping with ``ReportBatchItemFailures`` (batch
size 10, as the original system). Each record's body is an envelope the
gateway queued; the batch goes through the same processing core as the
in-process worker. Records that failed are returned in
``batchItemFailures`` so only they are retried (and, after the queue's
``maxReceiveCount``, moved to its dead-letter queue by the redrive
policy; the reason is in the function's log). When nothing could be
judged (the registry is unreachable) the handler raises and the whole
batch is retried.

The same function also sweeps the devices' liveness when invoked by a
schedule (an EventBridge rule, ``rate(1 minute)``: any event with
``"source": "aws.events"``, or ``{"sense": "sweep"}``): the state of each
late and offline device goes to the sinks (``sense_device``: ``state``,
``silent``, ``interval``), which the SQS batches cannot do for a device
that sends nothing. It returns ``{"swept": N}``.

Configured from ``SENSE_*`` environment variables only, e.g.
``SENSE_REGISTRY_BACKEND=dynamodb``, ``SENSE_REGISTRY_TABLE``,
``SENSE_SINKS_ENABLED=influxdb``, ``SENSE_INFLUXDB_URL``,
``SENSE_INFLUXDB_TOKEN``, ``SENSE_INFLUXDB_ORG``, ``SENSE_INFLUXDB_BUCKET``.
Needs neither Twisted nor txthings.
"""

from __future__ import annotations

import logging
import os

from sense_gateway.backends import processor_factory
from sense_gateway.config import load_config
from sense_gateway.envelope import Envelope
from sense_gateway.plugins import PROCESSOR_PLUGINS, make_plugin_manager
from sense_gateway.processor import BatchProcessor, Outcome

log = logging.getLogger("sense_gateway")
log.setLevel(logging.INFO)

# Built once per Lambda container and reused by later invocations.
_processor: BatchProcessor | None = None


def _build_processor() -> BatchProcessor:
    config = load_config(environ=os.environ)
    pm = make_plugin_manager(config.disable_plugins, builtins=PROCESSOR_PLUGINS,
                             plugins_dir=None)
    return processor_factory(config, pm)()


def handler(event, context):
    global _processor
    if _processor is None:
        _processor = _build_processor()
    if event.get("source") == "aws.events" or event.get("sense") == "sweep":
        return {"swept": _processor.sweep()}
    failures = []
    ids, envelopes = [], []
    for record in event.get("Records", []):
        try:
            envelopes.append(Envelope.from_json(record["body"]))
            ids.append(record["messageId"])
        except (ValueError, KeyError, TypeError) as e:
            log.error("record %s is not an envelope: %s", record.get("messageId"), e)
            failures.append(record.get("messageId"))
    # RegistryUnavailable propagates: the whole batch is retried.
    results = _processor.process_batch(envelopes)
    for message_id, envelope, result in zip(ids, envelopes, results):
        # A refused one too: the handler has no queue of its own to bury
        # it in, so the redrive policy does, after maxReceiveCount.
        if result.outcome is Outcome.FAILED or result.outcome is Outcome.REFUSED:
            log.warning("%s seq %s not written (message %s): %s",
                        envelope.device, envelope.seq, message_id, result.reason)
            failures.append(message_id)
    return {"batchItemFailures": [{"itemIdentifier": i} for i in failures]}
