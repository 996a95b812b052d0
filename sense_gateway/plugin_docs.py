"""Assemble ``docs/plugins.md`` from the code: the hook contract from
``hookspecs.py`` and each built-in plugin's manual from its module
docstring, so the document cannot drift from what the code says.

Regenerate with ``sense plugin-docs > docs/plugins.md``; a test fails when
the committed file is out of date.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import re
import typing

from sense_gateway import hookspecs
from sense_gateway.plugins import DEFAULT_PLUGINS

INTRO = """\
# Plugins

SENSE Gateway is assembled from plugins: the payload formats, the
validators, the queue and the `/time` resource that ship with it are
plugins too. A plugin is a Python module with functions marked
`@hookimpl`, found in one of three ways:

1. built in (the modules listed below);
2. an installed distribution advertising it in the `sense_gateway`
   entry-point group (`[options.entry_points] sense_gateway = name = module`);
3. a `.py` file in the plugins directory (`plugins/` by default,
   `--plugins-dir` or `plugins_dir` in the configuration).

`sense plugins` lists what is loaded and which hooks each implements;
`disable_plugins` in the configuration blocks plugins by name. A plugin
that fails to import or implements a hook wrongly stops start-up with one
line naming its file (or distribution) and the cause.

`plugins/example_kv.py` is a complete example to copy.
"""


def _hook_section(name: str, function) -> str:
    signature = str(inspect.signature(function))
    return f"### `{name}{signature}`\n\n{_markdown(function.__doc__)}\n"


def _markdown(docstring: str | None) -> str:
    """The reST of our docstrings as Markdown: roles and ``literals``
    become `code`, ``Example::`` blocks become fenced code blocks."""
    doc = inspect.cleandoc(docstring or "")
    doc = re.sub(r":[a-z]+:`~?([^`]+)`", r"`\1`", doc)
    doc = doc.replace("``", "`")
    lines = doc.splitlines()
    out: list[str] = []
    in_code = False
    for line in lines:
        if in_code and line and not line.startswith("    "):
            out.append("```")
            in_code = False
        if line.rstrip().endswith("::") and not in_code:
            out.append(line.rstrip()[:-1])
            out.append("")
            out.append("```python")
            in_code = True
            continue
        out.append(line[4:] if in_code else line)
    if in_code:
        while out and not out[-1].strip():
            out.pop()
        out.append("```")
    text = "\n".join(out)
    return text.replace("```python\n\n", "```python\n")


def hook_names() -> list[str]:
    return [name for name, _ in _hooks()]


def _hooks():
    return [(name, fn) for name, fn in vars(hookspecs).items()
            if name.startswith("sense_") and callable(fn)]


def render_plugin_docs() -> str:
    parts = [INTRO, "## Hooks\n", _markdown(hookspecs.__doc__) + "\n"]
    for name, function in _hooks():
        parts.append(_hook_section(name, function))
    parts.append("## Built-in plugins\n")
    for module_name in DEFAULT_PLUGINS:
        module = importlib.import_module(module_name)
        parts.append(f"### `{module_name}`\n\n{_markdown(module.__doc__)}\n")
        parts.extend(_queue_settings(module))
    return "\n".join(parts)


def _queue_settings(module) -> list[str]:
    """The table of each queue backend's own keys, from its declaration."""
    register = getattr(module, "sense_register_queues", None)
    out = []
    for name, backend in (register() if register else {}).items():
        if getattr(backend, "settings", None) is None:
            out.append(f"Queue backend `{name}`: no `[queue.{name}]` keys of its own.\n")
            continue
        hints = typing.get_type_hints(backend.settings)
        rows = [f"| `queue.{name}.{f.name}` | `{_type_name(hints[f.name])}` | `{f.default!r}` |"
                for f in dataclasses.fields(backend.settings)]
        out.append(f"Queue backend `{name}`, table `[queue.{name}]`:\n\n"
                   "| key | type | default |\n|---|---|---|\n" + "\n".join(rows) + "\n")
    return out


def _type_name(kind) -> str:
    return getattr(kind, "__name__", str(kind).replace("typing.", ""))
