"""The original SENSE devices' text format on /temperature and /temp."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from sense_gateway.envelope import RequestContext
from sense_gateway.errors import DecodeError
from sense_gateway.formats import sense_text

RECEIVED = 1764300000.0
CONTEXT = RequestContext(path="/temperature", content_format=None, source_host="2001:db8::7",
                         source_port=5683, received=RECEIVED)
[FORMAT] = sense_text.sense_register_formats()


def parity(value: int) -> int:
    return 0 if bin(value & 0xFFFF).count("1") % 2 else 1


def payload(values, bad=()) -> bytes:
    return "".join(f"{v},{parity(v) ^ (i in bad)}," for i, v in enumerate(values)).encode()


def decode(data: bytes):
    return FORMAT.decode(data, CONTEXT)


TEN = [2150, 2151, 2153, 2155, 2160, 2158, 2157, 2160, 2162, 2165]


class SenseTextTests(SynchronousTestCase):
    def test_paths_and_content_formats(self):
        self.assertEqual((FORMAT.paths, FORMAT.content_formats), (("/temperature", "/temp"), (0, None)))

    def test_ten_values_one_second_apart_ending_at_receive_time(self):
        decoded = decode(payload(TEN))
        self.assertEqual(decoded.device, "2001:db8::7")
        self.assertEqual([r.fields["temperature"] for r in decoded.readings], [v / 100 for v in TEN])
        self.assertEqual([r.ts for r in decoded.readings], [RECEIVED - 9 + i for i in range(10)])

    def test_negative_values_use_sixteen_bit_parity(self):
        decoded = decode(payload([-523, 12]))
        self.assertEqual([r.fields["temperature"] for r in decoded.readings], [-5.23, 0.12])

    def test_failed_parity_between_good_values_is_interpolated(self):
        decoded = decode(payload([2150, 9999, 2160], bad={1}))
        self.assertEqual([r.fields for r in decoded.readings], [
            {"temperature": 21.5}, {"temperature": 21.55, "interpolated": True}, {"temperature": 21.6}])
        self.assertEqual(decoded.readings[1].ts, RECEIVED - 1)

    def test_failed_parity_at_the_edges_is_dropped(self):
        decoded = decode(payload([2150, 2151, 2153], bad={0, 2}))
        self.assertEqual([(r.ts, r.fields) for r in decoded.readings],
                         [(RECEIVED - 1, {"temperature": 21.51})])

    def test_two_failed_neighbours_are_both_dropped(self):
        decoded = decode(payload([2150, 2151, 2153, 2155], bad={1, 2}))
        self.assertEqual([r.fields["temperature"] for r in decoded.readings], [21.5, 21.55])

    def test_without_trailing_comma_and_with_whitespace(self):
        self.assertEqual(len(decode(b" " + payload([2150, 2151])[:-1] + b"\r\n").readings), 2)


def _error_case(data, message):
    def test(self):
        self.assertEqual(str(self.assertRaises(DecodeError, decode, data)), message)
    return test


ERRORS = {
    "empty": (b"", "no values"),
    "odd_item_count": (b"2150,0,2151,", "3 items: expected value,parity pairs"),
    "not_an_integer": (b"2150,0,21.5,1,", "item 3: not an integer"),
    "parity_not_a_bit": (b"2150,2,", "item 2: parity bit must be 0 or 1"),
    "out_of_range": (b"40000,1,", "item 1: out of range"),
    "too_many_values": (b"0,1," * 61, "more than 60 values"),
    "not_ascii": ("21°,1,".encode(), "not ASCII text"),
    "every_parity_fails": (payload([2150, 2151], bad={0, 1}), "no value passed its parity check"),
}

for _name, _case in ERRORS.items():
    setattr(SenseTextTests, f"test_error_{_name}", _error_case(*_case))
