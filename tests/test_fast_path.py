"""The CoAP hot path: single-datagram POSTs to ingest resources served by
:class:`GatewayProtocol` itself, without txthings' per-request machinery.

Datagram in, datagram out, envelope in the queue, on a fake transport and
a controlled clock. Where the hot path must answer exactly as txthings'
path does, the same datagram goes through a second protocol with
``fast_path=False`` and the bytes are compared. One test at the end runs
the real gateway (SQLite queue, real UDP).
"""

from __future__ import annotations

import orjson
from twisted.internet import defer, task
from twisted.trial.unittest import SynchronousTestCase, TestCase
from txthings import coap, resource as txresource

from sense_gateway.coap.message import parse_simple_post
from sense_gateway.coap.protocol import GatewayProtocol
from sense_gateway.coap.resources import IngestResource, build_tree
from sense_gateway.coap.time import TimeResource
from sense_gateway.config import load_config
from sense_gateway.errors import Unavailable
from sense_gateway.formats import Format
from sense_gateway.pipeline import IngestPipeline
from tests.support import (RawCoapPeer, decode_number, parse, queued, request_datagram,
                           start_gateway)

PEER = ("::1", 40000)


class GroupCommitQueue:
    """A queue with ``put_then``, committing when the test says so."""

    def __init__(self):
        self.envelopes = []
        self.stored = []
        self.waiting = []
        self.refuse = None
        self.puts = 0

    def put_then(self, envelopes, done):
        self.puts += 1
        if self.refuse is not None:
            done(self.refuse)
            return
        self.envelopes.extend(envelopes)
        self.waiting.append((envelopes, done))

    def put(self, envelopes):
        d = defer.Deferred()
        self.put_then(envelopes, lambda error: d.callback(None) if error is None else d.errback(error))
        return d

    def commit(self, error=None):
        """Finish every waiting put, as one group commit would."""
        waiting, self.waiting = self.waiting, []
        for envelopes, done in waiting:
            if error is None:
                self.stored.extend(envelopes)
            done(error)


class DatagramTransport:
    def __init__(self):
        self.written: list[tuple[bytes, tuple]] = []

    def write(self, data, addr):
        self.written.append((data, addr))


class HotPathTestCase(SynchronousTestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.clock.advance(1_800_000_000)
        self.patch(coap, "reactor", self.clock)
        self.queue = GroupCommitQueue()
        self.protocol, self.transport, self.time = self.endpoint(fast_path=True)

    def endpoint(self, fast_path, queue=None):
        config = load_config(environ={}, overrides={"coap.max_payload": 64})
        fmt = Format("number", content_formats=(0, None), paths=("/data",), decode=decode_number)
        pipeline = IngestPipeline([fmt], lambda **kw: [], queue or self.queue, config)
        time = TimeResource(self.clock, interval=60, max_observers=2)
        root = build_tree(pipeline, self.clock, {"/time": time})
        protocol = GatewayProtocol(
            txresource.Endpoint(root), clock=self.clock, exchange_lifetime=247,
            max_exchanges=100, max_payload=64, fast_path=fast_path)
        protocol.observable_resources = [time]
        transport = DatagramTransport()
        protocol.makeConnection(transport)
        return protocol, transport, time

    def send(self, datagram, peer=PEER, protocol=None, transport=None):
        protocol = protocol or self.protocol
        transport = transport or self.transport
        before = len(transport.written)
        protocol.datagramReceived(datagram, peer)
        return [d for d, _ in transport.written[before:]]

    def written(self):
        return [d for d, _ in self.transport.written]


class HotPathTests(HotPathTestCase):
    def test_con_post_is_served_on_the_hot_path(self):
        self.send(request_datagram(payload=b"21.5", mid=7, token=b"tk"))
        self.assertEqual(self.protocol.hot_path, 1)
        self.assertEqual(len(self.queue.envelopes), 1)
        self.assertEqual(self.queue.envelopes[0].readings[0].fields, {"value": 21.5})

    def test_response_is_never_sent_before_the_commit(self):
        self.assertEqual(self.send(request_datagram(payload=b"1", mid=7, token=b"tk")), [])
        self.clock.advance(0.05)
        self.assertEqual(self.written(), [])
        self.queue.commit()
        [datagram] = self.written()
        response = parse(datagram)
        self.assertEqual((response.mtype, response.mid, response.code, response.token, response.payload),
                         (coap.ACK, 7, coap.CHANGED, b"tk", b""))

    def test_one_commit_answers_every_request_in_it(self):
        for mid in range(10):
            self.send(request_datagram(payload=b"1", mid=mid, token=bytes([mid])))
        self.assertEqual(self.written(), [])
        self.queue.commit()
        self.assertEqual(sorted(parse(d).mid for d in self.written()), list(range(10)))
        self.assertEqual(self.protocol.in_flight, 0)

    def test_retransmission_during_the_commit_is_answered_once_and_stored_once(self):
        datagram = request_datagram(payload=b"1", mid=9)
        self.send(datagram)
        self.assertEqual(self.send(datagram), [])
        self.assertEqual(self.send(datagram), [])
        self.queue.commit()
        self.assertEqual(len(self.written()), 1)
        self.assertEqual(len(self.queue.stored), 1)
        self.assertEqual(self.protocol.duplicates, 2)

    def test_retransmission_after_the_answer_replays_identical_bytes(self):
        datagram = request_datagram(payload=b"1", mid=9, token=b"abc")
        self.send(datagram)
        self.queue.commit()
        [again] = self.send(datagram)
        self.assertEqual(again, self.written()[0])
        self.assertEqual(self.queue.puts, 1)

    def test_same_message_id_from_another_port_is_a_new_request(self):
        datagram = request_datagram(payload=b"1", mid=9)
        self.send(datagram)
        self.send(datagram, ("::1", 40001))
        self.assertEqual(self.queue.puts, 2)

    def test_non_post_gets_a_non_response(self):
        self.send(request_datagram(payload=b"1", mtype=coap.NON, mid=12, token=b"n"))
        self.queue.commit()
        [datagram] = self.written()
        response = parse(datagram)
        self.assertEqual((response.mtype, response.code, response.token), (coap.NON, coap.CHANGED, b"n"))

    def test_slow_non_gets_no_empty_ack(self):
        # txthings sends an ACK to a NON request here (RFC 7252 4.3: NON
        # requests are never acknowledged); the hot path does not.
        self.send(request_datagram(payload=b"1", mtype=coap.NON, mid=12, token=b"n"))
        self.clock.advance(1)
        self.assertEqual(self.written(), [])
        self.queue.commit()
        self.assertEqual(parse(self.written()[0]).mtype, coap.NON)

    def test_duplicate_non_is_stored_once(self):
        datagram = request_datagram(payload=b"1", mtype=coap.NON, mid=12)
        self.send(datagram)
        self.send(datagram)
        self.queue.commit()
        self.assertEqual((len(self.queue.stored), len(self.written())), (1, 1))

    def test_slow_commit_gets_empty_ack_then_separate_confirmable_response(self):
        datagram = request_datagram(payload=b"1", mid=11, token=b"t1")
        self.send(datagram)
        self.clock.advance(coap.EMPTY_ACK_DELAY)
        [empty] = self.written()
        self.assertEqual(empty, bytes([0x60, 0x00, 0x00, 11]))  # no token (RFC 7252 4.1)
        # A retransmission now gets the empty ACK again.
        self.assertEqual(self.send(datagram), [empty])
        self.queue.commit()
        separate = parse(self.written()[-1])
        self.assertEqual((separate.mtype, separate.code, separate.token), (coap.CON, coap.CHANGED, b"t1"))
        # Retransmitted until the device acknowledges it.
        self.clock.advance(coap.ACK_TIMEOUT * coap.ACK_RANDOM_FACTOR)
        self.assertEqual(parse(self.written()[-1]).mid, separate.mid)
        self.send(bytes([0x60, 0x00]) + separate.mid.to_bytes(2, "big"))
        sent = len(self.written())
        self.clock.advance(60)
        self.assertEqual(len(self.written()), sent)
        self.assertEqual(len(self.queue.stored), 1)

    def test_retransmission_while_storing_is_stored_once_even_after_eviction(self):
        datagram = request_datagram(payload=b"1", mid=1, token=b"t1")
        self.send(datagram)
        # Enough other requests to push mid 1 out of the bounded cache (100).
        for n in range(150):
            self.send(request_datagram(payload=b"2", mid=1000 + n), peer=("::3", 41000))
        self.assertGreater(self.protocol.exchanges.evicted, 0)
        self.assertEqual(self.send(datagram), [])
        self.clock.advance(coap.EMPTY_ACK_DELAY)
        self.assertEqual(self.send(datagram), [bytes([0x60, 0x00, 0x00, 1])])  # the empty ACK again
        self.queue.commit()
        self.assertEqual(len(self.queue.stored), 151)

    def test_another_address_cannot_cancel_a_separate_response(self):
        self.send(request_datagram(payload=b"1", mid=12, token=b"t2"))
        self.clock.advance(coap.EMPTY_ACK_DELAY)
        self.queue.commit()
        separate = parse(self.written()[-1])
        self.assertEqual((separate.mtype, separate.code), (coap.CON, coap.CHANGED))
        forged = bytes([0x60, 0x00]) + separate.mid.to_bytes(2, "big")
        self.send(forged, peer=("::2", 40000))
        self.send(bytes([0x70, 0x00]) + separate.mid.to_bytes(2, "big"), peer=("::2", 40000))
        # Still retransmitted to the device, until the device itself answers.
        sent = len(self.written())
        self.clock.advance(coap.ACK_TIMEOUT * coap.ACK_RANDOM_FACTOR)
        self.assertEqual(len(self.written()), sent + 1)
        self.assertEqual(parse(self.written()[-1]).mid, separate.mid)
        self.send(forged)
        sent = len(self.written())
        self.clock.advance(60)
        self.assertEqual(len(self.written()), sent)

    def test_one_timer_serves_every_waiting_request(self):
        for mid in range(3):
            self.send(request_datagram(payload=b"1", mid=mid))
            self.clock.advance(0.02)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.clock.advance(0.05)  # the first is due, the others not yet
        self.assertEqual([parse(d).code for d in self.written()], [coap.EMPTY])
        self.queue.commit()
        codes = [(parse(d).mtype, parse(d).code) for d in self.written()]
        self.assertEqual(codes[1:], [(coap.CON, coap.CHANGED), (coap.ACK, coap.CHANGED),
                                     (coap.ACK, coap.CHANGED)])

    def test_queue_that_refuses_gets_service_unavailable_with_max_age(self):
        self.queue.refuse = Unavailable("queue full", max_age=7)
        [datagram] = self.send(request_datagram(payload=b"1", mid=3))
        response = parse(datagram)
        self.assertEqual((response.mtype, response.code, response.payload),
                         (coap.ACK, coap.SERVICE_UNAVAILABLE, b"queue full"))
        self.assertEqual(response.opt.getOption(coap.MAX_AGE)[0].value, 7)
        self.assertEqual(self.protocol.in_flight, 0)

    def test_failed_commit_gets_service_unavailable_never_changed(self):
        self.send(request_datagram(payload=b"1", mid=3))
        self.queue.commit(Unavailable("queue write failed", max_age=5))
        [datagram] = self.written()
        self.assertEqual(parse(datagram).code, coap.SERVICE_UNAVAILABLE)
        self.assertEqual(parse(datagram).payload, b"queue write failed")

    def test_unexpected_queue_error_is_logged_and_unavailable(self):
        self.send(request_datagram(payload=b"1", mid=3))
        self.queue.commit(OSError("disk I/O error"))
        self.assertEqual(parse(self.written()[0]).code, coap.SERVICE_UNAVAILABLE)
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)

    def test_requests_in_flight_are_bounded(self):
        self.protocol.max_in_flight = 2
        for mid in range(3):
            self.send(request_datagram(payload=b"1", mid=mid))
        [datagram] = self.written()
        response = parse(datagram)
        self.assertEqual((response.mid, response.code, response.payload),
                         (2, coap.SERVICE_UNAVAILABLE, b"too many requests in flight"))
        self.queue.commit()
        self.assertEqual(len(self.queue.stored), 2)
        self.assertEqual(self.protocol.in_flight, 0)

    def test_nothing_is_sent_after_the_protocol_stops(self):
        self.send(request_datagram(payload=b"1", mid=3))
        self.protocol.doStop()
        self.queue.commit()
        self.clock.advance(10)
        self.assertEqual(self.written(), [])
        self.assertEqual(self.clock.getDelayedCalls(), [])


class FallsBackToTxthingsTests(HotPathTestCase):
    """What the hot path leaves to txthings' full path."""

    def test_unknown_critical_option_is_still_bad_option(self):
        datagram = request_datagram(payload=b"1", options=[coap.OpaqueOption(2049, b"x")])
        [response] = self.send(datagram)
        self.assertEqual(parse(response).code, coap.BAD_OPTION)
        self.assertEqual((self.protocol.hot_path, self.queue.puts), (0, 0))

    def test_unknown_elective_option_takes_the_full_path(self):
        datagram = request_datagram(payload=b"1", options=[coap.OpaqueOption(2048, b"x")])
        self.send(datagram)
        self.assertEqual((self.protocol.hot_path, self.queue.puts), (0, 1))

    def test_block1_upload_takes_the_full_path(self):
        first = request_datagram(payload=b"12345678" * 2, mid=1,
                                 options=[coap.BlockOption(coap.BLOCK1, (0, True, 0))])
        [response] = self.send(first)
        self.assertEqual(parse(response).code, coap.CONTINUE)
        last = request_datagram(payload=b".5", mid=2, options=[coap.BlockOption(coap.BLOCK1, (1, False, 0))])
        self.send(last)
        self.queue.commit()
        self.assertEqual(parse(self.written()[-1]).code, coap.CHANGED)
        self.assertEqual(self.protocol.hot_path, 0)
        self.assertEqual(self.queue.stored[0].readings[0].fields["value"], 1234567812345678.5)

    def test_plain_post_during_a_block1_upload_takes_the_full_path(self):
        first = request_datagram(payload=b"12345678" * 2, mid=1,
                                 options=[coap.BlockOption(coap.BLOCK1, (0, True, 0))])
        self.send(first)
        self.send(request_datagram(payload=b"2", mid=2))
        self.assertEqual(self.protocol.hot_path, 0)
        self.assertEqual(self.protocol.incoming_requests, {})

    def test_observe_and_get_take_the_full_path(self):
        self.time.startService()
        self.addCleanup(self.time.stopService)
        datagram = request_datagram(code=coap.GET, path="time", token=b"ob",
                                    options=[coap.UintOption(coap.OBSERVE, 0)])
        [response] = self.send(datagram)
        self.assertIsNotNone(parse(response).opt.observe)
        self.assertEqual(self.protocol.hot_path, 0)

    def test_post_to_a_path_that_is_not_ingest_takes_the_full_path(self):
        [response] = self.send(request_datagram(path="time", payload=b"1"))
        self.assertEqual(parse(response).code, coap.METHOD_NOT_ALLOWED)
        [response] = self.send(request_datagram(path="nowhere", payload=b"1", mid=2))
        self.assertEqual(parse(response).code, coap.NOT_FOUND)
        self.assertEqual(self.protocol.hot_path, 0)

    def test_ingest_subclass_with_its_own_post_keeps_the_full_path(self):
        class Custom(IngestResource):
            def render_POST(self, request):
                return super().render_POST(request)

        root = build_tree(self.protocol.endpoint.resource.children[b"data"].pipeline, self.clock, {})
        root.children[b"data"].__class__ = Custom
        protocol = GatewayProtocol(txresource.Endpoint(root), clock=self.clock, exchange_lifetime=247,
                                   max_exchanges=100, max_payload=64)
        self.assertEqual(protocol.ingest_routes, {})

    def test_fast_path_can_be_turned_off(self):
        protocol, transport, _ = self.endpoint(fast_path=False)
        self.assertEqual(protocol.ingest_routes, {})
        self.send(request_datagram(payload=b"1"), protocol=protocol, transport=transport)
        self.assertEqual((protocol.hot_path, self.queue.puts), (0, 1))


class ParseSimplePostTests(SynchronousTestCase):
    def test_hot_case_is_parsed_in_one_pass(self):
        datagram = request_datagram(payload=b"{}", content_format=50, token=b"tk", mid=0x1234)
        self.assertEqual(parse_simple_post(datagram), (coap.CON, 0x1234, b"tk", (b"data",), 50, b"{}"))

    def test_long_path_segment_and_uri_host(self):
        segment = "x" * 20
        datagram = request_datagram(path=f"a/{segment}", payload=b"1",
                                    options=[coap.StringOption(coap.URI_HOST, b"gw.example")])
        self.assertEqual(parse_simple_post(datagram)[3], (b"a", segment.encode()))

    def test_anything_else_is_left_to_the_full_path(self):
        cases = {
            "get": request_datagram(code=coap.GET),
            "ack": request_datagram(mtype=coap.ACK),
            "block1": request_datagram(options=[coap.BlockOption(coap.BLOCK1, (0, True, 0))]),
            "observe": request_datagram(options=[coap.UintOption(coap.OBSERVE, 0)]),
            "query": request_datagram(options=[coap.StringOption(coap.URI_QUERY, b"a=b")]),
            "two content formats": request_datagram(payload=b"1", content_format=50)[:-2]
            + b"\x01\x3c\xff1",
            "marker without payload": request_datagram() + b"\xff",
            "truncated option": request_datagram(path="data")[:-2],
            "token length 9": bytes([0x49, 0x02, 0, 1]) + b"x" * 9,
            "version 2": bytes([0x80, 0x02, 0, 1]),
            "short": b"\x40\x02",
        }
        for name, datagram in cases.items():
            self.assertIsNone(parse_simple_post(datagram), name)


class SameAnswersAsTxthingsTests(HotPathTestCase):
    """The hot path's answers, byte for byte those of txthings' path."""

    def compare(self, datagram, commit_error=None, refuse=None):
        self.queue.refuse = refuse
        hot = self.send(datagram)
        self.queue.commit(commit_error)
        hot += self.written()[len(hot):]
        full_queue = GroupCommitQueue()
        full_queue.refuse = refuse
        protocol, transport, _ = self.endpoint(fast_path=False, queue=full_queue)
        full = self.send(datagram, protocol=protocol, transport=transport)
        full_queue.commit(commit_error)
        full += [d for d, _ in transport.written][len(full):]
        self.assertEqual(hot, full)
        self.assertEqual(len(hot), 1)
        self.flushLoggedErrors()
        return parse(hot[0])

    def test_changed(self):
        self.assertEqual(self.compare(request_datagram(payload=b"1", token=b"12345678")).code,
                         coap.CHANGED)

    def test_changed_without_token(self):
        self.assertEqual(self.compare(request_datagram(payload=b"1", token=b"")).code, coap.CHANGED)

    def test_bad_request_diagnostic(self):
        self.assertEqual(self.compare(request_datagram(payload=b"warm")).payload, b"not a number")

    def test_unsupported_content_format(self):
        response = self.compare(request_datagram(payload=b"1", content_format=60))
        self.assertEqual(response.code, coap.UNSUPPORTED_CONTENT_FORMAT)

    def test_too_large(self):
        response = self.compare(request_datagram(payload=b"1" * 65))
        self.assertEqual(response.code, coap.REQUEST_ENTITY_TOO_LARGE)

    def test_queue_full(self):
        response = self.compare(request_datagram(payload=b"1"),
                                refuse=Unavailable("queue full", max_age=9))
        self.assertEqual(response.opt.getOption(coap.MAX_AGE)[0].value, 9)

    def test_queue_write_failed(self):
        response = self.compare(request_datagram(payload=b"1"),
                                commit_error=Unavailable("queue write failed", max_age=5))
        self.assertEqual(response.code, coap.SERVICE_UNAVAILABLE)

    def test_unexpected_queue_error(self):
        response = self.compare(request_datagram(payload=b"1"), commit_error=OSError("gone"))
        self.assertEqual(response.payload, b"queue error")


class HotPathOverUdpTests(TestCase):
    """The real gateway: SQLite group commit behind the hot path."""

    timeout = 60

    @defer.inlineCallbacks
    def test_acknowledged_envelope_is_in_the_queue_and_retransmission_replays(self):
        gateway = start_gateway(self)
        peer = RawCoapPeer(self)
        body = orjson.dumps({"id": "hot-1", "seq": 5, "data": {"temperature": 21.5}})
        datagram = request_datagram(payload=body, content_format=50, mid=0x4242, token=b"hot")
        response = yield peer.request(datagram, gateway.port)
        self.assertEqual((response.code, response.mid, response.token),
                         (coap.CHANGED, 0x4242, b"hot"))
        # Acknowledged means committed: a second connection sees it now.
        [envelope] = queued(gateway)
        self.assertEqual((envelope.device, envelope.seq), ("hot-1", 5))
        self.assertTrue(envelope.source.startswith("[::1]:"))
        again = yield peer.request(datagram, gateway.port)
        self.assertEqual(again.encode(), response.encode())
        self.assertEqual(len(queued(gateway)), 1)
        self.assertEqual(gateway.protocol.hot_path, 1)
