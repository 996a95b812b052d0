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
        for key in ("coap.port", "queue.sqlite.synchronous", "validation.*", "disable_plugins"):
            self.assertIn(key, readme)


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


class ReadmeLayoutTests(SynchronousTestCase):
    """The README's Layout names every module of the package."""

    def layout(self) -> list[str]:
        readme = (REPO / "README.md").read_text()
        return readme.split("\n## Layout\n", 1)[1].split("\n## ", 1)[0].splitlines()

    def test_layout_names_every_module(self):
        lines = self.layout()
        text = "\n".join(lines)
        unnamed = []
        package = REPO / "sense_gateway"
        for path in sorted(package.rglob("*.py")):
            relative = path.relative_to(package)
            if relative.name == "__init__.py" and len(relative.parts) == 1:
                continue
            if len(relative.parts) == 1:
                if relative.name not in text:
                    unnamed.append(str(relative))
                continue
            # A subpackage's module is named under the subpackage's line:
            # on it, or on the lines below it that are indented further.
            folder = f"{relative.parts[0]}/"
            starts = [i for i, line in enumerate(lines) if line.strip().startswith(folder)]
            if not starts:
                unnamed.append(str(relative))
                continue
            first = starts[0]
            block = [lines[first]]
            for line in lines[first + 1:]:
                if line.strip() and _indent(line) <= _indent(lines[first]):
                    break
                block.append(line)
            if relative.name != "__init__.py" and relative.name not in "\n".join(block):
                unnamed.append(str(relative))
        self.assertEqual(unnamed, [])

    def test_layout_shows_the_entry_chain_and_links_the_contributing_guide(self):
        self.assertIn("twisted/plugins/sense_gateway_plugin.py -> sense_gateway/tap.py -> "
                      "sense_gateway/service.py", "\n".join(self.layout()))
        self.assertIn("(CONTRIBUTING.md)", (REPO / "README.md").read_text())
        self.assertTrue((REPO / "CONTRIBUTING.md").exists())
