"""The documentation says what the code does."""

from __future__ import annotations

from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from sense_gateway.plugin_docs import hook_names, render_plugin_docs

REPO = Path(__file__).resolve().parent.parent


class PluginDocsTests(SynchronousTestCase):
    def test_plugins_md_is_generated_from_the_code(self):
        committed = (REPO / "docs" / "plugins.md").read_text()
        self.assertEqual(committed, render_plugin_docs(),
                         "docs/plugins.md is stale: run `sense plugin-docs > docs/plugins.md`")

    def test_every_hook_is_exercised_by_a_test(self):
        tests = "".join(p.read_text() for p in (REPO / "tests").glob("test_*.py")
                        if p.name != "test_docs.py")
        unexercised = [name for name in hook_names() if f"def {name}(" not in tests]
        self.assertEqual(unexercised, [])

    def test_readme_names_every_configuration_table(self):
        readme = (REPO / "README.md").read_text()
        for key in ("coap.port", "queue.sqlite.synchronous", "validation.*", "disable_plugins"):
            self.assertIn(key, readme)
