"""Deploying the gateway itself: ``deploy.sh --mode server`` dry runs,
shell scripts through shellcheck, the compose file, the Dockerfile's
health check against a running gateway, the systemd unit through
``systemd-analyze verify``. The AWS side is in tests/test_aws_stack.py,
the Lambda package in tests/test_lambda_package.py."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import yaml
from twisted.internet import defer
from twisted.trial.unittest import TestCase

from tests.servers import BIN, free_tcp_port
from tests.support import REPO, GatewayProcess, clean_environment, run_deploy

DEPLOY_SH = REPO / "deploy.sh"


class ServerDryRunTests(TestCase):
    """``--mode server --dry-run`` prints every step and changes nothing
    (the lambda and all modes: tests/test_aws_stack.py)."""

    timeout = 120

    def setUp(self):
        self.root = Path(self.mktemp()).resolve()

    def dry_run(self, mode: str, *args: str) -> str:
        result = run_deploy("--mode", mode, "--dry-run", "--root", str(self.root), *args)
        self.assertIn("dry run: nothing was changed", result.stdout)
        self.assertFalse(self.root.exists(), f"the dry run wrote into {self.root}")
        return result.stdout

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
