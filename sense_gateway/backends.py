"""Choosing backends by name from the factories plugins register.

Queues, registries and sinks are offered by ``sense_register_*`` hooks as
``{name: factory}``; configuration names the ones to use.
"""

from __future__ import annotations

from collections.abc import Callable

from sense_gateway.errors import ConfigError, PluginLoadError
from sense_gateway.plugins import SensePluginManager, call_collecting


def named_factories(pm: SensePluginManager, hook_name: str, kind: str) -> dict[str, Callable]:
    factories: dict[str, Callable] = {}
    for plugin, offered in call_collecting(pm, hook_name):
        for name, factory in offered.items():
            if name in factories:
                raise PluginLoadError(f"{pm.origin(plugin)}: {kind} {name!r} registered twice")
            factories[name] = factory
    return factories


def choose(factories: dict[str, Callable], name: str, key: str) -> Callable:
    if name not in factories:
        raise ConfigError(f"{key}: unknown backend {name!r}; available: {', '.join(sorted(factories))}")
    return factories[name]


def registry_factory(config, pm: SensePluginManager) -> Callable:
    """``factory(config)`` of the registry ``registry.backend`` names."""
    return choose(named_factories(pm, "sense_register_registries", "registry"),
                  config.registry.backend, "registry.backend")


def credential_store_factory(config, pm: SensePluginManager) -> Callable | None:
    """``factory(config)`` of the credential store that goes with the
    registry ``registry.backend`` names, or ``None`` if that registry
    brings none (then no device has a credential)."""
    offered = named_factories(pm, "sense_register_credential_stores", "credential store")
    return offered.get(config.registry.backend)


def sink_factories(config, pm: SensePluginManager) -> list[Callable]:
    """``factory(config)`` of every sink ``sinks.enabled`` names, in order."""
    offered = named_factories(pm, "sense_register_sinks", "sink")
    return [choose(offered, name, "sinks.enabled") for name in config.sinks.enabled]


def processor_factory(config, pm: SensePluginManager) -> Callable:
    """A function building the :class:`~sense_gateway.processor.BatchProcessor`
    the configuration asks for; names are checked now, connections are
    made when it is called (on the thread that will use them)."""
    from sense_gateway.liveness import LivenessPolicy
    from sense_gateway.processor import BatchProcessor

    registry = registry_factory(config, pm)
    sinks = sink_factories(config, pm)
    policy = LivenessPolicy.from_config(config)

    def build() -> BatchProcessor:
        return BatchProcessor(registry(config), [make(config) for make in sinks],
                              policy=policy)

    return build
