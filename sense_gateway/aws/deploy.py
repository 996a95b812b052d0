"""Deploy SENSE Gateway's AWS side: ``etc/aws/sense-gateway.yaml`` as one
CloudFormation stack, created or updated through a change set.

What ``./deploy.sh --mode lambda`` runs after building the package. The
template is the only description of the resources; this module only
drives CloudFormation:

1. The parameters: those given (``--parameter``, or ``--env`` and
   ``SENSE_INFLUXDB_*`` variables for the ones the template hands the
   function as ``SENSE_*`` variables), else the stack's current values,
   else the template's defaults; checked against the template's
   constraints before anything is made.
2. The artifact bucket (made if missing, public access blocked) and the
   zip in it under a key named by its SHA-256, so the same code is never
   uploaded twice and new code is a new ``CodeS3Key``.
3. A change set, printed; executed, or with ``--dry-run`` deleted (and
   with it the empty stack a first dry run leaves). When nothing differs
   CloudFormation says so and the stack is reported ``unchanged``.
4. The stack's outputs, as the settings gateways need (``--gateway-env``).

    python -m sense_gateway.aws.deploy --package dist/sense-gateway-lambda.zip [--name sense]
        [--parameter KEY=VALUE ...] [--env SENSE_INFLUXDB_URL=...] [--bucket B] [--dry-run]
        [--region R] [--profile P] [--endpoint-url URL] [--gateway-env FILE]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from sense_gateway.aws.package import DEFAULT_OUTPUT, describe_size
from sense_gateway.aws.template import (GATEWAY_OUTPUTS, TEMPLATE, check_parameters,
                                        environment_parameters, gateway_environment, load_template,
                                        stack_parameters)
from sense_gateway.errors import ConfigError

#: Where the zips go in the artifact bucket (then ``<sha256>.zip``).
CODE_PREFIX = "sense-gateway-lambda/"
# How CloudFormation words "this change set would change nothing": AWS on
# the change set's StatusReason; moto may refuse the request instead, in
# the words of UpdateStack.
_NO_CHANGES = ("didn't contain changes", "No updates are to be performed")
_ONLY_DELETABLE = {"ROLLBACK_COMPLETE", "ROLLBACK_FAILED", "DELETE_FAILED"}


class DeployError(Exception):
    """The deployment cannot go on; the message says why."""


@dataclass(frozen=True)
class Settings:
    name: str = "sense"
    package: Path = DEFAULT_OUTPUT
    template: Path = TEMPLATE
    architecture: str = "x86_64"
    #: the artifact bucket; empty: ``<name>-artifacts-<account>-<region>``
    bucket: str = ""
    #: template parameters given, and SENSE_* variables for the function
    parameters: dict[str, str] = field(default_factory=dict)
    environment: dict[str, str] = field(default_factory=dict)
    #: SENSE_INFLUXDB_* variables of the deployer's environment
    inherited: dict[str, str] = field(default_factory=dict)
    region: str = "us-east-1"
    profile: str | None = None
    endpoint_url: str | None = None
    dry_run: bool = False


class Deployment:
    """One run: bucket, code, change set; :attr:`outputs` after :meth:`run`."""

    def __init__(self, settings: Settings, out: Callable[[str], None] = print):
        import boto3
        from botocore.config import Config

        self.settings = settings
        self.out = out
        self.outputs: dict[str, str] = {}
        session = boto3.Session(profile_name=settings.profile, region_name=settings.region)
        config = Config(retries={"mode": "standard", "max_attempts": 5})
        self.cloudformation, self.s3, self.sts = (
            session.client(service, endpoint_url=settings.endpoint_url or None, config=config)
            for service in ("cloudformation", "s3", "sts"))

    def given(self, template: dict) -> tuple[dict[str, str], dict[str, str]]:
        """Parameters given, and how to give each variable-backed one."""
        variables = environment_parameters(template)
        hints = {parameter: f"--env {name}=..." for name, parameter in variables.items()}
        given = {}
        for name, value in self.settings.inherited.items():
            if name in variables:
                given[variables[name]] = value
            else:
                print(f"deploy: {name} (of this environment): the stack does not give the function "
                      "this variable; left out", file=sys.stderr)
        for name, value in self.settings.environment.items():
            if name not in variables:
                raise ConfigError(f"{name}: the stack gives the function no such variable; it sets "
                                  f"{', '.join(variables)} from parameters")
            given[variables[name]] = value
        s = self.settings
        for key, option in (("Name", "--name"), ("Architecture", "--architecture"),
                            ("CodeS3Bucket", "--bucket"), ("CodeS3Key", "--package")):
            if key in s.parameters:
                raise ConfigError(f"{key}: set by the deployment; use {option}")
        given.update(s.parameters)
        given.update(Name=s.name, Architecture=s.architecture)
        return given, hints

    def run(self) -> None:
        s = self.settings
        text = Path(s.template).read_text()
        template = load_template(text)
        given, hints = self.given(template)
        package = Path(s.package)
        if not package.is_file():
            raise DeployError(f"{package}: no such package; build it with `sense package-lambda`")
        code = package.read_bytes()
        account = self.sts.get_caller_identity()["Account"]
        bucket = s.bucket or f"{s.name}-artifacts-{account}-{s.region}"
        if len(bucket) > 63:
            raise ConfigError(f"{bucket}: longer than a bucket name may be; choose one with --bucket")
        key = f"{CODE_PREFIX}{hashlib.sha256(code).hexdigest()}.zip"
        given.update(CodeS3Bucket=bucket, CodeS3Key=key)
        stack = self.deployable(self.describe_stack())
        previous = {p["ParameterKey"]: p.get("ParameterValue", "")
                    for p in (stack or {}).get("Parameters", [])}
        parameters, values = stack_parameters(template["Parameters"], given, previous, hints)
        check_parameters(template["Parameters"], values)
        if self.ensure_bucket(bucket, account):
            self.ensure_code(bucket, key, code)
        else:
            self.out(f"code s3://{bucket}/{key}: would be uploaded, {describe_size(len(code))}")
        # CloudFormation lists the resources a change set touches, not
        # the parameters behind it; a NoEcho one is not shown either way.
        changed = [f"  parameter {k}: {previous[k]} -> {values[k]}" for k in values
                   if k in previous and values[k] != previous[k]
                   and not template["Parameters"][k].get("NoEcho")]
        self.deploy(text, parameters, stack, changed)
        current = self.describe_stack() or {}
        self.outputs = {o["OutputKey"]: o["OutputValue"] for o in current.get("Outputs", [])}

    def describe_stack(self) -> dict | None:
        from botocore.exceptions import ClientError

        try:
            [stack] = self.cloudformation.describe_stacks(StackName=self.settings.name)["Stacks"]
        except ClientError as e:
            if "does not exist" in str(e):
                return None
            raise
        return stack

    def deployable(self, stack: dict | None) -> dict | None:
        """The stack to update, or None for one to create (there is none,
        or only the empty one a change set of type CREATE leaves before it
        is executed); refuses a stack in a state no change set can take."""
        if stack is None:
            return None
        status = stack["StackStatus"]
        if status == "REVIEW_IN_PROGRESS":
            return None
        if status in _ONLY_DELETABLE:
            raise DeployError(f"stack {self.settings.name} is {status}: it can only be deleted "
                              f"(aws cloudformation delete-stack --stack-name {self.settings.name})")
        if status.endswith("_IN_PROGRESS"):
            raise DeployError(f"stack {self.settings.name} is {status}; try again once it is done")
        return stack

    def ensure_bucket(self, bucket: str, account: str) -> bool:
        """Whether the bucket exists now (a dry run does not make it)."""
        from botocore.exceptions import ClientError

        try:
            self.s3.head_bucket(Bucket=bucket, ExpectedBucketOwner=account)
            self.out(f"bucket {bucket}: unchanged")
            return True
        except ClientError as e:
            if e.response["Error"]["Code"] in ("403", "AccessDenied"):
                raise DeployError(f"bucket {bucket}: not this account's; choose another with --bucket") from None
            if e.response["Error"]["Code"] not in ("404", "NoSuchBucket", "NotFound"):
                raise
        if self.settings.dry_run:
            self.out(f"bucket {bucket}: would be created")
            return False
        region = self.settings.region
        self.s3.create_bucket(Bucket=bucket, **({} if region == "us-east-1" else {
            "CreateBucketConfiguration": {"LocationConstraint": region}}))
        # New buckets are private already; this keeps one from being opened by mistake.
        self.s3.put_public_access_block(Bucket=bucket, PublicAccessBlockConfiguration={
            "BlockPublicAcls": True, "IgnorePublicAcls": True, "BlockPublicPolicy": True,
            "RestrictPublicBuckets": True})
        self.out(f"bucket {bucket}: created")
        return True

    def ensure_code(self, bucket: str, key: str, code: bytes) -> None:
        from botocore.exceptions import ClientError

        try:
            self.s3.head_object(Bucket=bucket, Key=key)
            self.out(f"code s3://{bucket}/{key}: unchanged")
            return
        except ClientError as e:
            if e.response["Error"]["Code"] not in ("404", "NoSuchKey", "NotFound"):
                raise
        if self.settings.dry_run:
            self.out(f"code s3://{bucket}/{key}: would be uploaded, {describe_size(len(code))}")
        else:
            self.s3.put_object(Bucket=bucket, Key=key, Body=code)
            self.out(f"code s3://{bucket}/{key}: uploaded, {describe_size(len(code))}")

    def deploy(self, text: str, parameters: list[dict], stack: dict | None, notes: list[str]) -> None:
        """Make the change set, print it, then execute it (or, in a dry
        run, delete it); print notes (the parameters that differ) with it."""
        from botocore.exceptions import WaiterError

        cf, name = self.cloudformation, self.settings.name
        kind = "UPDATE" if stack else "CREATE"
        made = self.change_set(text, parameters, kind)
        if made is None:
            self.out(f"stack {name}: unchanged")
            return
        created, changes = made
        self.out(f"stack {name}: change set {created['Name']} ({kind.lower()}), "
                 f"{len(changes)} resource changes")
        for note in notes:
            self.out(note)
        for change in changes:
            resource = change["ResourceChange"]
            replacement = resource.get("Replacement")
            self.out(f"  {resource['Action']} {resource['LogicalResourceId']} ({resource['ResourceType']})"
                     + (f", replacement: {replacement}" if replacement in ("True", "Conditional") else ""))
        done = "created" if kind == "CREATE" else "updated"
        if self.settings.dry_run:
            self._discard(created, kind)
            self.out(f"stack {name}: would be {done} (dry run: change set deleted)")
            return
        cf.execute_change_set(ChangeSetName=created["Id"])
        try:
            cf.get_waiter(f"stack_{kind.lower()}_complete").wait(
                StackName=created["StackId"], WaiterConfig={"Delay": 5, "MaxAttempts": 720})
        except WaiterError:
            raise DeployError(f"stack {name}: {kind.lower()} failed: {self._failures(created['StackId'])}") from None
        self.out(f"stack {name}: {done}")

    def change_set(self, text: str, parameters: list[dict], kind: str) -> tuple[dict, list] | None:
        """``(the change set's ids and name, its changes)``, or None when
        CloudFormation finds nothing to change (the empty set deleted)."""
        from botocore.exceptions import ClientError, WaiterError

        cf = self.cloudformation
        label = f"deploy-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
        try:
            created = cf.create_change_set(
                StackName=self.settings.name, ChangeSetName=label, ChangeSetType=kind,
                TemplateBody=text, Parameters=parameters, Capabilities=["CAPABILITY_NAMED_IAM"],
                Description="./deploy.sh --mode lambda")
        except ClientError as e:
            if any(words in str(e) for words in _NO_CHANGES):
                return None
            raise
        created = {"Id": created["Id"], "StackId": created["StackId"], "Name": label}
        try:
            cf.get_waiter("change_set_create_complete").wait(
                ChangeSetName=created["Id"], WaiterConfig={"Delay": 2, "MaxAttempts": 150})
        except WaiterError:
            pass  # FAILED (with its reason) or still not ready: told apart below
        page = cf.describe_change_set(ChangeSetName=created["Id"])
        status, reason = page["Status"], page.get("StatusReason") or ""
        changes = list(page.get("Changes", []))
        while page.get("NextToken"):
            page = cf.describe_change_set(ChangeSetName=created["Id"], NextToken=page["NextToken"])
            changes.extend(page.get("Changes", []))
        if status == "CREATE_COMPLETE":
            return created, changes
        self._discard(created, kind)
        if status == "FAILED" and any(words in reason for words in _NO_CHANGES):
            return None
        raise DeployError(f"stack {self.settings.name}: change set {label} is {status}: {reason}")

    def _discard(self, created: dict, kind: str) -> None:
        self.cloudformation.delete_change_set(ChangeSetName=created["Id"])
        if kind == "CREATE":
            # The empty stack (REVIEW_IN_PROGRESS) the change set made;
            # gone before this returns, so a run right after finds none.
            self.cloudformation.delete_stack(StackName=created["StackId"])
            self.cloudformation.get_waiter("stack_delete_complete").wait(
                StackName=created["StackId"], WaiterConfig={"Delay": 2, "MaxAttempts": 150})

    def _failures(self, stack_id: str) -> str:
        events = self.cloudformation.describe_stack_events(StackName=stack_id)["StackEvents"]
        failed = [f"{e['LogicalResourceId']}: {e.get('ResourceStatusReason', '')}" for e in events
                  if e["ResourceStatus"].endswith("_FAILED")]
        return "; ".join(failed[:5]) or "see the stack's events"


def _key_value(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name, value


def parse_args(argv: list[str] | None) -> tuple[Settings, Path | None]:
    defaults = Settings()
    parser = argparse.ArgumentParser(
        prog="python -m sense_gateway.aws.deploy",
        description="Upload the Lambda package and create or update the CloudFormation stack "
                    "of etc/aws/sense-gateway.yaml through a change set.")
    parser.add_argument("--package", type=Path, default=defaults.package,
                        help="the zip from `sense package-lambda` (default: %(default)s)")
    parser.add_argument("--template", type=Path, default=defaults.template, help="(default: %(default)s)")
    parser.add_argument("--name", default=defaults.name,
                        help="the stack, and the prefix of every resource name (default: %(default)s)")
    parser.add_argument("--architecture", choices=("x86_64", "arm64"), default=defaults.architecture,
                        help="the one the package was built for (default: %(default)s)")
    parser.add_argument("--bucket", default="", help="artifact bucket (default: NAME-artifacts-ACCOUNT-REGION)")
    parser.add_argument("--parameter", type=_key_value, action="append", default=[], metavar="KEY=VALUE",
                        help="a template parameter (repeatable); others keep the stack's values")
    parser.add_argument("--env", type=_key_value, action="append", default=[], metavar="NAME=VALUE",
                        help="a SENSE_* variable of the function, as its parameter (repeatable); "
                             "SENSE_INFLUXDB_* variables of this environment are taken as well")
    parser.add_argument("--region", default=os.environ.get("AWS_REGION")
                        or os.environ.get("AWS_DEFAULT_REGION") or defaults.region)
    parser.add_argument("--profile", default=None, help="AWS credentials profile")
    parser.add_argument("--endpoint-url", default=None,
                        help="an AWS-compatible endpoint for every service (e.g. moto)")
    parser.add_argument("--dry-run", action="store_true",
                        help="make the change set, print it, delete it: change nothing")
    parser.add_argument("--gateway-env", type=Path, default=None, metavar="FILE",
                        help="write the gateways' SENSE_* settings, from the stack's outputs, to FILE")
    args = parser.parse_args(argv)
    inherited = {name: value for name, value in os.environ.items() if name.startswith("SENSE_INFLUXDB_")}
    return Settings(name=args.name, package=args.package, template=args.template,
                    architecture=args.architecture, bucket=args.bucket, parameters=dict(args.parameter),
                    environment=dict(args.env), inherited=inherited, region=args.region, profile=args.profile,
                    endpoint_url=args.endpoint_url, dry_run=args.dry_run), args.gateway_env


def main(argv: list[str] | None = None) -> int:
    settings, gateway_env = parse_args(argv)
    from botocore.exceptions import BotoCoreError, ClientError

    deployment = Deployment(settings)
    try:
        deployment.run()
    except (ConfigError, DeployError) as e:
        print(f"deploy: {e}", file=sys.stderr)
        return 2
    except (BotoCoreError, ClientError) as e:
        print(f"deploy: AWS refused: {e}", file=sys.stderr)
        return 1
    outputs = deployment.outputs
    for key in sorted(outputs):
        print(f"output {key}: {outputs[key]}")
    missing = sorted(set(GATEWAY_OUTPUTS.values()) - outputs.keys())
    if missing and not settings.dry_run:
        print(f"deploy: stack {settings.name} reports no output {', '.join(missing)}", file=sys.stderr)
    lines = gateway_environment(outputs, settings.name, settings.region, settings.endpoint_url)
    print(f"gateways: {' '.join(lines)}")
    if gateway_env is not None:
        gateway_env.write_text("".join(f"{line}\n" for line in lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
