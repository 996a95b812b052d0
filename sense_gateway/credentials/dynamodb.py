"""Built-in plugin: device credentials in DynamoDB, beside the ``dynamodb``
registry.

One item per device in the table ``registry.credentials_table`` (partition
key ``device``, a string): ``key`` (binary, absent once revoked),
``changed`` and ``serial``; and one item, ``COUNTER``, holding the latest
serial (its key has a space, which no device id can have), written in the
same transaction as each change. A gateway polls that one item and scans
only when it changed. The table is created by the
deployment (``etc/aws``).
"""

from __future__ import annotations

import random
import time
from decimal import Decimal

import boto3
from boto3.dynamodb.conditions import Attr
from botocore.config import Config as BotoConfig
from botocore.exceptions import ClientError

from sense_gateway.credentials import Credential, CredentialStore
from sense_gateway.hookspecs import hookimpl

#: the counter item's key: a space cannot be in a device id
COUNTER = "# serial"
#: tries of a change that other writers keep overtaking
MAX_ATTEMPTS = 50


class DynamoDBCredentialStore(CredentialStore):
    def __init__(self, table: str, region: str, endpoint_url: str = ""):
        resource = boto3.resource(
            "dynamodb", region_name=region, endpoint_url=endpoint_url or None,
            config=BotoConfig(retries={"max_attempts": 3, "mode": "standard"}))
        self.table = resource.Table(table)

    def _change(self, device: str, key: bytes | None) -> Credential:
        """Write the device's item and the next serial in one transaction,
        conditional on the serial read: a gateway never sees a serial
        whose change it cannot read, and two writers never share one."""
        client = self.table.meta.client
        for attempt in range(MAX_ATTEMPTS):
            current = self.serial()
            serial, now = current + 1, time.time()
            item = {"device": device, "changed": Decimal(repr(now)), "serial": serial}
            if key is not None:
                item["key"] = bytes(key)
            counter = {"TableName": self.table.name, "Key": {"device": COUNTER},
                       "UpdateExpression": "SET serial = :next",
                       "ExpressionAttributeValues": {":next": serial}}
            if current:
                counter["ConditionExpression"] = "serial = :current"
                counter["ExpressionAttributeValues"][":current"] = current
            else:
                counter["ConditionExpression"] = "attribute_not_exists(serial)"
            try:
                client.transact_write_items(TransactItems=[
                    {"Update": counter}, {"Put": {"TableName": self.table.name, "Item": item}}])
            except ClientError as e:
                if e.response["Error"]["Code"] != "TransactionCanceledException":
                    raise
                # Another writer took this serial: read it again, after a
                # random pause so two writers do not keep colliding.
                time.sleep(random.uniform(0, 0.005 * (attempt + 1)))
                continue
            return Credential(device, item.get("key"), now, serial)
        raise RuntimeError(f"credentials: {MAX_ATTEMPTS} concurrent writers won over this one")

    def set_key(self, device: str, key: bytes) -> Credential:
        return self._change(device, key)

    def revoke(self, device: str) -> bool:
        item = self.table.get_item(Key={"device": device}, ConsistentRead=True).get("Item")
        if item is None or "key" not in item:
            return False
        self._change(device, None)
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
