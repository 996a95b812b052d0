"""Test helpers that run real things: the gateway (in-process or as a
``twistd`` process), libcoap's and aiocoap's clients, raw UDP peers.

They are plain functions and classes started from ``setUp`` and stopped
with ``addCleanup``, so both trial and pytest run them.
"""

from __future__ import annotations

import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson
import treq
from twisted.internet import defer, reactor, utils
from twisted.web.client import HTTPConnectionPool
from txthings import coap

from sense_gateway.coap.message import decode
from sense_gateway.config import load_config
from sense_gateway.envelope import Decoded, Reading
from sense_gateway.errors import DecodeError

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
COAP_CLIENT = shutil.which("coap-client-notls")


def free_udp_port(host: str = "::1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def coap_url(host: str, port: int, path: str) -> str:
    host = f"[{host}]" if ":" in host else host
    return f"coap://{host}:{port}{path}"


def start_gateway(testcase, *, environ=None, **overrides):
    """Run a gateway in this process on the real reactor, on free ports,
    with its data in a temporary directory; stopped when the test ends."""
    from sense_gateway.service import make_service

    data_dir = Path(testcase.mktemp())
    data_dir.mkdir(parents=True)
    settings = {
        "coap.bind": "::",
        "coap.port": 0,
        "data_dir": str(data_dir),
        "plugins_dir": str(data_dir / "no-plugins"),
        "role": "gateway",
        "web.port": 0,
    }
    settings.update(overrides)
    config = load_config(environ=environ or {}, overrides=settings)
    service = make_service(config, reactor)
    # Registered first: a start that fails half-way still stops what started
    # (a thread pool left running would keep the test process alive).
    testcase.addCleanup(service.stopService)
    service.startService()
    service.port = service.coap_server.address[1]
    return service


def queued(service_or_path) -> list:
    """Envelopes now in a gateway's SQLite queue, read by a second connection."""
    from sense_gateway.queues.sqlite import SQLiteQueueStore

    path = getattr(service_or_path, "config", None)
    path = path.queue_path if path is not None else Path(service_or_path)
    store = SQLiteQueueStore(path)
    try:
        return [m.envelope for m in store.peek()]
    finally:
        store.close()


class CoapClientResult:
    def __init__(self, code: str, payload: bytes, out: bytes, err: bytes):
        self.code, self.payload, self.out, self.err = code, payload, out, err

    def __repr__(self):
        return f"<coap-client {self.code} {self.payload!r}>"


@defer.inlineCallbacks
def libcoap_request(method: str, url: str, payload: bytes | None = None,
                    content_format: int | None = None, non: bool = False, extra=()):
    """Run ``coap-client-notls`` and return the response code and payload."""
    if COAP_CLIENT is None:
        raise RuntimeError("coap-client-notls is not installed (Debian package libcoap3-bin)")
    scratch = Path(tempfile.mkdtemp(prefix="coap-client-"))
    received = scratch / "payload"
    # At -v 7 libcoap logs "process incoming 2.04 response" on stdout; a
    # success payload goes to the -o file, an error's to stderr.
    args = ["-m", method, "-B", "5", "-v", "7", "-o", str(received), *extra]
    if payload is not None:
        (scratch / "request").write_bytes(payload)
        args += ["-f", str(scratch / "request")]
    if content_format is not None:
        args += ["-t", str(content_format)]
    if non:
        args.append("-N")
    args.append(url)
    try:
        out, err, status = yield utils.getProcessOutputAndValue(COAP_CLIENT, args, env=os.environ)
        body = received.read_bytes() if received.exists() else None
    finally:
        shutil.rmtree(scratch)
    codes = re.findall(rb"process incoming (\d\.\d\d) response", out)
    code = codes[-1].decode() if codes else None
    if body is None:
        # libcoap prints "4.00 <payload>\n" for an error response.
        body = err[len(code) + 1:].removesuffix(b"\n") if code and err.startswith(code.encode()) else b""
    return CoapClientResult(code, body, out, err)


@defer.inlineCallbacks
def aiocoap_request(method: str, url: str, payload: bytes | None = None,
                    content_format: int | None = None):
    """Run a small aiocoap client in a subprocess (it needs its own asyncio loop)."""
    script = REPO / "tests" / "aiocoap_request.py"
    args = [str(script), method, url, payload.hex() if payload is not None else "-",
            str(content_format) if content_format is not None else "-"]
    out, err, status = yield utils.getProcessOutputAndValue(sys.executable, args, env=os.environ)
    if status != 0:
        raise RuntimeError(f"aiocoap client failed: {err.decode()[-400:]}")
    code, _, payload_hex = out.decode().strip().partition(" ")
    return CoapClientResult(code, bytes.fromhex(payload_hex), out, err)


class RawCoapPeer:
    """A UDP socket speaking CoAP by hand, for exact datagrams and timing."""

    def __init__(self, testcase, host: str = "::1"):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.host = host
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        self.sock.bind((host, 0))
        self.sock.setblocking(False)
        testcase.addCleanup(self.sock.close)

    def send(self, datagram: bytes, port: int) -> None:
        self.sock.sendto(datagram, (self.host, port))

    @defer.inlineCallbacks
    def receive(self, timeout: float = 5.0):
        """Wait (on the reactor, without blocking it) for one datagram."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                data, _ = self.sock.recvfrom(65535)
                return data
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError("no datagram within %.1f s" % timeout)
                yield deferLater(0.002)

    @defer.inlineCallbacks
    def request(self, datagram: bytes, port: int, timeout: float = 5.0):
        self.send(datagram, port)
        data = yield self.receive(timeout)
        return coap.Message.decode(data)


@defer.inlineCallbacks
def eventually(predicate, timeout: float = 20.0, interval: float = 0.05):
    """Wait, without blocking the reactor, until *predicate()* is true."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s: {predicate.__doc__}")
        yield deferLater(interval)


def deferLater(seconds: float):
    from twisted.internet import task
    return task.deferLater(reactor, seconds, lambda: None)


def decode_number(payload, context):
    """A test format: the payload is one number, from device ``dev-1``."""
    try:
        value = float(payload)
    except ValueError:
        raise DecodeError("not a number") from None
    return Decoded(readings=[Reading(fields={"value": value})], device="dev-1", seq=None)


def parse(datagram: bytes) -> coap.Message:
    """A datagram the gateway sent, as a txthings message."""
    return decode(datagram, "::1", 5683, None)


def request_datagram(code=coap.POST, path="data", payload=b"", content_format=None,
                     mtype=coap.CON, mid=0x1234, token=b"\x01\x02", options=()) -> bytes:
    """A request as bytes, built with txthings' encoder."""
    message = coap.Message(mtype=mtype, mid=mid, code=code, payload=payload, token=token)
    for segment in path.split("/"):
        if segment:
            message.opt.addOption(coap.StringOption(coap.URI_PATH, segment.encode()))
    if content_format is not None:
        message.opt.content_format = content_format
    for option in options:
        message.opt.addOption(option)
    return message.encode()


class GatewayProcess:
    """``twistd -n sense-gateway`` as a child process on a free port.

    *file_size_limit* (bytes) starts it with that ``RLIMIT_FSIZE``: no
    file it writes can grow past it, as on a full disk (Python ignores
    SIGXFSZ, so a write beyond it fails with EFBIG); :meth:`limit_file_size`
    changes it while it runs."""

    def __init__(self, testcase, *args: str, env=None, cwd=None,
                 file_size_limit: int | None = None):
        self.data_dir = Path(testcase.mktemp()).resolve()
        self.data_dir.mkdir(parents=True)
        self.port = free_udp_port()
        self.log_path = self.data_dir / "twistd.log"
        command = [str(BIN / "twistd"), "-n", "--pidfile=", f"--logfile={self.log_path}",
                   "sense-gateway", "--coap-port", str(self.port), "--web-port", "0", "--data-dir",
                   str(self.data_dir), *args]
        if not any(a.startswith("--plugins-dir") for a in args):
            command += ["--plugins-dir", str(self.data_dir / "plugins")]
        environment = {k: v for k, v in os.environ.items() if not k.startswith("SENSE_")}
        environment.update(env or {})
        limit = None if file_size_limit is None else (
            lambda: resource.setrlimit(resource.RLIMIT_FSIZE,
                                       (file_size_limit, resource.RLIM_INFINITY)))
        self.process = subprocess.Popen(command, cwd=cwd or self.data_dir, env=environment,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        preexec_fn=limit)
        testcase.addCleanup(self.stop)

    def limit_file_size(self, limit: int | None) -> None:
        """Set the running gateway's RLIMIT_FSIZE (None: no limit)."""
        soft = resource.RLIM_INFINITY if limit is None else limit
        resource.prlimit(self.process.pid, resource.RLIMIT_FSIZE, (soft, resource.RLIM_INFINITY))

    @defer.inlineCallbacks
    def get(self, path: str):
        """(status, body) of a GET on the gateway's web side."""
        base = yield self.web_url()
        response = yield treq.get(base + path.lstrip("/"),
                                  pool=HTTPConnectionPool(reactor, persistent=False))
        body = yield response.content()
        return response.code, body

    @defer.inlineCallbacks
    def get_json(self, path: str):
        """(status, document) of a GET on the gateway's web side."""
        status, body = yield self.get(path)
        try:
            return status, orjson.loads(body)
        except orjson.JSONDecodeError:
            raise AssertionError(f"GET {path}: {status} {body[:300]!r}") from None

    @property
    def queue_path(self) -> Path:
        return self.data_dir / "queue.sqlite3"

    @defer.inlineCallbacks
    def wait_listening(self, timeout: float = 20.0):
        """Poll the log until the CoAP port is open (or the process died)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"gateway exited with {self.process.returncode}: "
                                   f"{self.output()}")
            if self.log_path.exists() and b"CoAP listening" in self.log_path.read_bytes():
                return
            yield deferLater(0.05)
        raise TimeoutError(f"gateway did not start: {self.output()}")

    @defer.inlineCallbacks
    def web_url(self, timeout: float = 20.0):
        """The dashboard's base URL, as the gateway logged it once listening."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"gateway exited with {self.process.returncode}: "
                                   f"{self.output()}")
            if self.log_path.exists():
                found = re.search(rb"HTTP listening on (http://\S+/)", self.log_path.read_bytes())
                if found:
                    return found.group(1).decode()
            yield deferLater(0.05)
        raise TimeoutError(f"gateway's web did not start: {self.output()}")

    def output(self) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        if self.process.poll() is not None and self.process.stdout:
            text += self.process.stdout.read().decode(errors="replace")
        return text[-2000:]

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        from tests.servers import stop_process

        stop_process(self.process, grace=10)
        if self.process.stdout:
            self.process.stdout.close()
