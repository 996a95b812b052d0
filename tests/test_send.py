"""``sense send`` against a real ``twistd`` gateway: the README's Try-it
command fills the dashboard (headless Chromium reads it, units and CSV
links included), SenML's ``u: "Cel"`` shows as °C, CoAPS with keys from
``--make-keys``, and losses and reboots the registry counts."""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

import orjson
from twisted.internet import defer, utils
from twisted.trial.unittest import SynchronousTestCase, TestCase

from sense_gateway.send import read_keys
from tests.support import BIN, GatewayProcess, coap_url, eventually
from tests.test_dashboard import BrowserSession, output_directory

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_send_command() -> list[str]:
    """The ``sense send`` line of the README's Try-it section, as arguments."""
    section = README.read_text().split("## Try it", 1)[1].split("\n## ", 1)[0]
    [line] = [l for l in section.splitlines() if l.strip().startswith("$ .venv/bin/sense send")]
    return shlex.split(line.strip()[2:])[1:]  # without "$" and the program


class KeysFileTests(SynchronousTestCase):
    def test_keys_file_lines_and_comments(self):
        path = Path(self.mktemp())
        path.write_text("# id key\nnode-1 00112233445566778899aabbccddeeff\n\n"
                        "node-2 ffeeddccbbaa99887766554433221100  # spare\n")
        self.assertEqual([d for d, _ in read_keys(path)], ["node-1", "node-2"])
        self.assertEqual(read_keys(path)[0][1], bytes.fromhex("00112233445566778899aabbccddeeff"))
        path.write_text("node-1 xyz\n")
        self.assertRaises(SystemExit, read_keys, path)


class SendTests(TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def setUp(self):
        # As `make run` starts it: role all, the embedded backends.
        self.gateway = GatewayProcess(self, "--role", "all", env={
            "SENSE_PROCESSOR_POLL_INTERVAL": "0.1", "SENSE_SECURITY_REFRESH_INTERVAL": "0.2"})
        yield self.gateway.wait_listening()
        self.base = yield self.gateway.web_url()

    @defer.inlineCallbacks
    def sense(self, *args, expect: int = 0) -> str:
        environment = {k: v for k, v in os.environ.items() if not k.startswith("SENSE_")}
        out, err, code = yield utils.getProcessOutputAndValue(str(BIN / "sense"), args,
                                                              env=environment)
        self.assertEqual(code, expect, (out + err).decode()[-2000:])
        return out.decode()

    @defer.inlineCallbacks
    def written(self, count: int):
        def done():
            return self.stats.get("processor", {}).get("written", 0) >= count
        self.stats = {}
        while not done():
            _, self.stats = yield self.gateway.get_json("/api/stats")
            if not done():
                yield eventually(lambda: True, timeout=1)

    @defer.inlineCallbacks
    def test_readme_try_it_fills_the_dashboard_with_units_and_csv(self):
        url = coap_url("::1", self.gateway.port, "")
        command = readme_send_command()
        self.assertEqual(command[:1], ["send"])
        self.assertIn("--devices", command)
        out = yield self.sense(*command, url, "--count", "3")
        self.assertEqual(len(re.findall(r"(?m)^\S+  sim-\d  seq \d  json .*->  2\.04", out)), 9, out)
        self.assertIn("sent 9, acknowledged 9", out)
        out = yield self.sense("send", url, "--format", "senml", "--prefix", "senml-",
                               "--devices", "1", "--count", "2", "--interval", "200ms")
        self.assertIn("senml [{\"bn\":\"senml-1:\",\"n\":\"temperature\",\"u\":\"Cel\"", out)
        yield self.written(11)

        browser = BrowserSession(self, self.base + "?refresh=0.5",
                                 output_directory() / "dashboard-send.png")
        csv_link = "/api/readings?device=senml-1&field=temperature&since=-1h&format=csv"
        seen = yield browser.look(rows=4, charts=8, points=[["sim-1", "temperature", 3]],
                                  units=[["senml-1", "temperature", "°C"],
                                         ["sim-2", "humidity", "% RH"]], fetch=[csv_link])
        self.assertNotIn("error", seen, seen)
        self.assertEqual({r["device"] for r in seen["rows"]}, {"sim-1", "sim-2", "sim-3", "senml-1"})
        charts = {(c["device"], c["field"]): c for c in seen["charts"]}
        self.assertRegex(charts[("senml-1", "temperature")]["caption"],
                         r"^temperature \(°C\)CSV[\d.]+ °C latest$")
        # The chart's download link is the readings API's CSV, and the
        # same as asking with epoch seconds.
        self.assertIn({"device": "senml-1", "field": "temperature", "href": csv_link},
                      seen["downloads"])
        status, body = yield self.gateway.get(
            "/api/readings?device=senml-1&field=temperature&since=1764300000&format=csv")
        self.assertEqual(status, 200)
        [fetched] = seen["fetched"]
        self.assertEqual(fetched, body.decode())
        lines = fetched.splitlines()
        self.assertEqual(lines[0], "time,device,field,value,unit")
        self.assertEqual(len(lines), 3)
        self.assertTrue(all(line.endswith(",senml-1,temperature," + line.split(",")[3] + ",Cel")
                            for line in lines[1:]), lines)
        self.assertEqual(seen["console"], [])
        yield browser.close()

    @defer.inlineCallbacks
    def test_coaps_with_keys_made_for_the_simulated_devices(self):
        keys = Path(self.mktemp())
        out = yield self.sense("send", "--make-keys", str(keys), "--devices", "2", "--prefix",
                               "dtls-", "--data-dir", str(self.gateway.data_dir))
        self.assertIn("2 keys provisioned", out)
        self.assertEqual(oct(keys.stat().st_mode & 0o777), "0o600")
        # The gateway reloads credentials every 0.2 s here.
        yield eventually(lambda: True, timeout=1)
        url = f"coaps://[::1]:{self.gateway.coaps_port}"
        out = yield self.sense("send", url, "--keys", str(keys), "--devices", "2", "--count", "2",
                               "--format", "cbor", "--interval", "200ms")
        self.assertIn("sent 4, acknowledged 4", out)
        yield self.written(4)
        status, rows = yield self.gateway.get_json("/api/devices")
        self.assertEqual({r["id"]: r["received"] for r in rows}, {"dtls-1": 2, "dtls-2": 2})
        # A key it does not have: the handshake fails, and it says so.
        keys.write_text("dtls-1 " + "00" * 16 + "\n")
        out = yield self.sense("send", url, "--keys", str(keys), "--devices", "1", "--count", "1",
                               expect=1)

    @defer.inlineCallbacks
    def test_losses_and_reboots_are_what_the_registry_counts(self):
        url = coap_url("::1", self.gateway.port, "")
        out = yield self.sense("send", url, "--devices", "1", "--count", "30", "--interval",
                               "20ms", "--loss", "0.2", "--reboot", "0.1", "--seed", "7")
        summary = dict(re.findall(r"(lost on purpose|reboots|acknowledged) (\d+)", out))
        self.assertGreater(int(summary["lost on purpose"]), 0, out)
        self.assertGreater(int(summary["reboots"]), 0, out)
        yield self.written(int(summary["acknowledged"]))
        status, [row] = yield self.gateway.get_json("/api/devices")
        self.assertEqual(row["resets"], int(summary["reboots"]))
        # A loss just before a reboot, or at the very end, shows no gap.
        self.assertGreater(row["lost"], 0)
        self.assertLessEqual(row["lost"], int(summary["lost on purpose"]))
        self.assertEqual(orjson.loads(orjson.dumps(row))["received"], int(summary["acknowledged"]))
