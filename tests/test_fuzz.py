"""Random and mutated datagrams against a live gateway on real UDP.

A seeded generator (reproducible: the seed is in the test) makes a few
thousand datagrams: pure noise, valid requests with bytes flipped, cut
short or extended, option soup, and well-formed requests with junk
payloads. Afterwards the gateway must still answer a valid request, and
what it remembers per peer must stay within its configured bounds.
"""

from __future__ import annotations

import random
import secrets

import cbor2
import orjson
import psutil
from twisted.internet import defer
from twisted.trial.unittest import TestCase
from txthings import coap

from sense_gateway.coap.message import parse
from sense_gateway.credentials.sqlite import SQLiteCredentialStore
from tests.support import GatewayProcess, RawCoapPeer, deferLater, request_datagram, start_gateway

VALID = request_datagram(payload=orjson.dumps({"id": "fuzz-ok", "seq": 1, "data": {"t": 1.5}}),
                         content_format=50, mid=0xBEEF, token=b"ok")


def seed_requests(rng: random.Random) -> list[bytes]:
    bodies = [
        orjson.dumps({"id": "n", "seq": 1, "data": {"t": 1}}),
        cbor2.dumps({"id": "n", "data": {"t": 1.0}}),
        orjson.dumps([{"bn": "urn:x:", "n": "t", "v": 1}]),
        b"2150,1,2151,0,",
    ]
    seeds = []
    for body, cf, path in zip(bodies, (50, 60, 110, None), ("data", "data", "data", "temperature")):
        seeds.append(request_datagram(payload=body, content_format=cf, path=path,
                                      mid=rng.randrange(65536), token=rng.randbytes(rng.randrange(9))))
    seeds.append(request_datagram(code=coap.GET, path=".well-known/core", mid=rng.randrange(65536)))
    seeds.append(request_datagram(code=coap.GET, path="time", mid=rng.randrange(65536),
                                  options=[coap.UintOption(coap.OBSERVE, 0)]))
    seeds.append(request_datagram(payload=b"x" * 16, mid=rng.randrange(65536),
                                  options=[coap.BlockOption(coap.BLOCK1, (0, True, 0))]))
    return seeds


def mutate(rng: random.Random, datagram: bytes) -> bytes:
    data = bytearray(datagram)
    kind = rng.randrange(6)
    if kind == 0:
        for _ in range(rng.randrange(1, 4)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    elif kind == 1:
        del data[rng.randrange(len(data)):]
    elif kind == 2:
        data += rng.randbytes(rng.randrange(1, 40))
    elif kind == 3:
        at = rng.randrange(4, len(data)) if len(data) > 4 else 4
        data[at:at] = rng.randbytes(rng.randrange(1, 12))
    elif kind == 4:
        data[2:4] = rng.randbytes(2)  # fresh message id: not a duplicate
        data[rng.randrange(4, len(data))] = rng.choice([0xFF, 0xDD, 0xEE, 0x0F, 0xF0])
    else:
        data[2:4] = rng.randbytes(2)
        if len(data) > 5:
            data[rng.randrange(4, len(data)):] = rng.randbytes(rng.randrange(0, 30))
    return bytes(data)


def datagrams(seed: int, count: int, seeds=None, noise: float = 0.15,
              noise_size: int = 64) -> list[bytes]:
    """*count* datagrams: pure noise (a share *noise* of them, up to
    *noise_size* bytes) and mutations of *seeds* (valid CoAP requests
    unless given)."""
    rng = random.Random(seed)
    seeds = seeds or seed_requests(rng)
    out = []
    for _ in range(count):
        if rng.random() < noise:
            out.append(rng.randbytes(rng.randrange(0, noise_size)))
        else:
            out.append(mutate(rng, rng.choice(seeds)))
    return out


@defer.inlineCallbacks
def blast(peer: RawCoapPeer, port: int, batch: list[bytes]):
    """Send in bursts, letting the reactor breathe between them."""
    for start in range(0, len(batch), 50):
        for datagram in batch[start:start + 50]:
            peer.send(datagram, port)
        yield deferLater(0.005)
    yield deferLater(0.2)


@defer.inlineCallbacks
def still_answers(testcase, peer: RawCoapPeer, port: int):
    # Drain whatever the noise provoked, then ask something valid.
    while True:
        try:
            yield peer.receive(timeout=0.2)
        except TimeoutError:
            break
    peer.send(VALID, port)
    while True:
        response = parse((yield peer.receive(timeout=5)))
        if response.token == b"ok":
            testcase.assertEqual(response.code, coap.CHANGED)
            return


class FuzzInProcessTests(TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def test_noise_leaves_gateway_answering_within_bounds(self):
        gateway = yield start_gateway(self, **{"coap.dedup_entries": 500, "coap.max_observers": 8,
                                                "coap.rate_limit": 0})
        peer = RawCoapPeer(self)
        yield blast(peer, gateway.port, datagrams(seed=20261128, count=4000))
        yield still_answers(self, peer, gateway.port)
        layer = gateway.layers[0]  # plain CoAP
        self.assertGreater(layer.malformed, 100)
        self.assertLessEqual(len(layer.exchanges), 500)
        self.assertGreater(layer.exchanges.evicted_from_source, 0)
        uploads = gateway.dispatcher.uploads("coap")
        self.assertLessEqual(len(uploads), uploads.max_per_source)  # one source sent them all
        time_resource = gateway.dispatcher.tree.find((b"time",))
        self.assertLessEqual(len(time_resource.observers), 8)
        self.assertEqual(self.flushLoggedErrors(), [])


class FuzzProcessMemoryTests(TestCase):
    timeout = 180

    @defer.inlineCallbacks
    def test_memory_stays_flat_under_repeated_noise(self):
        gateway = GatewayProcess(self, env={"SENSE_COAP_DEDUP_ENTRIES": "2000"})
        yield gateway.wait_listening()
        peer = RawCoapPeer(self)
        process = psutil.Process(gateway.process.pid)
        # The first round fills the bounded caches to their limits...
        yield blast(peer, gateway.port, datagrams(seed=1, count=4000))
        yield still_answers(self, peer, gateway.port)
        warmed = process.memory_info().rss
        # ...further rounds must not grow the process.
        for seed in (2, 3):
            yield blast(peer, gateway.port, datagrams(seed=seed, count=4000))
        yield still_answers(self, peer, gateway.port)
        grown = process.memory_info().rss - warmed
        self.assertLess(grown, 8 * 1024 * 1024, f"RSS grew by {grown} bytes")


class FuzzCoapsTests(TestCase):
    """Random datagrams, and records of a real handshake mutated, at 5684."""

    timeout = 180

    @defer.inlineCallbacks
    def test_noise_at_the_dtls_port_leaves_it_serving_within_bounds(self):
        from tests.dtls_harness import DTLSPeer
        from tests.test_coaps import post_datagram, reading

        key = secrets.token_hex(16).encode()

        def provision(data_dir):
            store = SQLiteCredentialStore(data_dir / "credentials.sqlite3")
            store.set_key("fuzz-ok", key)
            store.close()
        gateway = GatewayProcess(self, "--role", "gateway", prepare=provision,
                                 env={"SENSE_COAP_RATE_LIMIT": "0"})
        yield gateway.wait_listening()
        # A real handshake and request, recorded datagram by datagram.
        recorded = []
        live = DTLSPeer(self, "fuzz-ok", key)
        send = live._send
        live._send = lambda datagrams: (recorded.extend(datagrams), send(datagrams))
        self.assertTrue((yield live.connect(gateway.coaps_port)))
        yield live.request(post_datagram(reading("fuzz-ok"), 1))
        noise = RawCoapPeer(self)
        process = psutil.Process(gateway.process.pid)

        def batch(seed):
            return datagrams(seed, 3000, seeds=recorded, noise=0.2, noise_size=300)
        yield blast(noise, gateway.coaps_port, batch(20261201))
        warmed = process.memory_info().rss
        for seed in (2, 3):
            yield blast(noise, gateway.coaps_port, batch(seed))
        grown = process.memory_info().rss - warmed
        self.assertLess(grown, 8 * 1024 * 1024, f"RSS grew by {grown} bytes")
        self.assertIsNone(gateway.process.poll())
        # The live session still works, and a new device still gets in.
        answer = yield live.request(post_datagram(reading("fuzz-ok", 2), 2))
        self.assertEqual(parse(answer).code, coap.CHANGED)
        fresh = DTLSPeer(self, "fuzz-ok", key)
        self.assertTrue((yield fresh.connect(gateway.coaps_port)))
