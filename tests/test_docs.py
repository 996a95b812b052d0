"""The documentation says what the code does."""

from __future__ import annotations

import importlib
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
        # A test marked with tests.support.exercises fails unless a loaded
        # plugin's implementation of each hook it names is called.
        exercised = set()
        for path in sorted((REPO / "tests").glob("test_*.py")):
            module = importlib.import_module(f"tests.{path.stem}")
            for cls in vars(module).values():
                if isinstance(cls, type):
                    for attribute in vars(cls).values():
                        exercised.update(getattr(attribute, "exercised_hooks", ()))
        self.assertEqual([name for name in hook_names() if name not in exercised], [])

    def test_readme_names_every_configuration_table(self):
        readme = (REPO / "README.md").read_text()
        for key in ("coap.port", "queue.synchronous", "validation.*", "disable_plugins"):
            self.assertIn(key, readme)
