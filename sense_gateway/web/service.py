"""The web's service: the HTTP listener, the resource tree, the thread the
web's reads run on, and the statistics and health checks it serves."""

from __future__ import annotations

from pathlib import Path

from twisted.application.service import Service
from twisted.internet import defer
from twisted.logger import Logger
from twisted.web import server

from sense_gateway.errors import code_text, failure_text
from sense_gateway.liveness import LivenessPolicy
from sense_gateway.threads import BlockingThreads
from sense_gateway.web.api import (DevicesResource, Folder, HealthResource, ReadingsResource,
                                   SeriesResource, StatsResource)
from sense_gateway.web.metrics import MetricsResource
from sense_gateway.web.pages import add_dashboard, find_node_modules

__all__ = ["Backends", "WebService", "make_web"]

log = Logger()


class Backends:
    """The registry and store as the web reads them, opened on its thread
    when first needed."""

    def __init__(self, make_registry, make_store, make_sinks):
        self._make_registry, self._make_store, self._make_sinks = make_registry, make_store, make_sinks
        self.registry = self.store = self.sinks = None

    def _registry(self):
        if self.registry is None:
            self.registry = self._make_registry()
        return self.registry

    def _store(self):
        if self.store is None:
            self.store = self._make_store()
        return self.store

    def devices(self):
        return self._registry().devices()

    def count_devices(self):
        return self._registry().count()

    def readings(self, device, field, since_ns, until_ns=None):
        return self._store().query(device, field, since_ns, until_ns=until_ns, with_units=True)

    def series(self, device, since_ns, until_ns=None):
        return self._store().series(device, since_ns, until_ns=until_ns, with_units=True)

    def check_sinks(self):
        if self.sinks is None:
            self.sinks = self._make_sinks()
        for sink in self.sinks:
            sink.check()

    def close(self):
        for part in (self.registry, self.store, *(self.sinks or ())):
            if part is not None:
                part.close()


def _directory_health(directory):
    """Fails while the device directory cannot be refreshed (or never was)."""
    if directory.failure is not None:
        raise RuntimeError(directory.failure)
    if not directory.directory.ready:
        raise RuntimeError("not loaded yet")
    return defer.succeed(None)


class WebService(Service):
    """The HTTP listener and the thread the web's reads run on."""

    def __init__(self, gateway, backends: Backends | None, bind: str, port: int, reactor,
                 node_modules: Path | None = None, policy: LivenessPolicy = LivenessPolicy(),
                 metrics_limit: int = 1000):
        self.gateway, self.backends, self.reactor = gateway, backends, reactor
        self.bind, self.port_number = bind, port
        self.policy, self.metrics_limit = policy, metrics_limit
        self.threads = BlockingThreads("sense-web", reactor,
                                       close=backends.close if backends is not None else None)
        #: the listening port, while running
        self.port = None
        root = Folder()
        root.putChild(b"healthz", HealthResource(self))
        root.putChild(b"metrics", MetricsResource(self))
        api = Folder()
        root.putChild(b"api", api)
        api.putChild(b"stats", StatsResource(self))
        if backends is not None:
            # The dashboard and the API read the registry and the store.
            add_dashboard(root, node_modules)
            api.putChild(b"devices", DevicesResource(self))
            api.putChild(b"readings", ReadingsResource(self))
            api.putChild(b"series", SeriesResource(self))
        self.site = server.Site(root)
        self.site.noisy = False

    @property
    def address(self):
        return self.port.getHost()

    def in_thread(self, function, *args):
        return self.threads.run(function, *args)

    @defer.inlineCallbacks
    def stats(self):
        gateway = self.gateway
        out = {}
        coap = gateway.coap_counters()
        if coap is not None:
            out["coap"] = {**coap, "responses": {code_text(c): n
                                                 for c, n in coap["responses"].items()}}
        security = gateway.security_counters()
        if security is not None:
            out["security"] = security
        supervisor = getattr(gateway, "supervisor", None)
        if supervisor is not None:
            # The master: its workers' CoAP sides, summed as one gateway's.
            summed = supervisor.reports.summed()
            out.update((part, summed[part]) for part in ("coap", "security", "processor")
                       if part in summed)
        if gateway.worker is not None:
            out["processor"] = gateway.worker.outcomes()
        # A part that cannot be read (the queue's server down, a damaged
        # shard, the registry) is left out and named, not the whole answer:
        # /metrics matters most while something is down.
        unavailable = {}
        try:
            depth = yield gateway.queue.depth()
        except Exception as e:
            unavailable["queue"] = failure_text(e)
        else:
            out["queue"] = depth
            # What the dashboard shows as the backlog, against its bound.
            out["backlog"] = {"waiting": depth.get("visible", 0) + depth.get("in_flight", 0),
                              "max_depth": getattr(gateway.queue, "max_depth", None)}
        if supervisor is not None:
            out["workers"] = {**supervisor.state(), "counters": supervisor.reports.by_worker()}
        refusals = getattr(gateway.queue, "refusals", None)
        if refusals is not None:
            out["queue_refusals"] = dict(refusals)
        if self.backends is not None:
            try:
                out["devices"] = yield self.in_thread(self.backends.count_devices)
            except Exception as e:
                unavailable["devices"] = failure_text(e)
        if unavailable:
            out["unavailable"] = unavailable
        return out

    @defer.inlineCallbacks
    def health(self):
        failing = {}
        worker = self.gateway.worker
        if worker is not None and worker.problem is not None:
            failing["processor"] = worker.problem
        supervisor = getattr(self.gateway, "supervisor", None)
        if supervisor is not None:
            # The master: its workers' processors, as they last reported.
            problems = [f"worker {index}: {problem}" for index, report
                        in supervisor.reports.by_worker().items()
                        if (problem := report.get("processing", {}).get("problem"))]
            if problems:
                failing["processor"] = "; ".join(problems)
        checks = [("queue", self.gateway.queue.check)]
        if supervisor is not None:
            checks.append(("workers", supervisor.check))
        directory = self.gateway.directory
        if directory is not None:
            checks.append(("directory", lambda: _directory_health(directory)))
        if self.backends is not None:
            checks += [("registry", lambda: self.in_thread(self.backends.count_devices)),
                       ("sinks", lambda: self.in_thread(self.backends.check_sinks))]
        for part, check in checks:
            try:
                yield check()
            except Exception as e:
                failing[part] = failure_text(e)
        return failing

    def startService(self):
        self.threads.startService()
        self.port = self.reactor.listenTCP(self.port_number, self.site, interface=self.bind)
        super().startService()
        address = self.address
        host = f"[{address.host}]" if ":" in address.host else address.host
        log.info("HTTP listening on http://{host}:{port}/", host=host, port=address.port)

    @defer.inlineCallbacks
    def stopService(self):
        super().stopService()
        if self.port is not None:
            port, self.port = self.port, None
            yield port.stopListening()
        # Reads under way finish; then the backends close, on the thread.
        yield self.threads.stopService()


def make_web(gateway, config, pm, reactor) -> WebService:
    """The web service of *gateway*, reading the backends the configuration names."""
    from sense_gateway.backends import registry_factory, sink_factories
    from sense_gateway.sinks.sqlite import SQLiteStore

    if config.role == "gateway":
        return WebService(gateway, None, config.web.bind, config.web.port, reactor)
    registry = registry_factory(config, pm)
    sinks = sink_factories(config, pm)
    backends = Backends(lambda: registry(config),
                        lambda: SQLiteStore(config.store_path, config.store.retention_days),
                        lambda: [make(config) for make in sinks])
    node_modules = find_node_modules(config.web.node_modules)
    if node_modules is None:
        log.warn("uPlot not found (web.node_modules): the dashboard will show no charts; "
                 "`make run` installs it with npm")
    return WebService(gateway, backends, config.web.bind, config.web.port, reactor, node_modules,
                      LivenessPolicy.from_config(config), config.devices.metrics_limit)
