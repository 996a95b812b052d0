"""CoAPS against a ``twistd`` gateway on loopback: libcoap's OpenSSL and
GnuTLS clients with DTLS PSK over IPv6 and IPv4, identities bound to
writes, refused handshakes, credentials provisioned, rotated and revoked
while the gateway runs, the plain port's policy, the cookie exchange, a
thousand devices at once, and rates and limits for everyone else.

Keys are made at run time: 32 hex digits, which libcoap's ``-k`` takes as
they are (the key is those ASCII bytes).
"""

from __future__ import annotations

import os
import secrets
import subprocess
import time

import orjson
import psutil
from twisted.internet import defer
from twisted.trial.unittest import TestCase

from sense_gateway.coap.message import CHANGED, TOO_MANY_REQUESTS, UNAUTHORIZED, encode, parse
from sense_gateway.coap.message import CON, POST, URI_PATH, CONTENT_FORMAT
from sense_gateway.credentials.sqlite import SQLiteCredentialStore
from sense_gateway.registry.sqlite import SQLiteRegistry
from tests.dtls_harness import DTLSPeer, MemoryClient
from tests.servers import http
from tests.support import (BIN, GatewayProcess, RawCoapPeer, coap_url, deferLater, eventually,
                           libcoap_request, parametrize, queued, request_datagram)

CLIENTS = ("coap-client-openssl", "coap-client-gnutls")
HOSTS = {"ipv6": "::1", "ipv4": "127.0.0.1"}


def new_key() -> str:
    return secrets.token_hex(16)


def reading(device: str, seq: int = 1) -> bytes:
    return orjson.dumps({"id": device, "seq": seq, "data": {"t": 21.5}})


def post_datagram(body: bytes, mid: int) -> bytes:
    return encode(CON, POST, mid, b"tk", [(URI_PATH, b"data"), (CONTENT_FORMAT, 50)], body)


def coaps_url(host: str, port: int, path: str = "/data") -> str:
    return coap_url(host, port, path).replace("coap://", "coaps://")


class CoapsTestCase(TestCase):
    timeout = 120
    #: extra SENSE_* settings for the gateway
    settings: dict = {}

    @defer.inlineCallbacks
    def setUp(self):
        self.keys = {"node-7": new_key(), **self.more_keys()}

        def provision(data_dir):
            store = SQLiteCredentialStore(data_dir / "credentials.sqlite3")
            try:
                for device, key in self.keys.items():
                    store.set_key(device, key.encode())
            finally:
                store.close()
        self.gateway = GatewayProcess(self, "--role", "gateway", prepare=provision, env={
            "SENSE_COAP_RATE_LIMIT": "0", **self.settings})
        yield self.gateway.wait_listening()
        self.web = yield self.gateway.web_url()

    def more_keys(self) -> dict:
        return {}

    def devices(self, *args) -> str:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SENSE_")}
        result = subprocess.run([str(BIN / "sense"), "--data-dir", str(self.gateway.data_dir),
                                 "devices", *args], capture_output=True, text=True, timeout=60,
                                env=env)
        self.assertEqual(result.returncode, 0, result.stderr)
        return result.stdout

    def post(self, device="node-7", key=None, host="::1", client="coap-client-openssl",
             body=None, wait=5):
        return libcoap_request("post", coaps_url(host, self.gateway.coaps_port),
                               body if body is not None else reading(device), 50,
                               extra=("-u", device, "-k", key or self.keys[device], "-B",
                                      str(wait)), client=client)

    def stats(self) -> dict:
        status, body = http("GET", self.web + "api/stats")
        self.assertEqual(status, 200)
        return orjson.loads(body)

    def dtls(self) -> dict:
        return self.stats()["security"]["dtls"]


class InteropTests(CoapsTestCase):
    @defer.inlineCallbacks
    def check(self, client, host):
        response = yield self.post(host=host, client=client)
        self.assertEqual(response.code, "2.04", (response.out[-3000:], response.err[-2000:],
                                                 self.gateway.output()))
        [envelope] = queued(self.gateway.queue_path)
        self.assertEqual((envelope.device, envelope.transport, envelope.identity),
                         ("node-7", "coaps", "node-7"))


parametrize(InteropTests, {f"{client.rsplit('-', 1)[1]}_{family}": (client, host)
                           for client in CLIENTS for family, host in HOSTS.items()},
            InteropTests.check, "test_{}_posts_as_its_identity")



class RefusedTests(CoapsTestCase):
    settings = {"SENSE_COAPS_HANDSHAKE_TIMEOUT": "1"}

    @defer.inlineCallbacks
    def test_wrong_key_unknown_identity_and_revoked_device_get_no_session(self):
        self.keys["node-8"] = new_key()
        self.devices("add", "node-8", "--psk-hex", self.keys["node-8"].encode().hex())
        self.devices("revoke", "node-8")
        yield deferLater(3)  # the gateway learns of the revocation
        attempts = [("node-7", new_key()), ("stranger", new_key()), ("node-8", self.keys["node-8"])]
        for device, key in attempts:
            response = yield self.post(device, key, wait=2)
            self.assertIsNone(response.code, (device, response))
        yield deferLater(1.5)  # the wrong key's handshake times out
        self.assertEqual(queued(self.gateway.queue_path), [])
        dtls = self.dtls()
        self.assertEqual(dtls["sessions"], 0)
        self.assertGreaterEqual(dtls.get("refused_unknown_identity", 0), 2)
        self.assertGreaterEqual(dtls.get("refused_timeout", 0), 1)
        status, metrics = http("GET", self.web + "metrics")
        self.assertIn(b'sense_dtls_handshakes_refused_total{reason="unknown_identity"}', metrics)

    @defer.inlineCallbacks
    def test_identity_writing_as_another_device_is_forbidden(self):
        response = yield self.post(body=reading("node-8"))
        self.assertEqual((response.code, response.payload),
                         ("4.03", b"node-7 may not write as another device"))
        self.assertEqual(queued(self.gateway.queue_path), [])
        self.assertEqual(self.stats()["security"]["refused"]["identity_mismatch"], 1)


class PlainPortTests(CoapsTestCase):
    settings = {"SENSE_SECURITY_PLAIN_INGEST": "uncredentialed"}

    @defer.inlineCallbacks
    def test_credentialed_device_over_plain_coap_is_unauthorized(self):
        response = yield libcoap_request("post", coap_url("::1", self.gateway.port, "/data"),
                                         reading("node-7"), 50)
        self.assertEqual(response.code, "4.01", response)
        self.assertEqual(queued(self.gateway.queue_path), [])
        other = yield libcoap_request("post", coap_url("::1", self.gateway.port, "/data"),
                                      reading("plain-1"), 50)
        self.assertEqual(other.code, "2.04", other)


class PlainOffTests(CoapsTestCase):
    settings = {"SENSE_SECURITY_PLAIN_INGEST": "off"}

    @defer.inlineCallbacks
    def test_every_plain_write_is_refused_but_discovery_and_time_answer(self):
        for device in ("node-7", "plain-1"):
            response = yield libcoap_request("post", coap_url("127.0.0.1", self.gateway.port,
                                                              "/data"), reading(device), 50)
            self.assertEqual(response.code, "4.01", response)
        for path in ("/time", "/.well-known/core"):
            response = yield libcoap_request("get", coap_url("::1", self.gateway.port, path))
            self.assertEqual(response.code, "2.05", response)
        self.assertEqual(queued(self.gateway.queue_path), [])
        secure = yield self.post()
        self.assertEqual(secure.code, "2.04", secure)


class ProvisioningTests(CoapsTestCase):
    @defer.inlineCallbacks
    def post_until(self, device, key, code, timeout=10.0):
        """Post until the answer is *code*; the seconds it took."""
        start = time.monotonic()
        while True:
            response = yield self.post(device, key, wait=1)
            if response.code == code:
                return time.monotonic() - start
            if time.monotonic() - start > timeout:
                self.fail(f"{device}: still {response.code} after {timeout} s")

    @defer.inlineCallbacks
    def test_added_key_works_within_seconds_and_rotation_retires_the_old_one(self):
        key = new_key()
        self.devices("add", "node-9", "--psk-hex", key.encode().hex())
        took = yield self.post_until("node-9", key, "2.04")
        self.assertLess(took, 6)
        new = new_key()
        self.devices("rotate", "node-9", "--psk-hex", new.encode().hex())
        yield self.post_until("node-9", new, "2.04")
        old = yield self.post("node-9", key, wait=2)
        self.assertIsNone(old.code, old)

    @defer.inlineCallbacks
    def test_revocation_ends_a_live_session(self):
        peer = DTLSPeer(self, "node-7", self.keys["node-7"].encode())
        self.assertTrue((yield peer.connect(self.gateway.coaps_port)))
        answer = yield peer.request(post_datagram(reading("node-7", 1), 1))
        self.assertEqual(parse(answer).code, CHANGED)
        self.devices("revoke", "node-7")
        yield eventually(lambda: self.dtls()["sessions"] == 0, timeout=10)
        late = yield peer.request(post_datagram(reading("node-7", 2), 2), timeout=2)
        self.assertIsNone(late)
        self.assertTrue(peer.client.closed_by_server)
        self.assertEqual([e.seq for e in queued(self.gateway.queue_path)], [1])


class CookieTests(CoapsTestCase):
    @defer.inlineCallbacks
    def test_client_hellos_without_cookie_leave_no_state(self):
        flood = RawCoapPeer(self)
        hellos = [MemoryClient("x", b"k" * 16).start()[0] for _ in range(2000)]
        for start in range(0, len(hellos), 100):
            for hello in hellos[start:start + 100]:
                flood.send(hello, self.gateway.coaps_port)
            yield deferLater(0.01)
        yield eventually(lambda: self.dtls().get("cookies_sent", 0) >= 1900, timeout=20)
        dtls = self.dtls()
        self.assertEqual((dtls["sessions"], dtls["handshakes"]), (0, 0))

    @defer.inlineCallbacks
    def test_spoofed_client_hello_for_a_live_address_leaves_the_session_working(self):
        peer = DTLSPeer(self, "node-7", self.keys["node-7"].encode())
        self.assertTrue((yield peer.connect(self.gateway.coaps_port)))
        # From the session's own address: a fresh ClientHello, as a spoofer
        # who cannot see the answer would send it.
        peer.send_raw(MemoryClient("node-7", b"w" * 16).start())
        yield deferLater(0.3)
        answer = yield peer.request(post_datagram(reading("node-7"), 5))
        self.assertEqual(parse(answer).code, CHANGED)
        self.assertEqual(self.dtls()["sessions"], 1)


class ManyDevicesTests(CoapsTestCase):
    timeout = 300
    # All from one address here: no per-source limits on handshakes.
    settings = {"SENSE_COAPS_HANDSHAKES_PER_SOURCE": "100000",
                "SENSE_COAPS_HANDSHAKES_IN_PROGRESS_PER_SOURCE": "1000"}
    DEVICES = 1000

    def more_keys(self) -> dict:
        return {f"dev-{n:04d}": new_key() for n in range(self.DEVICES)}

    @defer.inlineCallbacks
    def test_a_thousand_devices_handshake_and_post_within_the_memory_bound(self):
        peers = [DTLSPeer(self, device, self.keys[device].encode())
                 for device in sorted(self.keys) if device.startswith("dev-")]
        for start in range(0, len(peers), 50):
            connected = yield defer.gatherResults(
                [p.connect(self.gateway.coaps_port, timeout=30) for p in peers[start:start + 50]])
            self.assertTrue(all(connected))
        answers = yield defer.gatherResults(
            [p.request(post_datagram(reading(p.client.identity.decode()), n), timeout=30)
             for n, p in enumerate(peers)])
        self.assertEqual({parse(a).code for a in answers}, {CHANGED})
        self.assertEqual(self.dtls()["sessions"], self.DEVICES)
        rss = psutil.Process(self.gateway.process.pid).memory_info().rss / 2 ** 20
        # docs/security.md: at most about 100 MiB + 70 KiB per session.
        self.assertLess(rss, 100 + 0.07 * self.DEVICES, f"{rss:.0f} MiB")
        self.assertEqual(len(queued(self.gateway.queue_path)), self.DEVICES)


class LimitsTests(TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def test_source_over_its_rate_gets_429_while_others_are_served(self):
        gateway = GatewayProcess(self, "--role", "gateway", env={
            "SENSE_COAP_RATE_LIMIT": "2", "SENSE_COAP_RATE_BURST": "3"})
        yield gateway.wait_listening()
        busy, calm = RawCoapPeer(self), RawCoapPeer(self, host="127.0.0.1")
        for mid in range(6):
            busy.send(request_datagram(payload=reading(f"b-{mid}"), content_format=50, mid=mid),
                      gateway.port)
        answers = []
        while True:
            try:
                answers.append(parse((yield busy.receive(timeout=1.0))))
            except TimeoutError:
                break
        # The burst is served, the one over it told once (Max-Age, no
        # payload), the rest of that second not answered at all.
        self.assertEqual(sorted(a.code for a in answers), [CHANGED] * 3 + [TOO_MANY_REQUESTS])
        [refused] = [a for a in answers if a.code == TOO_MANY_REQUESTS]
        self.assertEqual(refused.payload, b"")
        self.assertGreaterEqual(refused.option(14), 1)  # Max-Age
        served = yield calm.request(request_datagram(payload=reading("c-1"), content_format=50,
                                                     mid=1), gateway.port)
        self.assertEqual(served.code, CHANGED)

    @defer.inlineCallbacks
    def test_random_new_devices_beyond_the_limits_are_forbidden_and_the_registry_stays(self):
        gateway = GatewayProcess(self, env={
            "SENSE_COAP_RATE_LIMIT": "0", "SENSE_REGISTRY_MAX_DEVICES": "5",
            "SENSE_PROCESSOR_POLL_INTERVAL": "0.1"})
        yield gateway.wait_listening()
        peer = RawCoapPeer(self)
        codes = []
        for mid in range(20):
            response = yield peer.request(request_datagram(
                payload=reading(secrets.token_hex(6)), content_format=50, mid=mid), gateway.port)
            codes.append(response.code)
        self.assertEqual(codes.count(CHANGED), 5)
        self.assertEqual(codes.count(0x83), 15)
        registry = gateway.data_dir / "registry.sqlite3"
        yield eventually(lambda: registry.exists() and SQLiteRegistry(registry).count() == 5)
        yield deferLater(1)
        self.assertEqual(SQLiteRegistry(registry).count(), 5)
        self.assertNotIn(UNAUTHORIZED, codes)
