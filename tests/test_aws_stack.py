"""The AWS side for real: ``deploy.sh --mode lambda|all`` against moto in
server mode (S3, CloudFormation, Lambda, SQS, DynamoDB, IAM, EventBridge,
Logs), what the stack made read back through each service's own API, and
``etc/aws/sense-gateway.yaml`` through cfn-lint.

moto's CloudFormation (5.2) has gaps; these tests work within them:

- A stack made or updated through a change set reports no Outputs (moto
  resolves them in CreateStack and UpdateStack only). The settings printed
  for gateways are checked on a stack CreateStack made
  (:class:`GatewaySettingsTests`); on a change-set stack the script names
  the missing outputs instead of guessing them, which is checked too.
- A change set lists the resources the template adds, removes or changes;
  one whose parameters alone differ lists none (AWS lists the resources
  they reach). The script prints the differing parameters itself; the
  tests check those lines, and the resources through their own APIs.
- "Nothing to change" is judged against the parameters the stack was
  created with, which executing a change set does not update: so the
  unchanged run is checked right after the one that created the stack.
- An inline policy of a role comes back as Python's repr of the document,
  not as JSON: the test reads it as such.
- AWS::CloudWatch::Alarm is not made through CloudFormation (moto skips it
  with a warning): the alarm is checked in the template.
- Parameter constraints (AllowedValues, MinValue, AllowedPattern) are not
  checked: the script checks them itself before anything is made, and
  that is what the refusal test sees.
"""

from __future__ import annotations

import ast
import hashlib
import json
import shutil
import subprocess
import zipfile
from pathlib import Path

from twisted.trial.unittest import TestCase

from sense_gateway.aws import package, template
from sense_gateway.config import load_config
from tests.servers import BIN, MotoServer
from tests.support import REPO, clean_environment, run_deploy

TEMPLATE = REPO / "etc" / "aws" / "sense-gateway.yaml"
INFLUX_URL = "SENSE_INFLUXDB_URL=https://influx.example.org:8086"
BUCKET = "sense-artifacts-123456789012-us-east-1"


def code_key(zip_path: Path) -> str:
    """The artifact key of a zip: named by its content."""
    return f"sense-gateway-lambda/{hashlib.sha256(zip_path.read_bytes()).hexdigest()}.zip"


def stack_lines(stdout: str) -> list[str]:
    """The deployment's report: bucket, code and stack lines, with the
    change set's indented ones."""
    return [line for line in stdout.splitlines()
            if line.startswith(("bucket ", "code ", "stack ", "  "))]


class AWSResources:
    """What exists at a moto endpoint, read through boto3."""

    def __init__(self, moto: MotoServer):
        self.moto = moto

    def everything(self) -> dict:
        c = self.moto.client
        return {
            "buckets": [b["Name"] for b in c("s3").list_buckets()["Buckets"]],
            "stacks": [s["StackName"] for s in c("cloudformation").describe_stacks()["Stacks"]],
            "queues": c("sqs").list_queues().get("QueueUrls", []),
            "tables": c("dynamodb").list_tables()["TableNames"],
            "functions": [f["FunctionName"] for f in c("lambda").list_functions()["Functions"]],
            "roles": [r["RoleName"] for r in c("iam").list_roles()["Roles"]],
        }

    def nothing(self) -> dict:
        return {"buckets": [], "stacks": [], "queues": [], "tables": [], "functions": [], "roles": []}

    def queue(self, name: str) -> dict:
        sqs = self.moto.client("sqs")
        url = sqs.get_queue_url(QueueName=name)["QueueUrl"]
        return sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]

    def function(self) -> dict:
        return self.moto.client("lambda").get_function(FunctionName="sense-processor")["Configuration"]

    def open_change_sets(self) -> list[str]:
        summaries = self.moto.client("cloudformation").list_change_sets(StackName="sense")["Summaries"]
        return [s["ChangeSetName"] for s in summaries if s["ExecutionStatus"] != "EXECUTE_COMPLETE"]


class LambdaStackTests(TestCase):
    """``deploy.sh --mode lambda``: the package, the bucket, the stack."""

    timeout = 300

    def setUp(self):
        self.moto = MotoServer(self)
        self.aws = AWSResources(self.moto)
        self.package = Path(self.mktemp()).resolve() / "sense-gateway-lambda.zip"

    def deploy(self, *args, check=True):
        return run_deploy("--mode", "lambda", "--endpoint-url", self.moto.url, "--region", "us-east-1",
                          "--package", str(self.package), *args, check=check)

    def test_first_run_creates_the_stack_the_second_finds_nothing_to_change(self):
        first = self.deploy("--env", INFLUX_URL, "--env", "SENSE_INFLUXDB_ORG=sense")
        key = code_key(self.package)
        self.assertRegex(first.stdout, r"sense-gateway-lambda\.zip: \d+\.\d MB \([\d,]+ bytes\)")
        lines = stack_lines(first.stdout)
        self.assertEqual(lines[:2], [f"bucket {BUCKET}: created",
                                     f"code s3://{BUCKET}/{key}: uploaded, "
                                     f"{package.describe_size(self.package.stat().st_size)}"])
        resources = template.load_template(TEMPLATE.read_text())["Resources"]
        self.assertRegex(lines[2], rf"^stack sense: change set deploy-\d{{8}}T\d{{6}}Z \(create\), "
                                   rf"{len(resources)} resource changes$")
        self.assertEqual(sorted(lines[3:-1]), sorted(f"  Add {name} ({r['Type']})" for name, r in resources.items()))
        self.assertEqual(lines[-1], "stack sense: created")

        s3 = self.moto.client("s3")
        self.assertEqual(s3.get_object(Bucket=BUCKET, Key=key)["Body"].read(), self.package.read_bytes())
        self.assertEqual(set(s3.get_public_access_block(Bucket=BUCKET)[
            "PublicAccessBlockConfiguration"].values()), {True})

        dlq = self.aws.queue("sense-dlq")
        queue = self.aws.queue("sense")
        redrive = json.loads(queue["RedrivePolicy"])
        self.assertEqual((redrive["deadLetterTargetArn"], int(redrive["maxReceiveCount"])), (dlq["QueueArn"], 5))
        self.assertEqual(int(queue["VisibilityTimeout"]), 6 * 60)
        self.assertEqual((int(dlq["MessageRetentionPeriod"]), int(queue["MessageRetentionPeriod"])),
                         (14 * 86400, 4 * 86400))

        dynamodb = self.moto.client("dynamodb")
        for table, key_name in (("sense-devices", "id"), ("sense-credentials", "device")):
            described = dynamodb.describe_table(TableName=table)["Table"]
            self.assertEqual(described["KeySchema"], [{"AttributeName": key_name, "KeyType": "HASH"}])
            self.assertEqual(described["BillingModeSummary"]["BillingMode"], "PAY_PER_REQUEST")

        function = self.aws.function()
        self.assertEqual((function["Runtime"], function["Handler"], function["Timeout"], function["MemorySize"]),
                         ("python3.11", package.HANDLER, 60, 256))
        self.assertEqual(function["CodeSha256"], package.Package(
            self.package, 0, 0, hashlib.sha256(self.package.read_bytes()).hexdigest(), ()).code_sha256)
        variables = function["Environment"]["Variables"]
        self.assertEqual({k: variables[k] for k in ("SENSE_REGISTRY_BACKEND", "SENSE_REGISTRY_TABLE",
                                                    "SENSE_SINKS_ENABLED", "SENSE_INFLUXDB_URL",
                                                    "SENSE_INFLUXDB_API", "SENSE_INFLUXDB_BUCKET")},
                         {"SENSE_REGISTRY_BACKEND": "dynamodb", "SENSE_REGISTRY_TABLE": "sense-devices",
                          "SENSE_SINKS_ENABLED": "influxdb",
                          "SENSE_INFLUXDB_URL": "https://influx.example.org:8086",
                          "SENSE_INFLUXDB_API": "v2", "SENSE_INFLUXDB_BUCKET": "sense"})
        load_config(environ=variables)  # the function starts with these

        lam = self.moto.client("lambda")
        self.assertEqual(lam.get_function_concurrency(FunctionName="sense-processor")[
            "ReservedConcurrentExecutions"], 5)
        [mapping] = lam.list_event_source_mappings(FunctionName="sense-processor")["EventSourceMappings"]
        self.assertEqual(
            (mapping["EventSourceArn"], mapping["BatchSize"], mapping["FunctionResponseTypes"],
             mapping["ScalingConfig"], mapping["State"]),
            (queue["QueueArn"], 10, ["ReportBatchItemFailures"], {"MaximumConcurrency": 5}, "Enabled"))

        events = self.moto.client("events")
        [rule] = events.list_rules()["Rules"]
        self.assertEqual((rule["ScheduleExpression"], rule["State"]), ("rate(1 minute)", "ENABLED"))
        [target] = events.list_targets_by_rule(Rule=rule["Name"])["Targets"]
        self.assertEqual((target["Arn"], json.loads(target["Input"])), (function["FunctionArn"], {"sense": "sweep"}))
        [grant] = json.loads(lam.get_policy(FunctionName="sense-processor")["Policy"])["Statement"]
        self.assertEqual((grant["Principal"], grant["Condition"]["ArnLike"]["AWS:SourceArn"]),
                         ({"Service": "events.amazonaws.com"}, rule["Arn"]))

        iam = self.moto.client("iam")
        self.assertEqual(function["Role"], iam.get_role(RoleName="sense-processor")["Role"]["Arn"])
        document = iam.get_role_policy(RoleName="sense-processor", PolicyName="sense-processor")["PolicyDocument"]
        # moto keeps an inline policy made by CloudFormation as Python's repr of it.
        statements = {s["Sid"]: s for s in ast.literal_eval(document)["Statement"]}
        self.assertEqual(statements["ConsumeQueue"]["Resource"], queue["QueueArn"])
        self.assertEqual(statements["DeviceRegistry"]["Resource"],
                         "arn:aws:dynamodb:us-east-1:123456789012:table/sense-devices")
        self.assertNotIn("*", json.dumps([s["Action"] for s in statements.values()]))
        managed = {p["PolicyName"] for p in iam.list_policies(Scope="Local")["Policies"]}
        self.assertEqual(managed, {"sense-gateway", "sense-operator"})
        [group] = self.moto.client("logs").describe_log_groups(
            logGroupNamePrefix="/aws/lambda/sense-processor")["logGroups"]
        self.assertEqual(group["retentionInDays"], 30)
        # moto gives a change-set stack no outputs: the script says so and
        # leaves the settings it cannot know as placeholders, never guesses.
        self.assertIn("reports no output CredentialTableName, DeviceTableName, QueueUrl", first.stderr)
        self.assertIn("SENSE_REGISTRY_TABLE=<DeviceTableName of stack sense>", first.stdout)

        second = self.deploy("--env", INFLUX_URL, "--env", "SENSE_INFLUXDB_ORG=sense")
        self.assertEqual(stack_lines(second.stdout), [f"bucket {BUCKET}: unchanged",
                                                      f"code s3://{BUCKET}/{key}: unchanged",
                                                      "stack sense: unchanged"])
        self.assertEqual(self.aws.open_change_sets(), [])
        self.assertEqual(self.aws.function()["LastModified"], function["LastModified"])
        self.assertEqual(lam.get_event_source_mapping(UUID=mapping["UUID"])["LastModified"],
                         mapping["LastModified"])

    def test_a_changed_setting_updates_the_stack_and_what_is_not_given_is_kept(self):
        self.deploy("--env", INFLUX_URL)
        queue = self.aws.queue("sense")
        changed = self.deploy("--env", "SENSE_INFLUXDB_BUCKET=other", "--parameter", "MemorySize=512")
        lines = stack_lines(changed.stdout)
        self.assertIn("  parameter InfluxDBBucket: sense -> other", lines)
        self.assertIn("  parameter MemorySize: 256 -> 512", lines)
        self.assertEqual(lines[-1], "stack sense: updated")
        function = self.aws.function()
        self.assertEqual(function["MemorySize"], 512)
        variables = function["Environment"]["Variables"]
        self.assertEqual(variables["SENSE_INFLUXDB_BUCKET"], "other")
        # Not given this time: the stack's value stays.
        self.assertEqual(variables["SENSE_INFLUXDB_URL"], "https://influx.example.org:8086")
        self.assertEqual(self.aws.queue("sense")["LastModifiedTimestamp"], queue["LastModifiedTimestamp"])
        self.assertEqual(self.aws.open_change_sets(), [])

    def test_new_code_is_uploaded_under_its_own_key_and_the_function_runs_it(self):
        self.deploy("--env", INFLUX_URL)
        first_key = code_key(self.package)
        # Other code: the same zip and one more file (deploy.sh would build
        # the same bytes again, so the module is run here directly).
        other = self.package.with_name("other.zip")
        shutil.copy(self.package, other)
        with zipfile.ZipFile(other, "a") as archive:
            archive.writestr("sense_gateway/aws/extra.py", "")
        result = subprocess.run(
            [str(BIN / "python"), "-m", "sense_gateway.aws.deploy", "--package", str(other),
             "--endpoint-url", self.moto.url, "--region", "us-east-1"],
            capture_output=True, text=True, timeout=120, env=clean_environment())
        self.assertEqual(result.returncode, 0, result.stderr)
        second_key = code_key(other)
        self.assertIn(f"  parameter CodeS3Key: {first_key} -> {second_key}", result.stdout)
        self.assertIn("stack sense: updated", result.stdout)
        listed = self.moto.client("s3").list_objects_v2(Bucket=BUCKET)["Contents"]
        self.assertEqual(sorted(o["Key"] for o in listed), sorted([first_key, second_key]))
        self.assertEqual(self.aws.function()["CodeSha256"], package.Package(
            other, 0, 0, hashlib.sha256(other.read_bytes()).hexdigest(), ()).code_sha256)

    def test_unsafe_or_wrong_settings_are_refused_before_anything_is_made(self):
        for args, message in (
                (["--env", INFLUX_URL, "--env", "SENSE_X=1"],
                 "SENSE_X: the stack gives the function no such variable"),
                (["--env", INFLUX_URL, "--env", "SENSE_INFLUXDB_API=v3"],
                 "InfluxDBApi: must be one of v2, v1, not 'v3'"),
                (["--env", "SENSE_INFLUXDB_URL=influx.example.org"],
                 "InfluxDBUrl: must be an http:// or https:// URL"),
                ([], "InfluxDBUrl: the template needs a value (--env SENSE_INFLUXDB_URL=...)"),
                (["--env", INFLUX_URL, "--parameter", "MaxReceiveCount=2"],
                 "MaxReceiveCount: must be at least 5, not '2'"),
                (["--env", INFLUX_URL, "--parameter", "BatchSize=100"], "BatchSize: must be at most 10"),
                (["--env", INFLUX_URL, "--parameter", "ReservedConcurrency=3",
                  "--parameter", "MaximumConcurrency=4"], "the event-source mapping would be throttled"),
                (["--env", INFLUX_URL, "--parameter", "Timeout=60"],
                 "Timeout: not a parameter of the template"),
                (["--env", INFLUX_URL, "--parameter", "CodeS3Key=mine.zip"],
                 "CodeS3Key: set by the deployment")):
            result = self.deploy(*args, check=False)
            self.assertEqual(result.returncode, 2, result.stdout + result.stderr)
            self.assertIn(message, result.stderr)
        self.assertEqual(self.aws.everything(), self.aws.nothing())


class DryRunTests(TestCase):
    """``--dry-run`` makes the change set, prints it, deletes it."""

    timeout = 300

    def setUp(self):
        self.moto = MotoServer(self)
        self.aws = AWSResources(self.moto)
        self.root = Path(self.mktemp()).resolve()
        self.package = self.root / "sense-gateway-lambda.zip"

    def dry_run(self, mode: str, *args: str) -> str:
        result = run_deploy("--mode", mode, "--dry-run", "--endpoint-url", self.moto.url,
                            "--package", str(self.package), "--root", str(self.root), *args)
        self.assertIn("dry run: nothing was changed", result.stdout)
        self.assertFalse(self.root.exists(), f"the dry run wrote into {self.root}")
        return result.stdout

    def test_a_new_stack_is_printed_and_nothing_is_made(self):
        out = self.dry_run("lambda", "--env", INFLUX_URL)
        self.assertIn(f"+ {REPO}/.venv/bin/python -m sense_gateway.aws.package --architecture x86_64 "
                      f"--output {self.package}", out)
        lines = stack_lines(out)
        self.assertEqual(lines[0], f"bucket {BUCKET}: would be created")
        self.assertRegex(lines[1], rf"^code s3://{BUCKET}/sense-gateway-lambda/[0-9a-f]{{64}}\.zip: would be uploaded")
        resources = template.load_template(TEMPLATE.read_text())["Resources"]
        self.assertRegex(lines[2], rf"^stack sense: change set deploy-\S+ \(create\), {len(resources)} resource changes$")
        self.assertEqual(sorted(lines[3:-1]), sorted(f"  Add {name} ({r['Type']})" for name, r in resources.items()))
        self.assertEqual(lines[-1], "stack sense: would be created (dry run: change set deleted)")
        self.assertEqual(self.aws.everything(), self.aws.nothing())

    def test_a_change_is_printed_and_not_made(self):
        made = Path(self.mktemp()).resolve() / "sense-gateway-lambda.zip"
        run_deploy("--mode", "lambda", "--endpoint-url", self.moto.url, "--package", str(made),
                   "--env", INFLUX_URL)
        before = self.aws.everything()
        function = self.aws.function()
        out = self.dry_run("lambda", "--env", "SENSE_INFLUXDB_BUCKET=other",
                           "--parameter", "MaxReceiveCount=10")
        lines = stack_lines(out)
        self.assertIn("  parameter InfluxDBBucket: sense -> other", lines)
        self.assertIn("  parameter MaxReceiveCount: 5 -> 10", lines)
        self.assertEqual(lines[-1], "stack sense: would be updated (dry run: change set deleted)")
        self.assertEqual(self.aws.everything(), before)
        self.assertEqual(self.aws.function(), function)
        self.assertEqual(json.loads(self.aws.queue("sense")["RedrivePolicy"])["maxReceiveCount"], 5)
        self.assertEqual(self.aws.open_change_sets(), [])

    def test_all_deploys_lambda_then_a_gateway_sending_to_its_queue_then_compose(self):
        out = self.dry_run("all", "--docker", "--env", INFLUX_URL)
        self.assertIn("stack sense: would be created (dry run: change set deleted)", out)
        # No stack yet, so no outputs: the settings are named, not made up.
        self.assertIn(r"--env SENSE_ROLE=gateway --env SENSE_SECURITY_PLAIN_INGEST=off "
                      r"--env SENSE_QUEUE_BACKEND=sqs --env SENSE_AWS_REGION=us-east-1 "
                      r"--env SENSE_AWS_QUEUE_URL=\<QueueUrl\ of\ stack\ sense\> "
                      r"--env SENSE_REGISTRY_BACKEND=dynamodb "
                      r"--env SENSE_REGISTRY_TABLE=\<DeviceTableName\ of\ stack\ sense\> "
                      r"--env SENSE_REGISTRY_CREDENTIALS_TABLE=\<CredentialTableName\ of\ stack\ sense\> "
                      rf"--env SENSE_AWS_ENDPOINT_URL={self.moto.url} sense-gateway:latest", out)
        self.assertIn(f"+ docker compose --file {REPO}/compose.yaml up --detach influxdb grafana", out)
        lines = out.splitlines()
        self.assertLess(lines.index(next(x for x in lines if x.startswith("stack sense: would be"))),
                        lines.index(next(x for x in lines if x.startswith("+ docker run"))))
        self.assertEqual(self.aws.everything(), self.aws.nothing())


class GatewaySettingsTests(TestCase):
    """The gateways' settings are the stack's outputs."""

    timeout = 300

    def test_a_gateway_is_given_the_stack_outputs(self):
        moto = MotoServer(self)
        root = Path(self.mktemp()).resolve()
        zip_path = Path(self.mktemp()).resolve() / "sense-gateway-lambda.zip"
        package.build(zip_path)
        s3 = moto.client("s3")
        s3.create_bucket(Bucket="code")
        s3.put_object(Bucket="code", Key="lambda.zip", Body=zip_path.read_bytes())
        # CreateStack, since moto resolves outputs there (not through change
        # sets); its resources are named fleet-*, which only its outputs
        # can tell the script.
        cloudformation = moto.client("cloudformation")
        cloudformation.create_stack(
            StackName="sense", TemplateBody=TEMPLATE.read_text(), Capabilities=["CAPABILITY_NAMED_IAM"],
            Parameters=[{"ParameterKey": k, "ParameterValue": v} for k, v in (
                ("Name", "fleet"), ("CodeS3Bucket", "code"), ("CodeS3Key", "lambda.zip"),
                ("InfluxDBUrl", "https://influx.example.org"))])
        [stack] = cloudformation.describe_stacks(StackName="sense")["Stacks"]
        outputs = {o["OutputKey"]: o["OutputValue"] for o in stack["Outputs"]}
        self.assertEqual(outputs["DeviceTableName"], "fleet-devices")

        result = run_deploy("--mode", "all", "--dry-run", "--docker", "--endpoint-url", moto.url,
                            "--package", str(root / "sense-gateway-lambda.zip"), "--root", str(root))
        for key, value in outputs.items():
            self.assertIn(f"output {key}: {value}", result.stdout)
        self.assertIn(f"--env SENSE_QUEUE_BACKEND=sqs --env SENSE_AWS_REGION=us-east-1 "
                      f"--env SENSE_AWS_QUEUE_URL={outputs['QueueUrl']} --env SENSE_REGISTRY_BACKEND=dynamodb "
                      f"--env SENSE_REGISTRY_TABLE=fleet-devices "
                      f"--env SENSE_REGISTRY_CREDENTIALS_TABLE=fleet-credentials ", result.stdout)
