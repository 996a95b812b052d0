"""Crash loops under load: 40 devices through a lossy link while
``twistd -n sense-gateway --role all`` is SIGKILLed and restarted 20 times.

The devices (``sense_gateway.bench.fleet``) retransmit as RFC 7252 says,
with the timers scaled down twenty times so the test takes seconds, not
minutes: ACK_TIMEOUT 0.1 s (2 s in the RFC) x a random factor up to 1.5,
doubling, MAX_RETRANSMIT 4; Max-Age of a 5.03 counts 0.05 s a second.
When a device gives up it sends the same reading as a new message. The
relay (``sense_gateway.bench.lossy_proxy``) drops 20 % of the datagrams
each way, from a fixed seed. Every other kill comes while the processor
holds a batch. Afterwards the files of the last gateway are read: every
acknowledged reading is in the store once, nothing else is, no number is
stored twice, the registry counts no loss and no reset.
"""

from __future__ import annotations

import random
import sqlite3
import time
from collections import Counter

from twisted.internet import defer
from twisted.trial.unittest import TestCase

from sense_gateway.bench.crashloop import held_messages
from sense_gateway.bench.fleet import DeviceFleet
from sense_gateway.bench.lossy_proxy import LossyProxy
from sense_gateway.queues.sqlite_store import SQLiteQueueStore
from sense_gateway.registry.sqlite import SQLiteRegistry
from tests.support import GatewayProcess, deferLater, eventually, queued

SEED = 20261201
KILLS = 20
DEVICES = 40
LOSS = 0.2


def stored_numbers(path) -> dict[str, Counter]:
    """Per device, how often each reading number (field ``n``) is stored."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        out: dict[str, Counter] = {}
        for device, value in db.execute(
                "SELECT device, value FROM readings WHERE measurement = 'sense' AND field = 'n'"):
            out.setdefault(device, Counter())[int(value)] += 1
        return out
    finally:
        db.close()


@defer.inlineCallbacks
def kill_moment(gateway, rng: random.Random, holding: bool):
    """Wait 0.4-1.2 s; with *holding*, until the processor holds messages."""
    if not holding:
        yield deferLater(rng.uniform(0.4, 1.2))
        return
    yield deferLater(0.4)
    deadline = time.monotonic() + 0.8
    while time.monotonic() < deadline and not held_messages(gateway.queue_path):
        yield deferLater(0.002)


class CrashLoopTests(TestCase):
    timeout = 180

    @defer.inlineCallbacks
    def test_kills_under_lossy_load_lose_nothing_and_store_nothing_twice(self):
        gateway = GatewayProcess(self, "--role", "all",
                                 env={"SENSE_COAP_RATE_LIMIT": "0",
                                      "SENSE_PROCESSOR_POLL_INTERVAL": "0.1"})
        yield gateway.wait_listening()
        rng = random.Random(SEED)
        proxy = LossyProxy(("::1", gateway.port), LOSS, seed=rng.getrandbits(32)).start()
        self.addCleanup(proxy.stop)
        fleet = DeviceFleet(("::1", proxy.port), DEVICES, interval=0.01, ack_timeout=0.1,
                            time_scale=0.05, seed=rng.getrandbits(32)).start()
        self.addCleanup(fleet.stop)
        held_at_kill = []
        for kill in range(KILLS):
            yield kill_moment(gateway, rng, holding=kill % 2 == 1)
            gateway.process.kill()
            gateway.process.wait(10)
            held_at_kill.append(held_messages(gateway.queue_path))
            gateway.restart()
            yield gateway.wait_listening()
        yield deferLater(1.0)
        fleet.finish()
        yield eventually(lambda: fleet.idle, timeout=30)
        # Give the last gateway the time to process what it took.
        yield eventually(lambda: not queued(gateway.queue_path), timeout=30)
        gateway.stop()
        fleet.stop()
        proxy.stop()

        summary = fleet.summary()
        self.assertEqual(gateway.runs, KILLS + 1)
        self.assertEqual(summary["errors"], {})
        # The lossy link and the kills were felt: retransmissions, readings
        # given up and sent again as new messages, batches held at a kill.
        self.assertGreater(proxy.counters.up_dropped, 100)
        self.assertGreater(proxy.counters.down_dropped, 100)
        self.assertGreater(summary["retransmissions"], 200)
        self.assertGreater(summary["gave_up"], 10)
        self.assertGreater(sum(1 for n in held_at_kill if n), 3, held_at_kill)

        acknowledged = fleet.acknowledged
        self.assertGreater(sum(len(numbers) for numbers in acknowledged.values()), 40 * 10)
        stored = stored_numbers(gateway.data_dir / "readings.sqlite3")
        for device, numbers in acknowledged.items():
            # One reading at a time: numbers 1..k acknowledged, and the
            # device drained, so exactly those are stored, each once.
            self.assertEqual(numbers, list(range(1, len(numbers) + 1)))
            self.assertEqual(stored.get(device, Counter()), Counter(numbers), device)
        self.assertEqual(set(stored), set(acknowledged))

        registry = SQLiteRegistry(gateway.data_dir / "registry.sqlite3")
        self.addCleanup(registry.close)
        counters = {record.id: record.state.counters for record in registry.devices()}
        self.assertEqual(set(counters), set(acknowledged))
        for device, numbers in acknowledged.items():
            c = counters[device]
            self.assertEqual((c.received, c.lost, c.resets), (len(numbers), 0, 0), device)
        # Copies the restarted gateways could not recognise were dropped.
        self.assertGreater(sum(c.duplicates for c in counters.values()), 0)
        store = SQLiteQueueStore(gateway.queue_path)
        self.addCleanup(store.close)
        self.assertEqual((store.depth()["visible"], store.depth()["in_flight"]), (0, 0))
        self.assertEqual(store.dead_letters(), [])
