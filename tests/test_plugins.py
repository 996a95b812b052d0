"""Plugin discovery: built-ins, entry points, a plugins directory, and the
one-line errors a broken plugin produces."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase, TestCase

from sense_gateway.config import Config
from sense_gateway.errors import ConfigError, PluginLoadError
from sense_gateway.plugins import DEFAULT_PLUGINS, call_collecting, make_plugin_manager
from tests.support import (BIN, coap_url, deferLater, exercises, libcoap_request, queued,
                           start_gateway)

GOOD_PLUGIN = '''
from sense_gateway.envelope import Decoded, Reading
from sense_gateway.formats import Format
from sense_gateway.hookspecs import hookimpl


def decode(payload, context):
    return Decoded(readings=[Reading(fields={"level": float(payload)})], device="tank-1")


@hookimpl
def sense_register_formats():
    return [Format("level", content_formats=(0,), paths=("/level",), decode=decode)]
'''


class PluginDirectoryTests(SynchronousTestCase):
    def plugins_dir(self, **files: str) -> Path:
        directory = Path(self.mktemp())
        directory.mkdir()
        for name, text in files.items():
            (directory / f"{name}.py").write_text(textwrap.dedent(text))
        return directory

    def load_error(self, **files: str) -> tuple[str, Path]:
        directory = self.plugins_dir(**files)
        error = self.assertRaises(PluginLoadError, make_plugin_manager,
                                  load_entrypoints=False, plugins_dir=directory)
        return str(error), directory

    def test_builtins_are_plugins(self):
        pm = make_plugin_manager(load_entrypoints=False)
        self.assertEqual([name for name, _ in pm.list_name_plugin()], list(DEFAULT_PLUGINS))

    def test_dropped_in_module_adds_a_format(self):
        pm = make_plugin_manager(load_entrypoints=False, plugins_dir=self.plugins_dir(level=GOOD_PLUGIN))
        formats = {f.name: f for _, group in call_collecting(pm, "sense_register_formats", config=Config())
                   for f in group}
        self.assertEqual(formats["level"].paths, ("/level",))
        self.assertEqual(pm.origin("level").rsplit("/", 1)[-1], "level.py")

    def test_missing_directory_loads_nothing_extra(self):
        pm = make_plugin_manager(load_entrypoints=False, plugins_dir=Path(self.mktemp()))
        self.assertEqual(len(pm.get_plugins()), len(DEFAULT_PLUGINS))

    def test_syntax_error_is_one_line_naming_file_and_line(self):
        message, directory = self.load_error(broken="x = 1\ndef oops(:\n")
        self.assertEqual(message.splitlines(), [message])
        self.assertTrue(message.startswith(f"{directory / 'broken.py'}:2: syntax error"), message)

    def test_import_error_names_file_and_cause(self):
        message, directory = self.load_error(needs="import no_such_module_here\n")
        self.assertEqual(
            message,
            f"{directory / 'needs.py'}: import failed: ModuleNotFoundError: "
            "No module named 'no_such_module_here'")

    def test_unknown_hook_names_file_and_hook(self):
        message, directory = self.load_error(typo='''
            from sense_gateway.hookspecs import hookimpl

            @hookimpl
            def sense_register_format():
                return []
            ''')
        self.assertIn(str(directory / "typo.py"), message)
        self.assertIn("sense_register_format", message)
        self.assertEqual(message.splitlines(), [message])

    def test_wrong_hook_arguments_name_file_and_hook(self):
        message, directory = self.load_error(args='''
            from sense_gateway.hookspecs import hookimpl

            @hookimpl
            def sense_validate(envelope, config, strictness):
                return []
            ''')
        self.assertIn(str(directory / "args.py"), message)
        self.assertIn("sense_validate", message)
        self.assertIn("strictness", message)

    def test_hook_that_raises_names_plugin(self):
        pm = make_plugin_manager(load_entrypoints=False, plugins_dir=self.plugins_dir(raising='''
            from sense_gateway.hookspecs import hookimpl

            @hookimpl
            def sense_register_formats():
                raise KeyError("oops")
            '''))
        error = self.assertRaises(PluginLoadError, call_collecting, pm, "sense_register_formats")
        self.assertIn("raising.py: hook sense_register_formats raised KeyError", str(error))

    def test_disabled_builtin_is_not_loaded(self):
        pm = make_plugin_manager(disable=["sense_gateway.formats.senml"], load_entrypoints=False)
        self.assertIsNone(pm.get_plugin("sense_gateway.formats.senml"))
        self.assertIsNotNone(pm.get_plugin("sense_gateway.formats.sense"))

    def test_disabled_dropin_is_not_imported(self):
        pm = make_plugin_manager(disable=["broken"], load_entrypoints=False,
                                 plugins_dir=self.plugins_dir(broken="def oops(:\n"))
        self.assertIsNone(pm.get_plugin("broken"))


class EntryPointTests(SynchronousTestCase):
    """A distribution on sys.path advertising the ``sense_gateway`` group."""

    def install(self, module_text: str) -> Path:
        site = Path(self.mktemp())
        info = site / "sense_level_plugin-1.0.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text("Metadata-Version: 2.1\nName: sense-level-plugin\nVersion: 1.0\n")
        (info / "entry_points.txt").write_text("[sense_gateway]\nlevel = sense_level_plugin\n")
        (site / "sense_level_plugin.py").write_text(module_text)
        self.patch(sys, "path", [str(site), *sys.path])
        self.addCleanup(sys.modules.pop, "sense_level_plugin", None)
        return site

    def test_entry_point_plugin_is_loaded(self):
        self.install(GOOD_PLUGIN)
        pm = make_plugin_manager()
        self.assertIsNotNone(pm.get_plugin("level"))
        self.assertEqual(pm.origin("level"), "entry point level (sense-level-plugin)")

    def test_broken_entry_point_names_distribution(self):
        self.install("raise RuntimeError('half installed')\n")
        error = self.assertRaises(PluginLoadError, make_plugin_manager)
        self.assertEqual(str(error), "entry point level (sense-level-plugin): import failed: "
                                     "RuntimeError: half installed")


class GatewayPluginTests(TestCase):
    """Plugins seen from the outside: a running gateway, a CoAP client."""

    def plugins_dir(self, **files: str) -> str:
        directory = Path(self.mktemp()).resolve()
        directory.mkdir()
        for name, text in files.items():
            (directory / f"{name}.py").write_text(textwrap.dedent(text))
        return str(directory)

    @exercises("sense_register_formats")
    @defer.inlineCallbacks
    def test_plugin_format_decodes_on_its_path(self):
        gateway = yield start_gateway(self, plugins_dir=self.plugins_dir(level=GOOD_PLUGIN))
        response = yield libcoap_request("post", coap_url("::1", gateway.port, "/level"), b"3.5", 0)
        self.assertEqual(response.code, "2.04", response)
        self.assertEqual([(e.device, e.readings[0].fields) for e in queued(gateway)],
                         [("tank-1", {"level": 3.5})])

    @exercises("sense_coap_resources")
    @defer.inlineCallbacks
    def test_plugin_resource_is_served_and_listed(self):
        gateway = yield start_gateway(self, plugins_dir=self.plugins_dir(version='''
            from twisted.internet import defer
            from txthings import coap
            from sense_gateway.coap.resources import GatewayResource
            from sense_gateway.hookspecs import hookimpl

            class Version(GatewayResource):
                link_attributes = {"rt": "example.version", "ct": 0}

                def render_GET(self, request):
                    return defer.succeed(coap.Message(code=coap.CONTENT, payload=b"1.2.3"))

            @hookimpl
            def sense_coap_resources():
                return {"/about/version": Version()}
            '''))
        response = yield libcoap_request("get", coap_url("::1", gateway.port, "/about/version"))
        self.assertEqual((response.code, response.payload), ("2.05", b"1.2.3"))
        listing = yield libcoap_request("get", coap_url("::1", gateway.port,
                                                        "/.well-known/core?rt=example.*"))
        self.assertEqual(listing.payload, b'</about/version>;rt="example.version";ct=0')

    @exercises("sense_register_queues")
    @defer.inlineCallbacks
    def test_plugin_queue_backend_is_chosen_by_name(self):
        gateway = yield start_gateway(self, **{"queue.backend": "memory"}, plugins_dir=self.plugins_dir(
            memory_queue='''
            from twisted.internet import defer
            from sense_gateway.hookspecs import hookimpl
            from sense_gateway.queues import EnvelopeQueue

            class MemoryQueue(EnvelopeQueue):
                def __init__(self):
                    self.envelopes = []

                def put(self, envelopes):
                    self.envelopes.extend(envelopes)
                    return defer.succeed(None)

            @hookimpl
            def sense_register_queues():
                return {"memory": lambda config, reactor: MemoryQueue()}
            '''))
        response = yield libcoap_request("post", coap_url("127.0.0.1", gateway.port, "/data"),
                                         b'{"id": "m-1", "data": {"t": 1}}', 50)
        self.assertEqual(response.code, "2.04", response)
        self.assertEqual([e.device for e in gateway.queue.envelopes], ["m-1"])

    FILE_QUEUE = '''
        """A queue kept as files, one per message, in [queue.files] directory."""
        import time
        from dataclasses import dataclass
        from pathlib import Path

        from twisted.internet import defer
        from sense_gateway.envelope import Envelope
        from sense_gateway.hookspecs import hookimpl
        from sense_gateway.queues import DeadLetter, EnvelopeQueue, QueueBackend, Received

        @dataclass(frozen=True)
        class FileSettings:
            directory: str = "files-queue"
            #: digits of a message's file name
            width: int = 6

        class FileStore:
            def __init__(self, config, settings):
                self.root = Path(config.data_dir) / settings.directory
                self.width = settings.width
                for part in ("waiting", "dead"):
                    (self.root / part).mkdir(parents=True, exist_ok=True)

            def _files(self, part):
                return sorted((self.root / part).glob("*.json"))

            def put(self, envelope):
                number = len(self._files("waiting")) + len(self._files("dead")) + 1
                (self.root / "waiting" / f"{number:0{self.width}}.json").write_bytes(
                    envelope.to_json())

            def bury(self, name, reason):
                (self.root / "waiting" / name).rename(self.root / "dead" / name)
                (self.root / "dead" / (name + ".reason")).write_text(reason)

            def depth(self):
                return {"visible": len(self._files("waiting")), "in_flight": 0,
                        "dead": len(self._files("dead"))}

            def dead_letters(self, limit=100):
                return [DeadLetter(id=int(f.stem), envelope=Envelope.from_json(f.read_bytes()),
                                   reason=f.with_name(f.name + ".reason").read_text(),
                                   receive_count=1, enqueued_at=f.stat().st_mtime,
                                   failed_at=time.time()) for f in self._files("dead")[:limit]]

            def replay(self, ids=None):
                moved = 0
                for f in self._files("dead"):
                    if ids is None or int(f.stem) in ids:
                        f.rename(self.root / "waiting" / f.name)
                        f.with_name(f.name + ".reason").unlink()
                        moved += 1
                return moved

            def close(self):
                pass

        class FileQueue(EnvelopeQueue):
            def __init__(self, store):
                self.store = store

            def put(self, envelopes):
                for envelope in envelopes:
                    self.store.put(envelope)
                return defer.succeed(None)

            def receive(self, max_messages, visibility_timeout=None):
                return defer.succeed([Received(int(f.stem), f.name, Envelope.from_json(f.read_bytes()), 1)
                                      for f in self.store._files("waiting")[:max_messages]])

            def dead_letter(self, receipt, reason):
                self.store.bury(receipt, reason)
                return defer.succeed(None)

            def depth(self):
                return defer.succeed(self.store.depth())

        @hookimpl
        def sense_register_queues():
            return {"files": QueueBackend(
                open=lambda config, settings, reactor: FileQueue(FileStore(config, settings)),
                open_store=FileStore, settings=FileSettings)}
        '''

    def sense(self, gateway, *args, expect=0):
        done = subprocess.run([str(BIN / "sense"), "--data-dir", gateway.config.data_dir,
                               "--plugins-dir", gateway.config.plugins_dir, *args],
                              env={**os.environ, "SENSE_QUEUE_BACKEND": "files",
                                   "SENSE_QUEUE_FILES_WIDTH": "4"},
                              capture_output=True, timeout=60, text=True)
        self.assertEqual(done.returncode, expect, done.stderr)
        return done.stdout if expect == 0 else done.stderr

    @defer.inlineCallbacks
    def test_plugin_queue_gets_sense_queue_and_sense_dlq(self):
        gateway = yield start_gateway(self, **{"queue.backend": "files", "queue.files.width": 4},
                                      plugins_dir=self.plugins_dir(files_queue=self.FILE_QUEUE))
        for device in ("f-1", "f-2"):
            response = yield libcoap_request("post", coap_url("127.0.0.1", gateway.port, "/data"),
                                             b'{"id": "%s", "data": {"t": 1}}' % device.encode(), 50)
            self.assertEqual(response.code, "2.04", response)
        # The plugin's own setting took effect: four-digit file names.
        self.assertEqual(sorted(p.name for p in gateway.queue.store._files("waiting")),
                         ["0001.json", "0002.json"])
        self.assertEqual(json.loads(self.sense(gateway, "queue", "--json")),
                         {"visible": 2, "in_flight": 0, "dead": 0})

        [first, _] = yield gateway.queue.receive(10)
        yield gateway.queue.dead_letter(first.receipt, "sink refused: bad field")
        [letter] = json.loads(self.sense(gateway, "dlq", "list", "--json"))
        self.assertEqual((letter["id"], letter["device"], letter["reason"]),
                         (1, "f-1", "sink refused: bad field"))
        self.assertRegex(self.sense(gateway, "dlq", "list"), r"\n1 +f-1 .* sink refused: bad field\n")
        self.assertEqual(self.sense(gateway, "dlq", "replay"), "1 message back in the queue\n")
        self.assertEqual(json.loads(self.sense(gateway, "queue", "--json")),
                         {"visible": 2, "in_flight": 0, "dead": 0})

    def test_plugin_queue_setting_of_the_wrong_type_fails_startup(self):
        plugins = self.plugins_dir(files_queue=self.FILE_QUEUE)
        error = self.assertRaises(ConfigError, start_gateway, self, plugins_dir=plugins,
                                  **{"queue.backend": "files", "queue.files.width": "wide"})
        self.assertEqual(str(error), "queue.files.width: expected int, got 'wide'")

    def test_plugin_queue_setting_of_the_wrong_type_fails_the_cli(self):
        plugins = self.plugins_dir(files_queue=self.FILE_QUEUE)
        done = subprocess.run([str(BIN / "sense"), "--plugins-dir", plugins, "queue"],
                              env={**os.environ, "SENSE_QUEUE_BACKEND": "files",
                                   "SENSE_QUEUE_FILES_WIDTH": "wide"},
                              capture_output=True, timeout=60, text=True)
        self.assertEqual((done.returncode, done.stderr),
                         (2, "sense: queue.files.width: expected int, got 'wide'\n"))

    def test_plugin_queue_without_a_store_says_so_in_the_cli(self):
        plugins = self.plugins_dir(bare_queue='''
            from sense_gateway.hookspecs import hookimpl

            @hookimpl
            def sense_register_queues():
                return {"bare": lambda config, reactor: None}
            ''')
        done = subprocess.run([str(BIN / "sense"), "--plugins-dir", plugins, "dlq", "list"],
                              env={**os.environ, "SENSE_QUEUE_BACKEND": "bare"},
                              capture_output=True, timeout=60, text=True)
        self.assertEqual((done.returncode, done.stderr),
                         (2, "sense: queue.backend: 'bare' offers no store for this command\n"))

    def test_unknown_queue_backend_names_the_key(self):
        error = self.assertRaises(ConfigError, start_gateway, self, **{"queue.backend": "kafka"})
        self.assertEqual(str(error), "queue.backend: unknown backend 'kafka'; available: sqlite, sqs")

    def test_two_formats_claiming_one_content_format_fail_startup(self):
        error = self.assertRaises(PluginLoadError, start_gateway, self, plugins_dir=self.plugins_dir(
            clash='''
            from sense_gateway.formats import Format
            from sense_gateway.hookspecs import hookimpl

            @hookimpl
            def sense_register_formats():
                return [Format("my-json", (50,), ("/data",), lambda payload, context: None)]
            '''))
        self.assertIn("'my-json'", str(error))
        self.assertIn("Content-Format 50 on /data", str(error))

    @exercises("sense_validate")
    @defer.inlineCallbacks
    def test_plugin_validator_refuses_with_its_reason(self):
        gateway = yield start_gateway(self, plugins_dir=self.plugins_dir(no_test_devices='''
            from sense_gateway.hookspecs import hookimpl

            @hookimpl
            def sense_validate(envelope, config):
                if envelope.device.startswith("test-"):
                    return ["test devices are not accepted here"]
            '''))
        url = coap_url("::1", gateway.port, "/data")
        refused = yield libcoap_request("post", url, b'{"id": "test-1", "data": {"t": 1}}', 50)
        self.assertEqual((refused.code, refused.payload),
                         ("4.00", b"test devices are not accepted here"))
        accepted = yield libcoap_request("post", url, b'{"id": "prod-1", "data": {"t": 1}}', 50)
        self.assertEqual(accepted.code, "2.04")

    @exercises("sense_register_sinks", "sense_register_registries")
    @defer.inlineCallbacks
    def test_plugin_sink_and_registry_are_chosen_by_name(self):
        written = Path(self.mktemp()).resolve()
        gateway = yield start_gateway(
            self, role="all", **{"sinks.enabled": ("jsonl",), "registry.backend": "counting",
                                 "processor.poll_interval": 0.05},
            plugins_dir=self.plugins_dir(jsonl_sink=f'''
            import json
            from sense_gateway.hookspecs import hookimpl
            from sense_gateway.registry.sqlite import SQLiteRegistry
            from sense_gateway.sinks import MetricSink

            class JsonLines(MetricSink):
                name = "jsonl"

                def write(self, points):
                    with open({str(written)!r}, "a") as f:
                        for p in points:
                            f.write(json.dumps([p.measurement, p.tags, p.fields]) + "\\n")

            class CountingRegistry(SQLiteRegistry):
                def commit(self, records):
                    with open({str(written)!r} + ".commits", "a") as f:
                        f.write("commit\\n")
                    return super().commit(records)

            @hookimpl
            def sense_register_sinks():
                return {{"jsonl": lambda config: JsonLines()}}

            @hookimpl
            def sense_register_registries():
                return {{"counting": lambda config: CountingRegistry(config.registry_path)}}
            '''))
        response = yield libcoap_request("post", coap_url("::1", gateway.port, "/data"),
                                         b'{"id": "p-1", "seq": 1, "data": {"t": 1}}', 50)
        self.assertEqual(response.code, "2.04")
        deadline = time.monotonic() + 10
        while not Path(f"{written}.commits").exists():
            self.assertLess(time.monotonic(), deadline, "processor never committed")
            yield deferLater(0.05)
        lines = [json.loads(line) for line in written.read_text().splitlines()]
        self.assertIn(["sense", {"device": "p-1"}, {"t": 1.0}], lines)

    @exercises("sense_register_credential_stores")
    @defer.inlineCallbacks
    def test_plugin_registry_brings_its_credential_store(self):
        from tests.dtls_harness import DTLSPeer
        from tests.test_coaps import post_datagram, reading
        from sense_gateway.coap.message import parse

        key = secrets.token_hex(16)
        gateway = yield start_gateway(
            self, **{"registry.backend": "vault"}, plugins_dir=self.plugins_dir(vault=f'''
            from sense_gateway.credentials import Credential, CredentialStore
            from sense_gateway.hookspecs import hookimpl
            from sense_gateway.registry.sqlite import SQLiteRegistry

            class OneKey(CredentialStore):
                def serial(self):
                    return 1

                def changes(self, since):
                    return [Credential("vaulted-1", {key!r}.encode(), 0.0, 1)] if since < 1 else []

            @hookimpl
            def sense_register_registries():
                return {{"vault": lambda config: SQLiteRegistry(config.registry_path)}}

            @hookimpl
            def sense_register_credential_stores():
                return {{"vault": lambda config: OneKey()}}
            '''))
        peer = DTLSPeer(self, "vaulted-1", key.encode())
        self.assertTrue((yield peer.connect(gateway.coaps_server.address[1])))
        answer = yield peer.request(post_datagram(reading("vaulted-1"), 1))
        self.assertEqual(parse(answer).code, 0x44)
