"""The DTLS 1.2 PSK engine (sense_gateway.coap.dtls), against real peers.

libcoap's OpenSSL and GnuTLS clients talk to it over real UDP on IPv6 and
IPv4; OpenSSL's own client, in process over memory BIOs, scripts the
cases a real client will not produce on demand (lost flights, replays,
spoofed addresses, resumption, renegotiation) with a fake clock. Keys are
drawn at run time.
"""

from __future__ import annotations

import gc
import random
import secrets

import psutil

from twisted.internet import defer, reactor, task
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from sense_gateway.coap.dtls import DTLSServer
from sense_gateway.coap.dtls_admission import CookieJar
from sense_gateway.coap.dtls_records import (
    DTLS_1_0, parse_client_hello, split_records,
)
from tests.dtls_harness import (
    MemoryClient, UDPHarness, Wire, is_hello_verify_request, libcoap_post, new_key, records_of,
)
from tests.support import parametrize

IDENTITY = "node-7"


def coap_post(message_id: int = 0x1234, token: bytes = b"\x01\x02") -> bytes:
    """A CON POST /data with payload ``x``: enough CoAP for the engine's peers."""
    return (bytes((0x40 | len(token), 0x02)) + message_id.to_bytes(2, "big") + token
            + b"\xb4data" + b"\xffx")


def record(content_type: int, body: bytes, epoch: int = 0, sequence: int = 0,
           version: bytes = b"\xfe\xfd") -> bytes:
    """One DTLS record, as anybody could write it."""
    return (bytes((content_type,)) + version + epoch.to_bytes(2, "big") + sequence.to_bytes(6, "big")
            + len(body).to_bytes(2, "big") + body)


class Fixture:
    """A server on a fake clock with one key per identity, and a wire to it."""

    def __init__(self, keys: dict | None = None, **options):
        self.key = new_key()
        self.keys = {IDENTITY: self.key} if keys is None else keys
        self.clock = task.Clock()
        self.server = DTLSServer(lambda identity: self.keys.get(identity), self.clock, **options)
        self.wire = Wire(self.server)

    def connect(self, addr, identity: str = IDENTITY, key: bytes | None = None, **client_options):
        client = MemoryClient(identity, key or self.keys[identity], **client_options)
        self.wire.handshake(client, addr)
        return client

    def works(self, client: MemoryClient, addr, identity: str = IDENTITY) -> bool:
        """Whether a record goes through each way between ``client`` and the server."""
        payload = secrets.token_bytes(8)
        before = len(self.wire.delivered)
        self.wire.client_sends(client, payload, addr)
        inbound = self.wire.delivered[before:] == [(payload, addr, identity)]
        answer = secrets.token_bytes(8)
        outbound = self.wire.server_sends(client, answer, addr) and client.received[-1:] == [answer]
        return inbound and outbound


class HandshakeTests(SynchronousTestCase):

    def test_psk_handshake_delivers_each_record_with_its_identity(self):
        f = Fixture()
        client = f.connect(("2001:db8::7", 40000))
        self.assertTrue(client.established)
        self.assertEqual((f.server.session_count(), f.server.handshake_count()), (1, 0))
        f.wire.client_sends(client, coap_post(), ("2001:db8::7", 40000))
        self.assertEqual(f.wire.delivered, [(coap_post(), ("2001:db8::7", 40000), IDENTITY)])
        self.assertTrue(f.wire.server_sends(client, b"\x60\x44\x12\x34", ("2001:db8::7", 40000)))
        self.assertEqual(client.received, [b"\x60\x44\x12\x34"])
        self.assertEqual(f.server.counters["handshakes_completed"], 1)

    def test_two_records_in_one_datagram_are_two_messages(self):
        f = Fixture()
        addr = ("192.0.2.1", 5000)
        client = f.connect(addr)
        datagram = b"".join(client.send(coap_post(1)) + client.send(coap_post(2)))
        self.assertEqual(len(split_records(datagram)), 2)
        f.wire.to_server([datagram], addr)
        self.assertEqual([p for p, _, _ in f.wire.delivered], [coap_post(1), coap_post(2)])

    def test_ccm8_is_chosen_when_offered(self):
        client = Fixture().connect(("192.0.2.1", 5000))
        self.assertEqual(client.conn.get_cipher_name(), "PSK-AES128-CCM8")
        self.assertEqual(client.conn.get_protocol_version_name(), "DTLSv1.2")

    def test_ccm_without_ccm8_is_accepted(self):
        client = Fixture().connect(("192.0.2.1", 5000), ciphers=b"PSK-AES128-CCM")
        self.assertEqual(client.conn.get_cipher_name(), "PSK-AES128-CCM")

    def test_suites_outside_the_profile_are_refused(self):
        f = Fixture()
        client = f.connect(("192.0.2.1", 5000), ciphers=b"PSK-AES128-GCM-SHA256:PSK-AES128-CBC-SHA256")
        self.assertFalse(client.established)
        self.assertEqual(f.server.counters["refused_failed"], 1)
        self.assertEqual((f.server.session_count(), f.server.handshake_count()), (0, 0))

    def test_dtls_1_0_is_refused(self):
        f = Fixture()
        client = f.connect(("192.0.2.1", 5000), ciphers=b"PSK-AES128-CBC-SHA:@SECLEVEL=0",
                           max_version=DTLS_1_0)
        self.assertFalse(client.established)
        self.assertIn("protocol version", str(client.error))
        self.assertEqual(f.server.counters["refused_failed"], 1)

    def test_no_identity_hint_unless_one_is_configured(self):
        client = Fixture().connect(("192.0.2.1", 5000))
        self.assertEqual(client.hints_seen, [None])
        client = Fixture(identity_hint=b"sense").connect(("192.0.2.1", 5000))
        self.assertEqual(client.hints_seen, [b"sense"])

    def test_unknown_identity_is_refused_and_counted(self):
        f = Fixture()
        client = f.connect(("192.0.2.1", 5000), identity="node-9", key=new_key())
        self.assertFalse(client.established)
        self.assertIn("unknown psk identity", str(client.error))
        self.assertEqual(f.server.counters["refused_unknown_identity"], 1)
        self.assertEqual(f.server.counters["handshakes_refused"], 1)
        self.assertEqual((f.server.session_count(), f.server.handshake_count()), (0, 0))

    def test_identity_that_is_not_utf8_is_refused(self):
        f = Fixture()
        client = MemoryClient(b"\xff\xfenode", f.key)
        f.wire.handshake(client, ("192.0.2.1", 5000))
        self.assertFalse(client.established)
        self.assertEqual(f.server.counters["refused_undecodable_identity"], 1)

    def test_failing_key_lookup_refuses_the_handshake_and_raises_nothing(self):
        def broken_store(identity):
            raise RuntimeError("credential store unavailable")

        server = DTLSServer(broken_store, task.Clock())
        wire = Wire(server)
        client = MemoryClient(IDENTITY, new_key())
        wire.handshake(client, ("192.0.2.1", 5000))
        self.assertFalse(client.established)
        self.assertEqual(server.counters["refused_lookup_error"], 1)
        self.assertEqual(server.counters["internal_errors"], 0)

    def test_wrong_key_never_establishes_and_times_out_as_refused(self):
        f = Fixture(handshake_timeout=10.0)
        client = f.connect(("192.0.2.1", 5000), key=new_key())
        self.assertFalse(client.established)
        # OpenSSL drops a Finished that fails its MAC without a word, so the
        # handshake waits out its deadline.
        self.assertEqual(f.server.handshake_count(), 1)
        f.clock.advance(10.5)
        self.assertEqual(f.server.handshake_count(), 0)
        self.assertEqual(f.server.counters["refused_timeout"], 1)

    def test_a_resumed_session_cannot_skip_the_key_lookup(self):
        f = Fixture()
        first = f.connect(("192.0.2.1", 5000))
        self.assertTrue(first.established)
        del f.keys[IDENTITY]   # revoked
        again = MemoryClient(IDENTITY, f.key, resume=first)
        f.wire.handshake(again, ("192.0.2.1", 5001))
        self.assertFalse(again.established)
        self.assertEqual(f.server.counters["refused_unknown_identity"], 1)
        self.assertEqual(f.server.session_count(), 1)

    def test_client_renegotiation_is_answered_with_an_alert_not_a_handshake(self):
        # OpenSSL 3 and later refuse it on servers by default too; our option
        # keeps it refused whatever a later default or build says.
        f = Fixture()
        addr = ("192.0.2.1", 5000)
        client = f.connect(addr)
        f.wire.to_server(client.renegotiate(), addr)
        answer = f.wire.take(addr)
        records = [record for datagram in answer for record in records_of(datagram)]
        self.assertEqual([(kind, epoch) for kind, epoch, _ in records], [(21, 1)])
        self.assertEqual(f.server.counters["handshakes_started"], 1)

    def test_a_fatal_alert_ends_that_session_only(self):
        f = Fixture()
        addr, bystander_addr = ("192.0.2.1", 5000), ("192.0.2.2", 5000)
        client, bystander = f.connect(addr), f.connect(bystander_addr)
        f.wire.to_server(client.renegotiate(), addr)
        # OpenSSL's client gives up on the refusal with a fatal alert.
        f.wire.to_server(client.receive(f.wire.take(addr)), addr)
        self.assertEqual(f.server.counters["sessions_failed"], 1)
        self.assertFalse(f.server.send_to(b"gone", addr))
        self.assertEqual(f.server.session_count(), 1)
        self.assertTrue(f.works(bystander, bystander_addr))


class CookieExchangeTests(SynchronousTestCase):

    def first_flights(self, count: int) -> list[bytes]:
        return [MemoryClient(IDENTITY, b"k" * 16).start()[0] for _ in range(count)]

    def test_client_hellos_without_cookie_leave_no_state(self):
        f = Fixture()
        hellos = self.first_flights(50)
        addresses = [(f"2001:db8::{i:x}", 1024 + i) for i in range(100)]
        for hello in hellos:
            for addr in addresses:
                f.server.datagram_received(hello, addr)
        self.assertEqual(f.server.counters["cookies_sent"], 5000)
        self.assertEqual((f.server.session_count(), f.server.handshake_count()), (0, 0))
        sent = [d for addr in addresses for d in f.wire.take(addr)]
        self.assertEqual(len(sent), 5000)
        self.assertTrue(all(is_hello_verify_request(d) for d in sent))
        self.assertEqual(len(f.server._limits.rate), 0)
        self.assertEqual(f.clock.getDelayedCalls(), [])

    def test_hello_verify_request_echoes_the_record_and_message_sequence(self):
        f = Fixture()
        hello = bytearray(self.first_flights(1)[0])
        hello[5:11] = (7).to_bytes(6, "big")     # as if it were the client's eighth record
        hello[17:19] = (1).to_bytes(2, "big")    # and its second ClientHello
        f.server.datagram_received(bytes(hello), ("192.0.2.1", 5000))
        (answer,) = f.wire.take(("192.0.2.1", 5000))
        self.assertEqual(answer[3:11], hello[3:11])          # epoch and sequence number
        self.assertEqual(answer[17:19], hello[17:19])        # message_seq
        self.assertEqual(answer[1:3], b"\xfe\xff")

    def cookie_echo(self, f: Fixture, addr) -> tuple[MemoryClient, list[bytes]]:
        client = MemoryClient(IDENTITY, f.key)
        f.wire.to_server(client.start(), addr)
        return client, client.receive(f.wire.take(addr))

    def test_a_cookie_is_good_only_for_the_address_it_was_sent_to(self):
        f = Fixture()
        client, second_hello = self.cookie_echo(f, ("192.0.2.1", 5000))
        f.wire.to_server(second_hello, ("192.0.2.1", 5001))
        self.assertTrue(all(is_hello_verify_request(d) for d in f.wire.take(("192.0.2.1", 5001))))
        self.assertEqual(f.server.handshake_count(), 0)

    def test_a_cookie_is_good_only_for_the_client_hello_it_answered(self):
        f = Fixture()
        addr = ("192.0.2.1", 5000)
        client, (second_hello,) = self.cookie_echo(f, addr)
        record = split_records(second_hello)[0]
        self.assertTrue(parse_client_hello(second_hello, record).cookie)
        changed = bytearray(second_hello)
        changed[record.start + 12 + 2] ^= 1     # the first byte of the client random
        f.wire.to_server([bytes(changed)], addr)
        self.assertTrue(all(is_hello_verify_request(d) for d in f.wire.take(addr)))
        self.assertEqual(f.server.handshake_count(), 0)

    def test_a_cookie_survives_one_rotation_of_the_secret(self):
        f = Fixture()
        addr = ("192.0.2.1", 5000)
        client, second_hello = self.cookie_echo(f, addr)
        f.clock.advance(45)     # rotated at 30 s, the old secret good until 60 s
        f.wire.exchange(client, second_hello, addr)
        self.assertTrue(client.established)

    def test_a_cookie_expires(self):
        f = Fixture()
        addr = ("192.0.2.1", 5000)
        client, second_hello = self.cookie_echo(f, addr)
        f.clock.advance(61)
        f.wire.to_server(second_hello, addr)
        self.assertTrue(all(is_hello_verify_request(d) for d in f.wire.take(addr)))
        self.assertEqual(f.server.handshake_count(), 0)

    def test_retransmitted_client_hello_does_not_start_another_handshake(self):
        f = Fixture()
        addr = ("192.0.2.1", 5000)
        client, second_hello = self.cookie_echo(f, addr)
        f.wire.to_server(second_hello, addr)
        first_answer = f.wire.take(addr)
        # As if the answer was lost: OpenSSL resends it on its own timer
        # (RetransmissionTests), not on the copy.
        f.wire.to_server(second_hello, addr)
        self.assertEqual(f.server.counters["handshakes_started"], 1)
        self.assertEqual(f.server.handshake_count(), 1)
        f.wire.exchange(client, client.receive(first_answer), addr)
        self.assertTrue(client.established)


class SameAddressTests(SynchronousTestCase):
    """RFC 6347 4.2.8: a ClientHello from the address of a live session."""

    addr = ("2001:db8::7", 5684)

    def test_spoofed_client_hello_leaves_the_live_session_working(self):
        f = Fixture()
        client = f.connect(self.addr)
        spoofer = MemoryClient("anyone", new_key())
        f.wire.to_server(spoofer.start(), self.addr)
        answer = f.wire.take(self.addr)
        self.assertTrue(all(is_hello_verify_request(d) for d in answer))
        client.receive(answer)        # the real peer gets the HelloVerifyRequest and ignores it
        self.assertTrue(f.works(client, self.addr))
        self.assertEqual((f.server.session_count(), f.server.handshake_count()), (1, 0))

    def test_spoofed_plaintext_alert_leaves_the_live_session_working(self):
        f = Fixture()
        client = f.connect(self.addr)
        f.wire.to_server([record(21, b"\x02\x28", sequence=9)], self.addr)   # fatal handshake_failure
        self.assertTrue(f.works(client, self.addr))

    def test_replayed_cookie_exchange_without_the_key_does_not_end_the_session(self):
        # An attacker on the path sees the HelloVerifyRequest and answers it,
        # but has no key: the new handshake never completes.
        f = Fixture(handshake_timeout=10.0)
        client = f.connect(self.addr)
        attacker = MemoryClient(IDENTITY, new_key())
        f.wire.handshake(attacker, self.addr)
        self.assertFalse(attacker.established)
        self.assertEqual((f.server.session_count(), f.server.handshake_count()), (1, 1))
        self.assertTrue(f.works(client, self.addr))
        f.clock.advance(11)
        self.assertEqual(f.server.counters["refused_timeout"], 1)
        self.assertTrue(f.works(client, self.addr))

    def test_replayed_cookie_exchange_with_unknown_identity_does_not_end_the_session(self):
        f = Fixture()
        client = f.connect(self.addr)
        f.wire.handshake(MemoryClient("node-9", new_key()), self.addr)
        self.assertEqual(f.server.counters["refused_unknown_identity"], 1)
        self.assertTrue(f.works(client, self.addr))

    def test_reconnect_from_the_same_address_replaces_the_session(self):
        f = Fixture()
        old = f.connect(self.addr)
        new = f.connect(self.addr)      # the device restarted: new state, same address
        self.assertTrue(new.established)
        self.assertEqual((f.server.session_count(), f.server.handshake_count()), (1, 0))
        self.assertEqual(f.server.counters["sessions_replaced"], 1)
        self.assertTrue(f.works(new, self.addr))
        before = len(f.wire.delivered)
        f.wire.client_sends(old, b"stale", self.addr)
        self.assertEqual(f.wire.delivered[before:], [])

    def test_the_old_session_works_until_the_reconnect_completes(self):
        f = Fixture()
        old = f.connect(self.addr)
        new = MemoryClient(IDENTITY, f.key)
        f.wire.to_server(new.start(), self.addr)
        f.wire.to_server(new.receive(f.wire.take(self.addr)), self.addr)   # ClientHello with cookie
        server_hello = f.wire.take(self.addr)
        self.assertEqual(f.server.handshake_count(), 1)
        self.assertTrue(f.works(old, self.addr))
        f.wire.exchange(new, new.receive(server_hello), self.addr)
        self.assertTrue(new.established)
        self.assertTrue(f.works(new, self.addr))

    def test_a_new_client_hello_replaces_a_handshake_in_progress(self):
        # The device restarted before its handshake finished.
        f = Fixture()
        first = MemoryClient(IDENTITY, f.key)
        f.wire.to_server(first.start(), self.addr)
        f.wire.to_server(first.receive(f.wire.take(self.addr)), self.addr)
        f.wire.take(self.addr)
        again = f.connect(self.addr)
        self.assertTrue(again.established)
        self.assertEqual(f.server.counters["handshakes_abandoned"], 1)
        self.assertEqual((f.server.session_count(), f.server.handshake_count()), (1, 0))

    def test_an_alert_for_the_old_session_reaches_it_while_a_reconnect_is_pending(self):
        f = Fixture()
        old = f.connect(self.addr)
        new = MemoryClient(IDENTITY, f.key)
        f.wire.to_server(new.start(), self.addr)
        f.wire.to_server(new.receive(f.wire.take(self.addr)), self.addr)
        f.wire.to_server(old.close(), self.addr)
        self.assertEqual(f.server.counters["sessions_closed_by_peer"], 1)
        self.assertEqual((f.server.session_count(), f.server.handshake_count()), (0, 1))


class FailingCallbackTests(SynchronousTestCase):

    def test_a_failing_deliver_is_counted_and_the_session_goes_on(self):
        f = Fixture()
        addr = ("192.0.2.1", 5000)
        client = f.connect(addr)

        def broken(plaintext, addr, identity):
            raise ValueError("the message layer broke")

        f.server.deliver = broken
        f.wire.client_sends(client, coap_post(), addr)
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)
        self.assertEqual(f.server.counters["deliver_errors"], 1)
        f.server.deliver = lambda *received: f.wire.delivered.append(received)
        self.assertTrue(f.works(client, addr))

    def test_a_failing_send_is_counted_not_raised(self):
        f = Fixture()

        def unreachable(datagram, addr):
            raise OSError("network is unreachable")

        f.server.send = unreachable
        f.server.datagram_received(MemoryClient(IDENTITY, f.key).start()[0], ("192.0.2.1", 5000))
        self.assertEqual(f.server.counters["send_errors"], 1)
        self.assertEqual(f.server.counters["internal_errors"], 0)


class LimitTests(SynchronousTestCase):

    def stalled_handshake(self, f: Fixture, addr) -> tuple[MemoryClient, list[bytes]]:
        """A client that gets as far as the server's first flight, which it never reads."""
        client = MemoryClient(IDENTITY, f.key)
        f.wire.to_server(client.start(), addr)
        f.wire.to_server(client.receive(f.wire.take(addr)), addr)
        return client, f.wire.take(addr)

    def test_a_stalled_handshake_is_dropped_at_its_deadline(self):
        f = Fixture(handshake_timeout=20.0)
        self.stalled_handshake(f, ("192.0.2.1", 5000))
        self.assertEqual(f.server.handshake_count(), 1)
        f.clock.advance(19)
        self.assertEqual(f.server.handshake_count(), 1)
        f.clock.advance(2)
        self.assertEqual(f.server.handshake_count(), 0)
        self.assertEqual(f.server.counters["refused_timeout"], 1)
        self.assertEqual(f.clock.getDelayedCalls(), [])

    def test_handshake_messages_a_psk_client_never_sends_do_not_reach_openssl(self):
        # Fragments claiming 100 kB messages, ten future messages deep, and
        # large records of the next epoch: OpenSSL would buffer all of it.
        f = Fixture(max_sessions=200)
        peers = [(f"198.51.100.{i}", 5000) for i in range(100)]
        stalled = [self.stalled_handshake(f, addr) for addr in peers]
        gc.collect()
        before = psutil.Process().memory_info().rss
        for addr in peers:
            for seq in range(2, 12):
                fragment = (b"\x10" + (100000).to_bytes(3, "big") + seq.to_bytes(2, "big")
                            + bytes(3) + (1000).to_bytes(3, "big") + bytes(1000))
                f.server.datagram_received(record(22, fragment, epoch=0, sequence=seq), addr)
                f.server.datagram_received(record(22, bytes(16000), epoch=1, sequence=seq), addr)
        grown = psutil.Process().memory_info().rss - before
        self.assertEqual(f.server.counters["records_dropped"], 2000)
        self.assertLess(grown, 8 << 20)
        client, server_flight = stalled[0]
        f.wire.exchange(client, client.receive(server_flight), peers[0])
        self.assertTrue(client.established)

    def test_an_idle_session_expires_and_the_peer_is_told(self):
        f = Fixture(idle_timeout=60.0)
        addr = ("192.0.2.1", 5000)
        client = f.connect(addr)
        f.clock.advance(59)
        self.assertTrue(f.works(client, addr))   # activity restarts the idle time
        f.clock.advance(59)
        self.assertEqual(f.server.session_count(), 1)
        f.clock.advance(2)
        self.assertEqual(f.server.session_count(), 0)
        self.assertEqual(f.server.counters["sessions_expired"], 1)
        client.receive(f.wire.take(addr))
        self.assertTrue(client.closed_by_server)

    def test_max_sessions_refuses_new_handshakes_and_sessions_go_on(self):
        f = Fixture(max_sessions=3)
        clients = {(f"192.0.2.{i}", 5000): None for i in range(1, 4)}
        for addr in clients:
            clients[addr] = f.connect(addr)
        late = f.connect(("192.0.2.9", 5000))
        self.assertFalse(late.established)
        self.assertEqual(f.server.counters["refused_full"], 1)
        self.assertEqual(f.server.session_count(), 3)
        for addr, client in clients.items():
            self.assertTrue(f.works(client, addr))

    def test_handshakes_in_progress_count_against_max_sessions_and_the_oldest_gives_way(self):
        f = Fixture(max_sessions=2, max_handshakes=2)
        self.stalled_handshake(f, ("192.0.2.1", 5000))
        self.stalled_handshake(f, ("192.0.2.2", 5000))
        self.assertTrue(f.connect(("192.0.2.3", 5000)).established)
        self.assertEqual(f.server.counters["handshakes_evicted"], 1)
        self.assertEqual((f.server.session_count(), f.server.handshake_count()), (1, 1))

    def test_handshakes_per_source_are_limited_and_other_sources_go_on(self):
        f = Fixture(handshakes_per_source=2.0)
        first = [f.connect(("192.0.2.1", port)) for port in (5000, 5001)]
        self.assertTrue(all(c.established for c in first))
        self.assertFalse(f.connect(("192.0.2.1", 5002)).established)
        self.assertEqual(f.server.counters["refused_rate"], 1)
        self.assertTrue(f.connect(("192.0.2.2", 5000)).established)
        self.assertTrue(all(f.works(c, ("192.0.2.1", 5000 + i)) for i, c in enumerate(first)))
        f.clock.advance(1.0)
        self.assertTrue(f.connect(("192.0.2.1", 5003)).established)

    def test_client_hellos_openssl_cannot_read_do_not_keep_the_source_busy(self):
        from OpenSSL import SSL

        from sense_gateway.coap import dtls_openssl
        f = Fixture()
        listen = dtls_openssl.Session.listen
        failures = []

        def unreadable(session, data):
            # What OpenSSL does with a ClientHello our parser passed and it
            # does not (a fault injected: no client sends one on demand).
            failures.append(session.addr)
            raise SSL.Error([("SSL routines", "", "unexpected message")])
        self.patch(dtls_openssl.Session, "listen", unreadable)
        for port in range(5000, 5006):  # more than the 4 in progress one source may hold
            self.assertFalse(f.connect(("192.0.2.1", port)).established)
            f.clock.advance(1.0)  # within the handshake rate
        self.assertEqual((len(failures), f.server.counters["refused_failed"]), (6, 6))
        self.assertEqual(f.server.handshake_count(), 0)
        self.patch(dtls_openssl.Session, "listen", listen)
        self.assertTrue(f.connect(("192.0.2.1", 5006)).established)
        self.assertEqual(f.server.counters["refused_source_busy"], 0)

    def test_the_source_table_is_bounded(self):
        f = Fixture(max_sessions=2)
        for i in range(6000):
            f.server._limits.rate.take(f"2001:db8::{i:x}")
        self.assertEqual(len(f.server._limits.rate), 4096)

    def test_quiet_handshakes_cannot_lock_new_devices_out(self):
        # Peers past the cookie exchange that never finish: at most 4 from
        # one address, at most half the slots, and the oldest gives way.
        f = Fixture(max_sessions=10, handshakes_per_source=1000.0, max_sessions_per_identity=10)
        for port in range(6):
            self.stalled_handshake(f, ("192.0.2.1", 5000 + port))
        self.assertEqual(f.server.handshake_count(), 4)
        self.assertEqual(f.server.counters["refused_source_busy"], 2)
        for host in range(2, 9):
            for port in range(4):
                self.stalled_handshake(f, (f"192.0.2.{host}", 5000 + port))
        self.assertEqual(f.server.handshake_count(), 5)
        # Devices that finish still get in, until the sessions fill the rest.
        for n in range(10):
            self.assertTrue(f.connect((f"198.51.100.{n}", 5000)).established, n)
        self.assertEqual(f.server.session_count(), 10)
        self.assertEqual(f.server.handshake_count(), 0)
        self.assertFalse(f.connect(("198.51.100.99", 5000)).established)
        self.assertEqual(f.server.counters["refused_full"], 1)

    def test_one_ipv6_prefix_holds_only_so_many_handshakes(self):
        f = Fixture(max_sessions=200, handshakes_per_source=1000.0)
        for n in range(40):
            self.stalled_handshake(f, (f"2001:db8:0:1::{n + 1:x}", 5000))
        self.assertEqual(f.server.handshake_count(), 32)
        self.assertTrue(f.connect(("2001:db8:0:2::1", 5000)).established)

    def test_one_identity_holds_only_so_many_sessions(self):
        f = Fixture(max_sessions_per_identity=2)
        clients = [f.connect((f"192.0.2.{n}", 5000)) for n in range(1, 4)]
        self.assertTrue(all(c.established for c in clients))
        self.assertEqual(f.server.session_count(), 2)
        self.assertEqual(f.server.counters["sessions_over_identity_limit"], 1)
        self.assertTrue(f.works(clients[2], ("192.0.2.3", 5000)))
        self.assertFalse(f.works(clients[0], ("192.0.2.1", 5000)))

    def test_each_session_has_its_own_number(self):
        f = Fixture()
        addr = ("192.0.2.1", 5000)
        f.connect(addr)
        first = f.server.session_number(addr)
        f.connect(addr)  # the device restarted: a new session at the same address
        self.assertNotEqual(f.server.session_number(addr), first)
        self.assertIsNone(f.server.session_number(("192.0.2.9", 1)))

    def test_one_timer_serves_every_session_and_handshake(self):
        f = Fixture(max_sessions_per_identity=100)
        for i in range(20):
            f.connect((f"192.0.2.{i}", 5000))
        for i in range(5):
            self.stalled_handshake(f, (f"198.51.100.{i}", 5000))
        self.assertEqual((f.server.session_count(), f.server.handshake_count()), (20, 5))
        self.assertEqual(len(f.clock.getDelayedCalls()), 1)

    def test_stop_closes_every_session_and_the_timer(self):
        f = Fixture()
        clients = {(f"192.0.2.{i}", 5000): None for i in (1, 2)}
        for addr in clients:
            clients[addr] = f.connect(addr)
        f.server.stop()
        for addr, client in clients.items():
            client.receive(f.wire.take(addr))
            self.assertTrue(client.closed_by_server)
            self.assertFalse(f.server.send_to(b"late", addr))
        self.assertEqual(f.clock.getDelayedCalls(), [])
        self.assertEqual((f.server.session_count(), f.server.handshake_count()), (0, 0))


class RevocationTests(SynchronousTestCase):

    def test_end_sessions_closes_every_session_of_that_identity_only(self):
        f = Fixture(keys={IDENTITY: new_key(), "node-8": new_key()})
        revoked = {("192.0.2.1", 5000): None, ("192.0.2.2", 5000): None}
        for addr in revoked:
            revoked[addr] = f.connect(addr)
        other = f.connect(("192.0.2.3", 5000), identity="node-8")
        self.assertEqual(f.server.end_sessions(IDENTITY), 2)
        self.assertEqual(f.server.counters["sessions_revoked"], 2)
        before = len(f.wire.delivered)
        for addr, client in revoked.items():
            client.receive(f.wire.take(addr))
            self.assertTrue(client.closed_by_server)
            self.assertFalse(f.server.send_to(b"after", addr))
            f.wire.client_sends(client, b"after", addr)
        self.assertEqual(f.wire.delivered[before:], [])
        self.assertGreaterEqual(f.server.counters["records_dropped"], 2)
        f.wire.client_sends(other, b"still here", ("192.0.2.3", 5000))
        self.assertEqual(f.wire.delivered[-1], (b"still here", ("192.0.2.3", 5000), "node-8"))
        self.assertEqual(f.server.end_sessions("node-9"), 0)


class RobustnessTests(SynchronousTestCase):

    def test_datagrams_that_are_not_dtls_cost_a_header_check(self):
        f = Fixture()
        body = bytes(8)
        not_dtls = [
            b"", b"\x16\xfe\xfd", coap_post(),
            record(24, body),                            # heartbeat: not a type we take
            record(22, body, version=b"\x03\x03"),       # TLS 1.2, not DTLS
            record(23, body, version=b"\xfe\xfc"),       # no such DTLS version
            record(23, body)[:-1],                       # length beyond the datagram
            record(23, body) + b"\x17\xfe",               # trailing bytes that are no record
        ]
        for datagram in not_dtls:
            f.server.datagram_received(datagram, ("192.0.2.1", 5000))
        self.assertEqual(f.server.counters["datagrams_not_dtls"], len(not_dtls))
        self.assertEqual(f.wire.outbox, {})

    def test_records_without_a_session_are_dropped(self):
        f = Fixture()
        f.server.datagram_received(record(23, b"data", epoch=5), ("192.0.2.1", 5000))
        self.assertEqual(f.server.counters["records_dropped"], 1)
        self.assertEqual(f.wire.outbox, {})

    def test_random_and_mutated_datagrams_never_break_the_server(self):
        rng = random.Random(20261201)
        f = Fixture(max_sessions=50, handshake_timeout=10.0, handshakes_per_source=1000.0)
        live = ("2001:db8::1", 5684)
        client = f.connect(live)
        # Real datagrams of a whole handshake and some records, to mutate.
        samples = []
        send = f.server.send
        f.server.send = lambda datagram, addr: (samples.append(datagram), send(datagram, addr))
        spare = MemoryClient(IDENTITY, f.key)
        flight = spare.start()
        for _ in range(6):
            samples.extend(flight)
            f.wire.to_server(flight, ("2001:db8::2", 5684))
            flight = spare.receive(f.wire.take(("2001:db8::2", 5684)))
        samples.extend(spare.send(coap_post()))
        samples.extend(client.send(coap_post()))
        peers = [live] + [(f"2001:db8::{i:x}", 5684) for i in range(3, 40)]

        def mutant() -> bytes:
            kind = rng.randrange(5)
            if kind == 0:
                return rng.randbytes(rng.randrange(0, 300))
            if kind == 1:
                body = rng.randbytes(rng.randrange(0, 120))
                return (bytes((rng.choice((20, 21, 22, 23)),)) + rng.choice((b"\xfe\xfd", b"\xfe\xff"))
                        + rng.randrange(0, 4).to_bytes(2, "big") + rng.randbytes(6)
                        + len(body).to_bytes(2, "big") + body)
            datagram = bytearray(rng.choice(samples))
            if kind == 2:
                for _ in range(rng.randrange(1, 4)):
                    datagram[rng.randrange(len(datagram))] ^= 1 << rng.randrange(8)
                return bytes(datagram)
            if rng.random() < 0.5:
                del datagram[rng.randrange(len(datagram)):]
            else:
                position = rng.randrange(len(datagram))
                datagram[position:position] = rng.randbytes(rng.randrange(1, 40))
            if kind == 4 and len(datagram) >= 25:
                # Mend the lengths, so the damage reaches past the record
                # layer into the handshake message (a ClientHello above all).
                datagram[11:13] = (len(datagram) - 13).to_bytes(2, "big")
                if datagram[0] == 22:
                    datagram[14:17] = datagram[22:25] = (len(datagram) - 25).to_bytes(3, "big")
            return bytes(datagram)

        for _ in range(20000):
            f.server.datagram_received(mutant(), rng.choice(peers))
            self.assertLessEqual(f.server.session_count() + f.server.handshake_count(), 50)
        self.assertEqual(f.server.counters["internal_errors"], 0)
        for addr in list(f.wire.outbox):
            if addr != live:
                f.wire.take(addr)
        client.receive(f.wire.take(live))
        self.assertTrue(f.works(client, live))
        f.clock.advance(11)
        self.assertEqual(f.server.handshake_count(), 0)
        self.assertLessEqual(len(f.server._wakeups), 64)


class KeyHygieneTests(SynchronousTestCase):

    def test_keys_stay_out_of_logs_reprs_and_counters(self):
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        key = new_key()

        def store(identity):
            if identity == "broken":
                raise KeyError(f"the store held {key!r} {key.hex()}")
            return {IDENTITY: key}.get(identity)

        server = DTLSServer(store, task.Clock(), handshake_timeout=5.0)
        wire = Wire(server)
        good = MemoryClient(IDENTITY, key)
        wire.handshake(good, ("192.0.2.1", 5000))
        for identity in ("node-9", "broken"):
            wire.handshake(MemoryClient(identity, key), ("192.0.2.2", 5000))
        wire.handshake(MemoryClient(IDENTITY, new_key()), ("192.0.2.3", 5000))
        server._clock.advance(6)
        server.end_sessions(IDENTITY)
        self.assertTrue(good.established)
        self.assertGreater(len(events), 3)
        texts = [formatEvent(e) + repr(e) for e in events]
        texts += [repr(server), repr(server.counters), repr(server._openssl), repr(server._cookies)]
        for form in (key.decode(), key.hex()):
            for text in texts:
                self.assertNotIn(form, text)


class RetransmissionTests(TestCase):
    """OpenSSL's retransmission timer, driven by the engine's one timer, on the real reactor."""

    def test_a_lost_server_flight_is_sent_again(self):
        key = new_key()
        server = DTLSServer({IDENTITY: key}.get, reactor)
        self.addCleanup(server.stop)
        wire = Wire(server)
        addr = ("192.0.2.1", 5000)
        client = MemoryClient(IDENTITY, key)
        wire.to_server(client.start(), addr)
        wire.to_server(client.receive(wire.take(addr)), addr)
        self.assertTrue(wire.take(addr))      # the ServerHello flight, lost
        waited = task.deferLater(reactor, 1.3, lambda: None)

        def resent(_):
            again = wire.take(addr)
            self.assertTrue(again)
            wire.exchange(client, client.receive(again), addr)
            self.assertTrue(client.established)
        return waited.addCallback(resent)


class LibcoapClientTests(TestCase):
    """libcoap's coap-client, built on OpenSSL and on GnuTLS, over real UDP."""

    def harness(self, host: str, **options) -> UDPHarness:
        self.key = new_key()
        return UDPHarness(self, host, {IDENTITY: self.key}, **options)

    @defer.inlineCallbacks
    def post_gets_204(self, client: str, host: str):
        harness = self.harness(host)
        result = yield libcoap_post(client, harness.url(), IDENTITY, self.key)
        self.assertEqual(result.code, "2.04", result.err[-2000:])
        self.assertEqual([identity for _, _, identity in harness.requests], [IDENTITY])
        self.assertEqual(harness.server.counters["handshakes_completed"], 1)

    @defer.inlineCallbacks
    def refused(self, client: str, identity: str, key_for_client, reason: str):
        harness = self.harness("::1", handshake_timeout=1.0)
        result = yield libcoap_post(client, harness.url(), identity, key_for_client(self.key), wait=3)
        self.assertIsNone(result.code)
        self.assertEqual(harness.requests, [])
        self.assertEqual(harness.server.session_count(), 0)
        self.assertGreaterEqual(harness.server.counters["refused_" + reason], 1)


_LIBCOAP_CLIENTS = {client.rsplit("-", 1)[1]: client
                    for client in ("coap-client-openssl", "coap-client-gnutls")}
parametrize(LibcoapClientTests, {
    f"{short}_client_over_{family}": (client, host) for short, client in _LIBCOAP_CLIENTS.items()
    for family, host in (("ipv6", "::1"), ("ipv4", "127.0.0.1"))},
    LibcoapClientTests.post_gets_204, f"test_{{}}_gets_204_as_{IDENTITY.replace('-', '_')}")
parametrize(LibcoapClientTests, {
    f"{short}_client_with_a_wrong_key": (client, IDENTITY, lambda key: new_key(), "timeout")
    for short, client in _LIBCOAP_CLIENTS.items()},
    LibcoapClientTests.refused, "test_{}_gets_no_204_and_is_refused")
parametrize(LibcoapClientTests, {
    f"{short}_client_with_an_unknown_identity": (client, "node-9", lambda key: key, "unknown_identity")
    for short, client in _LIBCOAP_CLIENTS.items()},
    LibcoapClientTests.refused, "test_{}_gets_no_204_and_is_refused")


class CookieJarTests(SynchronousTestCase):

    def test_the_secret_is_not_in_the_repr(self):
        jar = CookieJar(task.Clock())
        self.assertNotIn(jar._secret.hex(), repr(jar))
        self.assertNotIn(repr(jar._secret)[2:-1], repr(jar))
