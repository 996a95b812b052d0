"""The processes the bench starts: our gateway (``twistd``), the comparison
peers and VictoriaMetrics, each on a free loopback port, each stopped
(SIGTERM, then SIGKILL) when the bench is done with it."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from sense_gateway.config import processes

BIN = Path(sys.executable).parent


def free_port(kind: int = socket.SOCK_DGRAM, host: str = "::1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, kind) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def executable(name: str) -> str:
    found = BIN / name
    if found.exists():
        return str(found)
    which = shutil.which(name)
    if which is None:
        raise RuntimeError(f"{name} is not installed")
    return which


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


class Child:
    """A child process with its output in a log file."""

    name = "process"

    def __init__(self, command: list[str], log: Path, env: dict | None = None,
                 cwd: Path | None = None):
        self.log = log
        self._log_file = open(log, "wb")
        self.process = subprocess.Popen(command, stdout=self._log_file, stderr=subprocess.STDOUT,
                                        env=env, cwd=cwd)

    @property
    def pid(self) -> int:
        return self.process.pid

    def output(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def wait_for(self, ready, what: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}: "
                                   f"{self.output()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not {what} within {timeout:g} s: "
                                   f"{self.output()}")
            time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL: no chance to finish anything."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self._log_file.close()

    def stop(self, grace: float = 15.0) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(grace)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log_file.close()


class Peer(Child):
    """``python -m sense_gateway.bench.peers KIND`` on a free port."""

    def __init__(self, kind: str, workdir: Path, host: str = "::1", extra: tuple = ()):
        self.name = kind
        self.host = host
        self.port = free_port(host=host)
        super().__init__([sys.executable, "-m", "sense_gateway.bench.peers", kind,
                          "--port", str(self.port), "--bind", host, *extra],
                         workdir / f"peer-{kind}.log")
        self.wait_for(lambda: b"listening on" in self.log.read_bytes(), "listen")


class Gateway(Child):
    """``twistd -n sense-gateway`` with its data in *data_dir*.

    *port* and *coaps_port* (default: free ones) let a restarted gateway
    listen where the one before it did; *label* names its log files
    (default: the role), so each run of a restarted gateway has its own."""

    name = "gateway"

    def __init__(self, data_dir: Path, role: str = "gateway", settings: dict | None = None,
                 host: str = "::1", wait: bool = True, port: int | None = None,
                 coaps_port: int | None = None, label: str | None = None):
        data_dir.mkdir(parents=True, exist_ok=True)
        self.data_dir = data_dir
        self.host = host
        self.port = port or free_port(host=host)
        self.coaps_port = coaps_port or free_port(host=host)
        self.web_port = free_port(socket.SOCK_STREAM, "127.0.0.1")
        label = label or role
        self.log_path = data_dir / f"twistd-{label}.log"
        environment = {k: v for k, v in os.environ.items() if not k.startswith("SENSE_")}
        # The load comes from one address: no per-source limits on requests
        # or on the devices it creates.
        settings = {"coap.rate_limit": 0, "registry.new_devices_per_minute": 1e9,
                    **(settings or {})}
        environment.update({f"SENSE_{k.replace('.', '_').upper()}": str(v)
                            for k, v in settings.items()})
        command = [executable("twistd"), "-n", "--pidfile=", f"--logfile={self.log_path}",
                   "sense-gateway", "--role", role, "--coap-port", str(self.port),
                   "--coaps-port", str(self.coaps_port),
                   "--bind", host, "--web-port", str(self.web_port),
                   "--data-dir", str(data_dir), "--plugins-dir", str(data_dir / "no-plugins")]
        super().__init__(command, data_dir / f"stdout-{label}.log", env=environment, cwd=data_dir)
        if wait:
            # Every worker's listener, so the load is spread from the start.
            self.wait_until_logged(b"CoAP listening" if role != "processor"
                                   else b"processor started",
                                   times=processes(settings.get("workers", 1)))

    def wait_until_logged(self, text: bytes, timeout: float = 30.0, times: int = 1) -> None:
        self.wait_for(lambda: self.log_path.exists()
                      and self.log_path.read_bytes().count(text) >= times,
                      f"log {text.decode()!r}", timeout)

    def output(self) -> str:
        parts = []
        for path in (self.log_path, self.log):
            try:
                parts.append(path.read_text(errors="replace"))
            except OSError:
                pass
        return "\n".join(parts)[-2000:]

    def stats(self) -> dict:
        import orjson

        status, body = http_get(f"http://127.0.0.1:{self.web_port}/api/stats")
        if status != 200:
            raise RuntimeError(f"/api/stats: HTTP {status}")
        return orjson.loads(body)


class VictoriaMetrics(Child):
    """VictoriaMetrics (Debian package ``victoria-metrics``) on a free port."""

    name = "victoria-metrics"

    def __init__(self, workdir: Path):
        self.port = free_port(socket.SOCK_STREAM, "127.0.0.1")
        self.url = f"http://127.0.0.1:{self.port}"
        super().__init__([executable("victoria-metrics"),
                          f"-httpListenAddr=127.0.0.1:{self.port}",
                          f"-storageDataPath={workdir / 'victoria-metrics'}",
                          "-retentionPeriod=100y", "-search.latencyOffset=0s",
                          "-loggerLevel=ERROR"], workdir / "victoria-metrics.log")

        def healthy() -> bool:
            try:
                return http_get(f"{self.url}/health", timeout=1)[0] == 200
            except OSError:
                return False

        self.wait_for(healthy, "answer /health")

    def count(self, metric: str) -> int:
        """How many points of *metric* are queryable now."""
        import urllib.parse

        http_get(f"{self.url}/internal/force_flush")
        query = urllib.parse.urlencode({"match[]": f'{{__name__="{metric}"}}', "start": 0,
                                        "end": int(time.time()) + 86400})
        status, body = http_get(f"{self.url}/api/v1/export?{query}", timeout=60)
        if status != 200:
            raise RuntimeError(f"export: HTTP {status}: {body[:200]!r}")
        total = 0
        import orjson

        for line in body.splitlines():
            if line.strip():
                total += len(orjson.loads(line)["timestamps"])
        return total
