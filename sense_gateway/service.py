"""The gateway's service tree, built from configuration and plugins.

:func:`make_service` returns a ``MultiService`` whose children start in
order (queue, then extra resources and the CoAP listener, then the
processor, then the periodic statistics) and stop in reverse, so the
listener closes before the queue flushes its last commit. Role
``gateway`` leaves out the processor, ``processor`` the CoAP side.
"""

from __future__ import annotations

from dataclasses import dataclass

from twisted.application.internet import TimerService
from twisted.application.service import IService, MultiService, Service
from twisted.internet import defer
from twisted.logger import Logger
from txthings import resource as txresource

from sense_gateway.coap.protocol import CoapServer, GatewayProtocol
from sense_gateway.coap.resources import build_tree, walk
from sense_gateway.config import Config
from sense_gateway.backends import choose, named_factories, processor_factory
from sense_gateway.errors import PluginLoadError
from sense_gateway.pipeline import IngestPipeline
from sense_gateway.plugins import call_collecting, make_plugin_manager
from sense_gateway.web import make_web
from sense_gateway.worker import ProcessorService

log = Logger()


class GatewayService(MultiService):
    """The running gateway; tests and ``sense`` commands reach its parts here."""

    def __init__(self, config: Config, pm, queue):
        super().__init__()
        self.config = config
        self.plugin_manager = pm
        self.queue = queue
        self.pipeline = self.protocol = self.coap_server = self.worker = self.web = None

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
        for child in reversed(list(self)):
            try:
                yield defer.maybeDeferred(child.stopService)
            except Exception:
                log.failure("{service} did not stop cleanly", service=type(child).__name__)

    def add_gateway(self, parts: GatewayParts) -> None:
        self.pipeline, self.protocol, self.coap_server = parts.pipeline, parts.protocol, parts.coap_server
        for child in (*parts.services, self.coap_server):
            child.setServiceParent(self)

    def log_stats(self) -> None:
        try:
            if self.worker is not None:
                log.info("processor: {counts}",
                         counts={o.value: n for o, n in self.worker.counts.items()})
            protocol = self.protocol
            if protocol is None:
                return
            log.info(
                "coap: {responses} responses by code, {duplicates} retransmissions, "
                "{malformed} malformed, {exchanges} exchanges remembered",
                responses=dict(sorted((f"{c >> 5}.{c & 31:02d}", n)
                                      for c, n in protocol.responses.items())),
                duplicates=protocol.duplicates,
                malformed=protocol.malformed,
                exchanges=len(protocol.exchanges),
            )
        except Exception:
            # TimerService stops for good after one exception.
            log.failure("statistics failed")


def make_service(config: Config, reactor=None) -> GatewayService:
    if reactor is None:
        from twisted.internet import reactor
    pm = make_plugin_manager(config.disable_plugins, plugins_dir=config.plugins_dir)
    queue_factory = choose(named_factories(pm, "sense_register_queues", "queue backend"),
                           config.queue.backend, "queue.backend")
    processor = processor_factory(config, pm) if config.role in ("all", "processor") else None
    queue = queue_factory(config, reactor)
    service = GatewayService(config, pm, queue)
    queue.setServiceParent(service)
    if config.role in ("all", "gateway"):
        service.add_gateway(_make_gateway(config, pm, queue, reactor))
    if processor is not None:
        service.worker = ProcessorService(queue, processor, config, reactor)
        service.worker.setServiceParent(service)
    if config.web.enabled:
        service.web = make_web(service, config, pm, reactor)
        service.web.setServiceParent(service)
    stats = TimerService(config.stats_interval, service.log_stats)
    stats.clock = reactor
    stats.setServiceParent(service)
    return service


@dataclass
class GatewayParts:
    pipeline: IngestPipeline
    protocol: GatewayProtocol
    coap_server: CoapServer
    #: plugin resources that are services too (started before the listener)
    services: list


def _make_gateway(config, pm, queue, reactor) -> GatewayParts:
    """The CoAP side: formats and validators, resources, the listener."""
    formats = [fmt for _, group in call_collecting(pm, "sense_register_formats", config=config) for fmt in group]
    pipeline = IngestPipeline(formats, pm.hook.sense_validate, queue, config, clock=reactor)

    extra = {}
    for plugin, resources in call_collecting(pm, "sense_coap_resources", config=config,
                                             reactor=reactor):
        for path, res in resources.items():
            if path in extra:
                raise PluginLoadError(f"{pm.origin(plugin)}: CoAP resource {path} registered twice")
            extra[path] = res
    try:
        root = build_tree(pipeline, reactor, extra)
    except ValueError as e:
        raise PluginLoadError(str(e)) from None

    protocol = GatewayProtocol(
        txresource.Endpoint(root),
        clock=reactor,
        exchange_lifetime=config.coap.exchange_lifetime,
        max_exchanges=config.coap.dedup_entries,
        max_payload=config.coap.max_payload,
        fast_path=config.coap.fast_path,
    )
    protocol.observable_resources = [r for _, r in walk(root) if getattr(r, "observable", False)]
    coap_server = CoapServer(protocol, config.coap.bind, config.coap.port, reactor)

    services = [res for res in extra.values() if IService.providedBy(res)]
    return GatewayParts(pipeline, protocol, coap_server, services)
