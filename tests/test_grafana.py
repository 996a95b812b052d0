"""Grafana provisioning, proven without Grafana: the dashboards load as
dashboard models, every panel uses a provisioned data source, and every
query, with Grafana's macros expanded the way Grafana expands them, runs
against a real InfluxDB 1.x holding data written by our own v1 sink. So
does every query of the provisioned alert rules, whose reduce and
threshold steps are then applied as Grafana applies them."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml
from twisted.trial.unittest import SynchronousTestCase, TestCase

from sense_gateway.config import InfluxConfig
from sense_gateway.envelope import Envelope, Reading, new_envelope_id
from sense_gateway.processor import BatchProcessor
from sense_gateway.registry.sqlite import SQLiteRegistry
from sense_gateway.sinks.influxdb import InfluxSink
from tests.servers import InfluxDB1

GRAFANA = Path(__file__).resolve().parent.parent / "etc" / "grafana"
DASHBOARDS = {p.stem: json.loads(p.read_text()) for p in (GRAFANA / "dashboards").glob("*.json")}
ALERTING = GRAFANA / "provisioning" / "alerting" / "sense.yaml"
T0 = 1764300000


def datasources() -> dict:
    document = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "sense.yaml").read_text())
    return {d["uid"]: d for d in document["datasources"]}


def targets(dashboard):
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            yield panel, target


class DashboardModelTests(SynchronousTestCase):
    def test_both_dashboards_are_provisioned(self):
        provider = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "sense.yaml").read_text())
        self.assertEqual(provider["providers"][0]["options"]["path"], "etc/grafana/dashboards")
        self.assertEqual(sorted(d["title"] for d in DASHBOARDS.values()),
                         ["SENSE devices", "SENSE link quality"])

    def test_data_sources_for_influxql_1x_2x_and_flux(self):
        sources = datasources()
        self.assertEqual(sorted(sources), ["sense-flux", "sense-influxql", "sense-influxql-v2"])
        self.assertEqual(sources["sense-flux"]["jsonData"]["version"], "Flux")

    def test_every_panel_and_variable_uses_a_provisioned_source(self):
        uids = set(datasources())
        for dashboard in DASHBOARDS.values():
            used = [p["datasource"]["uid"] for p in dashboard["panels"]]
            used += [t["datasource"]["uid"] for _, t in targets(dashboard)]
            used += [v["datasource"]["uid"] for v in dashboard["templating"]["list"]]
            self.assertTrue(set(used) <= uids, (dashboard["title"], used))

    def test_dashboard_models(self):
        for dashboard in DASHBOARDS.values():
            self.assertGreaterEqual(dashboard["schemaVersion"], 36)
            self.assertTrue(dashboard["uid"] and dashboard["title"])
            ids = [p["id"] for p in dashboard["panels"]]
            self.assertEqual(len(ids), len(set(ids)), dashboard["title"])
            cells = set()
            for panel in dashboard["panels"]:
                g = panel["gridPos"]
                self.assertLessEqual(g["x"] + g["w"], 24, panel["title"])
                area = {(x, y) for x in range(g["x"], g["x"] + g["w"])
                        for y in range(g["y"], g["y"] + g["h"])}
                self.assertFalse(cells & area, f"{panel['title']} overlaps another panel")
                cells |= area


def regex_escape(value: str) -> str:
    """Grafana's escaping of a variable value inside a regex."""
    return re.sub(r"([\\/^$.|?*+()\[\]{}])", r"\\\1", value)


def expand(query: str, variables: dict[str, list[str]], start_ms: int, end_ms: int,
           interval: str = "1m") -> str:
    """Expand macros and variables as Grafana does for InfluxQL."""
    query = query.replace("$timeFilter", f"time >= {start_ms}ms and time <= {end_ms}ms")
    query = query.replace("$__interval", interval)
    for name, values in variables.items():
        query = query.replace("${%s}" % name, values[0])
        # Inside /.../ Grafana writes a multi-value variable as (a|b).
        query = re.sub(rf"/\^\${name}\$/",
                       "/^(" + "|".join(regex_escape(v) for v in values) + ")$/", query)
        query = query.replace(f"${name}", values[0])
    return query


class DashboardQueryTests(TestCase):
    def setUp(self):
        self.db = InfluxDB1(self)
        registry = SQLiteRegistry(Path(self.mktemp()).resolve() / "registry.sqlite3")
        sink = InfluxSink(InfluxConfig(url=self.db.url, api="v1", database="sense", retries=0))
        self.now = T0 + 600
        self.processor = processor = BatchProcessor(registry, [sink], clock=lambda: self.now)
        self.addCleanup(processor.close)

        def envelope(device, seq, minute, **fields):
            ts = T0 + minute * 60
            units = {"temperature": "Cel"} if "temperature" in fields else None
            return Envelope(new_envelope_id(), device, seq, ts, "x", "coap", None, "/data", 50,
                            [Reading(fields, ts, units=units)])
        self.envelope = envelope
        # node-1: temperature and humidity, seq 1..3 then 8 (4 lost);
        # node-2: temperature only, one reset.
        processor.process_batch([
            envelope("node-1", 1, 0, temperature=20.0, humidity=40), envelope("node-1", 2, 1, temperature=21.0, humidity=41),
            envelope("node-1", 3, 2, temperature=22.0, humidity=42), envelope("node-1", 8, 3, temperature=23.0, humidity=43),
            envelope("node-2", 500, 0, temperature=18.0), envelope("node-2", 0, 1, temperature=18.5),
        ])
        self.window = ((T0 - 3600) * 1000, (T0 + 3600) * 1000)
        self.devices = self.variable("sense-devices", "device")
        self.fields = self.variable("sense-devices", "field")

    def source_headers(self) -> dict[str, str]:
        """The headers Grafana adds for the dashboards' data source (with no
        token set, as against an InfluxDB 1.x without authentication)."""
        source = datasources()["sense-influxql"]
        return {source["jsonData"]["httpHeaderName1"]:
                source["secureJsonData"]["httpHeaderValue1"].replace("${SENSE_INFLUXDB_TOKEN}", "")}

    def variable(self, dashboard, name) -> list[str]:
        [var] = [v for v in DASHBOARDS[dashboard]["templating"]["list"] if v["name"] == name]
        rows = self.db.query(var["query"], self.source_headers())["results"][0]["series"][0]["values"]
        values = [row[-1] if name == "device" else row[0] for row in rows]
        if var.get("regex"):
            # Grafana keeps the values its regex (JavaScript, /.../) matches.
            pattern = re.compile(var["regex"].strip("/"))
            values = [v for v in values if pattern.search(v)]
        return values

    def run_target(self, dashboard, title, **values) -> list[dict]:
        [target] = [t for p, t in targets(DASHBOARDS[dashboard])
                    if p["title"] == title and t["refId"] == "A"]
        query = expand(target["query"], {"device": self.devices, **values}, *self.window)
        result = self.db.query(query, self.source_headers())["results"][0]
        self.assertNotIn("error", result, query)
        return result.get("series", [])

    def test_variables_list_devices_and_fields(self):
        self.assertEqual(self.devices, ["node-1", "node-2"])
        self.assertEqual(self.fields, ["humidity", "temperature"])
        self.assertEqual(self.variable("sense-link-quality", "device"), ["node-1", "node-2"])

    def test_one_time_series_per_field_and_device(self):
        series = self.run_target("sense-devices", "$field", field=["temperature"])
        values = {s["tags"]["device"]: [v[1] for v in s["values"] if v[1] is not None] for s in series}
        self.assertEqual(values, {"node-1": [20.0, 21.0, 22.0, 23.0], "node-2": [18.0, 18.5]})
        series = self.run_target("sense-devices", "$field", field=["humidity"])
        self.assertEqual([s["tags"]["device"] for s in series if any(v[1] for v in s["values"])],
                         ["node-1"])

    def test_last_value_stat(self):
        series = self.run_target("sense-devices", "Last $field", field=["temperature"])
        self.assertEqual({s["tags"]["device"]: s["values"][0][1] for s in series},
                         {"node-1": 23.0, "node-2": 18.5})

    def test_device_table_with_last_seen(self):
        series = self.run_target("sense-devices", "Devices")
        rows = {s["tags"]["device"]: dict(zip(s["columns"], s["values"][0])) for s in series}
        self.assertEqual((rows["node-1"]["received"], rows["node-1"]["lost"]), (4, 4))
        self.assertEqual(rows["node-2"]["resets"], 1)
        self.assertEqual(rows["node-1"]["time"], (T0 + 600) * 1000)

    def test_link_quality_counters(self):
        expected = {"Received per device": {"node-1": 4, "node-2": 2},
                    "Lost per device": {"node-1": 4, "node-2": 0},
                    "Duplicates per device": {"node-1": 0, "node-2": 0},
                    "Resets per device": {"node-1": 0, "node-2": 1}}
        for title, counts in expected.items():
            series = self.run_target("sense-link-quality", title)
            last = {s["tags"]["device"]: [v[1] for v in s["values"] if v[1] is not None][-1]
                    for s in series}
            self.assertEqual(last, counts, title)

    def test_loss_rate(self):
        series = self.run_target("sense-link-quality", "Loss rate")
        last = {s["tags"]["device"]: [v[1] for v in s["values"] if v[1] is not None][-1]
                for s in series}
        self.assertEqual(last, {"node-1": 50.0, "node-2": 0.0})

    def test_one_device_selected(self):
        self.devices = ["node-2"]
        series = self.run_target("sense-devices", "$field", field=["temperature"])
        self.assertEqual([s["tags"]["device"] for s in series], ["node-2"])

    def test_units_are_queryable_and_the_panels_read_them(self):
        rows = self.db.rows('SELECT last("temperature_unit") FROM "sense" WHERE "device" = \'node-1\'')
        self.assertEqual(rows[0]["last"], "Cel")
        for title in ("$field", "Last $field"):
            [panel] = [p for p in DASHBOARDS["sense-devices"]["panels"] if p["title"] == title]
            [unit_target] = [t for t in panel["targets"] if t["refId"] == "B"]
            self.assertEqual(panel["transformations"][0]["options"]["configRefId"], "B")
            query = expand(unit_target["query"], {"device": self.devices, "field": ["temperature"]},
                           *self.window)
            result = self.db.query(query, self.source_headers())["results"][0]
            self.assertEqual(result["series"][0]["values"][0][1], "Cel", query)

    def test_device_table_shows_liveness(self):
        series = self.run_target("sense-devices", "Devices")
        rows = {s["tags"]["device"]: dict(zip(s["columns"], s["values"][0])) for s in series}
        # node-1's four messages a minute apart, the last at T0 + 180: at
        # T0 + 600 it is seven intervals silent.
        self.assertEqual((rows["node-1"]["state"], rows["node-1"]["silent"],
                          rows["node-1"]["interval"]), ("offline", 420, 60))
        self.assertEqual(rows["node-2"]["state"], "new")


def alert_rules() -> dict:
    document = yaml.safe_load(ALERTING.read_text())
    return {rule["uid"]: rule for group in document["groups"] for rule in group["rules"]}


class AlertRuleModelTests(SynchronousTestCase):
    def test_rules_query_the_provisioned_source_and_end_in_a_threshold(self):
        uids = set(datasources())
        rules = alert_rules()
        self.assertEqual(sorted(rules), ["sense-device-loss", "sense-device-offline",
                                         "sense-no-data"])
        for uid, rule in rules.items():
            steps = {step["refId"]: step for step in rule["data"]}
            self.assertEqual(steps["A"]["datasourceUid"] in uids, True, uid)
            self.assertEqual(steps[rule["condition"]]["model"]["type"], "threshold", uid)
            self.assertEqual(steps["B"]["model"]["expression"], "A", uid)


class AlertQueryTests(DashboardQueryTests):
    """Each alert rule as Grafana evaluates it at *now*: query A over its
    relative time range against influxd, B the last value of each series,
    C the threshold. Returns the firing series: {device: value}."""

    def evaluate(self, uid: str, now: float) -> dict:
        rule = alert_rules()[uid]
        steps = {step["refId"]: step for step in rule["data"]}
        span = steps["A"]["relativeTimeRange"]
        query = expand(steps["A"]["model"]["query"], {},
                       int((now - span["from"]) * 1000), int((now - span["to"]) * 1000))
        result = self.db.query(query, self.source_headers())["results"][0]
        self.assertNotIn("error", result, query)
        if not result.get("series"):
            return {None: "no data"} if rule["noDataState"] == "Alerting" else {}
        [condition] = steps["C"]["model"]["conditions"]
        kind, [limit] = condition["evaluator"]["type"], condition["evaluator"]["params"]
        firing = {}
        for series in result["series"]:
            values = [row[1] for row in series["values"] if row[1] is not None]
            if not values:
                continue
            value = values[-1]
            if (value > limit) if kind == "gt" else (value < limit):
                firing[series.get("tags", {}).get("device")] = value
        return firing

    def test_offline_fires_for_the_silent_device_and_ends_when_it_sends(self):
        self.assertEqual(self.evaluate("sense-device-offline", T0 + 600), {"node-1": 7.0})
        self.now = T0 + 620
        results = self.processor.process_batch([self.envelope("node-1", 9, 620 / 60,
                                                              temperature=24.0)])
        self.assertEqual([r.outcome.value for r in results], ["written"])
        self.assertEqual(self.evaluate("sense-device-offline", T0 + 620), {})
        # Silent again: only the processor's sweep can say so.
        self.now = T0 + 1000
        self.assertEqual(self.processor.sweep(), 1)
        self.assertEqual(self.evaluate("sense-device-offline", T0 + 1000), {"node-1": 380 / 60})

    def test_loss_fires_for_a_device_losing_messages_in_the_hour(self):
        self.now = T0 + 700
        self.processor.process_batch([self.envelope("node-3", 1, 11, t=1.0)])
        self.now = T0 + 760
        self.processor.process_batch([self.envelope("node-3", 2, 12, t=1.0),
                                      self.envelope("node-3", 9, 12.5, t=1.0)])
        # node-3: 2 more received, 6 lost since the hour's first point;
        # node-1 and node-2 wrote one point each, which says nothing of a rate.
        self.assertEqual(self.evaluate("sense-device-loss", T0 + 760), {"node-3": 75.0})

    def test_no_data_fires_when_nothing_is_written(self):
        self.assertEqual(self.evaluate("sense-no-data", T0 + 600), {})
        self.assertEqual(self.evaluate("sense-no-data", T0 + 7200), {None: "no data"})
