"""Built-in plugin: the ``dynamodb`` device registry, through boto3.

For processors on many machines or in AWS Lambda
(``registry.backend = "dynamodb"``). One item per device in the table
``registry.table`` (partition key ``id``, a string). Every write is
conditional on the version the processor read, so two processors can
never both advance the same device's sequence: the loser retries its
messages later.

Each item holds the device's counters, the sequence state (last number,
boot counter, the window as 16 hex digits, 65 content digests of 4 bytes
as one 260-byte binary attribute) and the 32 envelope ids last
processed, the newest inter-arrival times (``intervals``, a list of
numbers) and the interval set by hand (``interval``): about 1.4 KB, two
write capacity units per committed device.

Configuration: ``registry.table``, ``aws.region``, ``aws.endpoint_url``;
credentials from the usual AWS chain. The table is created by the
deployment (see ``etc/aws``), not by the gateway.
"""

from __future__ import annotations

from collections.abc import Iterable
from decimal import Decimal

import boto3
from botocore.config import Config as BotoConfig
from botocore.exceptions import ClientError

from sense_gateway.hookspecs import hookimpl
from sense_gateway.registry import DeviceRecord, DeviceRegistry
from sense_gateway.sequence import DeviceCounters, SequenceState

_COUNTERS = ("received", "duplicates", "lost", "resets", "unsequenced")


def _item(record: DeviceRecord) -> dict:
    c = record.state.counters
    item = {
        "id": record.id,
        "first_seen": Decimal(repr(record.first_seen)),
        "last_seen": Decimal(repr(record.last_seen)),
        "last_source": record.last_source,
        "window": format(record.state.window, "x"),
        "recent": list(record.recent),
        "version": record.version + 1,
        **{name: getattr(c, name) for name in _COUNTERS},
    }
    if record.state.last_seq is not None:
        item["last_seq"] = record.state.last_seq
    if record.state.digests:
        item["digests"] = record.state.digests
    if record.state.boot is not None:
        item["boot"] = record.state.boot
    if record.intervals:
        item["intervals"] = [Decimal(repr(i)) for i in record.intervals]
    if record.interval is not None:
        item["interval"] = Decimal(repr(record.interval))
    return item


def _record(item: dict) -> DeviceRecord:
    counters = DeviceCounters(*(int(item.get(name, 0)) for name in _COUNTERS))
    last_seq = int(item["last_seq"]) if "last_seq" in item else None
    # Items written before digests and boot counters were kept lack them.
    digests = bytes(item["digests"]) if "digests" in item else b""
    boot = int(item["boot"]) if "boot" in item else None
    return DeviceRecord(item["id"], float(item["first_seen"]), float(item["last_seen"]),
                        item["last_source"],
                        SequenceState(last_seq, int(item["window"], 16), counters, digests, boot),
                        tuple(item.get("recent", ())), int(item["version"]),
                        tuple(float(i) for i in item.get("intervals", ())),
                        float(item["interval"]) if "interval" in item else None)


class DynamoDBRegistry(DeviceRegistry):
    def __init__(self, table: str, region: str, endpoint_url: str = ""):
        self.resource = boto3.resource(
            "dynamodb", region_name=region, endpoint_url=endpoint_url or None,
            config=BotoConfig(connect_timeout=5, read_timeout=10,
                              retries={"mode": "standard", "max_attempts": 3}))
        self.table = self.resource.Table(table)
        self.table_name = table

    def load(self, device_ids: Iterable[str]) -> dict[str, DeviceRecord]:
        ids = list(dict.fromkeys(device_ids))
        records = {}
        for start in range(0, len(ids), 100):
            request = {self.table_name: {"Keys": [{"id": i} for i in ids[start:start + 100]],
                                         "ConsistentRead": True}}
            while request:
                response = self.resource.batch_get_item(RequestItems=request)
                for item in response["Responses"].get(self.table_name, []):
                    records[item["id"]] = _record(item)
                request = response.get("UnprocessedKeys") or None
        return records

    def check(self) -> None:
        # BatchGetItem of an id no device can have (device ids hold no
        # spaces): the one read call the processor's role may make anyway,
        # and it fails for a missing table or an endpoint out of reach.
        self.load([" "])

    def commit(self, records: list[DeviceRecord]) -> set[str]:
        lost = set()
        for record in records:
            if record.version == 0:
                condition = {"ConditionExpression": "attribute_not_exists(id)"}
            else:
                condition = {"ConditionExpression": "version = :v",
                             "ExpressionAttributeValues": {":v": record.version}}
            try:
                self.table.put_item(Item=_item(record), **condition)
            except ClientError as e:
                if e.response["Error"]["Code"] != "ConditionalCheckFailedException":
                    raise
                lost.add(record.id)
        return lost

    def set_interval(self, device: str, seconds: float | None) -> bool:
        # Version bumped, so a processor holding the record it read before
        # loses its conditional put (and retries) instead of undoing this.
        if seconds is None:
            change = {"UpdateExpression": "REMOVE #i SET version = version + :one"}
            values = {":one": 1}
        else:
            change = {"UpdateExpression": "SET #i = :i, version = version + :one"}
            values = {":i": Decimal(repr(seconds)), ":one": 1}
        try:
            self.table.update_item(Key={"id": device}, ConditionExpression="attribute_exists(id)",
                                   ExpressionAttributeNames={"#i": "interval"},
                                   ExpressionAttributeValues=values, **change)
        except ClientError as e:
            if e.response["Error"]["Code"] != "ConditionalCheckFailedException":
                raise
            return False
        return True

    def devices(self) -> list[DeviceRecord]:
        items, kwargs = [], {"ConsistentRead": True}
        while True:
            response = self.table.scan(**kwargs)
            items.extend(response["Items"])
            if "LastEvaluatedKey" not in response:
                break
            kwargs["ExclusiveStartKey"] = response["LastEvaluatedKey"]
        return sorted((_record(i) for i in items), key=lambda r: r.id)

    def count(self) -> int:
        total, kwargs = 0, {"Select": "COUNT"}
        while True:
            response = self.table.scan(**kwargs)
            total += response["Count"]
            if "LastEvaluatedKey" not in response:
                return total
            kwargs["ExclusiveStartKey"] = response["LastEvaluatedKey"]


@hookimpl
def sense_register_registries():
    return {"dynamodb": lambda config: DynamoDBRegistry(
        config.registry.table, config.aws.region, config.aws.endpoint_url)}
