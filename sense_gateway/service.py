"""The gateway's service tree, built from configuration and plugins.

:func:`make_service` returns a ``MultiService`` whose children start in
order (queue, then extra resources, then the CoAP listener, then the
periodic statistics) and stop in reverse, so the listener closes before
the queue flushes its last commit.
"""

from __future__ import annotations

from twisted.application.internet import TimerService
from twisted.application.service import IService, MultiService
from twisted.logger import Logger
from txthings import resource as txresource

from sense_gateway.coap.protocol import CoapServer, GatewayProtocol
from sense_gateway.coap.resources import build_tree, walk
from sense_gateway.config import Config
from sense_gateway.errors import ConfigError, PluginLoadError
from sense_gateway.pipeline import IngestPipeline
from sense_gateway.plugins import call_collecting, make_plugin_manager

log = Logger()


class GatewayService(MultiService):
    """The running gateway; tests and ``sense`` commands reach its parts here."""

    def __init__(self, config: Config, pm, queue, pipeline, protocol, coap_server):
        super().__init__()
        self.config = config
        self.plugin_manager = pm
        self.queue = queue
        self.pipeline = pipeline
        self.protocol = protocol
        self.coap_server = coap_server

    def log_stats(self) -> None:
        try:
            protocol = self.protocol
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
    if config.role == "processor":
        raise ConfigError("role: 'processor' has no processor to run in this release; "
                          "use 'gateway' or 'all'")

    pm = make_plugin_manager(config.disable_plugins, plugins_dir=config.plugins_dir)

    queues = {}
    for plugin, factories in call_collecting(pm, "sense_register_queues"):
        for name, factory in factories.items():
            if name in queues:
                raise PluginLoadError(f"{pm.origin(plugin)}: queue backend {name!r} registered twice")
            queues[name] = factory
    if config.queue.backend not in queues:
        raise ConfigError(f"queue.backend: unknown backend {config.queue.backend!r}; "
                          f"available: {', '.join(sorted(queues))}")
    queue = queues[config.queue.backend](config, reactor)

    formats = [fmt for _, group in call_collecting(pm, "sense_register_formats", config=config) for fmt in group]
    pipeline = IngestPipeline(formats, pm.hook.sense_validate, queue, config)

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
    )
    protocol.observable_resources = [r for _, r in walk(root) if getattr(r, "observable", False)]
    coap_server = CoapServer(protocol, config.coap.bind, config.coap.port, reactor)

    service = GatewayService(config, pm, queue, pipeline, protocol, coap_server)
    queue.setServiceParent(service)
    for res in extra.values():
        if IService.providedBy(res):
            res.setServiceParent(service)
    coap_server.setServiceParent(service)
    stats = TimerService(config.stats_interval, service.log_stats)
    stats.clock = reactor
    stats.setServiceParent(service)
    return service
