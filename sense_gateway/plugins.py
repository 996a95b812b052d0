"""Finding and loading plugins: built-ins, entry points, a plugins directory.

The plugin manager is built by :func:`make_plugin_manager`, never at import
time. Every way a plugin can fail to load becomes one
:class:`~sense_gateway.errors.PluginLoadError` whose message is a single
line naming the plugin and the cause.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import sys
from collections.abc import Iterable
from pathlib import Path

import pluggy

from sense_gateway import hookspecs
from sense_gateway.errors import PluginLoadError

#: What the processor needs, and nothing that needs Twisted (AWS Lambda).
PROCESSOR_PLUGINS = (
    "sense_gateway.registry.sqlite",
    "sense_gateway.registry.dynamodb",
    "sense_gateway.sinks.sqlite",
    "sense_gateway.sinks.influxdb",
)

#: The package's own plugins: the product uses the hooks it offers.
DEFAULT_PLUGINS = (
    "sense_gateway.formats.sense",
    "sense_gateway.formats.senml",
    "sense_gateway.formats.sense_text",
    "sense_gateway.validation",
    "sense_gateway.queues.sqlite",
    "sense_gateway.queues.sqs",
    *PROCESSOR_PLUGINS,
    "sense_gateway.credentials.sqlite",
    "sense_gateway.credentials.dynamodb",
    "sense_gateway.coap.time",
)

ENTRYPOINT_GROUP = "sense_gateway"

# Modules loaded from a plugins directory live under this package name so
# they cannot shadow real modules.
_DIR_PACKAGE = "sense_gateway_dropins"


class SensePluginManager(pluggy.PluginManager):
    """A pluggy manager that remembers where each plugin came from."""

    def __init__(self) -> None:
        super().__init__(hookspecs.PROJECT)
        self.add_hookspecs(hookspecs)
        #: plugin name -> module, "entry point NAME (dist)" or file path
        self.origins: dict[str, str] = {}
        #: changes whenever a plugin is registered or unregistered
        self.generation = 0

    def origin(self, name: str) -> str:
        return self.origins.get(name, name)

    def register(self, plugin, name=None):
        self.generation += 1
        return super().register(plugin, name)

    def unregister(self, plugin=None, name=None):
        self.generation += 1
        return super().unregister(plugin, name)


class DirectHook:
    """Calls one per-request hook's implementations directly.

    pluggy's caller checks arguments and runs its multicall loop on every
    call: several microseconds on the reactor thread per request. This
    looks the implementations up once, and again after any plugin is
    registered or unregistered; it gives pluggy's results in pluggy's
    order (non-None ones, last registered first). A hook with a wrapper
    implementation is left to pluggy.
    """

    def __init__(self, pm: SensePluginManager, name: str):
        self._pm = pm
        self._hook = getattr(pm.hook, name)
        self._generation = -1
        self._calls: list | None = None
        self._plugins: frozenset[str] = frozenset()

    def _resolve(self) -> None:
        impls = self._hook.get_hookimpls()
        self._plugins = frozenset(impl.plugin_name for impl in impls)
        if any(impl.hookwrapper or impl.wrapper for impl in impls):
            self._calls = None
        else:
            self._calls = [(impl.function, tuple(impl.argnames)) for impl in reversed(impls)]
        self._generation = self._pm.generation

    def implemented_only_by(self, plugin_name: str) -> bool:
        """Whether *plugin_name* is the one plugin implementing the hook."""
        if self._generation != self._pm.generation:
            self._resolve()
        return self._plugins == {plugin_name}

    def __call__(self, **kwargs) -> list:
        if self._generation != self._pm.generation:
            self._resolve()
        calls = self._calls
        if calls is None:
            return self._hook(**kwargs)
        results = []
        for function, argnames in calls:
            result = function(*[kwargs[name] for name in argnames])
            if result is not None:
                results.append(result)
        return results


def make_plugin_manager(
    disable: Iterable[str] = (),
    load_entrypoints: bool = True,
    plugins_dir: str | Path | None = None,
    builtins: Iterable[str] = DEFAULT_PLUGINS,
) -> SensePluginManager:
    """A plugin manager with every enabled plugin registered and checked.

    *disable* holds plugin names (a built-in's module name such as
    ``sense_gateway.formats.senml``, an entry point's name, or a dropped-in
    file's stem) that are blocked rather than loaded.
    """
    pm = SensePluginManager()
    for name in disable:
        pm.set_blocked(name)

    for module_name in builtins:
        if pm.is_blocked(module_name):
            continue
        _register(pm, importlib.import_module(module_name), module_name, module_name)

    if load_entrypoints:
        for ep in importlib.metadata.entry_points(group=ENTRYPOINT_GROUP):
            if pm.is_blocked(ep.name):
                continue
            dist = ep.dist.name if ep.dist is not None else "?"
            where = f"entry point {ep.name} ({dist})"
            try:
                plugin = ep.load()
            except Exception as e:
                raise PluginLoadError(f"{where}: import failed: {_one_line(e)}") from e
            _register(pm, plugin, ep.name, where)

    if plugins_dir is not None:
        for path in _plugin_files(plugins_dir):
            if pm.is_blocked(path.stem):
                continue
            _register(pm, _import_file(path), path.stem, str(path))

    try:
        pm.check_pending()
    except pluggy.PluginValidationError as e:
        raise PluginLoadError(f"{_describe(pm, e.plugin)}: {_one_line(e)}") from e
    return pm


def _plugin_files(plugins_dir: str | Path) -> list[Path]:
    directory = Path(plugins_dir)
    if not directory.exists():
        return []
    if not directory.is_dir():
        raise PluginLoadError(f"{directory}: plugins directory is not a directory")
    return sorted(p for p in directory.glob("*.py") if not p.name.startswith("_"))


def _import_file(path: Path):
    name = f"{_DIR_PACKAGE}.{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise PluginLoadError(f"{path}: cannot be imported")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except SyntaxError as e:
        raise PluginLoadError(f"{path}:{e.lineno}: syntax error: {e.msg}") from e
    except Exception as e:
        raise PluginLoadError(f"{path}: import failed: {_one_line(e)}") from e
    sys.modules[name] = module
    return module


def _register(pm: SensePluginManager, plugin, name: str, where: str) -> None:
    try:
        pm.register(plugin, name=name)
    except pluggy.PluginValidationError as e:
        raise PluginLoadError(f"{where}: {_one_line(e)}") from e
    except ValueError as e:
        raise PluginLoadError(f"{where}: {_one_line(e)}") from e
    pm.origins[name] = where


def _describe(pm: SensePluginManager, plugin) -> str:
    name = pm.get_name(plugin)
    return pm.origin(name) if name else repr(plugin)


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def call_collecting(pm: SensePluginManager, hook_name: str, **kwargs) -> list[tuple[str, object]]:
    """Call a hook and return ``(plugin name, result)`` pairs, so clashes can
    be reported by plugin name; a raising hook becomes a PluginLoadError."""
    hook = getattr(pm.hook, hook_name)
    results = []
    for impl in reversed(hook.get_hookimpls()):
        try:
            result = impl.function(**{arg: kwargs[arg] for arg in impl.argnames})
        except Exception as e:
            raise PluginLoadError(
                f"{pm.origin(impl.plugin_name)}: hook {hook_name} raised {_one_line(e)}"
            ) from e
        if result is not None:
            results.append((impl.plugin_name, result))
    return results
