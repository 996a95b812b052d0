"""The gateway's own HTTP side: the dashboard, a read-only JSON API,
health and metrics.

Served by Twisted web on ``web.port`` (8080), bound to ``web.bind``
(127.0.0.1 unless configured). Role ``gateway`` has no registry or store
to read, so it serves only ``/healthz`` (the queue) and ``/metrics``;
roles ``all`` and ``processor`` serve everything:

- ``/``: the dashboard (``static/``): devices and live charts, drawn with
  uPlot, which npm installs at set-up time (``web.node_modules``);
- ``/api/devices``, ``/api/readings``, ``/api/series``: the registry
  with each device's liveness, and the embedded store's readings, as
  JSON or CSV (``sense_gateway/web/api.py``);
- ``/api/stats``: CoAP responses by code, processor outcomes, queue depth,
  the backlog against ``queue.max_depth`` and the queue's refusals;
- ``/healthz``: 200 when the queue takes puts (not full, its disk
  writing), the processor runs (started, no sink or registry
  unavailable) and the registry and every sink answer; 503 naming each
  part that does not, and why;
- ``/metrics``: Prometheus text format (``sense_gateway/web/metrics.py``).

Everything that touches SQLite, boto3 or HTTP runs on the web's own
thread, never on the reactor.
"""

from __future__ import annotations

from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from twisted.application.internet import TCPServer
from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from twisted.web import pages, resource, server, static

from sense_gateway.errors import Unavailable, code_text
from sense_gateway.liveness import LivenessPolicy
from sense_gateway.web.api import (AsyncResource as _Async, DevicesResource, ReadingsResource,
                                   SeriesResource, json_response as _json, parse_since)
from sense_gateway.web.metrics import FleetCollector, StatsCollector

__all__ = ["WebService", "make_web", "parse_since"]

log = Logger()

STATIC = Path(__file__).with_name("static")
#: what the dashboard needs from npm's uPlot package, by the name it is served under
UPLOT_FILES = {b"uPlot.iife.min.js": "uplot/dist/uPlot.iife.min.js",
               b"uPlot.min.css": "uplot/dist/uPlot.min.css"}
#: the page loads nothing from elsewhere: it works offline, and a device id
#: that smuggles markup could not load a script anyway
PAGE_POLICY = b"default-src 'self'; img-src 'self' data:; style-src 'self'; frame-ancestors 'none'"

class Backends:
    """The registry and store as the web reads them, opened on its thread."""

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


class _Page(static.File):
    """A static file of the dashboard, never cached stale, never framed."""

    def render_GET(self, request):
        request.setHeader(b"cache-control", b"no-cache")
        request.setHeader(b"content-security-policy", PAGE_POLICY)
        request.setHeader(b"x-content-type-options", b"nosniff")
        return super().render_GET(request)


class _Folder(resource.Resource):
    """A path segment with fixed children; anything else is a plain 404."""

    def getChild(self, path, request):
        return pages.notFound()


class _Missing(resource.Resource):
    isLeaf = True

    def __init__(self, what: str):
        super().__init__()
        self.what = what

    def render_GET(self, request):
        request.setResponseCode(404)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return f"{self.what} is not installed: run `make run` (npm ci) in the checkout\n".encode()


def find_node_modules(configured: str) -> Path | None:
    """The node_modules holding uPlot: *configured*, else the checkout's, else ./node_modules."""
    candidates = ([Path(configured)] if configured else
                  [Path(__file__).resolve().parents[2] / "node_modules", Path("node_modules")])
    for candidate in candidates:
        if (candidate / "uplot" / "dist").is_dir():
            return candidate
    return None


def vendor_resource(node_modules: Path | None) -> resource.Resource:
    """``/vendor/``: only the files of uPlot the page uses, from npm's install."""
    vendor = _Folder()
    for name, relative in UPLOT_FILES.items():
        path = node_modules / relative if node_modules is not None else None
        vendor.putChild(name, _Page(str(path)) if path is not None and path.is_file()
                        else _Missing("uPlot (npm package uplot)"))
    return vendor


class StatsResource(_Async):
    @defer.inlineCallbacks
    def respond(self, request):
        stats = yield self.web.stats()
        return _json(request, 200, stats)


class HealthResource(_Async):
    @defer.inlineCallbacks
    def respond(self, request):
        failing = yield self.web.health()
        if failing:
            return _json(request, 503, {"status": "failing", "failing": failing})
        return _json(request, 200, {"status": "ok"})


class MetricsResource(_Async):
    @defer.inlineCallbacks
    def respond(self, request):
        stats = yield self.web.stats()
        registry = CollectorRegistry(auto_describe=False)
        registry.register(StatsCollector(stats, self.web.gateway))
        if self.web.backends is not None:
            records = yield self.web.in_thread(self.web.backends.devices)
            registry.register(FleetCollector(records, self.web.reactor.seconds(),
                                             self.web.policy, self.web.metrics_limit))
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode())
        return generate_latest(registry)


def _directory_health(directory):
    """Fails while the device directory cannot be refreshed (or never was)."""
    if directory.failure is not None:
        raise RuntimeError(directory.failure)
    if not directory.directory.ready:
        raise RuntimeError("not loaded yet")
    return defer.succeed(None)


class WebService(MultiService):
    """The HTTP listener and the thread the web's reads run on."""

    def __init__(self, gateway, backends: Backends | None, bind: str, port: int, reactor,
                 node_modules: Path | None = None, policy: LivenessPolicy = LivenessPolicy(),
                 metrics_limit: int = 1000):
        super().__init__()
        self.gateway, self.backends, self.reactor = gateway, backends, reactor
        self.policy, self.metrics_limit = policy, metrics_limit
        self._pool: ThreadPool | None = None
        root = _Folder()
        root.putChild(b"healthz", HealthResource(self))
        root.putChild(b"metrics", MetricsResource(self))
        api = _Folder()
        root.putChild(b"api", api)
        api.putChild(b"stats", StatsResource(self))
        if backends is not None:
            self._add_readers(root, api, node_modules)
        self.site = server.Site(root)
        self.site.noisy = False
        self.listener = TCPServer(port, self.site, interface=bind, reactor=reactor)
        self.listener.setServiceParent(self)

    def _add_readers(self, root, api, node_modules):
        """The dashboard and the API, which read the registry and the store."""
        root.putChild(b"", _Page(str(STATIC / "index.html")))
        assets = _Folder()
        for name in ("dashboard.js", "dashboard.css"):
            assets.putChild(name.encode(), _Page(str(STATIC / name)))
        root.putChild(b"static", assets)
        root.putChild(b"vendor", vendor_resource(node_modules))
        api.putChild(b"devices", DevicesResource(self))
        api.putChild(b"readings", ReadingsResource(self))
        api.putChild(b"series", SeriesResource(self))

    @property
    def address(self):
        return self.listener._port.getHost()

    def in_thread(self, function, *args):
        return deferToThreadPool(self.reactor, self._pool, function, *args)

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
        if gateway.worker is not None:
            out["processor"] = {o.value: n for o, n in gateway.worker.counts.items()}
        out["queue"] = depth = yield gateway.queue.depth()
        # What the dashboard shows as the backlog, against its bound.
        out["backlog"] = {"waiting": depth.get("visible", 0) + depth.get("in_flight", 0),
                          "max_depth": getattr(gateway.queue, "max_depth", None)}
        supervisor = getattr(gateway, "supervisor", None)
        if supervisor is not None:
            out["workers"] = supervisor.state()
        refusals = getattr(gateway.queue, "refusals", None)
        if refusals is not None:
            out["queue_refusals"] = dict(refusals)
        if self.backends is not None:
            out["devices"] = yield self.in_thread(self.backends.count_devices)
        return out

    @defer.inlineCallbacks
    def health(self):
        failing = {}
        worker = self.gateway.worker
        if worker is not None and worker.problem is not None:
            failing["processor"] = worker.problem
        checks = [("queue", self.gateway.queue.check)]
        supervisor = getattr(self.gateway, "supervisor", None)
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
                # A queue that refuses says why in its own words.
                text = str(e) if isinstance(e, Unavailable) else f"{type(e).__name__}: {e}"
                failing[part] = text[:300]
        return failing

    def startService(self):
        self._pool = ThreadPool(1, 1, name="sense-web")
        self._pool.start()
        super().startService()
        address = self.address
        host = f"[{address.host}]" if ":" in address.host else address.host
        log.info("HTTP listening on http://{host}:{port}/", host=host, port=address.port)

    @defer.inlineCallbacks
    def stopService(self):
        yield super().stopService()
        if self.backends is not None:
            yield self.in_thread(self.backends.close)
        self._pool.stop()


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
