"""Built-in plugin: device credentials in DynamoDB, beside the ``dynamodb``
registry.

One item per device in the table ``registry.credentials_table`` (partition
key ``device``, a string): ``key`` (binary, absent once revoked),
``changed`` and ``serial``; and one item, ``COUNTER``, holding the latest
serial (its key has a space, which no device id can have). A gateway polls
that one item and scans only when it changed. The table is created by the
deployment (``etc/aws``).
"""

from __future__ import annotations

import time
from decimal import Decimal

import boto3
from boto3.dynamodb.conditions import Attr
from botocore.config import Config as BotoConfig

from sense_gateway.credentials import Credential, CredentialStore
from sense_gateway.hookspecs import hookimpl

#: the counter item's key: a space cannot be in a device id
COUNTER = "# serial"


class DynamoDBCredentialStore(CredentialStore):
    def __init__(self, table: str, region: str, endpoint_url: str = ""):
        resource = boto3.resource(
            "dynamodb", region_name=region, endpoint_url=endpoint_url or None,
            config=BotoConfig(retries={"max_attempts": 3, "mode": "standard"}))
        self.table = resource.Table(table)

    def _next_serial(self) -> int:
        answer = self.table.update_item(
            Key={"device": COUNTER}, UpdateExpression="ADD serial :one",
            ExpressionAttributeValues={":one": 1}, ReturnValues="UPDATED_NEW")
        return int(answer["Attributes"]["serial"])

    def set_key(self, device: str, key: bytes) -> Credential:
        serial, now = self._next_serial(), time.time()
        self.table.put_item(Item={"device": device, "key": bytes(key),
                                  "changed": Decimal(repr(now)), "serial": serial})
        return Credential(device, bytes(key), now, serial)

    def revoke(self, device: str) -> bool:
        item = self.table.get_item(Key={"device": device}, ConsistentRead=True).get("Item")
        if item is None or "key" not in item:
            return False
        serial, now = self._next_serial(), time.time()
        self.table.put_item(Item={"device": device, "changed": Decimal(repr(now)),
                                  "serial": serial})
        return True

    def serial(self) -> int:
        item = self.table.get_item(Key={"device": COUNTER}, ConsistentRead=True).get("Item")
        return int(item["serial"]) if item else 0

    def changes(self, since: int) -> list[Credential]:
        found, start = [], None
        while True:
            kwargs = {"FilterExpression": Attr("serial").gt(since) & Attr("device").ne(COUNTER),
                      "ConsistentRead": True}
            if start is not None:
                kwargs["ExclusiveStartKey"] = start
            page = self.table.scan(**kwargs)
            for item in page.get("Items", []):
                key = item.get("key")
                found.append(Credential(item["device"], bytes(key.value) if key is not None
                                        else None, float(item["changed"]), int(item["serial"])))
            start = page.get("LastEvaluatedKey")
            if start is None:
                return sorted(found, key=lambda c: c.serial)


@hookimpl
def sense_register_credential_stores():
    return {"dynamodb": lambda config: DynamoDBCredentialStore(
        config.registry.credentials_table, config.aws.region, config.aws.endpoint_url)}
