"""plugins/example_kv.py, the example users copy, works as documented."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from sense_gateway.config import load_config
from sense_gateway.envelope import Reading, RequestContext
from sense_gateway.errors import DecodeError

EXAMPLE = Path(__file__).resolve().parent.parent / "plugins" / "example_kv.py"
CONTEXT = RequestContext(path="/kv", content_format=0, source_host="::1", source_port=1,
                         received=1764300000.0)


def load_example():
    spec = importlib.util.spec_from_file_location("example_kv_under_test", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class ExamplePluginTests(SynchronousTestCase):
    def setUp(self):
        self.module = load_example()

    def format(self, **tables):
        path = Path(self.mktemp())
        path.write_text("".join(f'[example_kv]\nmeasurement = "{m}"\n' for m in tables.values()))
        [fmt] = self.module.sense_register_formats(load_config(path, environ={}))
        return fmt

    def test_documented_example_decodes(self):
        fmt = self.format()
        decoded = fmt.decode(b"id=pump-3;seq=12;pressure=2.4;running=true", CONTEXT)
        self.assertEqual((fmt.paths, fmt.content_formats), (("/kv",), (0,)))
        self.assertEqual((decoded.device, decoded.seq), ("pump-3", 12))
        self.assertEqual(decoded.readings, [Reading({"pressure": 2.4, "running": True})])

    def test_measurement_from_its_config_table(self):
        decoded = self.format(measurement="kv").decode(b"id=a\nlevel=3", CONTEXT)
        self.assertEqual((decoded.readings[0].measurement, decoded.readings[0].fields),
                         ("kv", {"level": 3}))

    def test_pair_without_equals_is_refused(self):
        error = self.assertRaises(DecodeError, self.format().decode, b"id=a;oops", CONTEXT)
        self.assertEqual(str(error), "'oops': expected key=value")

    def test_docstring_is_its_manual(self):
        for words in ("/kv", "Content-Format", "[example_kv]", "coap-client-notls"):
            self.assertIn(words, self.module.__doc__)
