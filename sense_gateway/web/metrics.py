"""What ``/metrics`` serves: the gateway's counters as Prometheus metric
families, from the same statistics ``/api/stats`` serves."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from twisted.internet import defer

from sense_gateway.errors import failure_text
from sense_gateway.pipeline import cumulative_buckets
from sense_gateway.web.api import AsyncResource


#: the message layers' counters as /metrics names them (``_total`` added)
COAP_COUNTERS = {
    "requests": "CoAP requests received (retransmissions not counted)",
    "retransmissions": "Retransmitted CoAP requests recognised, answered again, not stored again",
    "malformed": "Datagrams that are not acceptable CoAP messages",
}


def _coap_metrics(sources, labels: list[str]):
    """The CoAP side's families, one series per source: *sources* are
    (label values, statistics with ``coap`` and ``security``)."""
    responses = CounterMetricFamily("sense_coap_responses", "CoAP responses sent, by code",
                                    labels=[*labels, "code"])
    for values, stats in sources:
        for code, count in stats.get("coap", {}).get("responses", {}).items():
            responses.add_metric([*values, code], count)
    yield responses
    for name, documentation in COAP_COUNTERS.items():
        counted = [(values, stats["coap"][name]) for values, stats in sources
                   if name in stats.get("coap", {})]
        if counted:
            counter = CounterMetricFamily(f"sense_coap_{name}", documentation, labels=labels)
            for values, count in counted:
                counter.add_metric(values, count)
            yield counter
    secured = [(values, stats["security"]) for values, stats in sources if "security" in stats]
    if secured:
        yield from _security_metrics(secured, labels)


def _security_metrics(sources, labels: list[str]):
    refused = CounterMetricFamily("sense_refused_requests", "Requests refused before storing, "
                                  "by reason (rate limit, identity, plain CoAP policy, device "
                                  "limits)", labels=[*labels, "reason"])
    for values, security in sources:
        for reason, count in sorted(security.get("refused", {}).items()):
            refused.add_metric([*values, reason], count)
    yield refused
    dtls = [(values, security["dtls"]) for values, security in sources if "dtls" in security]
    if not dtls:
        return
    for name, documentation in (("sessions", "Established DTLS sessions"),
                                ("handshakes", "DTLS handshakes in progress")):
        gauge = GaugeMetricFamily(f"sense_dtls_{name}", documentation, labels=labels)
        for values, counters in dtls:
            if name in counters:  # a gone worker has no sessions to tell of
                gauge.add_metric(values, counters[name])
        yield gauge
    handshakes = CounterMetricFamily("sense_dtls_handshakes_refused", "DTLS handshakes "
                                     "refused, by reason", labels=[*labels, "reason"])
    events = CounterMetricFamily("sense_dtls_events", "DTLS engine events (handshakes "
                                 "started and completed, cookies sent, sessions ended...)",
                                 labels=[*labels, "event"])
    for values, counters in dtls:
        for key, count in sorted(counters.items()):
            if key.startswith("refused_"):
                handshakes.add_metric([*values, key[len("refused_"):]], count)
            elif key not in ("sessions", "handshakes"):
                events.add_metric([*values, key], count)
    yield handshakes
    yield events


def _latency_metrics(by_worker: dict):
    """The workers' enqueue latency histograms, labelled by worker."""
    family = None
    for index, report in by_worker.items():
        latency = report.get("latency")
        if latency is None:
            continue
        if family is None:
            family = HistogramMetricFamily(
                "sense_enqueue_latency_seconds", "Time from a request's arrival to its "
                "envelope being stored", labels=["worker"])
        family.add_metric([index], cumulative_buckets(latency["bounds"], latency["counts"]),
                          latency["sum"])
    if family is not None:
        yield family


class StatsCollector:
    """A prometheus_client collector over one snapshot of the statistics."""

    def __init__(self, stats, gateway):
        self.stats, self.gateway = stats, gateway

    def collect(self):
        by_worker = self.stats.get("workers", {}).get("counters")
        if by_worker is not None:
            # The master: each worker's counters, labelled (sum them with
            # ``sum without (worker)``); its own CoAP side is none.
            yield from _coap_metrics([([i], c) for i, c in by_worker.items()], ["worker"])
            yield from _latency_metrics(by_worker)
        else:
            yield from _coap_metrics([([], self.stats)], [])
        pipeline = getattr(self.gateway, "pipeline", None)
        if pipeline is not None:
            yield from pipeline.enqueue_latency.collect()
        outcomes = CounterMetricFamily("sense_processed_messages",
                                       "Messages processed, by outcome", labels=["outcome"])
        for outcome, count in self.stats.get("processor", {}).items():
            outcomes.add_metric([outcome], count)
        yield outcomes
        if "processor" in self.stats:
            sink_failures = CounterMetricFamily("sense_sink_write_failures",
                                                "Messages whose sink write failed")
            sink_failures.add_metric([], self.stats["processor"].get("failed", 0))
            yield sink_failures
        if "workers" in self.stats:
            running = GaugeMetricFamily("sense_workers_running",
                                        "Ingest workers running (of --workers)")
            running.add_metric([], self.stats["workers"]["running"])
            yield running
            starts = CounterMetricFamily("sense_worker_starts",
                                         "Times each ingest worker was started", labels=["worker"])
            for index, count in self.stats["workers"]["starts"].items():
                starts.add_metric([index], count)
            yield starts
        if "queue" in self.stats:  # (not when it could not be read: see below)
            depth = GaugeMetricFamily("sense_queue_messages", "Messages in the queue",
                                      labels=["state"])
            for state, count in self.stats["queue"].items():
                depth.add_metric([state], count)
            yield depth
            dead = GaugeMetricFamily("sense_dead_letters", "Messages in the dead letters")
            dead.add_metric([], self.stats["queue"].get("dead", 0))
            yield dead
        unavailable = GaugeMetricFamily(
            "sense_stats_unavailable", "1 for each part of the gateway's state this scrape "
            "could not read (its metrics are left out; /healthz says why)", labels=["part"])
        for part in sorted(self.stats.get("unavailable", {})):
            unavailable.add_metric([part], 1)
        yield unavailable
        max_depth = self.stats.get("backlog", {}).get("max_depth")
        if max_depth is not None:
            bound = GaugeMetricFamily("sense_queue_max_depth",
                                      "Messages the queue takes at most (queue.max_depth)")
            bound.add_metric([], max_depth)
            yield bound
        if "queue_refusals" in self.stats:
            refusals = CounterMetricFamily("sense_queue_refusals",
                                           "Puts the queue refused, by reason", labels=["reason"])
            for reason, count in self.stats["queue_refusals"].items():
                refusals.add_metric([reason], count)
            yield refusals
        worker = getattr(self.gateway, "worker", None)
        if worker is not None:
            processing = [([], worker.state())]
            labels = []
        else:  # the master: each worker's processor, labelled
            processing = [([i], r["processing"]) for i, r in (by_worker or {}).items()
                          if "processing" in r]
            labels = ["worker"]
        if processing:
            settle = CounterMetricFamily("sense_settle_failures", "Deletes, releases and "
                                         "dead letters the queue failed", labels=labels)
            running = GaugeMetricFamily("sense_processor_running", "1 while the processor "
                                        "processes all of its queue, 0 while it waits "
                                        "(/healthz says why)", labels=labels)
            for values, state in processing:
                settle.add_metric(values, state.get("settle_failures", 0))
                if "running" in state:  # a gone worker's processor runs nowhere
                    running.add_metric(values, state["running"])
            yield settle
            yield running
        if "devices" in self.stats:
            devices = GaugeMetricFamily("sense_devices", "Devices in the registry")
            devices.add_metric([], self.stats["devices"])
            yield devices




class FleetCollector:
    """The devices' liveness, from one read of the registry.

    ``sense_devices_by_state{state}`` counts every device.
    ``sense_device_last_seen_timestamp_seconds{device, state}`` lists at
    most *limit* devices (``devices.metrics_limit``): every offline and
    late one first, silent longest first, then the others by id, so the
    set changes only when a device changes state, not at every message.
    With 10,000 devices, 30 of them offline, and the default limit of
    1,000: 1,000 series (the 30 and 970 others), ``sense_device_series_omitted``
    9,000; an alert on the state label sees every silent device until
    more than 1,000 are silent at once. The registry counters summed over
    every device give the fleet's loss rate.
    """

    def __init__(self, records, now: float, policy, limit: int):
        self.records, self.now, self.policy, self.limit = records, now, policy, limit

    def collect(self):
        from sense_gateway.liveness import DeviceState, fleet_order

        judged = fleet_order(self.records, self.now, self.policy)
        by_state = GaugeMetricFamily("sense_devices_by_state", "Devices in each liveness state "
                                     "(online, late, offline, new)", labels=["state"])
        counts = {state: 0 for state in DeviceState}
        for _, liveness in judged:
            counts[liveness.state] += 1
        for state, count in counts.items():
            by_state.add_metric([state.value], count)
        yield by_state
        last_seen = GaugeMetricFamily(
            "sense_device_last_seen_timestamp_seconds", "When a device's last message arrived "
            "(epoch seconds), with its state; offline and late devices first, at most "
            "devices.metrics_limit devices", labels=["device", "state"])
        for record, liveness in judged[:self.limit]:
            last_seen.add_metric([record.id, liveness.state.value], record.last_seen)
        yield last_seen
        omitted = GaugeMetricFamily("sense_device_series_omitted", "Devices left out of "
                                    "sense_device_last_seen_timestamp_seconds by devices.metrics_limit")
        omitted.add_metric([], max(0, len(judged) - self.limit))
        yield omitted
        for name, documentation in (("received", "Messages the devices sent, as the registry "
                                     "counts them, summed over every device"),
                                    ("lost", "Messages the devices' sequence numbers show as "
                                     "lost, summed over every device")):
            total = CounterMetricFamily(f"sense_device_messages_{name}", documentation)
            total.add_metric([], sum(getattr(r.state.counters, name) for r in self.records))
            yield total


class MetricsResource(AsyncResource):
    """``/metrics``: the statistics, and the fleet when the registry is read here."""

    @defer.inlineCallbacks
    def respond(self, request):
        web = self.web
        stats = yield web.stats()
        registry = CollectorRegistry(auto_describe=False)
        registry.register(StatsCollector(stats, web.gateway))
        if web.backends is not None:
            try:
                records = yield web.in_thread(web.backends.devices)
            except Exception as e:
                stats.setdefault("unavailable", {})["fleet"] = failure_text(e)
            else:
                registry.register(FleetCollector(records, web.reactor.seconds(), web.policy,
                                                 web.metrics_limit))
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode())
        return generate_latest(registry)
