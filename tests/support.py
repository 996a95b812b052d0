"""Test helpers that run real things: the gateway (in-process or as a
``twistd`` process), libcoap's and aiocoap's clients, raw UDP peers.

They are plain functions and classes started from ``setUp`` and stopped
with ``addCleanup``, so both trial and pytest run them.
"""

from __future__ import annotations

import functools
import os
import re
import resource
import shutil
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

from sense_gateway.coap.message import Message, parse
from sense_gateway.config import load_config
from sense_gateway.envelope import Decoded, Reading
from sense_gateway.errors import DecodeError
from tests.servers import ServerProcess

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


#: what boto3 needs to talk to moto
AWS_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1"}


def clean_environment(**extra) -> dict:
    """This process's environment without SENSE_* or AWS settings, plus
    moto's credentials and *extra*: for a child process such as deploy.sh."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SENSE_", "AWS_"))}
    env.update(AWS_ENV)
    env.update(extra)
    return env


def run_deploy(*args: str, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """``./deploy.sh ARGS`` in a clean environment; an AssertionError with
    its output if it fails and *check*."""
    result = subprocess.run([str(REPO / "deploy.sh"), *args], capture_output=True, text=True,
                            env=env or clean_environment(), timeout=300)
    if check and result.returncode != 0:
        raise AssertionError(f"deploy.sh {' '.join(args)} exited {result.returncode}:\n"
                             f"{result.stdout}\n{result.stderr}")
    return result


def set_environ(testcase, variables: dict) -> None:
    """Set environment variables for one test, restoring them after."""
    for name, value in variables.items():
        old = os.environ.get(name)
        os.environ[name] = value
        testcase.addCleanup(lambda n=name, o=old: os.environ.pop(n) if o is None
                            else os.environ.__setitem__(n, o))


def parametrize(cls, cases: dict, check, name: str = "test_{}"):
    """Give *cls* one test method per case: ``name.format(case)`` runs
    ``check(self, *arguments)`` with that case's tuple of arguments. One
    method per case, not a loop or subTest, so each case passes or fails
    on its own under both runners (trial's subTest stops at the first
    failure). Returns *cls*."""
    for case, arguments in cases.items():
        if not isinstance(arguments, tuple):
            raise TypeError(f"{case}: the arguments of a case are a tuple")
        method_name = name.format(case).replace("-", "_")
        if method_name in vars(cls):
            raise ValueError(f"{cls.__name__}.{method_name} is defined twice")

        def test(self, arguments=arguments):
            return check(self, *arguments)
        test.__name__ = method_name
        test.__qualname__ = f"{cls.__qualname__}.{method_name}"
        setattr(cls, method_name, test)
    return cls


def exercises(*hooks: str):
    """Mark a test as the one showing that the gateway calls *hooks* of a
    plugin it loaded: besides its own assertions, the test fails unless
    each hook's implementation in a plugin other than the built-ins was
    called while it ran. ``tests/test_docs.py`` requires such a test for
    every hook in ``sense_gateway/hookspecs.py``."""
    def decorate(test):
        @functools.wraps(test)
        def run(self):
            called: set[str] = set()
            _record_plugin_hook_calls(self, called)

            def check(result):
                missing = [hook for hook in hooks if hook not in called]
                if missing:
                    raise self.failureException(f"no plugin's {', '.join(missing)} was called")
                return result
            result = test(self)
            if isinstance(result, defer.Deferred):
                return result.addCallback(check)
            return check(result)
        run.exercised_hooks = hooks
        return run
    return decorate


def _record_plugin_hook_calls(testcase, called: set) -> None:
    """For one test, have every plugin manager note in *called* the hooks
    of non-built-in plugins that are called (through ``pm.hook`` or
    ``call_collecting``: both call ``HookImpl.function``)."""
    from sense_gateway.plugins import DEFAULT_PLUGINS, SensePluginManager

    register = SensePluginManager.register

    def recording(function, hook_name):
        @functools.wraps(function)
        def call(*args, **kwargs):
            called.add(hook_name)
            return function(*args, **kwargs)
        return call

    def recording_register(pm, plugin, name=None):
        registered = register(pm, plugin, name)
        if registered is not None and registered not in DEFAULT_PLUGINS:
            for caller in pm.get_hookcallers(plugin) or ():
                for impl in caller.get_hookimpls():
                    if impl.plugin is plugin:
                        impl.function = recording(impl.function, caller.name)
        return registered
    testcase.patch(SensePluginManager, "register", recording_register)


class HTTPResult:
    """A response to :func:`http_get`, its body read."""

    def __init__(self, code: int, headers, body: bytes):
        self.code, self.headers, self.body = code, headers, body

    def header(self, name: bytes) -> bytes | None:
        values = self.headers.getRawHeaders(name)
        return values[0] if values else None

    def json(self):
        try:
            return orjson.loads(self.body)
        except orjson.JSONDecodeError:
            raise AssertionError(f"not JSON: {self.code} {self.body[:300]!r}") from None


@defer.inlineCallbacks
def http_get(url: str, headers: dict | None = None):
    """One GET on the real reactor, without keep-alive: a test must leave
    no connection behind. Fires with an :class:`HTTPResult`."""
    response = yield treq.get(url, headers=headers, pool=HTTPConnectionPool(reactor, persistent=False))
    body = yield response.content()
    return HTTPResult(response.code, response.headers, body)


def web_base(service) -> str:
    """``http://host:port`` of an in-process gateway's web side."""
    address = service.web.address
    return f"http://{address.host}:{address.port}"


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
    with its data in a temporary directory; stopped when the test ends.
    Returns a Deferred that fires with the service once its CoAP port is
    open (errors in the configuration or plugins raise at once)."""
    from sense_gateway.service import make_service

    data_dir = Path(testcase.mktemp())
    data_dir.mkdir(parents=True)
    settings = {
        "coap.bind": "::",
        "coap.port": 0,
        "coaps.port": 0,
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
    if service.coap_server is None:
        return defer.succeed(service)

    def listening(_):
        service.port = service.coap_server.address[1]
        return service
    # The listeners open once the device directory is loaded.
    return eventually(lambda: service.coap_server.port is not None, timeout=20).addCallback(
        listening)


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
    def __init__(self, code: str, payload: bytes, out: bytes, err: bytes,
                 content_format: int | None = None):
        self.code, self.payload, self.out, self.err = code, payload, out, err
        self.content_format = content_format

    def __repr__(self):
        return f"<coap-client {self.code} {self.payload!r}>"


@defer.inlineCallbacks
def libcoap_request(method: str, url: str, payload: bytes | None = None,
                    content_format: int | None = None, non: bool = False, extra=(),
                    client: str = "coap-client-notls"):
    """Run libcoap's client (``coap-client-notls``, or ``-openssl`` /
    ``-gnutls`` for coaps:// with ``extra=("-u", ID, "-k", KEY)``) and
    return the response code and payload."""
    binary = shutil.which(client)
    if binary is None:
        raise RuntimeError(f"{client} is not installed (Debian package libcoap3-bin)")
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
        out, err, status = yield utils.getProcessOutputAndValue(binary, args, env=os.environ)
        body = received.read_bytes() if received.exists() else None
    finally:
        shutil.rmtree(scratch)
    codes = re.findall(rb"process incoming (\d\.\d\d) response", out)
    code = codes[-1].decode() if codes else None
    # libcoap logs each PDU it receives: "v:1 t:ACK c:2.05 i:... [ options ] ...".
    pdus = re.findall(rb"v:1 t:\w+ c:\d\.\d\d .*", out)
    if body is None:
        # libcoap prints "4.00 <payload>\n" for an error response.
        body = err[len(code) + 1:].removesuffix(b"\n") if code and err.startswith(code.encode()) else b""
    result = CoapClientResult(code, body, out, err)
    result.response_pdu = pdus[-1].decode(errors="replace") if pdus else ""
    return result


@defer.inlineCallbacks
def aiocoap_request(method: str, url: str, payload: bytes | None = None,
                    content_format: int | None = None, accept: int | None = None):
    """Run a small aiocoap client in a subprocess (it needs its own asyncio loop)."""
    script = REPO / "tests" / "aiocoap_request.py"
    args = [str(script), method, url, payload.hex() if payload is not None else "-",
            str(content_format) if content_format is not None else "-",
            str(accept) if accept is not None else "-"]
    out, err, status = yield utils.getProcessOutputAndValue(sys.executable, args, env=os.environ)
    if status != 0:
        raise RuntimeError(f"aiocoap client failed: {err.decode()[-400:]}")
    code, payload_hex, response_format = out.decode().split()
    return CoapClientResult(code, bytes.fromhex(payload_hex.strip("-")), out, err,
                            None if response_format == "-" else int(response_format))


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
        """Send *datagram* and return the next datagram back, parsed."""
        self.send(datagram, port)
        data = yield self.receive(timeout)
        return parse(data)


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


def assert_refused(testcase, diagnostic: str, decode, *args) -> None:
    """``decode(*args)`` refuses the payload as a 4.00 with exactly
    *diagnostic*, short enough to be a CoAP diagnostic payload."""
    from sense_gateway.errors import BAD_REQUEST

    error = testcase.assertRaises(DecodeError, decode, *args)
    testcase.assertEqual((error.code, error.diagnostic), (BAD_REQUEST, diagnostic))
    testcase.assertLess(len(error.diagnostic), 100)


def request_datagram(code=coap.POST, path="data", payload=b"", content_format=None,
                     mtype=coap.CON, mid=0x1234, token=b"\x01\x02", options=()) -> bytes:
    """A request as bytes, built with txthings' encoder (not ours, so the
    gateway's parser is checked against another implementation);
    *options* are txthings option objects."""
    message = coap.Message(mtype=mtype, mid=mid, code=code, payload=payload, token=token)
    for segment in path.split("/"):
        if segment:
            message.opt.addOption(coap.StringOption(coap.URI_PATH, segment.encode()))
    if content_format is not None:
        message.opt.content_format = content_format
    for option in options:
        message.opt.addOption(option)
    return message.encode()


class GatewayProcess(ServerProcess):
    """``twistd -n sense-gateway`` as a child process on a free port.

    *file_size_limit* (bytes) starts it with that ``RLIMIT_FSIZE``: no
    file it writes can grow past it, as on a full disk (Python ignores
    SIGXFSZ, so a write beyond it fails with EFBIG); :meth:`limit_file_size`
    changes it while it runs. *prepare*, if given, is called with the data
    directory before the process starts (to provision credentials, say).
    What it prints (a start-up error) is :meth:`printed`; twistd's log of
    this run is :attr:`log_path`."""

    name = "gateway"
    grace = 10.0

    def __init__(self, testcase, *args: str, env=None, cwd=None,
                 file_size_limit: int | None = None, prepare=None):
        self.data_dir = Path(testcase.mktemp()).resolve()
        self.data_dir.mkdir(parents=True)
        if prepare is not None:
            prepare(self.data_dir)
        self.port = free_udp_port()
        self.coaps_port = free_udp_port()
        self._args = args
        if not any(a.startswith("--plugins-dir") for a in args):
            self._args += ("--plugins-dir", str(self.data_dir / "plugins"))
        environment = {k: v for k, v in os.environ.items() if not k.startswith("SENSE_")}
        environment.update(env or {})
        limit = None if file_size_limit is None else (
            lambda: resource.setrlimit(resource.RLIMIT_FSIZE,
                                       (file_size_limit, resource.RLIM_INFINITY)))
        super().__init__(testcase, [str(BIN / "twistd")], env=environment, cwd=cwd or self.data_dir,
                         preexec_fn=limit)

    def start(self) -> None:
        # Each run's twistd log is a file of its own: wait_listening reads
        # "CoAP listening" from this run's log, not the last one's.
        self.log_path = self.data_dir / ("twistd.log" if self.runs == 0 else
                                         f"twistd-{self.runs + 1}.log")
        self.command[1:] = [
            "-n", "--pidfile=", f"--logfile={self.log_path}", "sense-gateway",
            "--coap-port", str(self.port), "--coaps-port", str(self.coaps_port),
            "--web-port", "0", "--data-dir", str(self.data_dir), *self._args]
        super().start()

    def restart(self) -> None:
        """SIGKILL the gateway and start it again on the same ports, with
        the same data directory and arguments (wait_listening after)."""
        self.kill()
        self.start()

    def limit_file_size(self, limit: int | None) -> None:
        """Set the running gateway's RLIMIT_FSIZE (None: no limit)."""
        soft = resource.RLIM_INFINITY if limit is None else limit
        resource.prlimit(self.process.pid, resource.RLIMIT_FSIZE, (soft, resource.RLIM_INFINITY))

    @defer.inlineCallbacks
    def get(self, path: str):
        """(status, body) of a GET on the gateway's web side."""
        base = yield self.web_url()
        response = yield http_get(base + path.lstrip("/"))
        return response.code, response.body

    @defer.inlineCallbacks
    def get_json(self, path: str):
        """(status, document) of a GET on the gateway's web side."""
        base = yield self.web_url()
        response = yield http_get(base + path.lstrip("/"))
        return response.code, response.json()

    @property
    def queue_path(self) -> Path:
        return self.data_dir / "queue.sqlite3"

    @defer.inlineCallbacks
    def _logged(self, pattern: bytes, timeout: float):
        """The first match of *pattern* in this run's twistd log, once it
        is there (or the process died)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_running()
            if self.log_path.exists():
                found = re.search(pattern, self.log_path.read_bytes())
                if found:
                    return found
            yield deferLater(0.05)
        raise TimeoutError(f"gateway did not log {pattern!r}: {self.output()}")

    def wait_listening(self, timeout: float = 20.0):
        """Poll the log until the CoAP port is open (or the process died)."""
        return self._logged(rb"CoAP listening", timeout).addCallback(lambda _: None)

    def web_url(self, timeout: float = 20.0):
        """The dashboard's base URL, as the gateway logged it once listening."""
        return self._logged(rb"HTTP listening on (http://\S+/)", timeout).addCallback(
            lambda found: found.group(1).decode())

    def printed(self) -> str:
        """What this run printed on stdout and stderr."""
        return self.log.read_text(errors="replace")

    def output(self) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return (text + self.printed())[-2000:]


# -- the CoAP side in memory: datagram in, datagram out, on a controlled clock

PEER = ("::1", 40000)


class FakeQueue:
    """A queue that commits when the test says so (or at once with
    ``auto_commit``), or refuses every put with ``refuse``."""

    def __init__(self, auto_commit: bool = False):
        self.auto_commit = auto_commit
        self.envelopes = []  # every envelope put
        self.stored = []  # those committed
        self.waiting = []
        self.refuse = None
        self.puts = 0

    def put_then(self, envelopes, done):
        self.puts += 1
        if self.refuse is not None:
            done(self.refuse)
            return
        self.envelopes.extend(envelopes)
        self.waiting.append((envelopes, done))
        if self.auto_commit:
            self.commit()

    def commit(self, error=None):
        """Finish every waiting put, as one group commit would."""
        waiting, self.waiting = self.waiting, []
        for envelopes, done in waiting:
            if error is None:
                self.stored.extend(envelopes)
            done(error)


class DatagramTransport:
    """A transport that records what the message layer sends."""

    name = "coap"

    def __init__(self):
        self.sent: list[tuple[bytes, tuple]] = []

    def send(self, datagram, addr):
        self.sent.append((datagram, addr))


class CoapEndpoint:
    """The gateway's CoAP side assembled as the service assembles it (the
    real pipeline, resource tree, dispatcher and message layer) over a
    :class:`DatagramTransport`, a ``task.Clock`` and a :class:`FakeQueue`;
    ``/data`` takes the one-number test format, ``/time`` is the real
    time resource."""

    def __init__(self, testcase, *, queue=None, max_payload=64, max_exchanges=100,
                 per_source=None, max_observers=2, resources=None, transport=None,
                 formats=None, policy=None, rate_limit=None):
        from twisted.internet import task
        from txthings import resource as txresource

        from sense_gateway.coap.blockwise import Uploads
        from sense_gateway.coap.dispatch import Dispatcher
        from sense_gateway.coap.layer import MessageLayer
        from sense_gateway.coap.resources import build_tree
        from sense_gateway.coap.time import TimeResource
        from sense_gateway.coap.tree import ResourceTree
        from sense_gateway.formats import Format
        from sense_gateway.pipeline import IngestPipeline

        self.clock = task.Clock()
        self.clock.advance(1_800_000_000)
        self.queue = queue if queue is not None else FakeQueue(auto_commit=True)
        config = load_config(environ={}, overrides={"coap.max_payload": max_payload})
        fmt = Format("number", content_formats=(0, None), paths=("/data",), decode=decode_number)
        self.pipeline = IngestPipeline([fmt, *(formats or ())], lambda **kw: [], self.queue, config,
                                       policy=policy)
        self.time = TimeResource(self.clock, interval=60, max_observers=max_observers)
        self.root = build_tree(self.pipeline, {"/time": self.time, **(resources or {})})
        self.tree = ResourceTree(txresource.Endpoint(self.root), max_observers=max_observers)
        self.dispatcher = Dispatcher(self.pipeline, self.tree,
                                     lambda: Uploads(max_payload, self.clock),
                                     wall_clock=self.clock)
        self.transport = transport or DatagramTransport()
        self.layer = MessageLayer(self.transport, self.dispatcher, self.clock,
                                  exchange_lifetime=247, max_exchanges=max_exchanges,
                                  exchanges_per_source=per_source or max_exchanges,
                                  rate_limit=rate_limit)
        testcase.addCleanup(self.layer.stop)

    def send(self, datagram: bytes, peer=PEER, identity=None) -> list[bytes]:
        """Deliver one datagram; the datagrams sent in answer, at once."""
        before = len(self.transport.sent)
        self.layer.datagram_received(datagram, peer, identity)
        return [d for d, _ in self.transport.sent[before:]]

    def only(self, datagram: bytes, peer=PEER, identity=None) -> Message:
        """Deliver one datagram that must be answered at once by one message."""
        sent = self.send(datagram, peer, identity)
        if len(sent) != 1:
            raise AssertionError(f"expected one datagram back, got {sent}")
        return parse(sent[0])

    def written(self) -> list[bytes]:
        return [d for d, _ in self.transport.sent]


def metric_samples(page: bytes) -> dict:
    """{(name, sorted label pairs): value} of every sample in a /metrics page."""
    from prometheus_client.parser import text_string_to_metric_families

    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(page.decode())
            for sample in family.samples}
