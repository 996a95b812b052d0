"""Typed configuration: defaults, then a TOML file, then ``SENSE_*`` variables,
then command-line options, validated once at start-up.

Every key has an environment name derived from where it lives:
``coap.port`` is ``SENSE_COAP_PORT``, top-level ``role`` is ``SENSE_ROLE``.
Tables this module does not know (``[example_kv]``) are kept for plugins,
which read them with :meth:`Config.section`.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import tomllib
import typing
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from sense_gateway.config_tables import (AwsConfig, CoapConfig, CoapsConfig, Config,
                                         DevicesConfig, InfluxConfig, ProcessorConfig,
                                         QueueConfig, RegistryConfig, SecurityConfig,
                                         SinksConfig, StoreConfig, ValidationConfig, WebConfig)
from sense_gateway.errors import ConfigError

__all__ = ["AwsConfig", "CoapConfig", "CoapsConfig", "Config", "DevicesConfig", "InfluxConfig",
           "ProcessorConfig", "QueueConfig", "RegistryConfig", "SecurityConfig", "SinksConfig",
           "StoreConfig", "ValidationConfig", "WebConfig", "load_config", "validate", "env_names",
           "backend_settings", "check_backend_env", "processes", "worker_count"]

ROLES = ("all", "gateway", "processor")
PLAIN_INGEST = ("open", "uncredentialed", "off")

_TABLES = {"coap": CoapConfig, "coaps": CoapsConfig, "security": SecurityConfig,
           "queue": QueueConfig, "validation": ValidationConfig,
           "processor": ProcessorConfig, "registry": RegistryConfig, "devices": DevicesConfig,
           "sinks": SinksConfig,
           "influxdb": InfluxConfig, "store": StoreConfig, "aws": AwsConfig,
           "web": WebConfig}


def _convert(key: str, kind: Any, value: Any) -> Any:
    """Coerce *value* (from TOML or an environment string) to *kind*."""
    from_text = isinstance(value, str)
    try:
        if kind in ("bool", bool):
            if isinstance(value, bool):
                return value
            if from_text and value.strip().lower() in ("1", "true", "yes", "on"):
                return True
            if from_text and value.strip().lower() in ("0", "false", "no", "off", ""):
                return False
            raise ValueError(value)
        if kind in ("int", int):
            if isinstance(value, bool):
                raise ValueError(value)
            return int(value)
        if kind in ("float", float):
            if isinstance(value, bool):
                raise ValueError(value)
            return float(value)
        if kind in ("str", str):
            if not isinstance(value, str):
                raise ValueError(value)
            return value
        if kind in ("tuple[str, ...]",):
            if from_text:
                return tuple(part.strip() for part in value.split(",") if part.strip())
            if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
                return tuple(value)
            raise ValueError(value)
    except ValueError:
        pass
    type_name = getattr(kind, "__name__", str(kind))
    raise ConfigError(f"{key}: expected {type_name}, got {value!r}")


def _field_kinds(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _kind_name(kind: Any) -> Any:
    if kind in (bool, int, float, str):
        return kind
    return str(kind).replace("typing.", "")


def _apply(cls, base, values: Mapping[str, Any], prefix: str):
    """Return a copy of dataclass *base* with *values* (already flat) applied."""
    kinds = _field_kinds(cls)
    changes = {}
    for key, value in values.items():
        if key not in kinds:
            raise ConfigError(f"{prefix}{key}: unknown configuration key")
        changes[key] = _convert(prefix + key, _kind_name(kinds[key]), value)
    return dataclasses.replace(base, **changes)


def env_names() -> dict[str, tuple[str | None, str]]:
    """``SENSE_*`` variable -> (table or None, key)."""
    names = {}
    for key in _field_kinds(Config):
        if key in _TABLES or key == "sections":
            continue
        names[f"SENSE_{key.upper()}"] = (None, key)
    for table, cls in _TABLES.items():
        for key in _field_kinds(cls):
            names[f"SENSE_{table.upper()}_{key.upper()}"] = (table, key)
    return names


def load_config(
    path: str | os.PathLike | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Build the configuration.

    *overrides* use dotted keys (``"coap.port"``) and come from the command
    line; they win over the environment, which wins over the file.
    """
    layers: list[tuple[str, dict[str, Any]]] = []
    if path is not None:
        try:
            with open(path, "rb") as f:
                document = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError(f"--config: no such file: {path}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: not valid TOML: {e}") from None
        layers.append((f"{path}: ", document))

    environ = os.environ if environ is None else environ
    from_env: dict[str, Any] = {}
    names = env_names()
    for name, value in environ.items():
        if name in names:
            table, key = names[name]
            target = from_env.setdefault(table, {}) if table else from_env
            target[key] = value
        elif name.startswith("SENSE_QUEUE_"):
            # A queue backend's own key; which one is known once plugins load.
            from_env.setdefault(BACKEND_ENV, {})[name] = value
        elif name.startswith("SENSE_") and name not in _IGNORED_ENV:
            raise ConfigError(f"{name}: unknown SENSE_ environment variable")
    layers.append(("environment ", from_env))

    from_cli: dict[str, Any] = {}
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        table, _, key = dotted.rpartition(".")
        target = from_cli.setdefault(table, {}) if table else from_cli
        target[key] = value
    layers.append(("option ", from_cli))

    config = Config()
    sections: dict[str, dict[str, Any]] = {}
    for origin, document in layers:
        top = {}
        for key, value in document.items():
            if key in _TABLES:
                if not isinstance(value, Mapping):
                    raise ConfigError(f"{origin}{key}: expected a table")
                if key == "queue":
                    # [queue.NAME]: a backend's own table, typed by the backend.
                    for name, inner in value.items():
                        if isinstance(inner, Mapping):
                            sections.setdefault(f"queue.{name}", {}).update(inner)
                    value = {k: v for k, v in value.items() if not isinstance(v, Mapping)}
                _moved(origin, key, value)
                table = _apply(_TABLES[key], getattr(config, key), value, f"{origin}{key}.")
                config = dataclasses.replace(config, **{key: table})
            elif key == BACKEND_ENV:
                sections.setdefault(key, {}).update(value)
            elif isinstance(value, Mapping) and key not in _field_kinds(Config):
                sections.setdefault(key, {}).update(value)
            else:
                top[key] = value
        if isinstance(top.get("workers"), int) and not isinstance(top["workers"], bool):
            top["workers"] = str(top["workers"])  # a count, or "auto"
        config = _apply(Config, config, top, origin)
    config = dataclasses.replace(
        config,
        sections=MappingProxyType({k: MappingProxyType(v) for k, v in sections.items()}),
    )
    validate(config)
    return config


# Variables that configure things other than this file's keys.
_IGNORED_ENV = frozenset({"SENSE_CONFIG"})

#: the section holding ``SENSE_QUEUE_*`` variables no core key claims, for
#: :func:`backend_settings` to give to the backend that declares them
BACKEND_ENV = "environment queue"

# Keys that moved into the sqlite backend's own table.
_MOVED = {("queue", key): f"queue.sqlite.{key}" for key in ("path", "synchronous", "max_batch")}


def _moved(origin: str, table: str, values: Mapping[str, Any]) -> None:
    for key in values:
        if (table, key) in _MOVED:
            raise ConfigError(f"{origin}{table}.{key}: moved to {_MOVED[table, key]}")


def backend_settings(config: Config, name: str, settings: type | None):
    """The typed settings of queue backend *name* from its table
    ``[queue.NAME]`` and its ``SENSE_QUEUE_NAME_*`` variables, converted
    and checked like the core's keys (``None`` when it declares none)."""
    table = f"queue.{name}"
    values = dict(config.section(table))
    prefix = f"SENSE_QUEUE_{name.upper()}_"
    kinds = _field_kinds(settings) if settings is not None else {}
    for variable, value in config.section(BACKEND_ENV).items():
        key = variable[len(prefix):].lower()
        if variable.startswith(prefix) and key in kinds:
            values[key] = value
    if settings is None:
        if values:
            raise ConfigError(f"{table}.{next(iter(values))}: queue backend {name!r} "
                              "has no settings of its own")
        return None
    return _apply(settings, settings(), values, f"{table}.")


def check_backend_env(config: Config, declared: Mapping[str, type | None]) -> None:
    """Fail on a ``SENSE_QUEUE_*`` variable and a ``[queue.NAME]`` table no
    registered backend (*declared*: name -> settings) claims."""
    for table in config.sections:
        if table.startswith("queue.") and table[6:] not in declared:
            raise ConfigError(f"{table}: no queue backend named {table[6:]!r}; "
                              f"available: {', '.join(sorted(declared))}")
    for variable in config.section(BACKEND_ENV):
        if not any(variable.startswith(f"SENSE_QUEUE_{name.upper()}_")
                   and variable[len(name) + 13:].lower() in _field_kinds(settings)
                   for name, settings in declared.items() if settings is not None):
            moved = _MOVED.get(("queue", variable[12:].lower()))
            hint = f" (queue.{variable[12:].lower()} moved to {moved})" if moved else ""
            raise ConfigError(f"{variable}: unknown SENSE_ environment variable{hint}")


def worker_count(config: Config) -> int:
    """How many worker processes ``workers`` asks for."""
    return processes(config.workers)


def processes(workers: str) -> int:
    """A ``workers`` setting (a count, or ``auto``: one per core this
    process may run on) as a number of processes."""
    if str(workers) == "auto":
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") \
            else os.cpu_count() or 1
    return int(workers)


def validate(config: Config) -> None:
    """Check values that have a type but not every value of it makes sense."""
    if config.role not in ROLES:
        raise ConfigError(f"role: must be one of {', '.join(ROLES)}, got {config.role!r}")
    if config.workers != "auto" and not (config.workers.isdigit() and int(config.workers) >= 1):
        raise ConfigError(f"workers: must be a count of at least 1 or 'auto', "
                          f"got {config.workers!r}")
    for key, bind in (("coap.bind", config.coap.bind), ("coaps.bind", config.coaps.bind)):
        try:
            ipaddress.ip_address(bind)
        except ValueError:
            raise ConfigError(f"{key}: not an IP address: {bind!r}") from None
    if config.security.plain_ingest not in PLAIN_INGEST:
        raise ConfigError(f"security.plain_ingest: must be one of {', '.join(PLAIN_INGEST)}, "
                          f"got {config.security.plain_ingest!r}")
    for key, port in (("coap.port", config.coap.port), ("coaps.port", config.coaps.port),
                      ("web.port", config.web.port)):
        if not 0 <= port <= 65535:
            raise ConfigError(f"{key}: out of range: {port}")
    # Zero is not "off" for these: a zero visibility timeout, say, hands the
    # same message to the next receive.
    positive = {
        "coap.max_payload": config.coap.max_payload,
        "coap.dedup_entries": config.coap.dedup_entries,
        "coap.dedup_per_source": config.coap.dedup_per_source,
        "coap.max_observers": config.coap.max_observers,
        "coap.time_interval": config.coap.time_interval,
        "coap.exchange_lifetime": config.coap.exchange_lifetime,
        "coap.rate_burst": config.coap.rate_burst,
        "shutdown_timeout": config.shutdown_timeout,
        "coaps.max_sessions": config.coaps.max_sessions,
        "coaps.handshake_timeout": config.coaps.handshake_timeout,
        "coaps.idle_timeout": config.coaps.idle_timeout,
        "coaps.handshakes_per_source": config.coaps.handshakes_per_source,
        "coaps.handshakes_in_progress_per_source": config.coaps.handshakes_in_progress_per_source,
        "coaps.max_sessions_per_identity": config.coaps.max_sessions_per_identity,
        "security.refresh_interval": config.security.refresh_interval,
        "registry.max_devices": config.registry.max_devices,
        "registry.new_devices_per_minute": config.registry.new_devices_per_minute,
        "registry.refresh_interval": config.registry.refresh_interval,
        "queue.max_receives": config.queue.max_receives,
        "queue.max_pending": config.queue.max_pending,
        "queue.max_depth": config.queue.max_depth,
        "queue.visibility_timeout": config.queue.visibility_timeout,
        "validation.max_readings": config.validation.max_readings,
        "validation.max_fields": config.validation.max_fields,
        "processor.batch_size": config.processor.batch_size,
        "processor.retry_base": config.processor.retry_base,
        "processor.retry_max": config.processor.retry_max,
        "influxdb.timeout": config.influxdb.timeout,
        "store.retention_days": config.store.retention_days,
        "devices.late_after": config.devices.late_after,
        "devices.offline_after": config.devices.offline_after,
        "devices.sweep_interval": config.devices.sweep_interval,
    }
    for key, value in positive.items():
        if not value > 0:  # NaN too
            raise ConfigError(f"{key}: must be positive, got {value}")
    at_least_zero = {
        # 0 polls SQS without waiting (short polling)
        "processor.poll_interval": config.processor.poll_interval,
        "queue.retry_after": config.queue.retry_after,
        # 0: no rate limit
        "coap.rate_limit": config.coap.rate_limit,
        "influxdb.retries": config.influxdb.retries,
        "validation.max_future": config.validation.max_future,
        "devices.metrics_limit": config.devices.metrics_limit,
    }
    for key, value in at_least_zero.items():
        if not value >= 0:
            raise ConfigError(f"{key}: must be 0 or more, got {value}")
    if config.processor.retry_max < config.processor.retry_base:
        raise ConfigError(f"processor.retry_max: must be at least processor.retry_base "
                          f"({config.processor.retry_base}), got {config.processor.retry_max}")
    if config.devices.offline_after <= config.devices.late_after:
        raise ConfigError(f"devices.offline_after: must be more than devices.late_after "
                          f"({config.devices.late_after}), got {config.devices.offline_after}")
    if config.influxdb.api not in ("v1", "v2"):
        raise ConfigError(f"influxdb.api: must be 'v1' or 'v2', got {config.influxdb.api!r}")
    if config.influxdb.precision not in ("ns", "ms", "s"):
        raise ConfigError(f"influxdb.precision: must be 'ns', 'ms' or 's', got {config.influxdb.precision!r}")
