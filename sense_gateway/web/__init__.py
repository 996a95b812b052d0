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

The package is split by concern: ``api`` (the resources: the JSON and
CSV API, ``/api/stats``, ``/healthz``, with one parser for the readings
endpoints' arguments), ``metrics`` (``/metrics``), ``pages`` (the
dashboard's files) and ``service`` (the listener, the resource tree, the
statistics and health checks). Everything that touches SQLite, boto3 or
HTTP runs on the web's own thread (a
:class:`~sense_gateway.threads.BlockingThreads`), never on the reactor.
"""

from sense_gateway.web.service import WebService, make_web

__all__ = ["WebService", "make_web"]
