"""The CoAP layer over real UDP: a ``twistd`` gateway asked by libcoap's
and aiocoap's clients for ``/time`` with each Accept, raw datagrams with
No-Response (RFC 7967), and the group commit behind a 2.04."""

from __future__ import annotations

import cbor2
import orjson
from twisted.internet import defer
from twisted.trial.unittest import TestCase
from txthings import coap as tx

from sense_gateway.coap.message import CHANGED, NON
from tests.support import (GatewayProcess, RawCoapPeer, aiocoap_request, coap_url, libcoap_request,
                           queued, request_datagram, start_gateway)

NO_RESPONSE = 258
READING = orjson.dumps({"id": "quiet-1", "seq": 1, "data": {"t": 20.5}})


class TimeAcceptTests(TestCase):
    """``GET /time`` with Accept 0, 50, 60 gives text, JSON and CBOR; 41 gets 4.06."""

    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        self.gateway = GatewayProcess(self, "--role", "gateway")
        yield self.gateway.wait_listening()

    def url(self, host="::1"):
        return coap_url(host, self.gateway.port, "/time")

    @defer.inlineCallbacks
    def test_libcoap_accept_json(self):
        response = yield libcoap_request("get", self.url(), extra=("-A", "50"))
        self.assertEqual(response.code, "2.05", response)
        self.assertIn("Content-Format:application/json", response.response_pdu)
        self.assertGreater(orjson.loads(response.payload)["time"], 1.7e9)

    @defer.inlineCallbacks
    def test_libcoap_accept_cbor(self):
        response = yield libcoap_request("get", self.url("127.0.0.1"), extra=("-A", "60"))
        self.assertEqual(response.code, "2.05", response)
        self.assertIn("Content-Format:application/cbor", response.response_pdu)
        self.assertGreater(cbor2.loads(response.payload), 1.7e9)

    @defer.inlineCallbacks
    def test_libcoap_accept_text(self):
        response = yield libcoap_request("get", self.url(), extra=("-A", "0"))
        self.assertEqual(response.code, "2.05", response)
        self.assertIn("Content-Format:text/plain", response.response_pdu)
        self.assertGreater(int(response.payload), 1.7e9)

    @defer.inlineCallbacks
    def test_libcoap_accept_xml_is_not_acceptable(self):
        response = yield libcoap_request("get", self.url(), extra=("-A", "41"))
        self.assertEqual((response.code, response.payload), ("4.06", b"accept one of 0, 50, 60"))

    @defer.inlineCallbacks
    def test_aiocoap_accept_each_format(self):
        for accept, check in ((0, int), (50, lambda p: orjson.loads(p)["time"]), (60, cbor2.loads)):
            response = yield aiocoap_request("get", self.url(), accept=accept)
            self.assertEqual((response.code, response.content_format), ("2.05", accept))
            self.assertGreater(check(response.payload), 1.7e9)
        refused = yield aiocoap_request("get", self.url(), accept=41)
        self.assertEqual(refused.code, "4.06")


class NoResponseTests(TestCase):
    """A NON POST with No-Response 2 is stored and not answered; with 0 it is."""

    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        self.gateway = GatewayProcess(self, "--role", "gateway")
        yield self.gateway.wait_listening()
        self.peer = RawCoapPeer(self)

    def post(self, value: int, mid: int) -> bytes:
        return request_datagram(payload=READING, content_format=50, mtype=tx.NON, mid=mid,
                                token=b"nr", options=[tx.UintOption(NO_RESPONSE, value)])

    @defer.inlineCallbacks
    def test_not_interested_in_success_is_queued_and_unanswered(self):
        self.peer.send(self.post(2, mid=1), self.gateway.port)
        with self.assertRaises(TimeoutError):
            yield self.peer.receive(timeout=1.5)
        [envelope] = queued(self.gateway.queue_path)
        self.assertEqual((envelope.device, envelope.seq), ("quiet-1", 1))

    @defer.inlineCallbacks
    def test_no_response_zero_is_answered_as_before(self):
        response = yield self.peer.request(self.post(0, mid=2), self.gateway.port)
        self.assertEqual((response.mtype, response.code, response.token), (NON, CHANGED, b"nr"))
        self.assertEqual(len(queued(self.gateway.queue_path)), 1)


class GroupCommitOverUdpTests(TestCase):
    """The real gateway: the SQLite group commit behind every 2.04."""

    timeout = 60

    @defer.inlineCallbacks
    def test_acknowledged_envelope_is_in_the_queue_and_retransmission_replays(self):
        gateway = yield start_gateway(self)
        peer = RawCoapPeer(self)
        body = orjson.dumps({"id": "hot-1", "seq": 5, "data": {"temperature": 21.5}})
        datagram = request_datagram(payload=body, content_format=50, mid=0x4242, token=b"hot")
        response = yield peer.request(datagram, gateway.port)
        self.assertEqual((response.code, response.mid, response.token), (CHANGED, 0x4242, b"hot"))
        # Acknowledged means committed: a second connection sees it now.
        [envelope] = queued(gateway)
        self.assertEqual((envelope.device, envelope.seq), ("hot-1", 5))
        self.assertTrue(envelope.source.startswith("[::1]:"))
        peer.send(datagram, gateway.port)
        again = yield peer.receive()
        self.assertEqual(again, response_bytes(response))
        self.assertEqual(len(queued(gateway)), 1)
        self.assertEqual(gateway.coap_counters()["retransmissions"], 1)


def response_bytes(message) -> bytes:
    from sense_gateway.coap.message import encode
    return encode(message.mtype, message.code, message.mid, message.token, message.options,
                  message.payload)
