"""The one CoAP parser and encoder: strict structure, typed options from the
registries (RFC 7252, 7641, 7959, 7967), datagrams built by another
implementation (txthings' encoder) read back exactly, and arbitrary bytes
never raising anything but :class:`MalformedMessage`."""

from __future__ import annotations

from hypothesis import given, settings, strategies as st
from twisted.trial.unittest import SynchronousTestCase
from txthings import coap as tx

from sense_gateway.coap.message import (
    ACCEPT, BLOCK1, CON, CONTENT_FORMAT, NO_RESPONSE, NON, OBSERVE, URI_HOST, URI_PATH,
    URI_QUERY, Block, MalformedMessage, encode, parse,
)
from tests.support import request_datagram


class ParseTests(SynchronousTestCase):
    def test_request_is_read_with_typed_options(self):
        datagram = request_datagram(code=tx.GET, path="time", mid=0x1234, token=b"tk", options=[
            tx.UintOption(tx.ACCEPT, 60), tx.UintOption(tx.OBSERVE, 0),
            tx.StringOption(tx.URI_QUERY, b"a=b"), tx.BlockOption(tx.BLOCK1, (3, True, 2))])
        message = parse(datagram)
        self.assertEqual((message.mtype, message.code, message.mid, message.token),
                         (CON, tx.GET, 0x1234, b"tk"))
        self.assertEqual(message.path, (b"time",))
        self.assertEqual(message.option(ACCEPT), 60)
        self.assertEqual(message.option(OBSERVE), 0)
        self.assertEqual(message.values(URI_QUERY), [b"a=b"])
        self.assertEqual(message.option(BLOCK1), Block(3, True, 2))
        self.assertIsNone(message.problem)

    def test_content_format_and_payload(self):
        message = parse(request_datagram(path="a/b", payload=b"{}", content_format=50))
        self.assertEqual((message.path, message.content_format, message.payload),
                         ((b"a", b"b"), 50, b"{}"))

    def test_no_response_is_understood(self):
        message = parse(request_datagram(payload=b"1", mtype=tx.NON, options=[
            tx.UintOption(NO_RESPONSE, 2)]))
        self.assertEqual((message.option(NO_RESPONSE), message.problem), (2, None))

    def test_long_option_values_and_large_deltas(self):
        segment = b"x" * 255  # one-byte extended length, the longest Uri-Path
        datagram = request_datagram(path="data", options=[
            tx.StringOption(tx.URI_PATH, segment),
            tx.OpaqueOption(2048, b"e" * 300)])  # extended delta, two-byte extended length
        message = parse(datagram)
        self.assertEqual(message.path, (b"data", segment))
        self.assertIsNone(message.problem)  # 2048 is elective: ignored

    def test_uri_path_over_255_bytes_is_a_problem(self):
        message = parse(request_datagram(options=[tx.StringOption(tx.URI_PATH, b"x" * 256)]))
        self.assertEqual(message.problem, (URI_PATH, "option 11: bad length 256"))

    def test_unknown_critical_option_is_the_problem(self):
        message = parse(request_datagram(options=[tx.OpaqueOption(2049, b"x")]))
        self.assertEqual(message.problem, (2049, "unknown critical option 2049"))

    def test_repeated_critical_option_is_a_problem_elective_ignored(self):
        host = tx.StringOption(tx.URI_HOST, b"gw")
        self.assertEqual(parse(request_datagram(options=[host, host])).problem,
                         (URI_HOST, "option 3 repeated"))
        twice = parse(request_datagram(payload=b"1", content_format=50)[:-2] + b"\x01\x3c\xff1")
        self.assertEqual((twice.content_format, twice.problem), (50, None))

    def test_bad_length_of_a_critical_option_is_a_problem(self):
        message = parse(request_datagram(options=[tx.OpaqueOption(tx.ACCEPT, b"\x00\x00\x32")]))
        self.assertEqual(message.problem, (ACCEPT, "option 17: bad length 3"))

    def test_empty_message(self):
        message = parse(bytes([0x40, 0, 0x12, 0x34]))
        self.assertEqual((message.mtype, message.code, message.mid), (CON, 0, 0x1234))

    def test_malformed_datagrams(self):
        cases = {
            "short": (b"\x40\x02", None),
            "version 2": (b"\x80\x02\x00\x01", None),
            "token length 9": (bytes([0x49, 0x02, 0, 5]) + b"123456789", 5),
            "truncated token": (bytes([0x44, 0x02, 0, 6]) + b"12", 6),
            "truncated option": (bytes([0x50, 0x02, 0, 7, 0xB4]) + b"da", 7),
            "marker without payload": (request_datagram(mid=8) + b"\xff", 8),
            "reserved delta": (bytes([0x40, 0x02, 0, 9, 0xF1, 0x00]), 9),
            "reserved length": (bytes([0x40, 0x02, 0, 10, 0x1F]), 10),
            "empty with token": (bytes([0x41, 0x00, 0, 11, 0x01]), 11),
            "reserved code class": (bytes([0x40, 0x20, 0, 12]), 12),
        }
        for name, (datagram, mid) in cases.items():
            with self.assertRaises(MalformedMessage, msg=name) as caught:
                parse(datagram)
            self.assertEqual(caught.exception.mid, mid, name)

    @settings(max_examples=2000, deadline=None)
    @given(st.binary(max_size=64))
    def test_arbitrary_bytes_parse_or_are_malformed(self, data):
        try:
            message = parse(data)
        except MalformedMessage:
            return
        token_length = data[0] & 0x0F
        self.assertEqual((message.mtype, message.code, message.mid, message.token),
                         ((data[0] >> 4) & 3, data[1], int.from_bytes(data[2:4], "big"),
                          data[4:4 + token_length]))


class EncodeTests(SynchronousTestCase):
    def test_encoded_message_reads_back_with_txthings(self):
        datagram = encode(NON, 0x45, 0xBEEF, b"tok", [(CONTENT_FORMAT, 60), (OBSERVE, 70000),
                                                      (URI_PATH, b"x" * 20)], b"\xa0")
        message = tx.Message.decode(datagram)
        self.assertEqual((message.mtype, message.code, message.mid, message.token, message.payload),
                         (NON, 0x45, 0xBEEF, b"tok", b"\xa0"))
        self.assertEqual((message.opt.content_format, message.opt.observe), (60, 70000))
        self.assertEqual(message.opt.uri_path, [b"x" * 20])

    def test_block_and_zero_values(self):
        datagram = encode(CON, 0x5F, 1, b"", [(BLOCK1, Block(0, True, 6)), (ACCEPT, 0)])
        message = parse(datagram)
        self.assertEqual((message.option(BLOCK1), message.option(ACCEPT)), (Block(0, True, 6), 0))

    @settings(max_examples=300, deadline=None)
    @given(mtype=st.integers(0, 3), code=st.sampled_from([1, 2, 0x44, 0x45, 0x84]),
           mid=st.integers(0, 0xFFFF), token=st.binary(max_size=8),
           path=st.lists(st.binary(max_size=255), max_size=4),
           content_format=st.one_of(st.none(), st.integers(0, 0xFFFF)),
           payload=st.binary(max_size=40))
    def test_what_we_encode_we_parse_back(self, mtype, code, mid, token, path, content_format,
                                          payload):
        options = [(URI_PATH, segment) for segment in path]
        if content_format is not None:
            options.append((CONTENT_FORMAT, content_format))
        message = parse(encode(mtype, code, mid, token, options, payload))
        self.assertEqual((message.mtype, message.code, message.mid, message.token),
                         (mtype, code, mid, token))
        self.assertEqual((message.path, message.content_format, message.payload),
                         (tuple(path), content_format, payload))


class TruncationProperties(SynchronousTestCase):
    """A datagram cut short on the way is never read as something else."""

    @settings(max_examples=300, deadline=None)
    @given(mtype=st.integers(0, 3), code=st.sampled_from([1, 2, 3, 0x44, 0x84]),
           mid=st.integers(0, 0xFFFF), token=st.binary(max_size=8),
           path=st.lists(st.binary(min_size=1, max_size=20), max_size=4),
           content_format=st.one_of(st.none(), st.integers(0, 0xFFFF)),
           payload=st.binary(max_size=20), data=st.data())
    def test_a_cut_message_is_malformed_with_its_id_or_a_prefix_of_itself(
            self, mtype, code, mid, token, path, content_format, payload, data):
        options = [(URI_PATH, segment) for segment in path]
        if content_format is not None:
            options.append((CONTENT_FORMAT, content_format))
        datagram = encode(mtype, code, mid, token, options, payload)
        cut = data.draw(st.integers(4, len(datagram)))
        try:
            message = parse(datagram[:cut])
        except MalformedMessage as e:
            # The header survived: a CON can still be answered with a Reset.
            self.assertEqual((e.mtype, e.mid), (mtype, mid))
            return
        self.assertEqual((message.mtype, message.code, message.mid, message.token),
                         (mtype, code, mid, token))
        self.assertEqual(message.path, tuple(path)[:len(message.path)])
        self.assertIn(message.content_format, (None, content_format))
        self.assertTrue(payload.startswith(message.payload))
        if cut == len(datagram):
            self.assertEqual((message.path, message.content_format, message.payload),
                             (tuple(path), content_format, payload))
