"""``twistd sense-gateway``'s service maker: the process-wide settings it
makes once (sense_gateway.tap.settle_process), seen from a process of
their own, as twistd's would be."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from sense_gateway.tap import GC_THRESHOLD

#: builds the service the way twistd does and reports the collector's state
PROBE = """
import gc, json, sys
gc.set_threshold(int(sys.argv[2]), *gc.get_threshold()[1:])
from sense_gateway.tap import Options, makeService
options = Options()
options.parseOptions(["--role", sys.argv[1], "--data-dir", sys.argv[3],
                      "--plugins-dir", sys.argv[3], "--coap-port", "0", "--coaps-port", "0",
                      "--web-port", "0"])
before = {"threshold": gc.get_threshold(), "frozen": gc.get_freeze_count()}
makeService(options)
print(json.dumps({"before": before,
                  "after": {"threshold": gc.get_threshold(), "frozen": gc.get_freeze_count()}}))
"""


class ProcessSettingsTests(SynchronousTestCase):
    def probe(self, role: str, threshold: int = 700) -> dict:
        # Absolute: the probe's own working directory must not matter.
        data_dir = Path(self.mktemp()).resolve()
        data_dir.mkdir(parents=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("SENSE_")}
        result = subprocess.run([sys.executable, "-c", PROBE, role, str(threshold), str(data_dir)],
                                env=env, capture_output=True, text=True, timeout=60)
        self.assertEqual(result.returncode, 0, result.stderr)
        return json.loads(result.stdout.splitlines()[-1])

    def assert_raised_and_frozen(self, role: str) -> None:
        state = self.probe(role)
        self.assertEqual(state["before"]["threshold"][0], 700)
        self.assertEqual(state["after"]["threshold"],
                         [GC_THRESHOLD, *state["before"]["threshold"][1:]])
        self.assertEqual(state["before"]["frozen"], 0)
        self.assertGreater(state["after"]["frozen"], 10_000)

    def test_role_all_raises_the_collectors_threshold_and_freezes_start_up(self):
        self.assert_raised_and_frozen("all")

    def test_role_processor_raises_the_collectors_threshold_and_freezes_start_up(self):
        self.assert_raised_and_frozen("processor")

    def test_role_gateway_keeps_the_threshold_and_freezes_start_up(self):
        state = self.probe("gateway")
        self.assertEqual(state["after"]["threshold"], state["before"]["threshold"])
        self.assertEqual(state["before"]["frozen"], 0)
        self.assertGreater(state["after"]["frozen"], 10_000)

    def test_a_higher_threshold_or_a_disabled_collector_is_kept(self):
        for threshold in (GC_THRESHOLD * 2, 0):
            state = self.probe("all", threshold)
            self.assertEqual(state["after"]["threshold"], state["before"]["threshold"], threshold)
