"""The gateway's service tree, built from configuration and plugins.

:func:`make_service` returns a ``MultiService`` whose children start in
order (queue, then extra resources and the CoAP listener, then the
processor, then the periodic statistics) and stop in reverse, so the
listener closes before the queue flushes its last commit. Role
``gateway`` leaves out the processor, ``processor`` the CoAP side.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from twisted.application.internet import TimerService
from twisted.application.service import IService, MultiService, Service
from twisted.internet import defer, task
from twisted.logger import Logger
from txthings import resource as txresource

from sense_gateway.coap.blockwise import Uploads
from sense_gateway.coap.dispatch import Dispatcher
from sense_gateway.coap.layer import MessageLayer
from sense_gateway.coap.request import MonotonicClock
from sense_gateway.coap.resources import build_tree
from sense_gateway.coap.transport import CoapServer, DTLSTransport, UDPTransport
from sense_gateway.coap.tree import ResourceTree
from sense_gateway.config import Config, ConfigError, worker_count
from sense_gateway.admission import IngestPolicy
from sense_gateway.backends import credential_store_factory, processor_factory, registry_factory
from sense_gateway.directory import DeviceDirectory, DirectoryService
from sense_gateway.limits import TokenBuckets
from sense_gateway.errors import PluginLoadError, code_text
from sense_gateway.pipeline import IngestPipeline
from sense_gateway.queues import queue_backend
from sense_gateway.queues.shards import ShardedQueue
from sense_gateway.plugins import DirectHook, call_collecting, make_plugin_manager
from sense_gateway.web import make_web
from sense_gateway.worker import ProcessorService
from sense_gateway.worker_reports import CounterReporter, worker_report
from sense_gateway.workers import OrphanWatch, WorkerSupervisor

log = Logger()


class GatewayService(MultiService):
    """The running gateway; tests and ``sense`` commands reach its parts here."""

    def __init__(self, config: Config, pm, queue, reactor=None):
        super().__init__()
        self.config = config
        self.reactor = reactor
        self.plugin_manager = pm
        self.queue = queue
        self.pipeline = self.dispatcher = self.coap_server = self.worker = self.web = None
        self.coaps_server = self.directory = self.policy = self.dtls = None
        #: the ingest workers' supervisor (``workers`` above 1)
        self.supervisor = None
        #: one message layer per CoAP transport
        self.layers: list[MessageLayer] = []

    @defer.inlineCallbacks
    def stopService(self):
        """Stop the children one after the other, newest first.

        ``MultiService`` stops them all at once; the processor's last
        round and the listener's last requests still need the queue, so
        the queue must stop after them.
        """
        if not self.running:
            return
        Service.stopService(self)
        yield self._drain()
        for child in reversed(list(self)):
            try:
                yield defer.maybeDeferred(child.stopService)
            except Exception:
                log.failure("{service} did not stop cleanly", service=type(child).__name__)

    @defer.inlineCallbacks
    def _drain(self):
        """Stop taking requests and wait, at most ``shutdown_timeout``
        seconds, until every one taken is answered (its commit done)."""
        if not self.layers:
            return
        waiting = sum(layer.in_flight for layer in self.layers)
        drained = defer.DeferredList([layer.drain() for layer in self.layers])
        log.info("stopping: new requests refused, {waiting} still being stored", waiting=waiting)
        timeout = task.deferLater(self.reactor, self.config.shutdown_timeout, lambda: "timeout")
        result = yield defer.DeferredList([drained, timeout], fireOnOneCallback=True,
                                          consumeErrors=True)
        if result[1] == 1:
            log.warn("stopping: {waiting} requests not answered within shutdown_timeout",
                     waiting=sum(layer.in_flight for layer in self.layers))
        else:
            timeout.cancel()

    def add_gateway(self, parts: GatewayParts) -> None:
        self.pipeline, self.dispatcher = parts.pipeline, parts.dispatcher
        self.layers, self.coap_server = parts.layers, parts.servers[0]
        self.coaps_server = parts.servers[1] if len(parts.servers) > 1 else None
        self.directory, self.policy, self.dtls = parts.directory, parts.policy, parts.dtls
        for child in (*parts.services, *parts.servers):
            child.setServiceParent(self)

    def coap_counters(self) -> dict | None:
        """What the CoAP layers counted, summed over transports (``None``
        without a CoAP side); the same names in /metrics, /api/stats and
        the log."""
        if not self.layers:
            return None
        responses: dict[int, int] = {}
        totals = dict.fromkeys(("requests", "retransmissions", "malformed", "exchanges"), 0)
        for layer in self.layers:
            totals["requests"] += layer.requests
            totals["retransmissions"] += layer.retransmissions
            totals["malformed"] += layer.malformed
            totals["exchanges"] += len(layer.exchanges)
            for code, count in layer.responses.items():
                responses[code] = responses.get(code, 0) + count
        return {"responses": dict(sorted(responses.items())), **totals}

    def security_counters(self) -> dict | None:
        """Refusals by reason, and the DTLS engine's state and counters
        (``None`` without a CoAP side). Never a key."""
        if self.policy is None:
            return None
        refused = dict(self.policy.refused)
        rate_limited = sum(layer.rate_limited for layer in self.layers)
        if rate_limited:
            refused["rate_limited"] = rate_limited
        out = {"refused": refused, "plain_ingest": self.policy.plain_ingest,
               "credentialed_devices": self.directory.directory.credentialed()}
        if self.dtls is not None:
            out["dtls"] = {"sessions": self.dtls.session_count(),
                           "handshakes": self.dtls.handshake_count(),
                           **dict(self.dtls.counters)}
        return out

    def log_stats(self) -> None:
        try:
            if self.worker is not None:
                log.info("processor: {counts}",
                         counts=self.worker.outcomes())
            counters = self.coap_counters()
            if counters is None:
                return
            log.info(
                "coap: {requests} requests, responses by code {responses}, "
                "{retransmissions} retransmissions, {malformed} malformed, "
                "{exchanges} exchanges remembered",
                **{**counters, "responses": {code_text(c): n
                                             for c, n in counters["responses"].items()}},
            )
        except Exception:
            # TimerService stops for good after one exception.
            log.failure("statistics failed")


def make_service(config: Config, reactor=None, worker: int | None = None,
                 worker_args=None) -> GatewayService:
    """The gateway's tree. With ``workers`` above 1 this is the master
    (the queue's shards for the web side, and a :class:`WorkerSupervisor`
    running ``worker_args(index)``); *worker* makes it worker *worker*,
    doing the role's work (ingest, processing or both) on its own shards."""
    if reactor is None:
        from twisted.internet import reactor
    pm = make_plugin_manager(config.disable_plugins, plugins_dir=config.plugins_dir)
    backend, settings = queue_backend(config, pm)
    workers = worker_count(config)
    if worker is not None:  # a worker: the role's work on its own shards, no web
        config = dataclasses.replace(config, web=dataclasses.replace(config.web, enabled=False))
    # With workers and shards, each worker processes its own shards and the
    # master none: one process judging and writing for every shard would
    # be one core again. A queue without shards (SQS) has one processor,
    # the master's, as several would race for each device's messages.
    in_workers = workers > 1 and backend.shards is not None
    processing = config.role in ("all", "processor") and (
        worker is not None if in_workers else worker is None)
    if config.role == "processor" and workers > 1 and not in_workers:
        raise ConfigError(f"workers: queue.backend {config.queue.backend!r} has no shards for "
                          "processor workers to share out; run one processor (or several "
                          "processor processes of their own)")
    processor = processor_factory(config, pm) if processing else None
    # Every shard there is, also with one process: an earlier run with
    # more workers may have left some that must still be drained.
    shards = backend.shards(config, settings, workers) if backend.shards else None
    if worker is not None and shards:
        queue = _open_shards(backend, config, [shards[i] for i in _assigned(worker, workers,
                                                                            len(shards))], reactor)
    elif shards is not None:
        queue = _open_shards(backend, config, shards, reactor)
    else:
        queue = backend.open(config, settings, reactor)
    service = GatewayService(config, pm, queue, reactor)
    queue.setServiceParent(service)
    if worker is not None and CounterReporter.available():
        # Stopped last but for the queue: its last report comes after the
        # drain and after the processor's last round.
        CounterReporter(reactor, lambda: worker_report(service)).setServiceParent(service)
    if config.role in ("all", "gateway") and (workers == 1 or worker is not None):
        service.add_gateway(_make_gateway(config, pm, queue, reactor,
                                          reuse_port=worker is not None))
    if processor is not None:
        # One liveness sweep over the registry is enough: the first worker's.
        service.worker = ProcessorService(queue, processor, config, reactor,
                                          sweep=worker is None or worker == 0)
        service.worker.setServiceParent(service)
    if config.web.enabled:
        service.web = make_web(service, config, pm, reactor)
        service.web.setServiceParent(service)
    stats = TimerService(config.stats_interval, service.log_stats)
    stats.clock = reactor
    stats.setServiceParent(service)
    if worker is not None:
        OrphanWatch(reactor).setServiceParent(service)
    elif workers > 1:
        # Added last, so stopped first: each worker drains its requests
        # into its shard and finishes its processor's round.
        service.supervisor = WorkerSupervisor(reactor, workers, worker_args,
                                              stop_timeout=config.shutdown_timeout + 5)
        service.supervisor.setServiceParent(service)
    return service


def _assigned(worker: int, workers: int, shards: int) -> list[int]:
    """The shards worker *worker* of *workers* puts into (its own, first)
    and processes: its own, and those an earlier run with more workers
    left behind, dealt out in turn."""
    return [worker, *range(workers + worker, shards, workers)]


def _open_shards(backend, config, shards: list, reactor):
    opened = [backend.open(config, shard, reactor) for shard in shards]
    return opened[0] if len(opened) == 1 else ShardedQueue(opened)


@dataclass
class GatewayParts:
    pipeline: IngestPipeline
    dispatcher: Dispatcher
    layers: list
    #: the listeners, plain CoAP first
    servers: list
    #: services started before the listeners (the directory, plugin resources)
    services: list
    directory: DirectoryService
    policy: IngestPolicy
    #: the DTLS engine, if CoAPS is on
    dtls: object = None


def _make_gateway(config, pm, queue, reactor, reuse_port: bool = False) -> GatewayParts:
    """The CoAP side: the device directory and ingest policy, formats and
    validators, resources, the listeners (plain CoAP, and CoAPS)."""
    clock = MonotonicClock(reactor)
    directory = DeviceDirectory(clock.seconds, max_devices=config.registry.max_devices,
                                new_devices_per_minute=config.registry.new_devices_per_minute)
    open_store = credential_store_factory(config, pm)
    if open_store is None:
        log.warn("registry.backend {backend!r} keeps no credentials: no device can use "
                 "CoAPS", backend=config.registry.backend)
    open_registry = registry_factory(config, pm)
    directory_service = DirectoryService(
        directory, open_store and (lambda: open_store(config)), lambda: open_registry(config),
        reactor,
        interval=config.security.refresh_interval,
        registry_interval=config.registry.refresh_interval)
    policy = IngestPolicy(directory, config.security.plain_ingest)

    formats = [fmt for _, group in call_collecting(pm, "sense_register_formats", config=config) for fmt in group]
    pipeline = IngestPipeline(formats, DirectHook(pm, "sense_validate"), queue, config,
                              clock=reactor, policy=policy)

    extra = {}
    for plugin, resources in call_collecting(pm, "sense_coap_resources", config=config,
                                             reactor=reactor):
        for path, res in resources.items():
            if path in extra:
                raise PluginLoadError(f"{pm.origin(plugin)}: CoAP resource {path} registered twice")
            extra[path] = res
    try:
        root = build_tree(pipeline, extra)
    except ValueError as e:
        raise PluginLoadError(str(e)) from None

    tree = ResourceTree(txresource.Endpoint(root), max_observers=config.coap.max_observers)
    dispatcher = Dispatcher(pipeline, tree, lambda: Uploads(config.coap.max_payload, clock),
                            wall_clock=reactor)
    coap = config.coap
    transports = [(UDPTransport(), coap.bind, coap.port, "CoAP")]
    if config.coaps.enabled:
        transports.append((_dtls_transport(config, directory, clock), config.coaps.bind,
                           config.coaps.port, "CoAPS"))
    layers, servers = [], []
    for transport, bind, port, label in transports:
        # One budget per source address (whichever port), per transport: a
        # spoofed plain datagram cannot spend a DTLS device's budget.
        rate_limit = TokenBuckets(coap.rate_limit, coap.rate_burst, clock.seconds) \
            if coap.rate_limit > 0 else None
        layer = MessageLayer(transport, dispatcher, clock,
                             exchange_lifetime=coap.exchange_lifetime,
                             max_exchanges=coap.dedup_entries,
                             exchanges_per_source=coap.dedup_per_source, rate_limit=rate_limit)
        transport.attach(layer)
        layers.append(layer)
        servers.append(CoapServer(transport, bind, port, reactor, label=label,
                                  ready=directory_service.when_ready, reuse_port=reuse_port))

    services = [directory_service, *(res for res in extra.values() if IService.providedBy(res))]
    return GatewayParts(pipeline, dispatcher, layers, servers, services, directory_service,
                        policy, transports[1][0].engine if config.coaps.enabled else None)


def _dtls_transport(config, directory, clock):
    from sense_gateway.coap.dtls import DTLSServer

    coaps = config.coaps
    engine = DTLSServer(directory.psk_for, clock, max_sessions=coaps.max_sessions,
                        handshake_timeout=coaps.handshake_timeout,
                        idle_timeout=coaps.idle_timeout,
                        handshakes_per_source=coaps.handshakes_per_source,
                        identity_hint=coaps.identity_hint.encode() or None,
                        handshakes_in_progress_per_source=coaps.handshakes_in_progress_per_source,
                        max_sessions_per_identity=coaps.max_sessions_per_identity)
    # A revoked or rotated key ends the sessions made with the old one.
    directory.on_key_withdrawn = engine.end_sessions
    return DTLSTransport(engine)
