"""Who may write as which device, datagram in and datagram out: the DTLS
identity bound to every write (4.03 for another device), what plain CoAP
may still do (``security.plain_ingest``: 4.01), bounded creation of new
devices (4.03), the per-source request rate (4.29 with Max-Age, RFC 8516),
and the device directory that answers all of it from memory."""

from __future__ import annotations

from twisted.internet import task
from twisted.trial.unittest import SynchronousTestCase
from txthings import coap as tx

from sense_gateway.admission import IngestPolicy
from sense_gateway.coap.message import (
    CHANGED, FORBIDDEN, MAX_AGE, SERVICE_UNAVAILABLE, TOO_MANY_REQUESTS, UNAUTHORIZED, parse,
)
from sense_gateway.credentials import Credential
from sense_gateway.directory import DeviceDirectory
from sense_gateway.envelope import Decoded, Reading
from sense_gateway.formats import Format
from sense_gateway.limits import TokenBuckets
from tests.support import PEER, CoapEndpoint, request_datagram


def anonymous(payload, context):
    """A format whose payload names no device (like the original text format)."""
    return Decoded(readings=[Reading(fields={"v": float(payload)})], device=None)


def named(payload, context):
    """A format whose payload is the device id."""
    return Decoded(readings=[Reading(fields={"v": 1.0})], device=payload.decode())


FORMATS = [Format("anonymous", content_formats=(0,), paths=("/anon",), decode=anonymous),
           Format("named", content_formats=(0,), paths=("/named",), decode=named)]


class PolicyTestCase(SynchronousTestCase):
    plain_ingest = "uncredentialed"
    max_devices = 1000
    new_devices_per_minute = 100.0

    def setUp(self):
        self.clock = task.Clock()
        self.directory = DeviceDirectory(self.clock.seconds, max_devices=self.max_devices,
                                         new_devices_per_minute=self.new_devices_per_minute)
        self.directory.apply_changes(1, [Credential("node-7", b"k" * 16, 0.0, 1)])
        self.directory.apply_registered(["node-7", "old-1"])
        self.directory.ready = True
        self.policy = IngestPolicy(self.directory, self.plain_ingest)
        self.endpoint = CoapEndpoint(self, formats=FORMATS, policy=self.policy)
        self.queue = self.endpoint.queue

    def post(self, path, payload, identity=None, peer=PEER, mid=1):
        return self.endpoint.only(request_datagram(path=path, payload=payload, content_format=0,
                                                   mid=mid), peer, identity)


class IdentityTests(PolicyTestCase):
    def test_identity_writes_as_itself(self):
        self.assertEqual(self.post("named", b"node-7", identity="node-7").code, CHANGED)
        [envelope] = self.queue.stored
        self.assertEqual((envelope.device, envelope.identity), ("node-7", "node-7"))

    def test_identity_naming_another_device_is_forbidden_and_not_queued(self):
        response = self.post("named", b"node-8", identity="node-7")
        self.assertEqual((response.code, response.payload),
                         (FORBIDDEN, b"node-7 may not write as another device"))
        self.assertEqual(self.queue.envelopes, [])
        self.assertEqual(self.policy.refused["identity_mismatch"], 1)

    def test_a_payload_without_device_takes_the_identity(self):
        self.assertEqual(self.post("anon", b"1.5", identity="node-7").code, CHANGED)
        self.assertEqual(self.queue.stored[0].device, "node-7")

    def test_original_text_format_takes_the_identity_not_the_address(self):
        from sense_gateway.envelope import RequestContext
        from sense_gateway.formats.sense_text import decode

        context = RequestContext("/temperature", 0, "2001:db8::7", 5684, 0.0, "coaps", "node-7")
        self.assertEqual(decode(b"2150,0,", context).device, "node-7")
        plain = RequestContext("/temperature", 0, "2001:db8::7", 5683, 0.0)
        self.assertEqual(decode(b"2150,0,", plain).device, "2001:db8::7")


class UncredentialedTests(PolicyTestCase):
    def test_credentialed_device_over_plain_coap_is_unauthorized(self):
        response = self.post("named", b"node-7")
        self.assertEqual((response.code, response.payload),
                         (UNAUTHORIZED, b"this device must write over coaps (DTLS)"))
        self.assertEqual(self.queue.envelopes, [])
        self.assertEqual(self.policy.refused["credentialed_on_plain"], 1)

    def test_device_without_credential_writes_over_plain_coap(self):
        self.assertEqual(self.post("named", b"old-1").code, CHANGED)

    def test_revoked_credential_lets_the_device_write_plain_again(self):
        self.directory.apply_changes(2, [Credential("node-7", None, 1.0, 2)])
        self.assertEqual(self.post("named", b"node-7").code, CHANGED)

    def test_nothing_is_judged_before_the_directory_is_loaded(self):
        self.directory.ready = False
        response = self.post("named", b"old-1")
        self.assertEqual((response.code, response.option(MAX_AGE)), (SERVICE_UNAVAILABLE, 2))


class OpenTests(PolicyTestCase):
    plain_ingest = "open"

    def test_open_lets_plain_coap_write_any_device(self):
        self.assertEqual(self.post("named", b"node-7").code, CHANGED)


class OffTests(PolicyTestCase):
    plain_ingest = "off"

    def test_every_plain_write_is_refused(self):
        for mid, device in enumerate((b"node-7", b"old-1", b"brand-new")):
            response = self.post("named", device, mid=mid)
            self.assertEqual((response.code, response.payload),
                             (UNAUTHORIZED, b"write over coaps (DTLS) only"))
        self.assertEqual(self.queue.envelopes, [])

    def test_time_and_resource_list_are_still_answered(self):
        for path in ("time", ".well-known/core"):
            response = self.endpoint.only(request_datagram(code=tx.GET, path=path))
            self.assertEqual(response.code, 0x45)

    def test_a_block_wise_upload_is_refused_at_its_first_block(self):
        first = request_datagram(payload=b"1" * 16, content_format=0, path="named",
                                 options=[tx.BlockOption(tx.BLOCK1, (0, True, 0))])
        self.assertEqual(self.endpoint.only(first).code, UNAUTHORIZED)
        self.assertEqual(len(self.endpoint.dispatcher.uploads("coap")), 0)

    def test_dtls_writes_still_go_through(self):
        self.assertEqual(self.post("named", b"node-7", identity="node-7").code, CHANGED)


class NewDeviceLimitTests(PolicyTestCase):
    max_devices = 4  # node-7 and old-1 are registered
    new_devices_per_minute = 3.0

    def test_new_devices_beyond_the_limit_are_forbidden(self):
        self.assertEqual(self.post("named", b"new-1", peer=("2001:db8::1", 1), mid=1).code,
                         CHANGED)
        self.assertEqual(self.post("named", b"new-2", peer=("2001:db8::2", 1), mid=2).code,
                         CHANGED)
        response = self.post("named", b"new-3", peer=("2001:db8::3", 1), mid=3)
        self.assertEqual((response.code, response.payload),
                         (FORBIDDEN, b"device limit reached (4)"))
        # Known devices still write; a device admitted once is not counted twice.
        self.assertEqual(self.post("named", b"old-1", mid=4).code, CHANGED)
        self.assertEqual(self.post("named", b"new-1", mid=5).code, CHANGED)
        self.assertEqual(self.directory.devices(), 4)
        self.assertEqual(len(self.queue.stored), 4)

    def test_one_source_creates_only_so_many_new_devices_a_minute(self):
        self.directory.max_devices = 1000
        codes = [self.post("named", f"r-{n}".encode(), mid=n).code for n in range(5)]
        self.assertEqual(codes, [CHANGED] * 3 + [FORBIDDEN] * 2)
        self.assertEqual(self.post("named", b"r-9", peer=("2001:db8::9", 1), mid=9).code, CHANGED)
        self.clock.advance(20)  # one more a minute / 3
        self.assertEqual(self.post("named", b"r-10", mid=10).code, CHANGED)
        self.assertEqual(self.policy.refused["new_device_rate"], 2)

    def test_devices_registered_meanwhile_stop_counting_as_admitted(self):
        self.post("named", b"new-1", mid=1)
        self.directory.apply_registered(["node-7", "old-1", "new-1"])
        self.assertEqual(self.directory.devices(), 3)


class RateLimitTests(SynchronousTestCase):
    def setUp(self):
        self.endpoint = CoapEndpoint(self)
        self.limit = TokenBuckets(rate=1.0, burst=2, now=self.endpoint.clock.seconds)
        self.endpoint.layer.rate_limit = self.limit

    def test_a_source_over_its_rate_gets_too_many_requests_with_max_age(self):
        codes = [self.endpoint.only(request_datagram(payload=b"1", mid=n)).code for n in range(3)]
        self.assertEqual(codes, [CHANGED, CHANGED, TOO_MANY_REQUESTS])
        refused = parse(self.endpoint.written()[-1])
        # No payload: an address over its rate gets a few bytes at most.
        self.assertEqual((refused.payload, refused.option(MAX_AGE)), (b"", 1))
        # Meanwhile another source is served...
        other = self.endpoint.only(request_datagram(payload=b"1", mid=9), ("2001:db8::5", 5683))
        self.assertEqual(other.code, CHANGED)
        # ...more from the busy one within the second get nothing at all,
        # and after a second the source may send again.
        for mid in range(2, 6):
            self.assertEqual(self.endpoint.send(request_datagram(payload=b"1", mid=mid)), [])
        self.endpoint.clock.advance(1)
        self.assertEqual(self.endpoint.only(request_datagram(payload=b"1", mid=3)).code, CHANGED)
        self.assertEqual(self.endpoint.layer.rate_limited, 5)
        self.assertEqual(len(self.endpoint.queue.stored), 4)

    def test_retransmissions_and_bad_options_cost_tokens_too(self):
        datagram = request_datagram(payload=b"1", mid=1)
        self.assertEqual(self.endpoint.only(datagram).code, CHANGED)
        self.assertEqual(len(self.endpoint.send(datagram)), 1)  # replayed, one token
        self.assertEqual(parse(self.endpoint.send(datagram)[0]).code, TOO_MANY_REQUESTS)
        self.assertEqual(self.endpoint.send(request_datagram(
            payload=b"1", mid=7, options=[tx.OpaqueOption(2049, b"x")])), [])
        self.assertEqual(len(self.endpoint.queue.stored), 1)

    def test_ports_of_one_address_share_its_budget(self):
        codes = [self.endpoint.only(request_datagram(payload=b"1"), ("::1", 40000 + n)).code
                 for n in range(3)]
        self.assertEqual(codes[-1], TOO_MANY_REQUESTS)

    def test_the_table_of_sources_is_bounded(self):
        limit = TokenBuckets(rate=1.0, burst=2, now=self.endpoint.clock.seconds, max_keys=100)
        for n in range(1000):
            limit.take(f"2001:db8::{n:x}")
        self.assertEqual(len(limit), 100)


class DirectoryTests(SynchronousTestCase):
    def setUp(self):
        self.directory = DeviceDirectory(task.Clock().seconds, max_devices=10,
                                         new_devices_per_minute=10)
        self.withdrawn = []
        self.directory.on_key_withdrawn = self.withdrawn.append

    def test_keys_come_and_go_with_the_store(self):
        self.directory.apply_changes(1, [Credential("a", b"1" * 16, 0, 1)])
        self.assertEqual(self.directory.psk_for("a"), b"1" * 16)
        self.assertIsNone(self.directory.psk_for("b"))
        self.assertEqual(self.withdrawn, [])
        self.directory.apply_changes(2, [Credential("a", b"2" * 16, 0, 2)])  # rotated
        self.directory.apply_changes(3, [Credential("a", None, 0, 3)])  # revoked
        self.assertEqual(self.withdrawn, ["a", "a"])
        self.assertIsNone(self.directory.psk_for("a"))
        self.assertEqual(self.directory.serial, 3)

    def test_a_full_reconcile_drops_keys_the_store_no_longer_has(self):
        self.directory.apply_changes(5, [Credential("a", b"1" * 16, 0, 4),
                                         Credential("b", b"2" * 16, 0, 5)])
        # A store restored from a backup: serial 3, only "a", with another key.
        self.directory.replace_keys(3, [Credential("a", b"3" * 16, 0, 3)])
        self.assertEqual((self.directory.psk_for("a"), self.directory.psk_for("b")),
                         (b"3" * 16, None))
        self.assertEqual(sorted(self.withdrawn), ["a", "b"])
        self.assertEqual(self.directory.serial, 3)
