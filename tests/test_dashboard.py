"""The built-in dashboard, looked at in a real browser: a ``--role all``
gateway (twistd) receives readings from ``coap-client-notls``, and headless
Chromium (driven by playwright-core) must show every device and a drawn
chart for each of its fields, then follow new readings without a reload.

The screenshot lands in ``screenshots/`` under the run's directory
(``_trial_temp`` for trial, pytest's temporary directory for pytest), or in
``$SENSE_TEST_OUTPUT`` when set; ``docs/img/dashboard.png`` is one of them.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import orjson
from twisted.internet import defer, error, protocol, reactor
from twisted.trial.unittest import TestCase

from tests.support import GatewayProcess, coap_url, deferLater, http_get, libcoap_request

ROOT = Path(__file__).resolve().parent.parent
BROWSER_SCRIPT = ROOT / "tests" / "browser" / "dashboard.mjs"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
NODE = shutil.which("node")


class BrowserSession(protocol.ProcessProtocol):
    """``tests/browser/dashboard.mjs`` in a child process: write what to wait
    for, read back one JSON report per request."""

    def __init__(self, testcase, url: str, screenshot: Path):
        if NODE is None or not (ROOT / "node_modules" / "playwright-core").is_dir():
            raise RuntimeError("node and the npm packages are needed: `make test` installs them")
        if not Path(CHROMIUM).exists():
            raise RuntimeError("chromium is not installed (Debian package chromium)")
        self.buffer = b""
        self.errors = b""
        self.waiting: list[defer.Deferred] = []
        self.ended = defer.Deferred()
        self.transport = reactor.spawnProcess(
            self, NODE, [NODE, str(BROWSER_SCRIPT), url, str(screenshot)],
            env={**os.environ, "CHROMIUM": CHROMIUM}, path=str(ROOT))
        testcase.addCleanup(self.close)

    def look(self, **want) -> defer.Deferred:
        waiting = defer.Deferred()
        self.waiting.append(waiting)
        self.transport.write(orjson.dumps(want) + b"\n")
        return waiting

    def outReceived(self, data: bytes) -> None:
        self.buffer += data
        while b"\n" in self.buffer and self.waiting:
            line, self.buffer = self.buffer.split(b"\n", 1)
            self.waiting.pop(0).callback(orjson.loads(line))

    def errReceived(self, data: bytes) -> None:
        self.errors = (self.errors + data)[-4000:]

    def processEnded(self, reason) -> None:
        for waiting in self.waiting:
            waiting.errback(RuntimeError(f"the browser script ended: {self.errors.decode(errors='replace')}"))
        self.waiting = []
        self.ended.callback(None)

    def close(self):
        if not self.ended.called:
            self.transport.closeStdin()
            # A browser that will not close is killed rather than left behind.
            timeout = reactor.callLater(30, self._kill)
            self.ended.addBoth(lambda _: timeout.active() and timeout.cancel())
        return self.ended

    def _kill(self):
        try:
            self.transport.signalProcess("KILL")
        except error.ProcessExitedAlready:
            pass


def output_directory() -> Path:
    directory = Path(os.environ.get("SENSE_TEST_OUTPUT") or "screenshots").resolve()
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def history(start: float, count: int, **waves) -> list[dict]:
    """*count* readings a minute apart from *start*, each field a gentle ramp."""
    return [{"ts": round(start + 60 * i),
             "data": {name: round(base + step * ((i % 12) - 6) ** 2 / 6, 2)
                      for name, (base, step) in waves.items()}}
            for i in range(count)]


class DashboardTests(TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def setUp(self):
        self.gateway = GatewayProcess(self, "--role", "all", "--bind", "::")
        yield self.gateway.wait_listening()
        self.base = yield self.gateway.web_url()
        self.screenshot = output_directory() / "dashboard.png"

    def post(self, body: dict, path: str = "/data", content_format: int | None = 50):
        payload = body if isinstance(body, bytes) else orjson.dumps(body)
        return libcoap_request("post", coap_url("::1", self.gateway.port, path), payload,
                               content_format)

    @defer.inlineCallbacks
    def get_json(self, path: str):
        response = yield http_get(self.base + path.lstrip("/"))
        return response.json()

    @defer.inlineCallbacks
    def send_batches(self, device: str, readings: list[dict], seqs):
        for seq, start in zip(seqs, range(0, len(readings), 10)):
            result = yield self.post({"id": device, "seq": seq, "readings": readings[start:start + 10]})
            self.assertEqual(result.code, "2.04", result.payload)

    @defer.inlineCallbacks
    def test_devices_and_charts_appear_and_follow_new_readings(self):
        start = time.time() - 40 * 60
        yield self.send_batches("greenhouse-1", history(start, 40, temperature=(21.0, 0.4),
                                                        humidity=(48.0, -1.1)), seqs=[1, 2, 3, 4])
        # seq 3 never arrives: the dashboard shows one lost message.
        yield self.send_batches("boiler-room", history(start, 40, pressure=(2.1, 0.05),
                                                       temperature=(64.0, 1.5)), seqs=[1, 2, 4, 5])
        # The original SENSE text format: the device is the sender's address.
        result = yield self.post(b"2150,0,2151,1,2153,0,", "/temperature", None)
        self.assertEqual(result.code, "2.04", result.payload)
        # Everything acknowledged has gone through the processor.
        deadline = time.monotonic() + 20
        while True:
            stats = yield self.get_json("/api/stats")
            if stats["processor"].get("written") == 9 or time.monotonic() > deadline:
                break
            yield deferLater(0.1)
        self.assertEqual(stats["processor"].get("written"), 9, stats)

        browser = BrowserSession(self, self.base + "?refresh=0.5", self.screenshot)
        first = yield browser.look(rows=3, charts=5, points=[
            ["greenhouse-1", "temperature", 40], ["boiler-room", "pressure", 40], ["::1", "temperature", 3]])
        self.assertNotIn("error", first, first)
        self.assertEqual({r["device"] for r in first["rows"]}, {"greenhouse-1", "boiler-room", "::1"})
        rows = {r["device"]: r["cells"] for r in first["rows"]}
        # device, state, last seen, readings, lost, loss, duplicates, resets
        self.assertEqual(rows["boiler-room"][3:6], ["4", "1", "20.0 %"])
        self.assertEqual(rows["greenhouse-1"][3:6], ["4", "0", "0.0 %"])
        charts = {(c["device"], c["field"]): c for c in first["charts"]}
        self.assertEqual(set(charts), {("greenhouse-1", "temperature"), ("greenhouse-1", "humidity"),
                                       ("boiler-room", "pressure"), ("boiler-room", "temperature"),
                                       ("::1", "temperature")})
        for key, chart in charts.items():
            self.assertTrue(chart["drawn"], key)
            self.assertEqual(chart["points"], 3 if key[0] == "::1" else 40, key)
            self.assertGreater(chart["painted"], 500, f"{key}: the canvas is blank")
        self.assertEqual(first["stats"]["devices"], "3")
        # The original SENSE devices send hundredths of a degree Celsius.
        self.assertEqual(charts[("::1", "temperature")]["unit"], "°C")
        self.assertEqual(charts[("greenhouse-1", "humidity")]["unit"], "")
        # Everything processed: nothing waits, against the default bound.
        self.assertEqual(first["stats"]["backlog"], "0 of 1,000,000")
        self.assertIsNone(first["notice"])

        # New readings show up without a reload: a new point, a new device.
        yield self.post({"id": "greenhouse-1", "seq": 5, "data": {"temperature": 22.5, "humidity": 47}})
        yield self.post({"id": "cellar", "seq": 1, "data": {"humidity": 81.5}})
        second = yield browser.look(rows=4, charts=6, points=[
            ["greenhouse-1", "temperature", 41], ["cellar", "humidity", 1]])
        self.assertNotIn("error", second, second)
        self.assertEqual(second["loads"], 1, "the page was reloaded")
        self.assertIn("cellar", {r["device"] for r in second["rows"]})

        # Offline and clean: nothing fetched from anywhere but the gateway,
        # nothing failed, no script error.
        self.assertEqual(second["origins"], [self.base.rstrip("/")])
        self.assertEqual(second["failedRequests"], [])
        self.assertEqual(second["console"], [])
        yield browser.close()
        self.assertEqual(self.screenshot.read_bytes()[:8], b"\x89PNG\r\n\x1a\n")
        self.assertGreater(self.screenshot.stat().st_size, 20_000)
