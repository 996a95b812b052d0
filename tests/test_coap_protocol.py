"""The CoAP endpoint, datagram in and datagram out, on a fake transport and
a controlled clock: message layer rules (RFC 7252), retransmissions, limits,
``/.well-known/core`` (RFC 6690) and observing ``/time`` (RFC 7641)."""

from __future__ import annotations

from ipaddress import ip_address

from twisted.internet import defer, task
from twisted.trial.unittest import SynchronousTestCase
from txthings import coap, resource as txresource

from sense_gateway.coap.protocol import GatewayProtocol
from sense_gateway.coap.resources import build_tree
from sense_gateway.coap.time import TimeResource
from sense_gateway.config import load_config
from sense_gateway.formats import Format
from sense_gateway.pipeline import IngestPipeline
from tests.support import decode_number, parse, request_datagram

PEER = ("::1", 40000)
OTHER_PEER = ("2001:db8::7", 40000)


class MemoryQueue:
    """Records puts; each put's Deferred fires at once unless ``hold`` is set."""

    def __init__(self):
        self.envelopes = []
        self.hold = False
        self.pending: list[defer.Deferred] = []
        self.failure = None

    def put(self, envelopes):
        if self.failure is not None:
            return defer.fail(self.failure)
        self.envelopes.extend(envelopes)
        if self.hold:
            d = defer.Deferred()
            self.pending.append(d)
            return d
        return defer.succeed(None)


class DatagramTransport:
    def __init__(self):
        self.written: list[tuple[bytes, tuple]] = []

    def write(self, data, addr):
        self.written.append((data, addr))


class EndpointTestCase(SynchronousTestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.clock.advance(1_800_000_000)
        # txthings schedules its own timers on the global reactor.
        self.patch(coap, "reactor", self.clock)
        self.config = load_config(environ={}, overrides={"coap.max_payload": 64})
        self.queue = MemoryQueue()
        fmt = Format("number", content_formats=(0, None), paths=("/data",), decode=decode_number)
        self.pipeline = IngestPipeline([fmt], lambda **kw: [], self.queue, self.config)
        self.time = TimeResource(self.clock, interval=60, max_observers=2)
        self.root = build_tree(self.pipeline, self.clock, {"/time": self.time})
        self.protocol = GatewayProtocol(
            txresource.Endpoint(self.root), clock=self.clock, exchange_lifetime=247,
            max_exchanges=100, max_payload=64)
        self.protocol.observable_resources = [self.time]
        self.transport = DatagramTransport()
        self.protocol.makeConnection(self.transport)

    def send(self, datagram, peer=PEER):
        before = len(self.transport.written)
        self.protocol.datagramReceived(datagram, peer)
        return [parse(d) for d, _ in self.transport.written[before:]]

    def only(self, datagram, peer=PEER):
        sent = self.send(datagram, peer)
        self.assertEqual(len(sent), 1, sent)
        return sent[0]


class MessageLayerTests(EndpointTestCase):
    def test_con_post_gets_piggybacked_changed(self):
        response = self.only(request_datagram(payload=b"21.5", mid=7, token=b"tk"))
        self.assertEqual((response.mtype, response.mid, response.code, response.token),
                         (coap.ACK, 7, coap.CHANGED, b"tk"))
        self.assertEqual(len(self.queue.envelopes), 1)
        self.assertEqual(self.queue.envelopes[0].readings[0].fields, {"value": 21.5})

    def test_retransmitted_con_is_answered_identically_and_queued_once(self):
        datagram = request_datagram(payload=b"1", mid=9)
        self.send(datagram)
        self.send(datagram)
        first, second = (d for d, _ in self.transport.written)
        self.assertEqual(first, second)
        self.assertEqual(len(self.queue.envelopes), 1)

    def test_same_message_id_from_another_peer_is_a_new_request(self):
        datagram = request_datagram(payload=b"1", mid=9)
        self.send(datagram)
        self.send(datagram, OTHER_PEER)
        self.assertEqual(len(self.queue.envelopes), 2)

    def test_retransmission_while_storing_gets_no_second_answer(self):
        self.queue.hold = True
        datagram = request_datagram(payload=b"1", mid=10)
        self.assertEqual(self.send(datagram), [])
        self.assertEqual(self.send(datagram), [])
        self.queue.pending[0].callback(None)
        self.assertEqual(len(self.transport.written), 1)
        self.assertEqual(len(self.queue.envelopes), 1)

    def test_slow_store_gets_empty_ack_then_separate_confirmable_response(self):
        self.queue.hold = True
        datagram = request_datagram(payload=b"1", mid=11, token=b"t1")
        self.send(datagram)
        self.clock.advance(coap.EMPTY_ACK_DELAY)
        ack = parse(self.transport.written[-1][0])
        self.assertEqual((ack.mtype, ack.code, ack.mid), (coap.ACK, coap.EMPTY, 11))
        self.queue.pending[0].callback(None)
        separate = parse(self.transport.written[-1][0])
        self.assertEqual((separate.mtype, separate.code, separate.token),
                         (coap.CON, coap.CHANGED, b"t1"))
        # A late retransmission of the request gets the empty ACK again.
        self.assertEqual(self.only(datagram).code, coap.EMPTY)
        self.assertEqual(len(self.queue.envelopes), 1)

    def test_non_request_gets_non_response(self):
        response = self.only(request_datagram(payload=b"1", mtype=coap.NON, mid=12))
        self.assertEqual((response.mtype, response.code), (coap.NON, coap.CHANGED))

    def test_ping_gets_reset(self):
        response = self.only(bytes([0x40, 0, 0x12, 0x34]))
        self.assertEqual((response.mtype, response.mid), (coap.RST, 0x1234))

    def test_exchange_lifetime_ends_duplicate_detection(self):
        datagram = request_datagram(payload=b"1", mid=13)
        self.send(datagram)
        self.clock.advance(248)
        self.send(datagram)
        self.assertEqual(len(self.queue.envelopes), 2)

    def test_remembered_exchanges_are_bounded(self):
        for mid in range(250):
            self.send(request_datagram(payload=b"1", mid=mid))
        self.assertEqual(len(self.protocol.exchanges), 100)
        self.assertEqual(self.protocol.exchanges.evicted, 150)
        self.assertEqual(len(self.queue.envelopes), 250)


class MalformedTests(EndpointTestCase):
    def test_short_datagram_is_ignored(self):
        self.assertEqual(self.send(b"\x40\x02"), [])

    def test_unknown_version_is_ignored(self):
        self.assertEqual(self.send(b"\x80\x02\x00\x01"), [])

    def test_malformed_con_gets_reset(self):
        datagram = bytes([0x49, 0x02, 0x00, 0x05]) + b"123456789"  # token length 9
        response = self.only(datagram)
        self.assertEqual((response.mtype, response.mid), (coap.RST, 5))

    def test_malformed_non_is_ignored(self):
        datagram = bytes([0x50, 0x02, 0x00, 0x05, 0xB4]) + b"da"  # option value truncated
        self.assertEqual(self.send(datagram), [])

    def test_payload_marker_without_payload_gets_reset(self):
        datagram = request_datagram(payload=b"", mid=6) + b"\xff"
        self.assertEqual(self.only(datagram).mtype, coap.RST)

    def test_reserved_option_nibble_gets_reset(self):
        datagram = bytes([0x40, 0x02, 0x00, 0x07, 0xF1, 0x00])
        self.assertEqual(self.only(datagram).mtype, coap.RST)

    def test_malformed_datagrams_leave_no_state(self):
        for mid in range(50):
            self.send(bytes([0x49, 0x02, 0x00, mid]) + b"x" * 9)
        self.assertEqual(len(self.protocol.exchanges), 0)
        self.assertEqual(self.protocol.malformed, 50)

    def test_unknown_critical_option_gets_bad_option(self):
        datagram = request_datagram(payload=b"1", options=[coap.OpaqueOption(2049, b"x")])
        response = self.only(datagram)
        self.assertEqual(response.code, coap.BAD_OPTION)
        self.assertIn(b"2049", response.payload)
        self.assertEqual(self.queue.envelopes, [])

    def test_non_request_with_unknown_critical_option_is_rejected(self):
        datagram = request_datagram(payload=b"1", mtype=coap.NON,
                                    options=[coap.OpaqueOption(2049, b"x")])
        reset = self.only(datagram)
        self.assertEqual((reset.mtype, reset.mid, reset.code), (coap.RST, 0x1234, coap.EMPTY))
        self.assertEqual(self.queue.envelopes, [])

    def test_unknown_elective_option_is_ignored(self):
        datagram = request_datagram(payload=b"1", options=[coap.OpaqueOption(2048, b"x")])
        self.assertEqual(self.only(datagram).code, coap.CHANGED)

    def test_proxy_uri_is_refused(self):
        datagram = request_datagram(
            payload=b"1", options=[coap.StringOption(coap.PROXY_URI, b"coap://x/")])
        self.assertEqual(self.only(datagram).code, coap.PROXYING_NOT_SUPPORTED)


class RequestErrorTests(EndpointTestCase):
    def test_unknown_path_is_not_found(self):
        self.assertEqual(self.only(request_datagram(path="nope", payload=b"1")).code,
                         coap.NOT_FOUND)

    def test_get_on_ingest_path_is_method_not_allowed(self):
        self.assertEqual(self.only(request_datagram(code=coap.GET)).code,
                         coap.METHOD_NOT_ALLOWED)

    def test_undecodable_payload_is_bad_request_with_diagnostic(self):
        response = self.only(request_datagram(payload=b"warm"))
        self.assertEqual((response.code, response.payload), (coap.BAD_REQUEST, b"not a number"))
        self.assertEqual(self.queue.envelopes, [])

    def test_unknown_content_format_is_unsupported(self):
        response = self.only(request_datagram(payload=b"1", content_format=60))
        self.assertEqual(response.code, coap.UNSUPPORTED_CONTENT_FORMAT)
        self.assertEqual(response.payload,
                         b"Content-Format 60 not accepted on /data; use 0, none")

    def test_payload_over_limit_is_too_large(self):
        response = self.only(request_datagram(payload=b"1" * 65))
        self.assertEqual(response.code, coap.REQUEST_ENTITY_TOO_LARGE)

    def test_blockwise_upload_over_limit_is_refused_with_size1(self):
        block = coap.BlockOption(coap.BLOCK1, (4, True, 0))  # bytes 64..79
        response = self.only(request_datagram(payload=b"1" * 16, options=[block]))
        self.assertEqual(response.code, coap.REQUEST_ENTITY_TOO_LARGE)
        self.assertEqual(response.opt.getOption(coap.SIZE1)[0].value, 64)

    def test_blockwise_upload_within_limit_is_assembled(self):
        first = request_datagram(payload=b"12345678" * 2, mid=1,
                                 options=[coap.BlockOption(coap.BLOCK1, (0, True, 0))])
        self.assertEqual(self.only(first).code, coap.CONTINUE)
        last = request_datagram(payload=b".5", mid=2,
                                options=[coap.BlockOption(coap.BLOCK1, (1, False, 0))])
        self.assertEqual(self.only(last).code, coap.CHANGED)
        self.assertEqual(self.queue.envelopes[0].readings[0].fields["value"], 1234567812345678.5)

    def test_blockwise_upload_to_unknown_path_is_not_found_before_assembly(self):
        first = request_datagram(path="nowhere", payload=b"1" * 16,
                                 options=[coap.BlockOption(coap.BLOCK1, (0, True, 0))])
        self.assertEqual(self.only(first).code, coap.NOT_FOUND)
        self.assertEqual(len(self.protocol.incoming_requests), 0)

    def test_one_source_cannot_take_every_blockwise_slot(self):
        from sense_gateway.coap.protocol import MAX_ASSEMBLIES_PER_SOURCE

        def start(peer, mid):
            return self.only(request_datagram(payload=b"1" * 16, mid=mid, options=[
                coap.BlockOption(coap.BLOCK1, (0, True, 0))]), peer=peer)
        # One address, many ports: the ports do not multiply its share.
        for n in range(MAX_ASSEMBLIES_PER_SOURCE):
            self.assertEqual(start(("10.0.0.9", 40000 + n), n).code, coap.CONTINUE)
        refused = start(("10.0.0.9", 50000), 100)
        self.assertEqual((refused.code, refused.payload),
                         (coap.SERVICE_UNAVAILABLE, b"too many block-wise transfers from this address"))
        self.assertEqual(refused.opt.getOption(coap.MAX_AGE)[0].value, 10)
        self.assertEqual(start(("10.0.0.10", 40000), 101).code, coap.CONTINUE)

    def test_full_queue_is_service_unavailable_with_max_age(self):
        from sense_gateway.errors import Unavailable

        self.queue.failure = Unavailable("queue full", max_age=7)
        response = self.only(request_datagram(payload=b"1"))
        self.assertEqual((response.code, response.payload), (coap.SERVICE_UNAVAILABLE, b"queue full"))
        self.assertEqual(response.opt.getOption(coap.MAX_AGE)[0].value, 7)

    def test_failed_store_is_never_acknowledged_as_stored(self):
        self.queue.failure = OSError("disk I/O error")
        response = self.only(request_datagram(payload=b"1"))
        self.assertEqual(response.code, coap.SERVICE_UNAVAILABLE)
        self.flushLoggedErrors(OSError)


class WellKnownCoreTests(EndpointTestCase):
    def get(self, *queries):
        """GET the listing, following Block2 (txthings sends 64-byte blocks)."""
        payload, block, mid = b"", 0, 1
        while True:
            options = [coap.StringOption(coap.URI_QUERY, q.encode()) for q in queries]
            if block:
                options.append(coap.BlockOption(coap.BLOCK2, (block, False, 2)))
            response = self.only(request_datagram(code=coap.GET, path=".well-known/core",
                                                  options=options, mid=mid))
            self.assertEqual((response.code, response.opt.content_format), (coap.CONTENT, 40))
            payload += response.payload
            if response.opt.block2 is None or not response.opt.block2.more:
                return payload.decode()
            block, mid = block + 1, mid + 1

    def test_txthings_listing_mixes_bytes_and_str(self):
        # Why we do not use txthings' generateResourceList: on Python 3 it
        # joins bytes path segments to str and fails.
        self.assertRaises(TypeError, self.root.generateResourceList, [])

    def test_lists_every_resource_with_attributes(self):
        self.assertEqual(
            self.get(),
            '</data>;rt="sense.readings";if="core.b";ct=0,'
            '</time>;rt="sense.time";if="core.s";ct="0 50 60";obs')

    def test_filter_by_resource_type(self):
        self.assertEqual(self.get("rt=sense.time"), '</time>;rt="sense.time";if="core.s";ct="0 50 60";obs')

    def test_filter_by_href_prefix(self):
        self.assertEqual(self.get("href=/da*"), '</data>;rt="sense.readings";if="core.b";ct=0')

    def test_filter_by_one_of_several_content_formats(self):
        self.assertTrue(self.get("ct=50").startswith("</time>"))

    def test_filter_matching_nothing_is_empty(self):
        self.assertEqual(self.get("rt=nothing"), "")


class ObserveTimeTests(EndpointTestCase):
    def observe(self, token, value=0, peer=PEER, mid=100):
        datagram = request_datagram(code=coap.GET, path="time", token=token, mid=mid,
                                    options=[coap.UintOption(coap.OBSERVE, value)])
        return self.only(datagram, peer)

    def setUp(self):
        super().setUp()
        self.time.startService()
        self.addCleanup(self.time.stopService)

    def test_get_time_is_the_server_clock(self):
        response = self.only(request_datagram(code=coap.GET, path="time"))
        self.assertEqual((response.code, response.payload), (coap.CONTENT, b"1800000000"))

    def test_observer_is_notified_until_it_resets(self):
        first = self.observe(b"ob")
        self.assertIsNotNone(first.opt.observe)
        self.clock.advance(60)
        notification = parse(self.transport.written[-1][0])
        self.assertEqual((notification.mtype, notification.token, notification.payload),
                         (coap.CON, b"ob", b"1800000060"))
        rst = bytes([0x70, 0]) + notification.mid.to_bytes(2, "big")
        self.send(rst)
        self.assertEqual(self.time.observers, {})
        sent = len(self.transport.written)
        self.clock.advance(60)
        self.assertEqual(len(self.transport.written), sent)

    def test_deregistration_stops_notifications(self):
        self.observe(b"ob", mid=1)
        response = self.observe(b"ob", value=1, mid=2)
        self.assertIsNone(response.opt.observe)
        self.assertEqual(self.time.observers, {})

    def test_observer_that_never_answers_is_dropped(self):
        self.observe(b"ob")
        self.clock.advance(60)
        for _ in range(coap.MAX_RETRANSMIT + 1):
            self.clock.advance(100)
        self.assertNotIn(((ip_address("::1"), 40000), b"ob"), self.time.observers)

    def test_observers_are_bounded(self):
        for i in range(4):
            self.observe(bytes([i]), mid=i)
        self.assertEqual(len(self.time.observers), 2)
