"""Real servers for tests, each on a free loopback port with a temporary
data directory: VictoriaMetrics (the InfluxDB v2 write API), InfluxDB 1.x
(``influxd``), and moto in server mode (SQS, DynamoDB).

Plain classes, started from ``setUp`` and stopped with ``addCleanup``, so
trial and pytest both use them. A server that does not come up fails the
test with its output; nothing is skipped.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

BIN = Path(sys.executable).parent


def free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method: str, url: str, body: bytes | None = None, timeout: float = 10.0,
         headers: dict[str, str] | None = None):
    """(status, body) of one HTTP request, errors included."""
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def stop_process(process: subprocess.Popen, grace: float = 15.0) -> None:
    """SIGTERM, then SIGKILL if it has not exited within *grace* seconds."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def as_environment(settings: dict) -> dict[str, str]:
    """Configuration overrides (``{"influxdb.url": ...}``) as the SENSE_*
    variables that set the same keys, for a child process."""
    return {"SENSE_" + key.replace(".", "_").upper():
            ",".join(value) if isinstance(value, tuple) else str(value).lower()
            if isinstance(value, bool) else str(value)
            for key, value in settings.items()}


class ServerProcess:
    """A child process that must answer *ready_url* within *timeout*
    seconds; stopped when the test ends. :meth:`start` runs it again
    after :meth:`stop` or :meth:`kill` (same command: same port, same
    data)."""

    name = "server"
    #: seconds :meth:`stop` waits after SIGTERM before SIGKILL
    grace = 15.0

    def __init__(self, testcase, command: list[str], ready_url: str | None = None,
                 timeout: float = 30.0, env: dict | None = None, cwd=None, **popen):
        executable = shutil.which(command[0]) or (BIN / command[0])
        if not Path(executable).exists():
            raise RuntimeError(f"{self.name}: {command[0]} is not installed")
        self._mktemp = testcase.mktemp
        self.command = [str(executable), *command[1:]]
        self.ready_url, self.timeout = ready_url, timeout
        self._popen = dict(env=env, cwd=cwd, **popen)
        self._log_file = self.process = None
        #: how many times it was started
        self.runs = 0
        testcase.addCleanup(self.stop)
        self.start()

    def start(self) -> None:
        if self.process is not None and self.process.poll() is None:
            # A second process would leave the first running past the test.
            raise RuntimeError(f"{self.name} is running already: stop or kill it first")
        # Each run logs to a file of its own, so what a run waits for or
        # reports is its own output.
        self.log = Path(self._mktemp() + ".log").resolve()
        self._log_file = open(self.log, "wb")
        self.process = subprocess.Popen(self.command, stdout=self._log_file,
                                        stderr=subprocess.STDOUT, **self._popen)
        self.runs += 1
        if self.ready_url is not None:
            self.wait_ready()

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.timeout
        while True:
            self.check_running()
            try:
                status, _ = http("GET", self.ready_url, timeout=1)
                if status < 500:
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not answer {self.ready_url}: {self.output()}")
            time.sleep(0.05)

    def check_running(self) -> None:
        """Raise, with its output, if the process has exited."""
        if self.process.poll() is not None:
            raise RuntimeError(f"{self.name} exited with {self.process.returncode}: "
                               f"{self.output()}")

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-2000:]

    def _closed(self) -> None:
        if self._log_file is not None:
            self._log_file.close()

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process, self.grace)
        self._closed()

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()
        self._closed()


class VictoriaMetrics(ServerProcess):
    """Accepts InfluxDB line protocol on ``/api/v2/write``; read back with
    :meth:`export`."""

    name = "victoria-metrics"

    def __init__(self, testcase, port: int | None = None, data: Path | None = None):
        self.port = port or free_tcp_port()
        self.data = data or Path(testcase.mktemp()).resolve()
        self.url = f"http://127.0.0.1:{self.port}"
        super().__init__(testcase, [
            "victoria-metrics", f"-httpListenAddr=127.0.0.1:{self.port}",
            f"-storageDataPath={self.data}", "-retentionPeriod=100y",
            "-search.latencyOffset=0s", "-loggerLevel=ERROR",
        ], f"{self.url}/health")

    def settings(self, *sinks: str) -> dict:
        """Configuration overrides that write to this server (after the
        other *sinks*), without retries so a test sees each failure."""
        return {"sinks.enabled": (*sinks, "influxdb"), "influxdb.url": self.url,
                "influxdb.retries": 0}

    def environment(self, *sinks: str) -> dict[str, str]:
        """:meth:`settings` as SENSE_* variables."""
        return as_environment(self.settings(*sinks))

    def export(self, match: str = '{__name__=~"sense.*"}') -> list[dict]:
        """Every series matching *match*: ``{"metric", "values", "timestamps"}``."""
        http("GET", f"{self.url}/internal/force_flush")
        # The default end is "now", which misses points stamped a moment ago.
        query = urllib.parse.urlencode({"match[]": match, "start": 0,
                                        "end": int(time.time()) + 86400})
        status, body = http("GET", f"{self.url}/api/v1/export?{query}")
        if status != 200:
            raise RuntimeError(f"export failed: {status} {body[:200]!r}")
        return [json.loads(line) for line in body.splitlines() if line.strip()]

    def points(self, match: str = '{__name__=~"sense.*"}') -> dict:
        """{(metric name, device): {timestamp ms: value}}"""
        out = {}
        for series in self.export(match):
            key = (series["metric"]["__name__"], series["metric"].get("device"))
            out.setdefault(key, {}).update(zip(series["timestamps"], series["values"]))
        return out


class InfluxDB1(ServerProcess):
    """``influxd`` 1.x with one database; query it with :meth:`query`."""

    name = "influxd"

    def __init__(self, testcase, database: str = "sense"):
        self.port = free_tcp_port()
        rpc_port = free_tcp_port()
        root = Path(testcase.mktemp()).resolve()
        root.mkdir()
        config = root / "influxdb.conf"
        config.write_text(f"""
reporting-disabled = true
bind-address = "127.0.0.1:{rpc_port}"
[meta]
  dir = "{root}/meta"
[data]
  dir = "{root}/data"
  wal-dir = "{root}/wal"
  query-log-enabled = false
[http]
  bind-address = "127.0.0.1:{self.port}"
  log-enabled = false
[monitor]
  store-enabled = false
[logging]
  level = "error"
""")
        self.url = f"http://127.0.0.1:{self.port}"
        self.database = database
        super().__init__(testcase, ["influxd", "-config", str(config)], f"{self.url}/ping")
        self.query(f'CREATE DATABASE "{database}"')

    def query(self, q: str, headers: dict[str, str] | None = None) -> dict:
        body = urllib.parse.urlencode({"q": q, "db": self.database, "epoch": "ms"}).encode()
        status, data = http("POST", f"{self.url}/query", body, headers=headers)
        if status != 200:
            raise RuntimeError(f"query failed: {status} {data[:200]!r}")
        return json.loads(data)

    def rows(self, q: str) -> list[dict]:
        """The first result's rows as dicts (with the series' tags merged in)."""
        result = self.query(q)["results"][0]
        rows = []
        for series in result.get("series", []):
            for values in series["values"]:
                rows.append({**series.get("tags", {}), **dict(zip(series["columns"], values))})
        return rows


class MotoServer(ServerProcess):
    """moto in server mode: SQS and DynamoDB at :attr:`url` for boto3."""

    name = "moto_server"

    def __init__(self, testcase):
        self.port = free_tcp_port()
        self.url = f"http://127.0.0.1:{self.port}"
        super().__init__(testcase, ["moto_server", "-H", "127.0.0.1", "-p", str(self.port)],
                         f"{self.url}/moto-api/")

    def client(self, service: str):
        import boto3

        return boto3.client(service, endpoint_url=self.url, region_name="us-east-1",
                            aws_access_key_id="testing", aws_secret_access_key="testing")


class Prometheus(ServerProcess):
    """A real Prometheus server (Debian package ``prometheus``) with the
    given configuration (YAML text); query it with :meth:`api`."""

    name = "prometheus"

    def __init__(self, testcase, config: str):
        self.port = free_tcp_port()
        root = Path(testcase.mktemp()).resolve()
        root.mkdir()
        (root / "prometheus.yml").write_text(config)
        self.url = f"http://127.0.0.1:{self.port}"
        super().__init__(testcase, [
            "prometheus", f"--config.file={root / 'prometheus.yml'}",
            f"--storage.tsdb.path={root / 'data'}", f"--web.listen-address=127.0.0.1:{self.port}",
            "--log.level=warn"], f"{self.url}/-/ready")

    def api(self, path: str, **params) -> dict:
        query = urllib.parse.urlencode(params)
        status, body = http("GET", f"{self.url}/api/v1/{path}" + (f"?{query}" if query else ""))
        if status != 200:
            raise RuntimeError(f"prometheus {path}: {status} {body[:200]!r}")
        return json.loads(body)["data"]
