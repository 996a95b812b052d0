"""plugins/example_kv.py, the example users copy, works as its manual says."""

from __future__ import annotations

import ast
import importlib.util
import shutil
from pathlib import Path
from types import ModuleType

from twisted.trial.unittest import SynchronousTestCase

from sense_gateway.config import load_config
from sense_gateway.envelope import Envelope, Reading, RequestContext
from sense_gateway.errors import ConfigError
from sense_gateway.formats import Format
from sense_gateway.plugins import make_plugin_manager
from sense_gateway.validation import sense_validate

from tests.support import assert_refused, parametrize

EXAMPLE = Path(__file__).resolve().parent.parent / "plugins" / "example_kv.py"
RECEIVED = 1764300000.0
CONTEXT = RequestContext(path="/kv", content_format=0, source_host="::1", source_port=5683,
                         received=RECEIVED)

#: What a drop-in plugin may import from the gateway: the public plugin API.
PUBLIC_MODULES = {"sense_gateway.hookspecs", "sense_gateway.formats", "sense_gateway.envelope",
                  "sense_gateway.errors"}


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("example_kv_under_test", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class ExamplePluginTests(SynchronousTestCase):
    def setUp(self):
        self.module = load_example()

    def config(self, table: str = ""):
        path = Path(self.mktemp())
        path.write_text(table)
        return load_config(path, environ={})

    def format(self, table: str = "") -> Format:
        [fmt] = self.module.sense_register_formats(self.config(table))
        return fmt

    def test_serves_text_on_kv(self):
        fmt = self.format()
        self.assertEqual((fmt.name, fmt.paths, fmt.content_formats), ("example-kv", ("/kv",), (0,)))

    def test_documented_example_decodes(self):
        decoded = self.format().decode(b"id=pump-3;seq=12;pressure=2.4;running=true", CONTEXT)
        self.assertEqual((decoded.device, decoded.seq), ("pump-3", 12))
        self.assertEqual(decoded.readings, [Reading({"pressure": 2.4, "running": True})])

    def test_value_types_newlines_whitespace_and_ts(self):
        body = b"id = a\nts = 1764299999.5\ncount=3; level=0.25;open=false;mode=eco;;\n"
        decoded = self.format().decode(body, CONTEXT)
        self.assertEqual(decoded.readings, [Reading(
            {"count": 3, "level": 0.25, "open": False, "mode": "eco"}, ts=1764299999.5)])
        self.assertIsNone(decoded.seq)

    def test_missing_id_is_left_to_the_validators(self):
        self.assertIsNone(self.format().decode(b"level=3", CONTEXT).device)

    def test_measurement_from_its_config_table(self):
        decoded = self.format('[example_kv]\nmeasurement = "kv"\n').decode(b"id=a;level=3", CONTEXT)
        self.assertEqual(decoded.readings, [Reading({"level": 3}, measurement="kv")])

    def test_wrong_measurement_setting_names_the_key(self):
        error = self.assertRaises(ConfigError, self.module.sense_register_formats,
                                  self.config("[example_kv]\nmeasurement = 5\n"))
        self.assertEqual(str(error), "example_kv.measurement: expected a name, got 5")

    def test_decoded_example_passes_the_built_in_validators(self):
        decoded = self.format().decode(b"id=pump-3;seq=12;pressure=2.4;running=true", CONTEXT)
        envelope = Envelope(id="e", device=decoded.device, seq=decoded.seq, received=RECEIVED,
                            source="[::1]:5683", transport="coap", identity=None, path="/kv",
                            content_format=0, readings=[Reading(r.fields, RECEIVED, r.measurement)
                                                        for r in decoded.readings])
        self.assertEqual(sense_validate(envelope, self.config()), [])

    def test_loaded_from_a_plugins_directory(self):
        plugins_dir = Path(self.mktemp())
        plugins_dir.mkdir()
        shutil.copy(EXAMPLE, plugins_dir / "example_kv.py")
        manager = make_plugin_manager(load_entrypoints=False, plugins_dir=plugins_dir, builtins=())
        [formats] = manager.hook.sense_register_formats(config=self.config())
        self.assertEqual([fmt.name for fmt in formats], ["example-kv"])

    def test_imports_only_the_public_plugin_api(self):
        tree = ast.parse(EXAMPLE.read_text())
        imported = {node.module for node in ast.walk(tree)
                    if isinstance(node, ast.ImportFrom) and node.module.startswith("sense_gateway")}
        imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                     for alias in node.names if alias.name.startswith("sense_gateway")}
        self.assertLessEqual(imported, PUBLIC_MODULES)

    def test_docstring_is_its_manual(self):
        for words in ("POST /kv", "Content-Format 0", "[example_kv]", "measurement",
                      "coap-client-notls -m post -t 0", "plugins/"):
            self.assertIn(words, self.module.__doc__)


class ExampleRefusalTests(SynchronousTestCase):
    """Each refusal with its diagnostic, which becomes the 4.00 payload."""


#: name -> (payload, diagnostic)
REFUSALS = {
    "pair_without_equals": (b"id=a;oops", "'oops': expected key=value"),
    "empty_key": (b"id=a;=3", "empty key"),
    "key_given_twice": (b"id=a;t=1;t=2", "'t' given twice"),
    "seq_not_digits": (b"id=a;seq=-1;t=1", "seq: expected decimal digits"),
    "ts_not_a_number": (b"id=a;ts=now;t=1", "ts: expected epoch seconds"),
    "not_utf8": (b"id=a;t=\xff", "not UTF-8 text"),
}


def _refused(self, body: bytes, diagnostic: str):
    [fmt] = load_example().sense_register_formats(load_config(environ={}))
    assert_refused(self, diagnostic, fmt.decode, body, CONTEXT)


parametrize(ExampleRefusalTests, REFUSALS, _refused)
