"""Operating a fleet, end to end against real processes: three devices
report every second to a ``twistd`` gateway (role all); one stops, and
within the configured time it is ``late``, then ``offline`` in
``/api/devices``, ``sense devices``, ``/metrics``, at the top of the
dashboard (headless Chromium reads it), and a real Prometheus scraping the
gateway with our rules fires ``SenseDeviceOffline`` for it; it comes back
``online`` when it sends again, and the alert ends.

Also the rules themselves: ``promtool check rules`` and ``promtool test
rules`` over etc/prometheus.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import orjson
from twisted.internet import defer, task, utils
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.servers import Prometheus
from tests.support import (BIN, GatewayProcess, RawCoapPeer, deferLater, metric_samples,
                           request_datagram)
from tests.test_dashboard import BrowserSession, output_directory

RULES = Path(__file__).resolve().parent.parent / "etc" / "prometheus"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"


class RuleFileTests(SynchronousTestCase):
    def promtool(self, *args) -> subprocess.CompletedProcess:
        if not Path(PROMTOOL).exists():
            raise RuntimeError("promtool is not installed (Debian package prometheus)")
        return subprocess.run([PROMTOOL, *args], cwd=RULES, capture_output=True, text=True,
                              timeout=120)

    def test_promtool_checks_the_rules(self):
        result = self.promtool("check", "rules", "sense-gateway.rules.yml")
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertIn("SUCCESS", result.stdout)

    def test_promtool_unit_tests_of_the_rules_pass(self):
        result = self.promtool("test", "rules", "sense-gateway.rules.test.yml")
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)


def scrape_config(gateway_url: str) -> str:
    host = gateway_url.split("//", 1)[1].rstrip("/")
    return f"""
global:
  scrape_interval: 1s
  evaluation_interval: 1s
rule_files:
  - {RULES / "sense-gateway.rules.yml"}
scrape_configs:
  - job_name: sense-gateway
    static_configs:
      - targets: ["{host}"]
"""


#: late after the default 2 intervals, offline after this many: the late
#: state lasts 13 intervals (13 s), long enough to be seen from a busy
#: machine, by a `sense devices` that takes seconds to start there too
OFFLINE_AFTER = 15
#: the configuration of the gateway and of every `sense devices` run: the
#: CLI judges liveness itself, so it must be given the same policy (with the
#: default one it called node-c offline 5 s into the gateway's late state)
SETTINGS = {"SENSE_PROCESSOR_POLL_INTERVAL": "0.1",
            "SENSE_DEVICES_OFFLINE_AFTER": str(OFFLINE_AFTER)}


def by_state(samples: dict, state: str) -> float | None:
    return samples.get(("sense_devices_by_state", (("state", state),)))


class FleetLivenessTests(TestCase):
    timeout = 180

    @defer.inlineCallbacks
    def setUp(self):
        self.gateway = GatewayProcess(self, "--role", "all", env=SETTINGS)
        yield self.gateway.wait_listening()
        self.base = yield self.gateway.web_url()
        self.peer = RawCoapPeer(self)
        self.sequences = {}
        #: when each device's last message left (time.monotonic())
        self.last_sent = {}

    def send(self, device: str) -> None:
        seq = self.sequences[device] = self.sequences.get(device, 0) + 1
        body = orjson.dumps({"id": device, "seq": seq, "data": {"t": 20.0 + seq / 10}})
        self.peer.send(request_datagram(payload=body, content_format=50, mid=(hash(device) + seq)
                                        & 0xFFFF, token=seq.to_bytes(4, "big")),
                       self.gateway.port)
        self.last_sent[device] = time.monotonic()

    def reporting(self, device: str) -> task.LoopingCall:
        call = task.LoopingCall(self.send, device)
        call.start(1.0)
        self.addCleanup(lambda: call.running and call.stop())
        return call

    @defer.inlineCallbacks
    def devices(self) -> dict:
        status, rows = yield self.gateway.get_json("/api/devices")
        self.assertEqual(status, 200)
        return rows

    @defer.inlineCallbacks
    def until(self, fetch, accept, what: str, timeout: float):
        """Call *fetch* (a Deferred) until *accept* takes its result; that
        result. A loaded machine delays the senders as well as the polls:
        a device may look late for one poll and not the next."""
        deadline = time.monotonic() + timeout
        while True:
            got = yield fetch()
            if accept(got):
                return got
            if time.monotonic() > deadline:
                raise AssertionError(f"never {what}: {got}")
            yield deferLater(0.1)

    def until_state(self, device: str, state: str, timeout: float = 20.0, others: str | None = None):
        """Poll /api/devices until *device* is in *state* (and every other
        device in *others*, if given); the rows then."""
        def accept(rows):
            return any(r["id"] == device and r["state"] == state for r in rows) and (
                others is None or all(r["state"] == others for r in rows if r["id"] != device))
        return self.until(self.devices, accept, f"{device} {state} (others {others})",
                          timeout)

    @defer.inlineCallbacks
    def sense_devices(self, *args):
        environment = {k: v for k, v in os.environ.items() if not k.startswith("SENSE_")}
        environment.update(SETTINGS)
        out, err, code = yield utils.getProcessOutputAndValue(
            str(BIN / "sense"), ["--data-dir", str(self.gateway.data_dir), "--plugins-dir",
                                 str(self.gateway.data_dir / "plugins"), "devices", *args],
            env=environment)
        self.assertEqual(code, 0, err)
        return out.decode()

    @defer.inlineCallbacks
    def metrics(self) -> dict:
        status, body = yield self.gateway.get("/metrics")
        return metric_samples(body)

    @staticmethod
    def alerts(prometheus) -> list[dict]:
        return [a for a in prometheus.api("alerts")["alerts"]
                if a["labels"]["alertname"] == "SenseDeviceOffline"]

    @defer.inlineCallbacks
    def until_alert(self, prometheus, state: str | None, timeout: float = 30.0):
        deadline = time.monotonic() + timeout
        while True:
            alerts = self.alerts(prometheus)
            states = {a["labels"]["device"]: a["state"] for a in alerts}
            if (states.get("node-c") == state) if state else not states:
                return alerts
            if time.monotonic() > deadline:
                raise AssertionError(f"SenseDeviceOffline for node-c never {state}: {alerts}")
            yield deferLater(0.25)

    @defer.inlineCallbacks
    def test_a_device_that_stops_is_late_then_offline_everywhere_then_back(self):
        prometheus = Prometheus(self, scrape_config(self.base))
        senders = {device: self.reporting(device) for device in ("node-a", "node-b", "node-c")}
        # Four messages each: three intervals, enough to learn one (1 s).
        for device in senders:
            yield self.until_state(device, "online")
        rows = yield self.devices()
        self.assertEqual({r["id"]: (r["interval_source"], round(r["interval"])) for r in rows},
                         {d: ("learned", 1) for d in senders})
        browser = BrowserSession(self, self.base + "?refresh=0.5",
                                 output_directory() / "dashboard-offline.png")

        senders["node-c"].stop()
        rows = yield self.until_state("node-c", "late", timeout=10)
        # Late after 2 intervals (1 s each), not yet offline after 15; the
        # row's own silence says so, whenever the poll came.
        [late] = [r for r in rows if r["id"] == "node-c"]
        self.assertEqual((late["interval_source"], round(late["interval"])), ("learned", 1))
        self.assertGreaterEqual(time.monotonic() - self.last_sent["node-c"], 2 * late["interval"])
        self.assertGreaterEqual(late["silent"], 2 * late["interval"])
        self.assertLess(late["silent"], OFFLINE_AFTER * late["interval"])
        table = yield self.sense_devices()
        self.assertRegex(table, r"(?m)^node-c\s+late\s+\d")
        rows = yield self.until_state("node-c", "offline", timeout=OFFLINE_AFTER + 15,
                                      others="online")
        [offline] = [r for r in rows if r["id"] == "node-c"]
        self.assertGreaterEqual(offline["silent"], OFFLINE_AFTER * offline["interval"])
        self.assertGreaterEqual(time.monotonic() - self.last_sent["node-c"],
                                OFFLINE_AFTER * offline["interval"])
        self.assertEqual([r["id"] for r in rows][0], "node-c", "offline devices come first")
        self.assertEqual({r["id"]: r["state"] for r in rows[1:]},
                         {"node-a": "online", "node-b": "online"})

        listed = orjson.loads((yield self.sense_devices("--json")))
        self.assertEqual((listed[0]["id"], listed[0]["state"]), ("node-c", "offline"))
        self.assertGreaterEqual(listed[0]["silent"], OFFLINE_AFTER * offline["interval"])
        table = yield self.sense_devices()
        self.assertRegex(table.splitlines()[1], r"^node-c\s+offline\s+\d+(\.\d)? s\s+1\.0 s\s")

        samples = yield self.until(
            self.metrics, lambda got: (by_state(got, "offline"), by_state(got, "online")) == (1, 2),
            "one device offline and two online in /metrics", timeout=10)
        self.assertIn(("sense_device_last_seen_timestamp_seconds",
                       (("device", "node-c"), ("state", "offline"))), samples)
        self.assertEqual(samples[("sense_device_series_omitted", ())], 0)

        seen = yield browser.look(states={"node-c": "offline"}, top="node-c")
        self.assertNotIn("error", seen, seen)
        top = seen["rows"][0]
        self.assertEqual((top["device"], top["className"]), ("node-c", "state-offline"))
        self.assertRegex(top["cells"][1], r"^offline, silent \d+ s$")
        self.assertEqual(seen["stats"]["offline"], "1")
        self.assertIn("offline", seen["highlighted"])

        firing = yield self.until_alert(prometheus, "firing")
        [alert] = [a for a in firing if a["labels"]["device"] == "node-c"]
        self.assertEqual(alert["annotations"]["summary"], "device node-c is offline")

        # Back: online at once, everywhere.
        senders["node-c"] = self.reporting("node-c")
        rows = yield self.until_state("node-c", "online", timeout=6, others="online")
        self.assertEqual({r["state"] for r in rows}, {"online"})
        samples = yield self.metrics()
        self.assertEqual(by_state(samples, "offline"), 0)
        seen = yield browser.look(states={"node-c": "online"})
        self.assertNotIn("error", seen, seen)
        self.assertEqual(seen["stats"]["offline"], "0")
        yield self.until_alert(prometheus, None)
        self.assertEqual(seen["console"], [])
        yield browser.close()
