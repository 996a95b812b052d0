"""Where requests go and what comes back, datagram in and datagram out:
readings to the pipeline (one datagram or assembled from blocks, RFC
7959), everything else to the resource tree: errors with diagnostics,
``/.well-known/core`` (RFC 6690) in blocks, ``/time`` by Accept, and
observing it (RFC 7641)."""

from __future__ import annotations

import cbor2
import orjson
from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase
from txthings import coap as tx

from sense_gateway.coap.blockwise import Uploads
from sense_gateway.coap.confirmable import MAX_RETRANSMIT
from sense_gateway.coap.message import (
    ACK, BAD_REQUEST, BLOCK1, BLOCK2, CHANGED, CON, CONTENT, CONTINUE, MAX_AGE, METHOD_NOT_ALLOWED,
    NOT_ACCEPTABLE, NOT_FOUND, OBSERVE, REQUEST_ENTITY_INCOMPLETE, REQUEST_ENTITY_TOO_LARGE,
    SERVICE_UNAVAILABLE, SIZE1, UNSUPPORTED_CONTENT_FORMAT, Block, parse,
)
from sense_gateway.coap.resources import GatewayResource
from tests.support import PEER, CoapEndpoint, request_datagram


def block1(number, more, szx=0):
    return tx.BlockOption(tx.BLOCK1, (number, more, szx))


class DispatchTestCase(SynchronousTestCase):
    def setUp(self):
        self.endpoint = CoapEndpoint(self)
        self.queue = self.endpoint.queue
        self.clock = self.endpoint.clock

    def only(self, datagram, peer=PEER):
        return self.endpoint.only(datagram, peer)


class IngestTests(DispatchTestCase):
    def test_con_post_gets_piggybacked_changed(self):
        response = self.only(request_datagram(payload=b"21.5", mid=7, token=b"tk"))
        self.assertEqual((response.mtype, response.mid, response.code, response.token),
                         (ACK, 7, CHANGED, b"tk"))
        [envelope] = self.queue.stored
        self.assertEqual(envelope.readings[0].fields, {"value": 21.5})
        self.assertEqual((envelope.transport, envelope.identity, envelope.source),
                         ("coap", None, "[::1]:40000"))

    def test_authenticated_identity_reaches_the_envelope(self):
        self.endpoint.layer.datagram_received(request_datagram(payload=b"1"), PEER, "node-7")
        self.assertEqual(self.queue.stored[0].identity, "node-7")

    def test_ipv4_peer_is_named_by_its_ipv4_address(self):
        self.only(request_datagram(payload=b"1"), ("::ffff:192.0.2.7", 5683))
        self.assertEqual(self.queue.stored[0].source, "192.0.2.7:5683")

    def test_unknown_path_is_not_found_with_a_diagnostic(self):
        response = self.only(request_datagram(path="nope", payload=b"1"))
        self.assertEqual((response.code, response.payload), (NOT_FOUND, b"no such resource"))

    def test_get_on_ingest_path_is_method_not_allowed(self):
        self.assertEqual(self.only(request_datagram(code=tx.GET)).code, METHOD_NOT_ALLOWED)

    def test_post_to_time_is_method_not_allowed(self):
        self.assertEqual(self.only(request_datagram(path="time", payload=b"1")).code,
                         METHOD_NOT_ALLOWED)

    def test_undecodable_payload_is_bad_request_with_diagnostic(self):
        response = self.only(request_datagram(payload=b"warm"))
        self.assertEqual((response.code, response.payload), (BAD_REQUEST, b"not a number"))
        self.assertEqual(self.queue.envelopes, [])

    def test_unknown_content_format_is_unsupported(self):
        response = self.only(request_datagram(payload=b"1", content_format=60))
        self.assertEqual((response.code, response.payload),
                         (UNSUPPORTED_CONTENT_FORMAT,
                          b"Content-Format 60 not accepted on /data; use 0, none"))

    def test_payload_over_limit_is_too_large(self):
        self.assertEqual(self.only(request_datagram(payload=b"1" * 65)).code,
                         REQUEST_ENTITY_TOO_LARGE)


class BlockwiseUploadTests(DispatchTestCase):
    def test_upload_within_limit_is_assembled(self):
        first = request_datagram(payload=b"12345678" * 2, mid=1, options=[block1(0, True)])
        response = self.only(first)
        self.assertEqual((response.code, response.option(BLOCK1)), (CONTINUE, Block(0, True, 0)))
        last = request_datagram(payload=b".5", mid=2, options=[block1(1, False)])
        response = self.only(last)
        self.assertEqual((response.code, response.option(BLOCK1)), (CHANGED, Block(1, False, 0)))
        self.assertEqual(self.queue.stored[0].readings[0].fields["value"], 1234567812345678.5)

    def test_upload_over_limit_is_refused_with_size1(self):
        response = self.only(request_datagram(payload=b"1" * 16, options=[block1(4, True)]))
        self.assertEqual((response.code, response.option(SIZE1)), (REQUEST_ENTITY_TOO_LARGE, 64))

    def test_announced_size_over_limit_is_refused_at_the_first_block(self):
        response = self.only(request_datagram(payload=b"1" * 16, options=[
            block1(0, True), tx.UintOption(tx.SIZE1, 1000)]))
        self.assertEqual(response.code, REQUEST_ENTITY_TOO_LARGE)

    def test_block_out_of_order_is_incomplete(self):
        self.only(request_datagram(payload=b"1" * 16, mid=1, options=[block1(0, True)]))
        response = self.only(request_datagram(payload=b"1" * 16, mid=2, options=[block1(2, True)]))
        self.assertEqual((response.code, response.payload),
                         (REQUEST_ENTITY_INCOMPLETE, b"expected the block at byte 16"))
        self.assertEqual(len(self.endpoint.dispatcher.uploads("coap")), 0)

    def test_upload_to_unknown_path_is_not_found_before_assembly(self):
        first = request_datagram(path="nowhere", payload=b"1" * 16, options=[block1(0, True)])
        self.assertEqual(self.only(first).code, NOT_FOUND)
        self.assertEqual(len(self.endpoint.dispatcher.uploads("coap")), 0)

    def test_plain_post_during_an_upload_ends_it(self):
        self.only(request_datagram(payload=b"1" * 16, mid=1, options=[block1(0, True)]))
        self.assertEqual(self.only(request_datagram(payload=b"2", mid=2)).code, CHANGED)
        self.assertEqual(len(self.endpoint.dispatcher.uploads("coap")), 0)

    def test_one_source_cannot_take_every_upload_slot(self):
        def start(peer, mid):
            return self.only(request_datagram(payload=b"1" * 16, mid=mid,
                                              options=[block1(0, True)]), peer=peer)
        per_source = self.endpoint.dispatcher.uploads("coap").max_per_source
        # One address, many ports: the ports do not multiply its share.
        for n in range(per_source):
            self.assertEqual(start(("10.0.0.9", 40000 + n), n).code, CONTINUE)
        refused = start(("10.0.0.9", 50000), 100)
        self.assertEqual((refused.code, refused.payload),
                         (SERVICE_UNAVAILABLE, b"too many block-wise transfers from this address"))
        self.assertEqual(refused.option(MAX_AGE), 10)
        self.assertEqual(start(("10.0.0.10", 40000), 101).code, CONTINUE)

    def test_abandoned_uploads_are_forgotten(self):
        uploads = self.endpoint.dispatcher._uploads["coap"] = Uploads(64, self.clock, max_uploads=2)
        for n in range(2):
            self.only(request_datagram(payload=b"1" * 16, mid=n, options=[block1(0, True)]),
                      peer=(f"10.0.0.{n + 1}", 40000))
        refused = self.only(request_datagram(payload=b"1" * 16, mid=9, options=[block1(0, True)]),
                            peer=("10.0.0.9", 40000))
        self.assertEqual(refused.code, SERVICE_UNAVAILABLE)
        self.clock.advance(uploads.lifetime)
        self.assertEqual(self.only(request_datagram(payload=b"1" * 16, mid=10, options=[
            block1(0, True)]), peer=("10.0.0.9", 40000)).code, CONTINUE)
        self.assertEqual(len(uploads), 1)


class WellKnownCoreTests(DispatchTestCase):
    def get(self, *queries):
        """GET the listing, following Block2 (64-byte blocks)."""
        payload, block, mid = b"", 0, 1
        while True:
            options = [tx.StringOption(tx.URI_QUERY, q.encode()) for q in queries]
            if block:
                options.append(tx.BlockOption(tx.BLOCK2, (block, False, 2)))
            response = self.only(request_datagram(code=tx.GET, path=".well-known/core",
                                                  options=options, mid=mid))
            self.assertEqual((response.code, response.content_format), (CONTENT, 40))
            payload += response.payload
            block2 = response.option(BLOCK2)
            if block2 is None or not block2.more:
                return payload.decode()
            self.assertEqual(len(response.payload), 64)
            block, mid = block + 1, mid + 1

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

    def test_larger_blocks_asked_for_are_served_in_ours(self):
        # A peer asking for 256-byte blocks (SZX 4) gets 64-byte ones at
        # the same offset: block 1 of 256 is block 4 of 64.
        response = self.only(request_datagram(code=tx.GET, path=".well-known/core", options=[
            tx.BlockOption(tx.BLOCK2, (0, False, 4))]))
        self.assertEqual(response.option(BLOCK2), Block(0, True, 2))

    def test_block_beyond_the_end_is_bad_request(self):
        response = self.only(request_datagram(code=tx.GET, path=".well-known/core", options=[
            tx.BlockOption(tx.BLOCK2, (100, False, 2))]))
        self.assertEqual((response.code, response.payload), (BAD_REQUEST, b"block 100 out of range"))


class TimeTests(DispatchTestCase):
    def get(self, accept=None, **kw):
        options = [] if accept is None else [tx.UintOption(tx.ACCEPT, accept)]
        return self.only(request_datagram(code=tx.GET, path="time", options=options, **kw))

    def test_without_accept_is_text(self):
        response = self.get()
        self.assertEqual((response.code, response.content_format, response.payload),
                         (CONTENT, 0, b"1800000000"))

    def test_accept_text_json_and_cbor(self):
        self.assertEqual(self.get(0).payload, b"1800000000")
        json = self.get(50, mid=2)
        self.assertEqual((json.content_format, orjson.loads(json.payload)), (50, {"time": 1.8e9}))
        cbor = self.get(60, mid=3)
        self.assertEqual((cbor.content_format, cbor2.loads(cbor.payload)), (60, 1.8e9))

    def test_accept_it_cannot_serve_is_not_acceptable(self):
        response = self.get(41)
        self.assertEqual((response.code, response.payload),
                         (NOT_ACCEPTABLE, b"accept one of 0, 50, 60"))


class ObserveTimeTests(DispatchTestCase):
    def setUp(self):
        super().setUp()
        self.endpoint.time.startService()
        self.addCleanup(self.endpoint.time.stopService)

    def observe(self, token, value=0, peer=PEER, mid=100):
        datagram = request_datagram(code=tx.GET, path="time", token=token, mid=mid,
                                    options=[tx.UintOption(tx.OBSERVE, value)])
        return self.only(datagram, peer)

    def observers(self):
        return self.endpoint.time.observers

    def test_observer_is_notified_until_it_resets(self):
        first = self.observe(b"ob")
        self.assertIsNotNone(first.option(OBSERVE))
        self.clock.advance(60)
        notification = parse(self.endpoint.written()[-1])
        self.assertEqual((notification.mtype, notification.token, notification.payload),
                         (CON, b"ob", b"1800000060"))
        self.assertGreater(notification.option(OBSERVE), first.option(OBSERVE))
        self.endpoint.send(bytes([0x70, 0]) + notification.mid.to_bytes(2, "big"))
        self.assertEqual(self.observers(), {})
        sent = len(self.endpoint.written())
        self.clock.advance(60)
        self.assertEqual(len(self.endpoint.written()), sent)

    def test_acknowledged_notifications_keep_coming(self):
        self.observe(b"ob")
        for n in range(3):
            self.clock.advance(60)
            notification = parse(self.endpoint.written()[-1])
            self.assertEqual(notification.payload, str(1800000060 + 60 * n).encode())
            self.endpoint.send(bytes([0x60, 0]) + notification.mid.to_bytes(2, "big"))
        self.assertEqual(len(self.observers()), 1)

    def test_deregistration_stops_notifications(self):
        self.observe(b"ob", mid=1)
        response = self.observe(b"ob", value=1, mid=2)
        self.assertIsNone(response.option(OBSERVE))
        self.assertEqual(self.observers(), {})

    def test_observer_that_never_answers_is_dropped(self):
        self.observe(b"ob")
        self.clock.advance(60)
        for _ in range(MAX_RETRANSMIT + 1):
            self.clock.advance(50)
        self.assertEqual(self.observers(), {})

    def test_observers_are_bounded(self):
        for i in range(4):
            self.observe(bytes([i]), mid=i)
        self.assertEqual(len(self.observers()), 2)


class PluginResourceTests(SynchronousTestCase):
    def test_a_failing_resource_costs_one_internal_error(self):
        class Broken(GatewayResource):
            def render_GET(self, request):
                return defer.fail(RuntimeError("bug"))

        endpoint = CoapEndpoint(self, resources={"/broken": Broken()})
        response = endpoint.only(request_datagram(code=tx.GET, path="broken"))
        self.assertEqual((response.code, response.payload), (0xA0, b"internal error"))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_resource_sees_the_peer_and_its_identity(self):
        seen = []

        class Echo(GatewayResource):
            def render_GET(self, request):
                seen.append((request.remote[1], request.transport, request.identity))
                return defer.succeed(tx.Message(code=tx.CONTENT, payload=b"ok"))

        endpoint = CoapEndpoint(self, resources={"/echo": Echo()})
        endpoint.layer.datagram_received(request_datagram(code=tx.GET, path="echo"), PEER, "node-7")
        self.assertEqual(seen, [(40000, "coap", "node-7")])


class ObservationOwnerTests(DispatchTestCase):
    def setUp(self):
        super().setUp()
        self.endpoint.time.startService()
        self.addCleanup(self.endpoint.time.stopService)

    def test_a_plain_datagram_cannot_end_an_observation_made_over_dtls(self):
        observe = request_datagram(code=tx.GET, path="time", token=b"ob", mid=1,
                                   options=[tx.UintOption(tx.OBSERVE, 0)])
        self.endpoint.layer.datagram_received(observe, PEER, "node-7", 3)
        deregister = request_datagram(code=tx.GET, path="time", token=b"ob", mid=2,
                                      options=[tx.UintOption(tx.OBSERVE, 1)])
        self.endpoint.send(deregister)  # same address, token; plain CoAP
        self.assertEqual(len(self.endpoint.time.observers), 1)
        self.endpoint.layer.datagram_received(
            request_datagram(code=tx.GET, path="time", token=b"ob", mid=3,
                             options=[tx.UintOption(tx.OBSERVE, 1)]), PEER, "node-7", 3)
        self.assertEqual(self.endpoint.time.observers, {})
