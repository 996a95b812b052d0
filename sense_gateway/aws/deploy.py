"""Create or update the AWS side of SENSE Gateway, idempotently, with boto3.

What ``./deploy.sh --mode lambda`` runs after building the package: the
dead-letter queue, the queue (redrive to it after ``--max-receive-count``
receives), the device and credential tables, the function's log group, role and
least-privilege policy, the function (code, configuration, reserved
concurrency), the SQS event-source mapping (batch size 10,
ReportBatchItemFailures, maximum concurrency) and an alarm on the
dead-letter queue's depth. Names and defaults are those of
``etc/aws/sense-gateway.yaml`` (the CloudFormation template), and a test
keeps the two in step.

Each resource is read first and only changed where it differs, so a
second run reports ``unchanged`` everywhere; ``--dry-run`` only reads and
says what it would do. ``--endpoint-url`` points every client at an
AWS-compatible endpoint (moto in the tests).

    python -m sense_gateway.aws.deploy --package dist/sense-gateway-lambda.zip [--name sense]
        [--region R] [--profile P] [--endpoint-url URL] [--dry-run] [--env NAME=VALUE ...]
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from sense_gateway.aws.package import DEFAULT_OUTPUT, HANDLER
from sense_gateway.config import load_config
from sense_gateway.errors import ConfigError

RUNTIME = "python3.11"
#: The SQS event-source mapping hands the function this many messages.
BATCH_SIZE = 10
#: AWS's advice for a queue feeding a function: at least six times its timeout.
VISIBILITY_FACTOR = 6
#: Receives before a message is dead-lettered; lower than 5 and a burst of
#: throttled invocations alone could dead-letter good messages.
MIN_MAX_RECEIVE_COUNT = 5
QUEUE_RETENTION = 4 * 86400
# Longer than the queue's: a dead letter keeps its first enqueue time.
DLQ_RETENTION = 14 * 86400
LOG_RETENTION_DAYS = 30
LAMBDA_TRUST = {
    "Version": "2012-10-17",
    "Statement": [{"Effect": "Allow", "Principal": {"Service": "lambda.amazonaws.com"},
                   "Action": "sts:AssumeRole"}],
}


@dataclass(frozen=True)
class Settings:
    name: str = "sense"
    region: str = "us-east-1"
    profile: str | None = None
    endpoint_url: str | None = None
    package: Path = DEFAULT_OUTPUT
    function_timeout: int = 60
    memory: int = 256
    architecture: str = "x86_64"
    #: 0: no reserved concurrency (the account's unreserved pool)
    reserved_concurrency: int = 5
    max_concurrency: int = 5
    max_receive_count: int = 5
    alarm_topic_arn: str = ""
    environment: dict[str, str] = field(default_factory=dict)
    dry_run: bool = False

    @property
    def queue(self) -> str:
        return self.name

    @property
    def dead_letter_queue(self) -> str:
        return f"{self.name}-dlq"

    @property
    def table(self) -> str:
        return f"{self.name}-devices"

    @property
    def credentials_table(self) -> str:
        return f"{self.name}-credentials"

    @property
    def function(self) -> str:
        return f"{self.name}-processor"

    @property
    def role(self) -> str:
        return f"{self.name}-processor"

    @property
    def log_group(self) -> str:
        return f"/aws/lambda/{self.function}"

    @property
    def alarm(self) -> str:
        return f"{self.name}-dead-letters"

    def check(self) -> None:
        if self.max_receive_count < MIN_MAX_RECEIVE_COUNT:
            raise ConfigError(f"--max-receive-count: at least {MIN_MAX_RECEIVE_COUNT}, so throttling "
                              f"alone does not dead-letter messages (got {self.max_receive_count})")
        if not 1 <= self.function_timeout <= 900:
            raise ConfigError(f"--function-timeout: 1 to 900 seconds, got {self.function_timeout}")
        if not 2 <= self.max_concurrency <= 1000:
            raise ConfigError(f"--max-concurrency: 2 to 1000, got {self.max_concurrency}")
        if self.reserved_concurrency and self.reserved_concurrency < self.max_concurrency:
            raise ConfigError(f"--reserved-concurrency ({self.reserved_concurrency}) below "
                              f"--max-concurrency ({self.max_concurrency}): the mapping would be throttled")


def function_environment(settings: Settings) -> dict[str, str]:
    """The function's ``SENSE_*`` variables, checked by the gateway's own
    configuration loader so a wrong one fails here, not in AWS."""
    variables = {
        "SENSE_REGISTRY_BACKEND": "dynamodb",
        "SENSE_REGISTRY_TABLE": settings.table,
        "SENSE_AWS_REGION": settings.region,
        "SENSE_SINKS_ENABLED": "influxdb",
        **settings.environment,
    }
    load_config(environ=variables)
    return variables


class Deployment:
    """Ensures each resource in turn; :attr:`report` holds one line per resource."""

    def __init__(self, settings: Settings, out: Callable[[str], None] = print):
        import boto3

        self.settings = settings
        self.out = out
        self.report: list[tuple[str, str]] = []
        self._role_changed = False
        session = boto3.Session(profile_name=settings.profile, region_name=settings.region)
        self._clients = {}
        self._session = session

    def client(self, service: str):
        if service not in self._clients:
            from botocore.config import Config

            self._clients[service] = self._session.client(
                service, endpoint_url=self.settings.endpoint_url or None,
                config=Config(retries={"mode": "standard", "max_attempts": 5}))
        return self._clients[service]

    def note(self, resource: str, outcome: str) -> None:
        self.report.append((resource, outcome))
        self.out(f"{resource}: {outcome}")

    def change(self, resource: str, outcome: str, action: Callable[[], object]) -> None:
        """Run *action* unless this is a dry run, then report *outcome*."""
        if self.settings.dry_run:
            self.note(resource, f"would be {outcome}")
        else:
            action()
            self.note(resource, outcome)

    # -- names -------------------------------------------------------------

    def arn(self, service: str, resource: str) -> str:
        return f"arn:aws:{service}:{self.settings.region}:{self.account}:{resource}"

    def run(self) -> list[tuple[str, str]]:
        s = self.settings
        s.check()
        self.environment = function_environment(s)
        self.account = self.client("sts").get_caller_identity()["Account"]
        self.queue_arn = self.arn("sqs", s.queue)
        self.dlq_arn = self.arn("sqs", s.dead_letter_queue)
        self.table_arn = self.arn("dynamodb", f"table/{s.table}")
        self.function_arn = self.arn("lambda", f"function:{s.function}")
        self.role_arn = f"arn:aws:iam::{self.account}:role/{s.role}"
        self.ensure_queue(s.dead_letter_queue, {"MessageRetentionPeriod": str(DLQ_RETENTION)})
        self.queue_url = self.ensure_queue(s.queue, {
            "VisibilityTimeout": str(VISIBILITY_FACTOR * s.function_timeout),
            "MessageRetentionPeriod": str(QUEUE_RETENTION),
            "RedrivePolicy": json.dumps({"deadLetterTargetArn": self.dlq_arn,
                                         "maxReceiveCount": s.max_receive_count}),
        })
        self.ensure_table(s.table, "id", "the registry")
        self.ensure_table(s.credentials_table, "device", "the credential store")
        self.ensure_log_group()
        self.ensure_role()
        self.ensure_function()
        self.ensure_event_source_mapping()
        self.ensure_alarm()
        return self.report

    # -- SQS ---------------------------------------------------------------

    def ensure_queue(self, name: str, attributes: dict[str, str]) -> str | None:
        sqs = self.client("sqs")
        resource = f"queue {name}"
        try:
            url = sqs.get_queue_url(QueueName=name)["QueueUrl"]
        except sqs.exceptions.QueueDoesNotExist:
            self.change(resource, "created", lambda: sqs.create_queue(QueueName=name, Attributes=attributes))
            return None if self.settings.dry_run else sqs.get_queue_url(QueueName=name)["QueueUrl"]
        current = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]
        differing = {key: value for key, value in attributes.items()
                     if not _same_attribute(key, current.get(key), value)}
        if differing:
            self.change(resource, f"updated ({', '.join(sorted(differing))})",
                        lambda: sqs.set_queue_attributes(QueueUrl=url, Attributes=differing))
        else:
            self.note(resource, "unchanged")
        return url

    # -- DynamoDB ----------------------------------------------------------

    def ensure_table(self, name: str, key: str, user: str) -> None:
        dynamodb = self.client("dynamodb")
        resource = f"table {name}"
        try:
            table = dynamodb.describe_table(TableName=name)["Table"]
        except dynamodb.exceptions.ResourceNotFoundException:
            def create():
                dynamodb.create_table(
                    TableName=name, BillingMode="PAY_PER_REQUEST",
                    KeySchema=[{"AttributeName": key, "KeyType": "HASH"}],
                    AttributeDefinitions=[{"AttributeName": key, "AttributeType": "S"}])
                dynamodb.get_waiter("table_exists").wait(
                    TableName=name, WaiterConfig={"Delay": 1, "MaxAttempts": 120})
            self.change(resource, "created", create)
            return
        if table["KeySchema"] != [{"AttributeName": key, "KeyType": "HASH"}]:
            raise DeployError(f"{resource}: exists with another key ({table['KeySchema']}); "
                              f"{user} needs the partition key {key} (string)")
        billing = table.get("BillingModeSummary", {}).get("BillingMode", "PROVISIONED")
        if billing != "PAY_PER_REQUEST":
            self.change(resource, "updated (BillingMode)", lambda: dynamodb.update_table(
                TableName=name, BillingMode="PAY_PER_REQUEST"))
        else:
            self.note(resource, "unchanged")

    # -- CloudWatch Logs ---------------------------------------------------

    def ensure_log_group(self) -> None:
        logs = self.client("logs")
        name = self.settings.log_group
        resource = f"log group {name}"
        groups = [g for g in logs.describe_log_groups(logGroupNamePrefix=name)["logGroups"]
                  if g["logGroupName"] == name]
        if not groups:
            def create():
                logs.create_log_group(logGroupName=name)
                logs.put_retention_policy(logGroupName=name, retentionInDays=LOG_RETENTION_DAYS)
            self.change(resource, "created", create)
        elif groups[0].get("retentionInDays") != LOG_RETENTION_DAYS:
            self.change(resource, "updated (retention)", lambda: logs.put_retention_policy(
                logGroupName=name, retentionInDays=LOG_RETENTION_DAYS))
        else:
            self.note(resource, "unchanged")

    # -- IAM ---------------------------------------------------------------

    def role_policy(self) -> dict:
        """Only what the function does: take messages from its queue, read
        and write its table (Scan: the scheduled liveness sweep), write its
        own log group."""
        return {
            "Version": "2012-10-17",
            "Statement": [
                {"Sid": "ConsumeQueue", "Effect": "Allow",
                 "Action": ["sqs:ReceiveMessage", "sqs:DeleteMessage", "sqs:GetQueueAttributes"],
                 "Resource": self.queue_arn},
                {"Sid": "DeviceRegistry", "Effect": "Allow",
                 "Action": ["dynamodb:BatchGetItem", "dynamodb:PutItem", "dynamodb:Scan"],
                 "Resource": self.table_arn},
                {"Sid": "Logs", "Effect": "Allow",
                 "Action": ["logs:CreateLogStream", "logs:PutLogEvents"],
                 "Resource": f"arn:aws:logs:{self.settings.region}:{self.account}:"
                             f"log-group:{self.settings.log_group}:*"},
            ],
        }

    def ensure_role(self) -> None:
        iam = self.client("iam")
        name = self.settings.role
        resource = f"role {name}"
        policy = self.role_policy()
        try:
            role = iam.get_role(RoleName=name)["Role"]
        except iam.exceptions.NoSuchEntityException:
            def create():
                iam.create_role(RoleName=name, AssumeRolePolicyDocument=json.dumps(LAMBDA_TRUST),
                                Description="SENSE Gateway processor (Lambda)")
                iam.put_role_policy(RoleName=name, PolicyName=name, PolicyDocument=json.dumps(policy))
            self._role_changed = True
            self.change(resource, "created", create)
            return
        changes = []
        if _policy_document(role["AssumeRolePolicyDocument"]) != LAMBDA_TRUST:
            changes.append(("trust policy", lambda: iam.update_assume_role_policy(
                RoleName=name, PolicyDocument=json.dumps(LAMBDA_TRUST))))
        try:
            current = _policy_document(iam.get_role_policy(RoleName=name, PolicyName=name)["PolicyDocument"])
        except iam.exceptions.NoSuchEntityException:
            current = None
        if current != policy:
            changes.append(("policy", lambda: iam.put_role_policy(
                RoleName=name, PolicyName=name, PolicyDocument=json.dumps(policy))))
        self._role_changed = bool(changes)
        self._apply(resource, changes)

    def _apply(self, resource: str, changes: list[tuple[str, Callable]]) -> None:
        if not changes:
            self.note(resource, "unchanged")
            return

        def run_all():
            for _, action in changes:
                action()
        self.change(resource, f"updated ({', '.join(what for what, _ in changes)})", run_all)

    # -- Lambda ------------------------------------------------------------

    def function_configuration(self) -> dict:
        s = self.settings
        return {"Runtime": RUNTIME, "Handler": HANDLER, "Role": self.role_arn,
                "Timeout": s.function_timeout, "MemorySize": s.memory,
                "Environment": {"Variables": self.environment},
                "Description": "SENSE Gateway processor: SQS batches to the registry and sinks"}

    def ensure_function(self) -> None:
        lam = self.client("lambda")
        s = self.settings
        name = s.function
        resource = f"function {name}"
        wanted = self.function_configuration()
        package = Path(s.package)
        code = package.read_bytes() if package.exists() else None
        if code is None and not s.dry_run:
            raise DeployError(f"{package}: no such package; build it with `sense package-lambda`")
        try:
            current = lam.get_function(FunctionName=name)["Configuration"]
        except lam.exceptions.ResourceNotFoundException:
            def create():
                self._create_function(lam, wanted, code)
                self._ensure_concurrency(lam, created=True)
            self.change(resource, "created", create)
            return
        changes = []
        differing = [key for key, value in wanted.items() if current.get(key) != value]
        if differing:
            def configure():
                lam.update_function_configuration(FunctionName=name, **wanted)
                lam.get_waiter("function_updated_v2").wait(
                    FunctionName=name, WaiterConfig={"Delay": 2, "MaxAttempts": 150})
            changes.append((f"configuration: {', '.join(differing)}", configure))
        digest = base64.b64encode(hashlib.sha256(code).digest()).decode() if code else None
        if (digest != current.get("CodeSha256")
                or current.get("Architectures", ["x86_64"]) != [s.architecture]):
            def update_code():
                lam.update_function_code(FunctionName=name, ZipFile=code,
                                         Architectures=[s.architecture])
                lam.get_waiter("function_updated_v2").wait(
                    FunctionName=name, WaiterConfig={"Delay": 2, "MaxAttempts": 150})
            changes.append(("code" if code else "code (package not built yet)", update_code))
        concurrency = lam.get_function_concurrency(FunctionName=name).get("ReservedConcurrentExecutions")
        if concurrency != (s.reserved_concurrency or None):
            changes.append(("reserved concurrency", lambda: self._ensure_concurrency(lam)))
        self._apply(resource, changes)

    def _create_function(self, lam, configuration: dict, code: bytes) -> None:
        self._while_iam_settles(lam, lambda: lam.create_function(
            FunctionName=self.settings.function, Code={"ZipFile": code}, PackageType="Zip",
            Architectures=[self.settings.architecture], **configuration))
        lam.get_waiter("function_active_v2").wait(
            FunctionName=self.settings.function, WaiterConfig={"Delay": 2, "MaxAttempts": 150})

    def _while_iam_settles(self, lam, action: Callable[[], object]) -> None:
        """Run *action*, retrying for a while the errors Lambda gives while
        a role (or its policy) made a moment ago is not visible to it yet:
        IAM is eventually consistent."""
        deadline = time.monotonic() + (90 if self._role_changed else 0)
        while True:
            try:
                action()
                return
            except lam.exceptions.InvalidParameterValueException as e:
                settling = "cannot be assumed" in str(e) or "does not have permissions" in str(e)
                if not settling or time.monotonic() > deadline:
                    raise
                time.sleep(3)

    def _ensure_concurrency(self, lam, created: bool = False) -> None:
        if self.settings.reserved_concurrency:
            lam.put_function_concurrency(FunctionName=self.settings.function,
                                         ReservedConcurrentExecutions=self.settings.reserved_concurrency)
        elif not created:
            lam.delete_function_concurrency(FunctionName=self.settings.function)

    def event_source_mapping(self) -> dict:
        return {"BatchSize": BATCH_SIZE, "MaximumBatchingWindowInSeconds": 0,
                "FunctionResponseTypes": ["ReportBatchItemFailures"],
                "ScalingConfig": {"MaximumConcurrency": self.settings.max_concurrency},
                "Enabled": True}

    def ensure_event_source_mapping(self) -> None:
        lam = self.client("lambda")
        resource = f"event source mapping {self.settings.queue} -> {self.settings.function}"
        wanted = self.event_source_mapping()
        try:
            mappings = lam.list_event_source_mappings(
                EventSourceArn=self.queue_arn, FunctionName=self.settings.function)["EventSourceMappings"]
        except lam.exceptions.ResourceNotFoundException:
            mappings = []  # the function does not exist yet (dry run)
        if not mappings:
            self.change(resource, "created", lambda: self._while_iam_settles(
                lam, lambda: lam.create_event_source_mapping(
                    EventSourceArn=self.queue_arn, FunctionName=self.settings.function, **wanted)))
            return
        [current] = mappings
        state = current.get("State")
        differing = [key for key, value in wanted.items()
                     if key != "Enabled" and current.get(key, _ESM_DEFAULTS.get(key)) != value]
        if state in ("Disabled", "Disabling"):
            differing.append("Enabled")
        if differing:
            self.change(resource, f"updated ({', '.join(differing)})", lambda: lam.update_event_source_mapping(
                UUID=current["UUID"], FunctionName=self.settings.function, **wanted))
        else:
            self.note(resource, "unchanged")

    # -- CloudWatch --------------------------------------------------------

    def alarm(self) -> dict:
        topic = self.settings.alarm_topic_arn
        return {"AlarmName": self.settings.alarm,
                "AlarmDescription": f"Messages in {self.settings.dead_letter_queue}: "
                                    "see `sense dlq list`, replay with `sense dlq replay`",
                "Namespace": "AWS/SQS", "MetricName": "ApproximateNumberOfMessagesVisible",
                "Dimensions": [{"Name": "QueueName", "Value": self.settings.dead_letter_queue}],
                "Statistic": "Maximum", "Period": 300, "EvaluationPeriods": 1, "Threshold": 0.0,
                "ComparisonOperator": "GreaterThanThreshold", "TreatMissingData": "notBreaching",
                "AlarmActions": [topic] if topic else [], "ActionsEnabled": True}

    def ensure_alarm(self) -> None:
        cloudwatch = self.client("cloudwatch")
        wanted = self.alarm()
        resource = f"alarm {wanted['AlarmName']}"
        found = cloudwatch.describe_alarms(AlarmNames=[wanted["AlarmName"]])["MetricAlarms"]
        if not found:
            self.change(resource, "created", lambda: cloudwatch.put_metric_alarm(**wanted))
            return
        differing = [key for key, value in wanted.items() if found[0].get(key) != value]
        if differing:
            self.change(resource, f"updated ({', '.join(differing)})",
                        lambda: cloudwatch.put_metric_alarm(**wanted))
        else:
            self.note(resource, "unchanged")


_ESM_DEFAULTS = {"MaximumBatchingWindowInSeconds": 0, "FunctionResponseTypes": [], "ScalingConfig": {}}


class DeployError(Exception):
    """The deployment cannot go on; the message says why."""


def _same_attribute(key: str, current: str | None, wanted: str) -> bool:
    if current is None:
        return False
    if key == "RedrivePolicy":
        a, b = json.loads(current), json.loads(wanted)
        return (a.get("deadLetterTargetArn") == b["deadLetterTargetArn"]
                and str(a.get("maxReceiveCount")) == str(b["maxReceiveCount"]))
    return str(current) == str(wanted)


def _policy_document(document) -> dict | None:
    """IAM hands documents back as URL-encoded JSON text or already parsed;
    None for one that cannot be read (it is then replaced)."""
    if isinstance(document, str):
        from urllib.parse import unquote

        try:
            document = json.loads(unquote(document))
        except ValueError:
            return None
    return document


def _key_value(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name, value


def parse_args(argv: list[str] | None) -> tuple[Settings, Path | None]:
    defaults = Settings()
    parser = argparse.ArgumentParser(
        prog="python -m sense_gateway.aws.deploy",
        description="Create or update the queue, dead-letter queue, device table, role, "
                    "function and event-source mapping of SENSE Gateway's processor in AWS.")
    parser.add_argument("--name", default=defaults.name,
                        help="prefix of every resource name (default: %(default)s)")
    parser.add_argument("--region", default=os.environ.get("AWS_REGION")
                        or os.environ.get("AWS_DEFAULT_REGION") or defaults.region)
    parser.add_argument("--profile", default=None, help="AWS credentials profile")
    parser.add_argument("--endpoint-url", default=None,
                        help="an AWS-compatible endpoint for every service (e.g. moto)")
    parser.add_argument("--package", type=Path, default=defaults.package,
                        help="the zip from `sense package-lambda` (default: %(default)s)")
    parser.add_argument("--function-timeout", type=int, default=defaults.function_timeout,
                        help="seconds (default: %(default)s); the queue's visibility timeout is 6x this")
    parser.add_argument("--memory", type=int, default=defaults.memory, help="MB (default: %(default)s)")
    parser.add_argument("--architecture", choices=("x86_64", "arm64"), default=defaults.architecture)
    parser.add_argument("--reserved-concurrency", type=int, default=defaults.reserved_concurrency,
                        help="0 for none (default: %(default)s)")
    parser.add_argument("--max-concurrency", type=int, default=defaults.max_concurrency,
                        help="of the event-source mapping, 2 to 1000 (default: %(default)s)")
    parser.add_argument("--max-receive-count", type=int, default=defaults.max_receive_count,
                        help="receives before the dead-letter queue, at least 5 (default: %(default)s)")
    parser.add_argument("--alarm-topic-arn", default="", help="SNS topic told about dead letters")
    parser.add_argument("--env", type=_key_value, action="append", default=[], metavar="NAME=VALUE",
                        help="a SENSE_* variable for the function (repeatable); SENSE_INFLUXDB_* "
                             "variables of this environment are passed on as well")
    parser.add_argument("--dry-run", action="store_true", help="only read, and say what would change")
    parser.add_argument("--outputs", type=Path, default=None,
                        help="write NAME=VALUE lines (queue_url, function_arn) to this file")
    args = parser.parse_args(argv)
    environment = {name: value for name, value in os.environ.items()
                   if name.startswith("SENSE_INFLUXDB_")}
    environment.update(args.env)
    return Settings(name=args.name, region=args.region, profile=args.profile,
                    endpoint_url=args.endpoint_url, package=args.package,
                    function_timeout=args.function_timeout, memory=args.memory,
                    architecture=args.architecture, reserved_concurrency=args.reserved_concurrency,
                    max_concurrency=args.max_concurrency, max_receive_count=args.max_receive_count,
                    alarm_topic_arn=args.alarm_topic_arn, environment=environment,
                    dry_run=args.dry_run), args.outputs


def main(argv: list[str] | None = None) -> int:
    settings, outputs = parse_args(argv)
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        deployment = Deployment(settings)
        deployment.run()
    except (ConfigError, DeployError) as e:
        print(f"deploy: {e}", file=sys.stderr)
        return 2
    except (BotoCoreError, ClientError) as e:
        print(f"deploy: AWS refused: {e}", file=sys.stderr)
        return 1
    if deployment.queue_url:
        print(f"gateways send to: SENSE_QUEUE_BACKEND=sqs SENSE_AWS_REGION={settings.region} "
              f"SENSE_AWS_QUEUE_URL={deployment.queue_url}")
    if outputs is not None:
        outputs.write_text(f"queue_url={deployment.queue_url or ''}\n"
                           f"function_arn={deployment.function_arn}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
