"""The original SENSE devices' ``value,parity,...`` text on /temperature and /temp."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from sense_gateway.envelope import Decoded, Reading, RequestContext
from sense_gateway.errors import DecodeError
from sense_gateway.formats import sense_text

from tests.support import assert_refused, parametrize

RECEIVED = 1764300000.0
[FORMAT] = sense_text.sense_register_formats()


def parity(value: int) -> int:
    """The odd-parity bit a SENSE device sends with *value* (16-bit two's complement)."""
    ones = format(value % 65536, "016b").count("1")
    return 0 if ones % 2 else 1


def payload(values: list[int], corrupt: frozenset[int] = frozenset()) -> bytes:
    """``v,p,`` pairs; the parity bit of the values at the *corrupt* indexes is flipped."""
    return "".join(f"{v},{parity(v) ^ (i in corrupt)}," for i, v in enumerate(values)).encode()


def decode(body: bytes, source_host: str = "2001:db8::7") -> Decoded:
    context = RequestContext(path="/temperature", content_format=0, source_host=source_host,
                             source_port=5683, received=RECEIVED)
    return FORMAT.decode(body, context)


def temperature(value: float, ts: float, interpolated: bool = False) -> Reading:
    fields = {"temperature": value, "interpolated": True} if interpolated else {"temperature": value}
    return Reading(fields, ts=ts, measurement="sense", units={"temperature": "Cel"})


TEN = [2150, 2151, 2153, 2155, 2160, 2158, 2157, 2160, 2162, 2165]


class SenseTextTests(SynchronousTestCase):
    def test_registered_on_both_paths_for_text_and_no_content_format(self):
        self.assertEqual((FORMAT.name, FORMAT.paths, FORMAT.content_formats),
                         ("sense-text", ("/temperature", "/temp"), (0, None)))

    def test_ten_values_one_per_second_ending_at_receipt(self):
        decoded = decode(payload(TEN))
        self.assertEqual(decoded.readings,
                         [temperature(v / 100, RECEIVED - 9 + i) for i, v in enumerate(TEN)])

    def test_device_is_the_source_address_and_there_is_no_seq(self):
        decoded = decode(payload(TEN), source_host="192.0.2.7")
        self.assertEqual((decoded.device, decoded.seq), ("192.0.2.7", None))

    def test_readme_example(self):
        self.assertEqual(decode(b"2150,0,2151,1,2153,0,").readings,
                         [temperature(21.5, RECEIVED - 2), temperature(21.51, RECEIVED - 1),
                          temperature(21.53, RECEIVED)])

    def test_interpolated_value_is_the_mean_of_its_neighbours(self):
        readings = decode(payload([2150, 9999, 2153], corrupt=frozenset({1}))).readings
        self.assertEqual(readings, [temperature(21.5, RECEIVED - 2),
                                    temperature(21.515, RECEIVED - 1, interpolated=True),
                                    temperature(21.53, RECEIVED)])

    def test_failed_first_value_is_dropped_and_times_stay(self):
        readings = decode(payload([1000, 2150, 2151], corrupt=frozenset({0}))).readings
        self.assertEqual(readings, [temperature(21.5, RECEIVED - 1), temperature(21.51, RECEIVED)])

    def test_failed_last_value_is_dropped(self):
        readings = decode(payload([2150, 2151, 1000], corrupt=frozenset({2}))).readings
        self.assertEqual(readings, [temperature(21.5, RECEIVED - 2), temperature(21.51, RECEIVED - 1)])

    def test_adjacent_failures_are_both_dropped(self):
        readings = decode(payload([2150, 1, 2, 2153], corrupt=frozenset({1, 2}))).readings
        self.assertEqual(readings, [temperature(21.5, RECEIVED - 3), temperature(21.53, RECEIVED)])

    def test_alternate_failures_are_each_interpolated(self):
        values = [2150, 1, 2152, 3, 2154]
        readings = decode(payload(values, corrupt=frozenset({1, 3}))).readings
        self.assertEqual([r.fields.get("interpolated", False) for r in readings],
                         [False, True, False, True, False])
        self.assertEqual([r.fields["temperature"] for r in readings],
                         [21.5, 21.51, 21.52, 21.53, 21.54])

    def test_negative_values_use_16_bit_twos_complement(self):
        # -5 is 0xFFFB: fifteen ones, so parity bit 0 makes it odd.
        self.assertEqual(decode(b"-5,0").readings, [temperature(-0.05, RECEIVED)])
        self.assertRaises(DecodeError, decode, b"-5,1")

    def test_16_bit_extremes(self):
        readings = decode(payload([-32768, 32767])).readings
        self.assertEqual([r.fields["temperature"] for r in readings], [-327.68, 327.67])

    def test_trailing_comma_is_optional(self):
        self.assertEqual(decode(b"2150,0").readings, decode(b"2150,0,").readings)

    def test_whitespace_around_payload_and_items_is_ignored(self):
        self.assertEqual(decode(b"  2150, 0 ,2151 ,1,\r\n").readings,
                         decode(b"2150,0,2151,1,").readings)

    def test_one_pair_is_enough(self):
        self.assertEqual(decode(b"2150,0,").readings, [temperature(21.5, RECEIVED)])

    def test_sixty_pairs_are_accepted(self):
        values = [2000 + i for i in range(60)]
        readings = decode(payload(values)).readings
        self.assertEqual((len(readings), readings[0].ts, readings[-1].ts),
                         (60, RECEIVED - 59, RECEIVED))

    def test_parity_rule(self):
        self.assertTrue(sense_text.parity_holds(2150, 0))
        self.assertFalse(sense_text.parity_holds(2150, 1))
        self.assertTrue(sense_text.parity_holds(0, 1))


class SenseTextRefusalTests(SynchronousTestCase):
    """Each refusal with its diagnostic, which becomes the 4.00 payload."""


#: name -> (payload, diagnostic)
REFUSALS = {
    "every_parity_failed": (b"2150,1,2151,0,", "no value passed its parity check"),
    "single_value_failed": (b"2150,1", "no value passed its parity check"),
    "empty": (b"", "no values"),
    "only_whitespace": (b" \n", "no values"),
    "only_a_comma": (b",", "1 items: expected value,parity pairs"),
    "odd_number_of_items": (b"2150,0,2151,", "3 items: expected value,parity pairs"),
    "sixty_one_pairs": (payload([2000] * 61), "61 values: at most 60"),
    "word": (b"2150,0,warm,1,", "item 3: not an integer"),
    "decimal": (b"21.5,0,", "item 1: not an integer"),
    "plus_sign": (b"+2150,0,", "item 1: not an integer"),
    "underscore_digits": (b"2_150,0,", "item 1: not an integer"),
    "empty_item": (b"2150,,2151,1", "item 2: not an integer"),
    "bare_minus": (b"-,0", "item 1: not an integer"),
    "parity_two": (b"2150,2,", "item 2: parity bit must be 0 or 1"),
    "parity_negative": (b"2150,0,2151,-1,", "item 4: parity bit must be 0 or 1"),
    "above_16_bits": (b"32768,0,", "item 1: out of 16-bit range"),
    "below_16_bits": (b"2150,0,-32769,0,", "item 3: out of 16-bit range"),
    "not_ascii": ("21\u00b0C,0".encode(), "not ASCII text"),
}


def _refused(self, body: bytes, diagnostic: str):
    assert_refused(self, diagnostic, decode, body)


parametrize(SenseTextRefusalTests, REFUSALS, _refused)
