"""The HTTP side of a running ``--role all`` gateway: JSON API, /healthz
and /metrics, read with a real HTTP client."""

from __future__ import annotations

import orjson
from twisted.internet import defer
from twisted.trial.unittest import TestCase

from tests.servers import VictoriaMetrics
from tests.support import (coap_url, eventually, http_get, libcoap_request, metric_samples,
                           start_gateway, web_base)

NOW = 1764300000


class WebTests(TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        self.vm = VictoriaMetrics(self)
        self.gateway = yield start_gateway(self, role="all", **{
            **self.vm.settings("sqlite"), "influxdb.timeout": 2.0, "processor.poll_interval": 0.05,
            "store.retention_days": 36500.0})
        self.base = web_base(self.gateway)

    @defer.inlineCallbacks
    def get(self, path):
        response = yield http_get(self.base + path)
        return response.code, response.body

    @defer.inlineCallbacks
    def send_readings(self):
        url = coap_url("::1", self.gateway.port, "/data")
        for seq in (1, 2, 3):
            yield libcoap_request("post", url, orjson.dumps(
                {"id": "node-w", "seq": seq, "ts": NOW + seq, "data": {"temperature": 20 + seq}}), 50)
        yield libcoap_request("post", url, b'{"seq": 1, "data": {"t": 1}}', 50)
        yield eventually(lambda: self.gateway.worker.counts[_written()] == 3)

    @defer.inlineCallbacks
    def test_devices_and_readings(self):
        yield self.send_readings()
        code, body = yield self.get("/api/devices")
        self.assertEqual(code, 200)
        [device] = orjson.loads(body)
        self.assertEqual((device["id"], device["received"], device["last_seq"]), ("node-w", 3, 3))
        code, body = yield self.get(
            "/api/readings?device=node-w&field=temperature&since=2025-11-28T00:00:00Z")
        self.assertEqual(orjson.loads(body)["points"],
                         [[(NOW + s) * 1000, 20.0 + s] for s in (1, 2, 3)])
        code, body = yield self.get("/api/readings?device=node-w")
        self.assertEqual(code, 400)

    @defer.inlineCallbacks
    def test_metrics_count_the_requests_sent(self):
        yield self.send_readings()
        code, body = yield self.get("/metrics")
        self.assertEqual(code, 200)
        samples = metric_samples(body)
        self.assertEqual(samples[("sense_coap_responses_total", (("code", "2.04"),))], 3)
        self.assertEqual(samples[("sense_coap_responses_total", (("code", "4.00"),))], 1)
        self.assertEqual(samples[("sense_processed_messages_total", (("outcome", "written"),))], 3)
        self.assertEqual(samples[("sense_enqueue_latency_seconds_count", ())], 3)
        self.assertEqual(samples[("sense_devices", ())], 1)
        self.assertEqual(samples[("sense_dead_letters", ())], 0)

    @defer.inlineCallbacks
    def test_healthz_follows_the_sink_server(self):
        code, body = yield self.get("/healthz")
        self.assertEqual((code, orjson.loads(body)), (200, {"status": "ok"}))
        self.vm.stop()
        code, body = yield self.get("/healthz")
        self.assertEqual(code, 503)
        self.assertEqual(list(orjson.loads(body)["failing"]), ["sinks"])
        self.vm.start()
        code, _ = yield self.get("/healthz")
        self.assertEqual(code, 200)

    @defer.inlineCallbacks
    def test_series_gives_every_field_of_a_device(self):
        url = coap_url("::1", self.gateway.port, "/data")
        yield libcoap_request("post", url, orjson.dumps(
            {"id": "node-s", "seq": 1, "ts": NOW, "data": {"temperature": 20.5, "humidity": 40,
                                                          "state": "open"}}), 50)
        yield eventually(lambda: self.gateway.worker.counts[_written()] == 1)
        code, body = yield self.get("/api/series?device=node-s&since=2025-11-28T00:00:00Z")
        self.assertEqual(code, 200)
        # Text fields have no chart; the device's own counters are not readings.
        self.assertEqual(orjson.loads(body), {"device": "node-s", "fields": {
            "humidity": [[NOW * 1000, 40.0]], "temperature": [[NOW * 1000, 20.5]]},
            "units": {}, "symbols": {}})
        code, body = yield self.get("/api/series?since=-1h")
        self.assertEqual((code, orjson.loads(body)), (400, {"error": "device is required"}))

    @defer.inlineCallbacks
    def test_readings_as_csv_from_epoch_seconds_or_milliseconds(self):
        url = coap_url("::1", self.gateway.port, "/data")
        yield libcoap_request("post", url, orjson.dumps(
            [{"bn": "node-u:", "bt": NOW, "bu": "Cel", "n": "t", "v": 21.5},
             {"n": "t", "t": 60, "v": 22}, {"n": "label", "vs": "=cmd()"}]), 110)
        yield eventually(lambda: self.gateway.worker.counts[_written()] == 1)
        expected = ("time,device,field,value,unit\r\n"
                    "2025-11-28T03:20:00.000Z,node-u,t,21.5,Cel\r\n"
                    "2025-11-28T03:21:00.000Z,node-u,t,22.0,Cel\r\n")
        for since in (str(NOW), str(NOW * 1000), "2025-11-28T03:20:00Z"):
            code, body = yield self.get(f"/api/readings?device=node-u&field=t&since={since}"
                                        "&format=csv")
            self.assertEqual((code, body.decode()), (200, expected), since)
        # Accept: text/csv does the same; until bounds the window.
        response = yield http_get(self.base + f"/api/readings?device=node-u&field=t&since={NOW}"
                                  f"&until={NOW + 30}", headers={"Accept": "text/csv"})
        self.assertEqual(response.headers.getRawHeaders(b"content-type"),
                         [b"text/csv; charset=utf-8"])
        self.assertEqual(response.body.decode().count("\r\n"), 2)
        # Every field of the device, text too, a formula defused.
        code, body = yield self.get(f"/api/series?device=node-u&since={NOW}&format=csv")
        self.assertEqual(body.decode().splitlines()[1:], [
            "2025-11-28T03:20:00.000Z,node-u,t,21.5,Cel",
            "2025-11-28T03:21:00.000Z,node-u,t,22.0,Cel"])
        code, body = yield self.get(f"/api/readings?device=node-u&field=label&since={NOW}"
                                    "&format=csv")
        self.assertIn(",node-u,label,'=cmd(),", body.decode())
        code, body = yield self.get(f"/api/series?device=node-u&since={NOW}")
        document = orjson.loads(body)
        self.assertEqual((document["units"], document["symbols"]), ({"t": "Cel"}, {"t": "°C"}))
        code, body = yield self.get("/api/readings?device=node-u&field=t&since=yesterday")
        self.assertEqual((code, orjson.loads(body)["error"]),
                         (400, "since: -<n>[smhd], an ISO 8601 time, or epoch seconds or "
                               "milliseconds"))

    @defer.inlineCallbacks
    def test_readings_and_series_refuse_bad_arguments_alike(self):
        time_help = "-<n>[smhd], an ISO 8601 time, or epoch seconds or milliseconds"
        for path in ("/api/readings?device=d&field=f", "/api/series?device=d"):
            for query, error in (("&until=tomorrow", f"until: {time_help}"),
                                 ("&since=-5x", f"since: {time_help}"),
                                 ("&since=" + "9" * 400, f"since: {time_help}")):
                code, body = yield self.get(path + query)
                self.assertEqual((code, orjson.loads(body)), (400, {"error": error}), path + query)
        code, body = yield self.get("/api/readings?field=t")
        self.assertEqual((code, orjson.loads(body)), (400, {"error": "device and field are required"}))

    @defer.inlineCallbacks
    def test_dashboard_page_and_its_chart_library_are_served_locally(self):
        response = yield http_get(self.base + "/")
        page = response.body
        self.assertEqual(response.code, 200)
        self.assertIn(b"/vendor/uPlot.iife.min.js", page)
        self.assertEqual(response.headers.getRawHeaders(b"content-security-policy")[0].split(b";")[0],
                         b"default-src 'self'")
        code, library = yield self.get("/vendor/uPlot.iife.min.js")
        self.assertEqual(code, 200)
        self.assertIn(b"uPlot", library)
        code, _ = yield self.get("/vendor/")
        self.assertEqual(code, 404)  # no directory listing of node_modules

    def test_binds_to_localhost_by_default(self):
        self.assertEqual(self.gateway.web.address.host, "127.0.0.1")


class GatewayRoleTests(TestCase):
    """Role gateway (CoAP in, queue out) serves health and metrics only."""

    @defer.inlineCallbacks
    def test_healthz_and_metrics_but_no_dashboard(self):
        gateway = yield start_gateway(self, role="gateway")
        base = web_base(gateway)
        yield libcoap_request("post", coap_url("::1", gateway.port, "/data"),
                              orjson.dumps({"id": "g-1", "seq": 1, "data": {"t": 1}}), 50)

        def get(path):
            return http_get(base + path)
        response = yield get("/healthz")
        self.assertEqual((response.code, response.json()),
                         (200, {"status": "ok"}))
        response = yield get("/metrics")
        samples = metric_samples(response.body)
        self.assertEqual(samples[("sense_coap_responses_total", (("code", "2.04"),))], 1)
        self.assertEqual(samples[("sense_queue_messages", (("state", "visible"),))], 1)
        self.assertNotIn(("sense_devices", ()), samples)
        for path in ("/", "/api/devices"):
            response = yield get(path)
            self.assertEqual(response.code, 404, path)


class MissingChartLibraryTests(TestCase):
    """Without npm's install the page still loads and says what is missing."""

    @defer.inlineCallbacks
    def test_missing_uplot_is_a_404_naming_the_fix(self):
        gateway = yield start_gateway(self, role="all", **{"web.node_modules": self.mktemp()})
        response = yield http_get(web_base(gateway) + "/vendor/uPlot.iife.min.js")
        body = response.body
        self.assertEqual(response.code, 404)
        self.assertIn(b"npm", body)


def _written():
    from sense_gateway.processor import Outcome

    return Outcome.WRITTEN
