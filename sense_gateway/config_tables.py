"""The configuration's typed tables: one frozen dataclass per TOML table,
each field a key with its default. Loading, precedence and validation are
in :mod:`sense_gateway.config`, which re-exports these names."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any


@dataclass(frozen=True)
class CoapConfig:
    bind: str = "::"
    port: int = 5683
    max_payload: int = 1024
    dedup_entries: int = 65536
    #: of those, at most this many for one source address (docs/coap.md)
    dedup_per_source: int = 4096
    exchange_lifetime: float = 247.0
    time_interval: float = 60.0
    max_observers: int = 256
    #: requests per second one source address may send, on average (0: no
    #: limit), and how many at once; beyond them 4.29 with Max-Age
    rate_limit: float = 100.0
    rate_burst: int = 200


@dataclass(frozen=True)
class CoapsConfig:
    """CoAP over DTLS 1.2 with pre-shared keys (docs/security.md)."""

    enabled: bool = True
    bind: str = "::"
    port: int = 5684
    #: sessions at once, established or handshaking
    max_sessions: int = 1000
    #: a handshake not done by then is dropped (a wrong key ends only so:
    #: OpenSSL drops the bad Finished without an alert)
    handshake_timeout: float = 10.0
    idle_timeout: float = 300.0
    #: new handshakes one source address may start per second, and have
    #: in progress at once (eight times that from one IPv6 /64)
    handshakes_per_source: float = 5.0
    handshakes_in_progress_per_source: int = 4
    #: established sessions one identity may hold (a newer one ends its oldest)
    max_sessions_per_identity: int = 4
    #: a PSK identity hint to send (empty: none, RFC 7925)
    identity_hint: str = ""


@dataclass(frozen=True)
class SecurityConfig:
    """What plain CoAP may still do, and how fresh the gateway's view of
    the credentials is (docs/security.md)."""

    #: open: any device; uncredentialed: only devices without a credential;
    #: off: no ingest over plain CoAP
    plain_ingest: str = "open"
    #: seconds between checks for new, rotated or revoked credentials
    refresh_interval: float = 2.0


@dataclass(frozen=True)
class QueueConfig:
    """Keys every queue backend reads; a backend's own keys are in its
    table ``[queue.NAME]`` (:class:`sense_gateway.queues.QueueBackend`)."""

    backend: str = "sqlite"
    max_receives: int = 5
    visibility_timeout: float = 30.0
    max_pending: int = 20000
    #: envelopes in the queue at most (the backlog a long outage leaves)
    max_depth: int = 1_000_000
    retry_after: int = 5


@dataclass(frozen=True)
class ValidationConfig:
    max_readings: int = 100
    max_fields: int = 32
    max_name_length: int = 64
    max_string_length: int = 256
    max_device_length: int = 64
    max_future: float = 300.0
    min_timestamp: float = 946684800.0


@dataclass(frozen=True)
class ProcessorConfig:
    #: envelopes per round of the in-process worker; an SQS queue gives at
    #: most 10 per receive whatever this says, and a Lambda function gets
    #: the batch size of its event source mapping
    batch_size: int = 1000
    poll_interval: float = 1.0
    retry_base: float = 2.0
    retry_max: float = 300.0


@dataclass(frozen=True)
class RegistryConfig:
    backend: str = "sqlite"
    path: str = ""
    table: str = "sense-devices"
    #: credentials (PSKs): the SQLite file (default <data_dir>/credentials.sqlite3)
    #: or the DynamoDB table, by registry.backend
    credentials_path: str = ""
    credentials_table: str = "sense-credentials"
    #: devices plain CoAP may create at most, and how many new ones one
    #: source address may create per minute
    max_devices: int = 100000
    new_devices_per_minute: float = 60.0
    #: seconds between reloads of the registered device ids (for those limits)
    refresh_interval: float = 30.0


@dataclass(frozen=True)
class DevicesConfig:
    """When a device counts as late or offline (sense_gateway/liveness.py)."""

    #: silent for this many expected intervals: late; for this many: offline
    late_after: float = 2.0
    offline_after: float = 5.0
    #: seconds between the processor's sweeps writing silent devices' state
    sweep_interval: float = 60.0
    #: devices /metrics lists one by one at most (offline and late first)
    metrics_limit: int = 1000


@dataclass(frozen=True)
class SinksConfig:
    enabled: tuple[str, ...] = ("sqlite",)


@dataclass(frozen=True)
class InfluxConfig:
    url: str = "http://127.0.0.1:8086"
    api: str = "v2"
    token: str = ""
    org: str = ""
    bucket: str = "sense"
    database: str = "sense"
    username: str = ""
    password: str = ""
    precision: str = "ns"
    timeout: float = 10.0
    retries: int = 3


@dataclass(frozen=True)
class StoreConfig:
    path: str = ""
    retention_days: float = 7.0


@dataclass(frozen=True)
class WebConfig:
    enabled: bool = True
    bind: str = "127.0.0.1"
    port: int = 8080
    #: where npm put the dashboard's chart library (uPlot); empty: the
    #: checkout's node_modules, then ./node_modules
    node_modules: str = ""


@dataclass(frozen=True)
class AwsConfig:
    region: str = "us-east-1"
    endpoint_url: str = ""
    queue_url: str = ""


@dataclass(frozen=True)
class Config:
    role: str = "all"
    #: processes doing the role's work, each on its own queue shard: a count, or "auto" (one per core)
    workers: str = "1"
    data_dir: str = "./var"
    plugins_dir: str = "plugins"
    keep_raw: bool = False
    stats_interval: float = 60.0
    #: seconds a stop waits for requests being stored to be answered
    shutdown_timeout: float = 10.0
    disable_plugins: tuple[str, ...] = ()
    coap: CoapConfig = field(default_factory=CoapConfig)
    coaps: CoapsConfig = field(default_factory=CoapsConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    queue: QueueConfig = field(default_factory=QueueConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    processor: ProcessorConfig = field(default_factory=ProcessorConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    devices: DevicesConfig = field(default_factory=DevicesConfig)
    sinks: SinksConfig = field(default_factory=SinksConfig)
    influxdb: InfluxConfig = field(default_factory=InfluxConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    aws: AwsConfig = field(default_factory=AwsConfig)
    web: WebConfig = field(default_factory=WebConfig)
    sections: Mapping[str, Mapping[str, Any]] = field(
        default_factory=lambda: MappingProxyType({})
    )

    def section(self, name: str) -> Mapping[str, Any]:
        """A plugin's own table from the config file (empty if absent)."""
        return self.sections.get(name, MappingProxyType({}))

    @property
    def queue_path(self) -> Path:
        """The embedded queue's file (``queue.sqlite.path``, checked with
        the sqlite backend's settings at start-up)."""
        path = self.section("queue.sqlite").get("path")
        return Path(path or Path(self.data_dir) / "queue.sqlite3")

    @property
    def registry_path(self) -> Path:
        return Path(self.registry.path or Path(self.data_dir) / "registry.sqlite3")

    @property
    def credentials_path(self) -> Path:
        return Path(self.registry.credentials_path
                    or Path(self.data_dir) / "credentials.sqlite3")

    @property
    def store_path(self) -> Path:
        return Path(self.store.path or Path(self.data_dir) / "readings.sqlite3")
