"""The gateway as users run it: ``twistd -n sense-gateway`` in a process of
its own, spoken to by libcoap's client, killed, and restarted."""

from __future__ import annotations

import signal
import subprocess
import textwrap
import time
from pathlib import Path

import orjson
from twisted.internet import defer
from twisted.trial.unittest import TestCase
from txthings import coap

from sense_gateway.coap.message import parse
from sense_gateway.registry.sqlite import SQLiteRegistry
from tests.support import (BIN, GatewayProcess, RawCoapPeer, coap_url, deferLater,
                           libcoap_request, eventually, queued, request_datagram)

README_EXAMPLE = b'{"id":"node-7","seq":1,"data":{"temperature":21.5}}'


class InstalledCommandTests(TestCase):
    def test_twistd_knows_sense_gateway(self):
        # Fails when the package is installed in a way that hides
        # twisted/plugins from twistd (a plain `pip install -e .`).
        result = subprocess.run([str(BIN / "twistd"), "sense-gateway", "--help"],
                                capture_output=True, text=True, timeout=60)
        self.assertEqual(result.returncode, 0, result.stderr)
        for option in ("--config", "--coap-port", "--bind", "--data-dir", "--plugins-dir", "--role"):
            self.assertIn(option, result.stdout)

    def test_sense_plugins_lists_builtins(self):
        result = subprocess.run([str(BIN / "sense"), "plugins", "--json"], capture_output=True,
                                text=True, timeout=60)
        self.assertEqual(result.returncode, 0, result.stderr)
        names = [p["name"] for p in orjson.loads(result.stdout)]
        self.assertIn("sense_gateway.formats.senml", names)


class GatewayProcessTests(TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def test_readme_example_is_accepted(self):
        gateway = GatewayProcess(self)
        yield gateway.wait_listening()
        response = yield libcoap_request("post", coap_url("::1", gateway.port, "/data"),
                                         README_EXAMPLE, 50)
        self.assertEqual(response.code, "2.04", response)
        core = yield libcoap_request("get", coap_url("127.0.0.1", gateway.port, "/.well-known/core"))
        self.assertIn(b"</data>", core.payload)
        # The default role also runs the processor: the reading ends in the registry.
        registry = gateway.data_dir / "registry.sqlite3"
        yield eventually(lambda: registry.exists() and "node-7" in {
            r.id for r in SQLiteRegistry(registry).devices()})

    @defer.inlineCallbacks
    def test_acknowledged_readings_survive_sigkill(self):
        # Role gateway: no processor takes messages out of the queue.
        gateway = GatewayProcess(self, "--role", "gateway")
        yield gateway.wait_listening()
        peer = RawCoapPeer(self)
        acknowledged = []
        for seq in range(200):
            body = orjson.dumps({"id": "node-k", "seq": seq, "data": {"t": seq}})
            peer.send(request_datagram(payload=body, content_format=50, mid=seq), gateway.port)
        while len(acknowledged) < 200:
            response = parse((yield peer.receive()))
            self.assertEqual(response.code, coap.CHANGED)
            acknowledged.append(response.mid)
        # Kill the moment the last ACK is in: no chance to flush anything.
        gateway.kill()
        stored = sorted(e.seq for e in queued(gateway.queue_path))
        self.assertEqual(stored, sorted(acknowledged))

    @defer.inlineCallbacks
    def test_dropped_in_plugin_adds_a_format(self):
        plugins = Path(self.mktemp()).resolve()
        plugins.mkdir()
        (plugins / "level.py").write_text(textwrap.dedent('''
            from sense_gateway.envelope import Decoded, Reading
            from sense_gateway.formats import Format
            from sense_gateway.hookspecs import hookimpl

            def decode(payload, context):
                device, level = payload.decode().split("=")
                return Decoded(readings=[Reading(fields={"level": float(level)})], device=device)

            @hookimpl
            def sense_register_formats():
                return [Format("level", content_formats=(0,), paths=("/level",), decode=decode)]
            '''))
        gateway = GatewayProcess(self, "--plugins-dir", str(plugins), "--role", "gateway")
        yield gateway.wait_listening()
        response = yield libcoap_request("post", coap_url("127.0.0.1", gateway.port, "/level"),
                                         b"tank-3=0.75", 0)
        self.assertEqual(response.code, "2.04", response)
        [envelope] = queued(gateway.queue_path)
        self.assertEqual((envelope.device, envelope.readings[0].fields), ("tank-3", {"level": 0.75}))

    def test_plugin_with_syntax_error_stops_startup_naming_the_file(self):
        plugins = Path(self.mktemp()).resolve()
        plugins.mkdir()
        (plugins / "broken.py").write_text("def decode(:\n")
        gateway = GatewayProcess(self, "--plugins-dir", str(plugins))
        self.assertNotEqual(gateway.process.wait(60), 0)
        lines = gateway.printed().strip().splitlines()
        self.assertEqual(lines, [f"sense-gateway: {plugins / 'broken.py'}:1: syntax error: "
                                 "invalid syntax"])

    def test_a_queue_file_that_is_not_a_database_stops_startup_naming_it(self):
        def prepare(data_dir):
            # A shard left by a run with two workers, then overwritten.
            (data_dir / "queue-1.sqlite3").write_bytes(b"not SQLite " * 500)
        gateway = GatewayProcess(self, prepare=prepare)
        self.assertNotEqual(gateway.process.wait(60), 0)
        output = gateway.printed().strip()
        self.assertEqual(output, f'sense-gateway: queue.sqlite.path: cannot open '
                                 f'{gateway.data_dir / "queue-1.sqlite3"}: file is not a database')

    def test_bad_configuration_stops_startup_naming_the_key(self):
        gateway = GatewayProcess(self, env={"SENSE_QUEUE_MAX_RECEIVES": "often"})
        self.assertNotEqual(gateway.process.wait(60), 0)
        output = gateway.printed().strip()
        self.assertEqual(output, "sense-gateway: environment queue.max_receives: "
                                 "expected int, got 'often'")


class GracefulStopTests(TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def test_sigterm_under_load_answers_every_committed_request_and_stores_each_once(self):
        gateway = GatewayProcess(self, "--role", "gateway", env={"SENSE_COAP_RATE_LIMIT": "0"})
        yield gateway.wait_listening()
        peer = RawCoapPeer(self)
        answers = {}
        seq = 0

        def collect():
            while True:
                try:
                    data, _ = peer.sock.recvfrom(65535)
                except BlockingIOError:
                    return
                response = parse(data)
                answers.setdefault(response.mid, response.code)
        # A steady stream, 64 in flight, then SIGTERM in the middle of it.
        deadline = time.monotonic() + 1.0
        stopped_at = None
        while time.monotonic() < deadline + 1.0:
            collect()
            while seq - len(answers) < 64 and seq < 60000:
                body = orjson.dumps({"id": "node-t", "seq": seq, "data": {"t": seq}})
                peer.send(request_datagram(payload=body, content_format=50, mid=seq), gateway.port)
                seq += 1
            if stopped_at is None and time.monotonic() > deadline:
                gateway.process.send_signal(signal.SIGTERM)
                stopped_at = seq
            yield deferLater(0.001)
        # twistd stops cleanly, then reports the signal that stopped it.
        self.assertIn(gateway.process.wait(30), (0, -signal.SIGTERM))
        self.assertIn(b"Server Shut Down", gateway.log_path.read_bytes())
        collect()
        stored = [e.seq for e in queued(gateway.queue_path)]
        self.assertEqual(len(stored), len(set(stored)), "a reading stored twice")
        acknowledged = {mid for mid, code in answers.items() if code == coap.CHANGED}
        self.assertGreater(len(acknowledged), 100)
        # Every acknowledged reading is stored, and every stored one was
        # acknowledged: nothing committed was left unanswered.
        self.assertEqual(set(stored), acknowledged)
        refused = {code for mid, code in answers.items() if code != coap.CHANGED}
        self.assertLessEqual(refused, {coap.SERVICE_UNAVAILABLE})
        self.assertIn(b"stopping", gateway.log_path.read_bytes())
