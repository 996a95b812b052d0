"""Grafana provisioning, proven without Grafana: the dashboards load as
dashboard models, every panel uses a provisioned data source, and every
query, with Grafana's macros expanded the way Grafana expands them, runs
against a real InfluxDB 1.x holding data written by our own v1 sink."""

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
        processor = BatchProcessor(registry, [sink], clock=lambda: T0 + 600)
        self.addCleanup(processor.close)

        def envelope(device, seq, minute, **fields):
            ts = T0 + minute * 60
            return Envelope(new_envelope_id(), device, seq, ts, "x", "coap", None, "/data", 50,
                            [Reading(fields, ts)])
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
        return [row[-1] if name == "device" else row[0] for row in rows]

    def run_target(self, dashboard, title, **values) -> list[dict]:
        [target] = [t for p, t in targets(DASHBOARDS[dashboard]) if p["title"] == title]
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
