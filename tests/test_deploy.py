"""Deployment for real: ``deploy.sh`` against moto in server mode, the
Lambda zip unpacked and run by a plain Python against moto and
VictoriaMetrics, the CloudFormation template through cfn-lint and moto's
CloudFormation, shell scripts through shellcheck, the compose file, the
Dockerfile's health check against a running gateway, the systemd unit
through ``systemd-analyze verify``."""

from __future__ import annotations

import ast
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import orjson
import yaml
from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase, TestCase

from sense_gateway.aws import deploy, package
from tests.servers import BIN, MotoServer, VictoriaMetrics, free_tcp_port
from tests.support import AWS_ENV, REPO, GatewayProcess

NOW = 1764300000
DEPLOY_SH = REPO / "deploy.sh"
TEMPLATE = REPO / "etc" / "aws" / "sense-gateway.yaml"
#: What the Lambda python3.11 runtime brings besides the standard library:
#: the AWS SDK and its dependencies (written out here, not taken from the
#: packager, so a packager that leaves out too much fails the test).
RUNTIME_DISTRIBUTIONS = ["boto3", "botocore", "jmespath", "python-dateutil", "s3transfer", "six",
                         "urllib3"]


def clean_environment(**extra) -> dict:
    """This process's environment without SENSE_* or AWS settings."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SENSE_", "AWS_"))}
    env.update(AWS_ENV)
    env.update(extra)
    return env


def run_deploy(*args: str, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([str(DEPLOY_SH), *args], capture_output=True, text=True,
                            env=env or clean_environment(), timeout=300)
    if check and result.returncode != 0:
        raise AssertionError(f"deploy.sh {' '.join(args)} exited {result.returncode}:\n"
                             f"{result.stdout}\n{result.stderr}")
    return result


def report(stdout: str) -> dict[str, str]:
    """``{resource: outcome}`` from the deployment's ``resource: outcome`` lines."""
    prefixes = ("queue ", "table ", "log group ", "role ", "function ", "event source mapping ",
                "alarm ")
    return dict(line.split(": ", 1) for line in stdout.splitlines() if line.startswith(prefixes))


def envelope(device: str, seq: int, value: float) -> bytes:
    return orjson.dumps({"v": 1, "id": f"{device}-{seq}", "device": device, "seq": seq,
                         "received": NOW + seq, "source": "[2001:db8::7]:5683", "transport": "coap",
                         "identity": None, "path": "/data", "cf": 50,
                         "readings": [{"m": "sense", "ts": NOW + seq, "f": {"t": value}, "t": {}}]})


class AWSResources:
    """What exists at a moto endpoint, read through boto3."""

    def __init__(self, moto: MotoServer):
        self.moto = moto

    def queues(self) -> list[str]:
        return [u.rsplit("/", 1)[1] for u in self.moto.client("sqs").list_queues().get("QueueUrls", [])]

    def tables(self) -> list[str]:
        return self.moto.client("dynamodb").list_tables()["TableNames"]

    def functions(self) -> list[str]:
        return [f["FunctionName"] for f in self.moto.client("lambda").list_functions()["Functions"]]

    def roles(self) -> list[str]:
        return [r["RoleName"] for r in self.moto.client("iam").list_roles()["Roles"]]

    def nothing(self) -> dict:
        return {"queues": self.queues(), "tables": self.tables(), "functions": self.functions(),
                "roles": self.roles()}


class LambdaModeTests(TestCase):
    """``deploy.sh --mode lambda`` against moto, checked through boto3."""

    timeout = 300

    def setUp(self):
        self.moto = MotoServer(self)
        self.aws = AWSResources(self.moto)
        self.package = Path(self.mktemp()).resolve() / "sense-gateway-lambda.zip"

    def deploy(self, *args, check=True):
        return run_deploy("--mode", "lambda", "--endpoint-url", self.moto.url,
                          "--region", "us-east-1", "--package", str(self.package),
                          "--env", "SENSE_INFLUXDB_URL=https://influx.example.org:8086",
                          "--env", "SENSE_INFLUXDB_ORG=sense", *args, check=check)

    def test_creates_queue_dead_letters_table_function_and_mapping_then_changes_nothing(self):
        first = self.deploy()
        self.assertRegex(first.stdout, r"sense-gateway-lambda\.zip: \d+\.\d MB \([\d,]+ bytes\)")
        self.assertEqual(set(report(first.stdout).values()), {"created"}, first.stdout)

        sqs = self.moto.client("sqs")
        dlq_url = sqs.get_queue_url(QueueName="sense-dlq")["QueueUrl"]
        dlq_arn = sqs.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=["QueueArn"])[
            "Attributes"]["QueueArn"]
        queue_url = sqs.get_queue_url(QueueName="sense")["QueueUrl"]
        attributes = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["All"])["Attributes"]
        redrive = json.loads(attributes["RedrivePolicy"])
        self.assertEqual((redrive["deadLetterTargetArn"], int(redrive["maxReceiveCount"])), (dlq_arn, 5))
        self.assertEqual(int(attributes["VisibilityTimeout"]), 6 * 60)
        self.assertIn(f"SENSE_AWS_QUEUE_URL={queue_url}", first.stdout)

        table = self.moto.client("dynamodb").describe_table(TableName="sense-devices")["Table"]
        self.assertEqual(table["KeySchema"], [{"AttributeName": "id", "KeyType": "HASH"}])
        self.assertEqual(table["BillingModeSummary"]["BillingMode"], "PAY_PER_REQUEST")
        credentials = self.moto.client("dynamodb").describe_table(
            TableName="sense-credentials")["Table"]
        self.assertEqual(credentials["KeySchema"], [{"AttributeName": "device", "KeyType": "HASH"}])

        lam = self.moto.client("lambda")
        function = lam.get_function(FunctionName="sense-processor")["Configuration"]
        self.assertEqual((function["Runtime"], function["Handler"], function["Timeout"]),
                         ("python3.11", "sense_gateway.aws.lambda_handler.handler", 60))
        self.assertEqual(function["Environment"]["Variables"], {
            "SENSE_REGISTRY_BACKEND": "dynamodb", "SENSE_REGISTRY_TABLE": "sense-devices",
            "SENSE_AWS_REGION": "us-east-1", "SENSE_SINKS_ENABLED": "influxdb",
            "SENSE_INFLUXDB_URL": "https://influx.example.org:8086", "SENSE_INFLUXDB_ORG": "sense"})
        self.assertEqual(function["CodeSha256"], package.Package(
            self.package, 0, 0, __import__("hashlib").sha256(self.package.read_bytes()).hexdigest(),
            ()).code_sha256)
        self.assertEqual(lam.get_function_concurrency(FunctionName="sense-processor")[
            "ReservedConcurrentExecutions"], 5)
        [mapping] = lam.list_event_source_mappings(FunctionName="sense-processor")["EventSourceMappings"]
        queue_arn = dlq_arn.replace("sense-dlq", "sense")
        self.assertEqual(
            (mapping["EventSourceArn"], mapping["BatchSize"], mapping["FunctionResponseTypes"],
             mapping["ScalingConfig"], mapping["State"]),
            (queue_arn, 10, ["ReportBatchItemFailures"], {"MaximumConcurrency": 5}, "Enabled"))

        iam = self.moto.client("iam")
        self.assertEqual(function["Role"], iam.get_role(RoleName="sense-processor")["Role"]["Arn"])
        policy = iam.get_role_policy(RoleName="sense-processor", PolicyName="sense-processor")
        statements = {s["Sid"]: s for s in policy["PolicyDocument"]["Statement"]}
        self.assertEqual(statements["ConsumeQueue"]["Resource"], queue_arn)
        self.assertEqual(statements["DeviceRegistry"]["Resource"],
                         "arn:aws:dynamodb:us-east-1:123456789012:table/sense-devices")
        self.assertNotIn("*", json.dumps([s["Action"] for s in statements.values()]))

        [alarm] = self.moto.client("cloudwatch").describe_alarms(AlarmNames=["sense-dead-letters"])[
            "MetricAlarms"]
        self.assertEqual((alarm["MetricName"], alarm["Dimensions"], alarm["Threshold"]),
                         ("ApproximateNumberOfMessagesVisible",
                          [{"Name": "QueueName", "Value": "sense-dlq"}], 0.0))

        second = self.deploy()
        outcomes = report(second.stdout)
        self.assertEqual(len(outcomes), 9, second.stdout)
        self.assertEqual(set(outcomes.values()), {"unchanged"}, second.stdout)
        self.assertEqual(lam.get_function(FunctionName="sense-processor")["Configuration"]["LastModified"],
                         function["LastModified"])
        self.assertEqual(lam.get_event_source_mapping(UUID=mapping["UUID"])["LastModified"],
                         mapping["LastModified"])

    def test_a_changed_setting_updates_only_what_it_touches(self):
        self.deploy()
        changed = self.deploy("--env", "SENSE_INFLUXDB_BUCKET=other")
        outcomes = report(changed.stdout)
        self.assertEqual(outcomes.pop("function sense-processor"), "updated (configuration: Environment)")
        self.assertEqual(set(outcomes.values()), {"unchanged"}, changed.stdout)
        variables = self.moto.client("lambda").get_function(FunctionName="sense-processor")[
            "Configuration"]["Environment"]["Variables"]
        self.assertEqual(variables["SENSE_INFLUXDB_BUCKET"], "other")

    def test_unsafe_or_wrong_settings_are_refused_before_anything_is_made(self):
        for args, message in (
                (["--env", "SENSE_X=1"], "SENSE_X: unknown SENSE_ environment variable"),
                (["--env", "SENSE_INFLUXDB_API=v3"], "influxdb.api: must be 'v1' or 'v2'"),
                (["--", "--max-receive-count", "2"], "--max-receive-count: at least 5"),
                (["--", "--reserved-concurrency", "3", "--max-concurrency", "4"], "would be throttled")):
            result = self.deploy(*args, check=False)
            self.assertEqual(result.returncode, 2, result.stdout + result.stderr)
            self.assertIn(message, result.stderr)
        self.assertEqual(self.aws.nothing(), {"queues": [], "tables": [], "functions": [], "roles": []})


class DryRunTests(TestCase):
    """``--dry-run`` prints every step of a mode and changes nothing."""

    timeout = 120

    def setUp(self):
        self.moto = MotoServer(self)
        self.aws = AWSResources(self.moto)
        self.root = Path(self.mktemp()).resolve()
        self.package = self.root / "sense-gateway-lambda.zip"

    def dry_run(self, mode: str, *args: str) -> str:
        result = run_deploy("--mode", mode, "--dry-run", "--endpoint-url", self.moto.url,
                            "--package", str(self.package), "--root", str(self.root), *args)
        self.assertIn("dry run: nothing was changed", result.stdout)
        self.assertEqual(self.aws.nothing(), {"queues": [], "tables": [], "functions": [], "roles": []})
        self.assertFalse(self.root.exists(), f"the dry run wrote into {self.root}")
        return result.stdout

    def test_lambda(self):
        out = self.dry_run("lambda")
        self.assertIn(f"+ {REPO}/.venv/bin/python -m sense_gateway.aws.package --output {self.package}", out)
        self.assertEqual(report(out), {
            "queue sense-dlq": "would be created", "queue sense": "would be created",
            "table sense-devices": "would be created", "table sense-credentials": "would be created",
            "log group /aws/lambda/sense-processor": "would be created",
            "role sense-processor": "would be created", "function sense-processor": "would be created",
            "event source mapping sense -> sense-processor": "would be created",
            "alarm sense-dead-letters": "would be created"})

    def test_server_without_docker_installs_a_venv_and_the_systemd_unit(self):
        out = self.dry_run("server", "--no-docker", "--prefix", "/opt/sense-gateway")
        steps = [line for line in out.splitlines() if line.startswith("+ ")]
        self.assertRegex(steps[0], rf"^\+ \S*python3\S* -m venv {self.root}/opt/sense-gateway$")
        self.assertIn(f"+ {self.root}/opt/sense-gateway/bin/pip install --quiet --upgrade {REPO}", steps)
        self.assertIn(f"{REPO}/etc/systemd/sense-gateway.service as "
                      f"{self.root}/etc/systemd/system/sense-gateway.service", out)
        self.assertIn("SENSE_ROLE=all", out)

    def test_server_with_docker_builds_and_runs_the_image(self):
        out = self.dry_run("server", "--docker")
        self.assertIn(f"+ docker build --tag sense-gateway:latest {REPO}", out)
        self.assertIn("+ docker run -d --name sense-gateway --restart unless-stopped --network host "
                      "--volume sense-gateway-data:/var/lib/sense-gateway --env SENSE_ROLE=all "
                      "--env SENSE_SECURITY_PLAIN_INGEST=off sense-gateway:latest", out)

    def test_all_deploys_lambda_then_a_gateway_sending_to_its_queue_then_compose(self):
        out = self.dry_run("all", "--docker")
        self.assertEqual(set(report(out).values()), {"would be created"})
        self.assertIn("--env SENSE_ROLE=gateway --env SENSE_SECURITY_PLAIN_INGEST=off "
                      "--env SENSE_QUEUE_BACKEND=sqs", out)
        self.assertIn("--env SENSE_REGISTRY_BACKEND=dynamodb --env SENSE_REGISTRY_TABLE=sense-devices "
                      "--env SENSE_REGISTRY_CREDENTIALS_TABLE=sense-credentials", out)
        self.assertIn(f"+ docker compose --file {REPO}/compose.yaml up --detach influxdb grafana", out)
        lines = out.splitlines()
        self.assertLess(lines.index(next(x for x in lines if x.startswith("queue sense:"))),
                        lines.index(next(x for x in lines if x.startswith("+ docker run"))))


class TemplateTests(TestCase):
    timeout = 120

    def template(self) -> dict:
        from cfnlint.decode import decode

        document, errors = decode(str(TEMPLATE))
        self.assertEqual(errors, [])
        return document

    def test_cfn_lint_finds_nothing(self):
        result = subprocess.run([str(BIN / "cfn-lint"), "--format", "parseable", str(TEMPLATE)],
                                capture_output=True, text=True, timeout=120)
        self.assertEqual((result.returncode, result.stdout, result.stderr), (0, "", ""))

    def test_safe_defaults_are_stated_and_match_the_deploy_script(self):
        template = self.template()
        parameters = template["Parameters"]
        defaults = deploy.Settings()
        self.assertEqual(int(parameters["FunctionTimeout"]["Default"]), defaults.function_timeout)
        self.assertEqual(int(parameters["MaxReceiveCount"]["Default"]), defaults.max_receive_count)
        self.assertGreaterEqual(parameters["MaxReceiveCount"]["MinValue"], 5)
        self.assertEqual(parameters["MaximumConcurrency"]["Default"], defaults.max_concurrency)
        self.assertEqual(parameters["ReservedConcurrency"]["Default"], defaults.reserved_concurrency)
        self.assertEqual(parameters["MemorySize"]["Default"], defaults.memory)
        # Every allowed function timeout maps to six times it.
        visibility = template["Mappings"]["VisibilityTimeout"]
        self.assertEqual({int(t): visibility[t]["Seconds"] for t in parameters["FunctionTimeout"]["AllowedValues"]},
                         {int(t): 6 * int(t) for t in parameters["FunctionTimeout"]["AllowedValues"]})
        resources = template["Resources"]
        mapping = resources["QueueMapping"]["Properties"]
        self.assertEqual((mapping["BatchSize"], mapping["FunctionResponseTypes"]),
                         (deploy.BATCH_SIZE, ["ReportBatchItemFailures"]))
        self.assertIn("MaximumConcurrency", mapping["ScalingConfig"])
        function = resources["Function"]["Properties"]
        self.assertEqual((function["Runtime"], function["Handler"]), (deploy.RUNTIME, package.HANDLER))
        alarm = resources["DeadLetterAlarm"]["Properties"]
        expected = deploy.Deployment.alarm(_Named(defaults))
        for key in ("Namespace", "MetricName", "Statistic", "Period", "EvaluationPeriods",
                    "ComparisonOperator", "TreatMissingData"):
            self.assertEqual(alarm[key], expected[key], key)
        self.assertEqual(alarm["Dimensions"][0]["Value"], {"Fn::GetAtt": ["DeadLetterQueue", "QueueName"]})

    def test_template_on_moto_makes_what_the_deploy_script_would_leave_alone(self):
        moto = MotoServer(self)
        zip_path = Path(self.mktemp()).resolve() / "sense-gateway-lambda.zip"
        package.build(zip_path)
        moto.client("s3").create_bucket(Bucket="code")
        moto.client("s3").put_object(Bucket="code", Key="sense-gateway-lambda.zip",
                                     Body=zip_path.read_bytes())
        cloudformation = moto.client("cloudformation")
        cloudformation.create_stack(
            StackName="sense", TemplateBody=TEMPLATE.read_text(), Capabilities=["CAPABILITY_NAMED_IAM"],
            Parameters=[{"ParameterKey": "CodeS3Bucket", "ParameterValue": "code"},
                        {"ParameterKey": "InfluxDBUrl", "ParameterValue": "https://influx.example.org"}])
        [stack] = cloudformation.describe_stacks(StackName="sense")["Stacks"]
        self.assertEqual(stack["StackStatus"], "CREATE_COMPLETE")

        lines = []
        settings = deploy.Settings(
            endpoint_url=moto.url, package=zip_path, dry_run=True,
            environment={"SENSE_INFLUXDB_URL": "https://influx.example.org", "SENSE_INFLUXDB_TOKEN": "",
                         "SENSE_INFLUXDB_ORG": "sense", "SENSE_INFLUXDB_BUCKET": "sense"})
        deployment = deploy.Deployment(settings, out=lines.append)
        with _environment(AWS_ENV):
            deployment.run()
        outcomes = dict(deployment.report)
        # moto's CloudFormation keeps an inline policy as Python's repr of
        # it (so the script would rewrite it) and makes no alarms: compare
        # the policy here, the alarm in test_safe_defaults...
        role = outcomes.pop("role sense-processor")
        self.assertIn(role, ("unchanged", "would be updated (policy)"))
        stored = moto.client("iam").get_role_policy(RoleName="sense-processor",
                                                    PolicyName="sense-processor")["PolicyDocument"]
        if isinstance(stored, str):
            stored = ast.literal_eval(stored)
        self.assertEqual(stored, deployment.role_policy())
        outcomes.pop("alarm sense-dead-letters")
        self.assertEqual(outcomes, {
            "queue sense-dlq": "unchanged", "queue sense": "unchanged", "table sense-devices": "unchanged",
            "table sense-credentials": "unchanged",
            "log group /aws/lambda/sense-processor": "unchanged",
            "function sense-processor": "unchanged",
            "event source mapping sense -> sense-processor": "unchanged"})


class _Named:
    """Just enough of a Deployment for :meth:`Deployment.alarm`."""

    def __init__(self, settings):
        self.settings = settings


class _environment:
    def __init__(self, variables):
        self.variables = variables

    def __enter__(self):
        self.saved = {k: os.environ.get(k) for k in self.variables}
        os.environ.update(self.variables)

    def __exit__(self, *exc):
        for k, v in self.saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def shell_scripts() -> list[Path]:
    """Every shell script in the checkout: *.sh, and files whose first line
    names sh or bash."""
    skip = {".git", ".venv", "node_modules", "_trial_temp", "var", "dist", "build", ".ruff_cache"}
    found = []
    for directory, dirs, files in os.walk(REPO):
        dirs[:] = [d for d in dirs if d not in skip and not d.startswith("_trial_temp")]
        for name in files:
            path = Path(directory) / name
            if name.endswith(".sh"):
                found.append(path)
                continue
            try:
                with open(path, "rb") as f:
                    first = f.readline(200)
            except OSError:
                continue
            if re.match(rb"#!\s*(/usr)?/bin/(env\s+)?(ba)?sh\b", first):
                found.append(path)
    return sorted(found)


class ShellTests(TestCase):
    def test_shellcheck_passes_on_every_shell_script(self):
        scripts = shell_scripts()
        self.assertIn(DEPLOY_SH, scripts)
        result = subprocess.run(["shellcheck", *map(str, scripts)], capture_output=True, text=True,
                                timeout=120)
        self.assertEqual(result.returncode, 0, result.stdout)

    def test_help_and_mistakes(self):
        result = run_deploy("--help")
        self.assertIn("Usage: ./deploy.sh --mode server|lambda|all", result.stdout)
        for args, message in ((["--mode", "cloud"], "--mode must be server, lambda or all"),
                              ([], "--mode is required"), (["--mode", "lambda", "--bogus"], "unknown option")):
            result = run_deploy(*args, check=False)
            self.assertEqual(result.returncode, 2, args)
            self.assertIn(message, result.stderr)


class ComposeTests(TestCase):
    def compose(self) -> dict:
        return yaml.safe_load((REPO / "compose.yaml").read_text())

    def test_stack_has_every_role_influxdb_and_grafana(self):
        services = self.compose()["services"]
        self.assertEqual(set(services), {"gateway", "processor", "influxdb", "grafana"})
        self.assertEqual(services["gateway"]["command"], ["--role", "gateway"])
        self.assertEqual(services["processor"]["command"], ["--role", "processor"])
        self.assertEqual(services["gateway"]["network_mode"], "host")
        self.assertIn("3000:3000", services["grafana"]["ports"])
        influx = services["influxdb"]["environment"]
        self.assertEqual(influx["DOCKER_INFLUXDB_INIT_MODE"], "setup")
        self.assertEqual(influx["DOCKER_INFLUXDB_INIT_BUCKET"], "sense")
        self.assertEqual(influx["DOCKER_INFLUXDB_INIT_ADMIN_TOKEN"],
                         services["processor"]["environment"]["SENSE_INFLUXDB_TOKEN"])
        # The processor's settings are ones the gateway accepts.
        from sense_gateway.config import load_config

        environment = {k: "t" if v.startswith("${") else v
                       for k, v in services["processor"]["environment"].items()}
        load_config(environ=environment)

    def test_every_mounted_path_exists_and_named_volumes_are_declared(self):
        document = self.compose()
        binds = []
        for name, service in document["services"].items():
            if "build" in service:
                self.assertTrue((REPO / service["build"] / "Dockerfile").is_file(), name)
            for volume in service.get("volumes", []):
                source = volume.split(":")[0]
                if source.startswith((".", "/")):
                    binds.append(source)
                    self.assertTrue((REPO / source).exists(), f"{name} mounts {source}, not in the repo")
                else:
                    self.assertIn(source, document["volumes"], f"{name}: volume {source} not declared")
        self.assertIn("./etc/grafana/provisioning", binds)


def _dockerignore_excludes(patterns: list[str], path: str) -> bool:
    """Whether the build context leaves *path* out (last match wins; a
    pattern matching a parent directory matches what is inside)."""
    def regex(pattern):
        out = ""
        for part in re.split(r"(\*\*|\*|\?)", pattern.strip("/")):
            out += {"**": ".*", "*": "[^/]*", "?": "[^/]"}.get(part, re.escape(part))
        return re.compile(out + "$")

    parts = path.split("/")
    candidates = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    excluded = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        compiled = regex(pattern.lstrip("!"))
        if any(compiled.match(c) for c in candidates):
            excluded = not negated
    return excluded


class DockerfileTests(TestCase):
    timeout = 60

    def instructions(self) -> list[tuple[str, str]]:
        text = (REPO / "Dockerfile").read_text()
        text = re.sub(r"<<'(\w+)'.*?\n\1\n", "<<heredoc\n", text, flags=re.DOTALL)
        text = text.replace("\\\n", " ")
        return [tuple(line.split(None, 1)) for line in text.splitlines()
                if line.strip() and not line.startswith("#")]

    def test_image_runs_twistd_as_an_unprivileged_user_with_coap_exposed_and_plain_ingest_off(self):
        instructions = self.instructions()
        final = instructions[max(i for i, (k, _) in enumerate(instructions) if k == "FROM"):]
        values = {}
        for keyword, value in final:
            values.setdefault(keyword, []).append(value)
        self.assertEqual(values["USER"], ["sense-gateway"])
        self.assertIn("5683/udp", values["EXPOSE"][0].split())
        self.assertIn("5684/udp", values["EXPOSE"][0].split())
        # Safe by default: plain CoAP stores nothing unless told otherwise.
        self.assertTrue(any("SENSE_SECURITY_PLAIN_INGEST=off" in v for v in values["ENV"]))
        self.assertEqual(json.loads(values["ENTRYPOINT"][0])[:1] + json.loads(values["ENTRYPOINT"][0])[-1:],
                         ["twistd", "sense-gateway"])
        self.assertIn("--nodaemon", values["ENTRYPOINT"][0])
        self.assertIn("sense-healthcheck", values["HEALTHCHECK"][0])
        self.assertTrue(any("SENSE_DATA_DIR=/var/lib/sense-gateway" in v for v in values["ENV"]))

    def test_every_copied_path_is_in_the_build_context(self):
        patterns = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
                    if line.strip() and not line.startswith("#")]
        sources = []
        for keyword, value in self.instructions():
            if keyword != "COPY" or "--from=" in value or "<<heredoc" in value:
                continue
            words = [w for w in value.split() if not w.startswith("--")]
            sources.extend(words[:-1])
        self.assertIn("sense_gateway", sources)
        for source in sources:
            self.assertTrue((REPO / source).exists(), source)
            self.assertFalse(_dockerignore_excludes(patterns, source), f"{source} left out by .dockerignore")
        for inside in ("sense_gateway/aws/lambda_handler.py", "twisted/plugins/sense_gateway_plugin.py"):
            self.assertFalse(_dockerignore_excludes(patterns, inside), inside)
        for outside in (".venv/bin/python", "var/queue.sqlite3", "tests/test_deploy.py",
                        "sense_gateway/__pycache__/config.cpython-311.pyc"):
            self.assertTrue(_dockerignore_excludes(patterns, outside), outside)

    def healthcheck(self, **variables) -> int:
        text = (REPO / "Dockerfile").read_text()
        script = re.search(r"<<'PYTHON' /opt/sense-gateway/bin/sense-healthcheck\n(.*?)\nPYTHON\n",
                           text, re.DOTALL).group(1)
        return subprocess.run([sys.executable, "-c", script], timeout=30,
                              env={**clean_environment(), **variables}).returncode

    @defer.inlineCallbacks
    def test_healthcheck_pings_a_gateway_and_asks_a_processor(self):
        gateway = GatewayProcess(self, "--role", "gateway")
        yield gateway.wait_listening()
        no_web = str(free_tcp_port())
        self.assertEqual(self.healthcheck(SENSE_COAP_PORT=str(gateway.port), SENSE_WEB_PORT=no_web), 0)
        gateway.stop()
        self.assertEqual(self.healthcheck(SENSE_COAP_PORT=str(gateway.port), SENSE_WEB_PORT=no_web), 1)

        everything = GatewayProcess(self, "--role", "all")
        url = yield everything.web_url()
        web_port = url.rstrip("/").rsplit(":", 1)[1]
        self.assertEqual(self.healthcheck(SENSE_COAP_PORT=str(everything.port), SENSE_WEB_PORT=web_port), 0)


class SystemdUnitTests(TestCase):
    timeout = 60

    def test_unit_as_deploy_installs_it_passes_systemd_analyze(self):
        unit = (REPO / "etc" / "systemd" / "sense-gateway.service").read_text()
        settings = dict(line.split("=", 1) for line in unit.splitlines()
                        if "=" in line and not line.startswith("#"))
        self.assertEqual((settings["User"], settings["Restart"], settings["StateDirectory"]),
                         ("sense-gateway", "on-failure", "sense-gateway"))
        self.assertIn("SENSE_DATA_DIR=/var/lib/sense-gateway", unit)
        # deploy.sh points the unit at its venv (--prefix): here, ours.
        directory = Path(self.mktemp()).resolve()
        directory.mkdir()
        installed = directory / "sense-gateway.service"
        installed.write_text(unit.replace("/opt/sense-gateway", str(BIN.parent)))
        result = subprocess.run(["systemd-analyze", "verify", str(installed)], capture_output=True,
                                text=True, timeout=60)
        self.assertEqual((result.returncode, result.stderr), (0, ""))
