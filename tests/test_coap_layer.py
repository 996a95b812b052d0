"""The CoAP side, datagram in and datagram out, on a fake transport and a
controlled clock: the message layer's rules (RFC 7252 4 and 5), answers
only after the commit, retransmissions, limits, fairness of the exchange
memory, No-Response (RFC 7967), message ids per peer, and errors."""

from __future__ import annotations

from twisted.internet import task
from twisted.trial.unittest import SynchronousTestCase
from txthings import coap as tx

from sense_gateway.coap import confirmable as confirmables
from sense_gateway.coap.confirmable import ACK_RANDOM_FACTOR, ACK_TIMEOUT
from sense_gateway.coap.layer import EMPTY_ACK_DELAY
from sense_gateway.coap.message import (
    ACK, BAD_OPTION, CHANGED, CON, EMPTY, MAX_AGE, NO_RESPONSE, NON, PROXYING_NOT_SUPPORTED, RST,
    SERVICE_UNAVAILABLE, encode, parse,
)
from sense_gateway.errors import Unavailable
from tests.support import PEER, CoapEndpoint, FakeQueue, request_datagram

OTHER_PEER = ("2001:db8::7", 40000)


def ack(mid: int) -> bytes:
    return bytes([0x60, 0x00]) + mid.to_bytes(2, "big")


def with_mid(datagram: bytes, mid: int) -> bytes:
    return datagram[:2] + mid.to_bytes(2, "big") + datagram[4:]


def reset(mid: int) -> bytes:
    return bytes([0x70, 0x00]) + mid.to_bytes(2, "big")


class LayerTestCase(SynchronousTestCase):
    queue_commits_at_once = False

    def setUp(self):
        self.queue = FakeQueue(auto_commit=self.queue_commits_at_once)
        self.endpoint = CoapEndpoint(self, queue=self.queue)
        self.clock = self.endpoint.clock
        self.layer = self.endpoint.layer

    def send(self, datagram, peer=PEER):
        return self.endpoint.send(datagram, peer)

    def only(self, datagram, peer=PEER):
        return self.endpoint.only(datagram, peer)

    def written(self):
        return self.endpoint.written()


class AnswerAfterCommitTests(LayerTestCase):
    def test_response_is_never_sent_before_the_commit(self):
        self.assertEqual(self.send(request_datagram(payload=b"21.5", mid=7, token=b"tk")), [])
        self.clock.advance(0.05)
        self.assertEqual(self.written(), [])
        self.queue.commit()
        [datagram] = self.written()
        response = parse(datagram)
        self.assertEqual((response.mtype, response.mid, response.code, response.token,
                          response.payload), (ACK, 7, CHANGED, b"tk", b""))
        self.assertEqual(self.queue.stored[0].readings[0].fields, {"value": 21.5})

    def test_one_commit_answers_every_request_in_it(self):
        for mid in range(10):
            self.send(request_datagram(payload=b"1", mid=mid, token=bytes([mid])))
        self.queue.commit()
        self.assertEqual(sorted(parse(d).mid for d in self.written()), list(range(10)))
        self.assertEqual(self.layer.in_flight, 0)

    def test_retransmission_during_the_commit_is_answered_once_and_stored_once(self):
        datagram = request_datagram(payload=b"1", mid=9)
        self.send(datagram)
        self.assertEqual(self.send(datagram), [])
        self.assertEqual(self.send(datagram), [])
        self.queue.commit()
        self.assertEqual(len(self.written()), 1)
        self.assertEqual(len(self.queue.stored), 1)
        self.assertEqual(self.layer.retransmissions, 2)

    def test_retransmission_after_the_answer_replays_identical_bytes(self):
        datagram = request_datagram(payload=b"1", mid=9, token=b"abc")
        self.send(datagram)
        self.queue.commit()
        [again] = self.send(datagram)
        self.assertEqual(again, self.written()[0])
        self.assertEqual(self.queue.puts, 1)

    def test_same_message_id_from_another_port_or_address_is_a_new_request(self):
        datagram = request_datagram(payload=b"1", mid=9)
        self.send(datagram)
        self.send(datagram, ("::1", 40001))
        self.send(datagram, OTHER_PEER)
        self.assertEqual(self.queue.puts, 3)

    def test_non_request_gets_a_non_response_and_never_an_empty_ack(self):
        self.send(request_datagram(payload=b"1", mtype=tx.NON, mid=12, token=b"n"))
        self.clock.advance(1)
        self.assertEqual(self.written(), [])  # RFC 7252 4.3: NON is never acknowledged
        self.queue.commit()
        [datagram] = self.written()
        response = parse(datagram)
        self.assertEqual((response.mtype, response.code, response.token), (NON, CHANGED, b"n"))

    def test_duplicate_non_is_stored_once(self):
        datagram = request_datagram(payload=b"1", mtype=tx.NON, mid=12)
        self.send(datagram)
        self.send(datagram)
        self.queue.commit()
        self.assertEqual((len(self.queue.stored), len(self.written())), (1, 1))

    def test_slow_commit_gets_empty_ack_then_separate_confirmable_response(self):
        datagram = request_datagram(payload=b"1", mid=11, token=b"t1")
        self.send(datagram)
        self.clock.advance(EMPTY_ACK_DELAY)
        [empty] = self.written()
        self.assertEqual(empty, bytes([0x60, 0x00, 0x00, 11]))  # no token (RFC 7252 4.1)
        # A retransmission now gets the empty ACK again.
        self.assertEqual(self.send(datagram), [empty])
        self.queue.commit()
        separate = parse(self.written()[-1])
        self.assertEqual((separate.mtype, separate.code, separate.token), (CON, CHANGED, b"t1"))
        # Retransmitted until the device acknowledges it.
        self.clock.advance(ACK_TIMEOUT * ACK_RANDOM_FACTOR)
        self.assertEqual(parse(self.written()[-1]).mid, separate.mid)
        self.send(ack(separate.mid))
        sent = len(self.written())
        self.clock.advance(60)
        self.assertEqual(len(self.written()), sent)
        # A late retransmission of the request still gets the empty ACK.
        self.assertEqual(self.send(datagram), [empty])
        self.assertEqual(len(self.queue.stored), 1)

    def test_separate_response_is_given_up_after_max_retransmit(self):
        self.send(request_datagram(payload=b"1", mid=11))
        self.clock.advance(EMPTY_ACK_DELAY)
        self.queue.commit()
        for _ in range(10):
            self.clock.advance(100)
        self.assertEqual(len(self.written()), 2 + confirmables.MAX_RETRANSMIT)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_retransmission_while_storing_is_stored_once_even_after_eviction(self):
        datagram = request_datagram(payload=b"1", mid=1, token=b"t1")
        self.send(datagram)
        # Enough other requests to push mid 1 out of the bounded memory (100).
        for n in range(150):
            self.send(request_datagram(payload=b"2", mid=1000 + n), peer=("::3", 41000 + n))
        self.assertGreater(self.layer.exchanges.evicted, 0)
        self.assertEqual(self.send(datagram), [])
        self.clock.advance(EMPTY_ACK_DELAY)
        self.assertEqual(self.send(datagram), [bytes([0x60, 0x00, 0x00, 1])])  # empty ACK again
        self.queue.commit()
        self.assertEqual(len(self.queue.stored), 151)

    def test_another_address_cannot_cancel_a_separate_response(self):
        self.send(request_datagram(payload=b"1", mid=12, token=b"t2"))
        self.clock.advance(EMPTY_ACK_DELAY)
        self.queue.commit()
        separate = parse(self.written()[-1])
        self.assertEqual((separate.mtype, separate.code), (CON, CHANGED))
        self.send(ack(separate.mid), peer=("::2", 40000))
        self.send(reset(separate.mid), peer=("::2", 40000))
        sent = len(self.written())
        self.clock.advance(ACK_TIMEOUT * ACK_RANDOM_FACTOR)
        self.assertEqual(len(self.written()), sent + 1)
        self.assertEqual(parse(self.written()[-1]).mid, separate.mid)
        self.send(ack(separate.mid))
        sent = len(self.written())
        self.clock.advance(60)
        self.assertEqual(len(self.written()), sent)

    def test_one_timer_serves_every_waiting_request(self):
        for mid in range(3):
            self.send(request_datagram(payload=b"1", mid=mid))
            self.clock.advance(0.02)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.clock.advance(0.05)  # the first is due, the others not yet
        self.assertEqual([parse(d).code for d in self.written()], [EMPTY])
        self.queue.commit()
        codes = [(parse(d).mtype, parse(d).code) for d in self.written()]
        self.assertEqual(codes[1:], [(CON, CHANGED), (ACK, CHANGED), (ACK, CHANGED)])

    def test_queue_that_refuses_gets_service_unavailable_with_max_age(self):
        self.queue.refuse = Unavailable("queue full", max_age=7)
        [datagram] = self.send(request_datagram(payload=b"1", mid=3))
        response = parse(datagram)
        self.assertEqual((response.mtype, response.code, response.payload),
                         (ACK, SERVICE_UNAVAILABLE, b"queue full"))
        self.assertEqual(response.option(MAX_AGE), 7)
        self.assertEqual(self.layer.in_flight, 0)

    def test_failed_commit_gets_service_unavailable_never_changed(self):
        self.send(request_datagram(payload=b"1", mid=3))
        self.queue.commit(Unavailable("queue write failed", max_age=5))
        [datagram] = self.written()
        self.assertEqual((parse(datagram).code, parse(datagram).payload),
                         (SERVICE_UNAVAILABLE, b"queue write failed"))

    def test_unexpected_queue_error_is_logged_and_unavailable(self):
        self.send(request_datagram(payload=b"1", mid=3))
        self.queue.commit(OSError("disk I/O error"))
        response = parse(self.written()[0])
        self.assertEqual((response.code, response.payload), (SERVICE_UNAVAILABLE, b"queue error"))
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)

    def test_requests_in_flight_are_bounded(self):
        self.layer.max_in_flight = 2
        for mid in range(3):
            self.send(request_datagram(payload=b"1", mid=mid))
        [datagram] = self.written()
        response = parse(datagram)
        self.assertEqual((response.mid, response.code, response.payload),
                         (2, SERVICE_UNAVAILABLE, b"too many requests in flight"))
        self.queue.commit()
        self.assertEqual(len(self.queue.stored), 2)
        self.assertEqual(self.layer.in_flight, 0)

    def test_nothing_is_sent_after_the_layer_stops(self):
        self.send(request_datagram(payload=b"1", mid=3))
        self.layer.stop()
        self.queue.commit()
        self.clock.advance(10)
        self.assertEqual(self.written(), [])
        self.assertEqual(self.clock.getDelayedCalls(), [])


class MessageLayerTests(LayerTestCase):
    queue_commits_at_once = True

    def test_ping_gets_reset(self):
        response = self.only(bytes([0x40, 0, 0x12, 0x34]))
        self.assertEqual((response.mtype, response.mid), (RST, 0x1234))

    def test_confirmable_response_from_a_peer_gets_reset(self):
        response = self.only(encode(CON, 0x45, 0x55, b"t"))
        self.assertEqual((response.mtype, response.mid), (RST, 0x55))

    def test_exchange_lifetime_ends_duplicate_detection(self):
        datagram = request_datagram(payload=b"1", mid=13)
        self.send(datagram)
        self.clock.advance(248)
        self.send(datagram)
        self.assertEqual(len(self.queue.stored), 2)

    def test_remembered_exchanges_are_bounded(self):
        for mid in range(250):
            self.send(request_datagram(payload=b"1", mid=mid), peer=(f"2001:db8::{mid:x}", 40000))
        self.assertEqual(len(self.layer.exchanges), 100)
        self.assertEqual(self.layer.exchanges.evicted, 150)
        self.assertEqual(len(self.queue.stored), 250)

    def test_lifetimes_follow_the_monotonic_clock_not_the_wall_clock(self):
        # The receive time of readings is wall time; the layer's lifetimes
        # and timers are not: a wall clock stepped by a day changes nothing.
        wall = task.Clock()
        self.endpoint.dispatcher.wall_clock = wall
        datagram = request_datagram(payload=b"1", mid=21)
        self.send(datagram)
        wall.advance(86400)
        self.assertEqual(len(self.send(datagram)), 1)  # still a retransmission
        self.assertEqual(len(self.queue.stored), 1)
        self.assertEqual(self.queue.stored[0].received, 0.0)

    def test_a_new_dtls_session_from_the_same_address_is_a_new_peer(self):
        # A device that rebooted and handshook again from the same port,
        # starting its message ids where it did before.
        datagram = request_datagram(payload=b"1", mid=21)
        self.layer.datagram_received(datagram, PEER, "node-7", 1)
        self.layer.datagram_received(datagram, PEER, "node-7", 1)  # a retransmission
        self.layer.datagram_received(datagram, PEER, "node-7", 2)  # the new session
        self.assertEqual(len(self.queue.stored), 2)

    def test_unknown_critical_option_gets_bad_option(self):
        response = self.only(request_datagram(payload=b"1", options=[tx.OpaqueOption(2049, b"x")]))
        self.assertEqual((response.code, response.payload),
                         (BAD_OPTION, b"unknown critical option 2049"))
        self.assertEqual(self.queue.envelopes, [])

    def test_non_request_with_unknown_critical_option_is_rejected(self):
        reset_ = self.only(request_datagram(payload=b"1", mtype=tx.NON,
                                            options=[tx.OpaqueOption(2049, b"x")]))
        self.assertEqual((reset_.mtype, reset_.mid, reset_.code), (RST, 0x1234, EMPTY))
        self.assertEqual(self.queue.envelopes, [])

    def test_repeated_uri_host_is_bad_option(self):
        host = tx.StringOption(tx.URI_HOST, b"gw.example")
        self.assertEqual(self.only(request_datagram(payload=b"1", options=[host, host])).code,
                         BAD_OPTION)

    def test_unknown_elective_option_is_ignored(self):
        datagram = request_datagram(payload=b"1", options=[tx.OpaqueOption(2048, b"x")])
        self.assertEqual(self.only(datagram).code, CHANGED)

    def test_uri_host_and_port_change_nothing(self):
        datagram = request_datagram(payload=b"1", options=[
            tx.StringOption(tx.URI_HOST, b"gw.example"), tx.UintOption(tx.URI_PORT, 5683)])
        self.assertEqual(self.only(datagram).code, CHANGED)

    def test_proxy_uri_is_refused(self):
        datagram = request_datagram(
            payload=b"1", options=[tx.StringOption(tx.PROXY_URI, b"coap://x/")])
        self.assertEqual(self.only(datagram).code, PROXYING_NOT_SUPPORTED)

    def test_request_as_ack_is_ignored(self):
        self.assertEqual(self.send(request_datagram(payload=b"1", mtype=tx.ACK)), [])
        self.assertEqual(self.layer.malformed, 1)


class MalformedTests(LayerTestCase):
    def test_short_datagram_and_unknown_version_are_ignored(self):
        self.assertEqual(self.send(b"\x40\x02"), [])
        self.assertEqual(self.send(b"\x80\x02\x00\x01"), [])

    def test_malformed_con_gets_reset(self):
        datagram = bytes([0x49, 0x02, 0x00, 0x05]) + b"123456789"  # token length 9
        response = self.only(datagram)
        self.assertEqual((response.mtype, response.mid), (RST, 5))

    def test_malformed_non_is_ignored(self):
        self.assertEqual(self.send(bytes([0x50, 0x02, 0x00, 0x05, 0xB4]) + b"da"), [])

    def test_payload_marker_without_payload_gets_reset(self):
        self.assertEqual(self.only(request_datagram(payload=b"", mid=6) + b"\xff").mtype, RST)

    def test_reserved_option_nibble_gets_reset(self):
        self.assertEqual(self.only(bytes([0x40, 0x02, 0x00, 0x07, 0xF1, 0x00])).mtype, RST)

    def test_malformed_datagrams_leave_no_state(self):
        for mid in range(50):
            self.send(bytes([0x49, 0x02, 0x00, mid]) + b"x" * 9)
        self.assertEqual(len(self.layer.exchanges), 0)
        self.assertEqual(self.layer.malformed, 50)


class NoResponseTests(LayerTestCase):
    queue_commits_at_once = True

    def post(self, value, mtype=tx.NON, payload=b"1", mid=30):
        return request_datagram(payload=payload, mtype=mtype, mid=mid,
                                options=[tx.UintOption(NO_RESPONSE, value)])

    def test_non_post_not_interested_in_success_is_stored_and_unanswered(self):
        self.assertEqual(self.send(self.post(2)), [])
        self.assertEqual(len(self.queue.stored), 1)
        self.assertEqual(self.layer.in_flight, 0)

    def test_no_response_zero_is_answered_as_before(self):
        response = self.only(self.post(0))
        self.assertEqual((response.mtype, response.code), (NON, CHANGED))

    def test_errors_are_still_sent_unless_suppressed_too(self):
        self.assertEqual(self.only(self.post(2, payload=b"warm")).code, 0x80)
        self.assertEqual(self.send(self.post(2 | 8, payload=b"warm", mid=31)), [])

    def test_confirmable_request_still_gets_its_empty_ack(self):
        response = self.only(self.post(2, mtype=tx.CON, mid=32))
        self.assertEqual((response.mtype, response.code, response.mid), (ACK, EMPTY, 32))
        self.assertEqual(len(self.queue.stored), 1)


class FairExchangeMemoryTests(SynchronousTestCase):
    def test_a_flood_from_one_source_does_not_forget_another_devices_exchange(self):
        endpoint = CoapEndpoint(self, max_exchanges=65536, per_source=4096)
        device = ("2001:db8::42", 5683)
        datagram = request_datagram(payload=b"21.5", mid=0x0707, token=b"dv")
        [answer] = endpoint.send(datagram, device)
        # 100,000 fresh message ids from one address (two ports, as ids wrap).
        template = request_datagram(payload=b"x", mid=0, token=b"")
        for n in range(100_000):
            endpoint.layer.datagram_received(with_mid(template, n & 0xFFFF),
                                             ("2001:db8::bad", 40000 + n // 65536))
        self.assertEqual(endpoint.layer.exchanges.sources(), 2)
        self.assertEqual(endpoint.layer.exchanges.evicted, 0)
        self.assertEqual(endpoint.send(datagram, device), [answer])
        self.assertEqual(sum(1 for e in endpoint.queue.stored if e.source.startswith("[2001:db8::42]")),
                         1)

    def test_the_flooding_source_keeps_only_its_share(self):
        endpoint = CoapEndpoint(self, max_exchanges=1000, per_source=100)
        for n in range(500):
            endpoint.send(request_datagram(payload=b"1", mid=n), ("::5", 40000))
        self.assertEqual(len(endpoint.layer.exchanges), 100)
        self.assertEqual(endpoint.layer.exchanges.evicted_from_source, 400)
        # Its own recent exchanges are still recognised; its oldest are not.
        self.assertEqual(len(endpoint.send(request_datagram(payload=b"1", mid=499), ("::5", 40000))), 1)
        self.assertEqual(endpoint.queue.puts, 500)


class MessageIdTests(SynchronousTestCase):
    def test_non_response_ids_do_not_repeat_for_one_peer_and_peers_are_independent(self):
        endpoint = CoapEndpoint(self, max_exchanges=200_000, per_source=200_000)
        ids = {PEER: [], OTHER_PEER: []}
        # Refused at once (not a number): a NON answer per request.
        template = request_datagram(payload=b"x", mtype=tx.NON, mid=0, token=b"")
        sent = endpoint.transport.sent
        for n in range(65536):
            datagram = with_mid(template, n)
            for peer in ids:
                endpoint.layer.datagram_received(datagram, peer)
                ids[peer].append(int.from_bytes(sent.pop()[0][2:4], "big"))
        for peer, sequence in ids.items():
            self.assertEqual(len(set(sequence)), 65536, peer)
            # One sequence per peer: consecutive, from where it started.
            self.assertEqual([(m - sequence[0]) & 0xFFFF for m in sequence[:5]], [0, 1, 2, 3, 4])
        self.assertNotEqual(ids[PEER][:100], ids[OTHER_PEER][:100])


class DrainTests(LayerTestCase):
    """A graceful stop: what was taken is answered, nothing new is taken."""

    def test_requests_being_stored_are_answered_and_new_ones_refused(self):
        self.send(request_datagram(payload=b"1", mid=1, token=b"a"))
        drained = self.layer.drain()
        refused = self.only(request_datagram(payload=b"2", mid=2, token=b"b"))
        self.assertEqual((refused.code, refused.payload, refused.option(MAX_AGE)),
                         (SERVICE_UNAVAILABLE, b"shutting down", 5))
        self.assertNoResult(drained)
        self.queue.commit()
        self.assertEqual(parse(self.written()[-1]).code, CHANGED)
        self.clock.advance(0)
        self.successResultOf(drained)
        self.assertEqual(len(self.queue.stored), 1)

    def test_an_idle_layer_is_drained_at_once(self):
        self.successResultOf(self.layer.drain())
