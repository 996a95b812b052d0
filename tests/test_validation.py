"""The built-in validators: what a device is told when its data breaks a rule.

Limits are set small here so each boundary is cheap to reach; every limit
is tested at its value (accepted) and one past it (refused).
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from sense_gateway.config import Config, load_config
from sense_gateway.envelope import Envelope, Reading
from sense_gateway.validation import sense_validate

from tests.support import parametrize

RECEIVED = 1764300000.0
MIN_TIMESTAMP = 946684800.0
CONFIG = load_config(environ={}, overrides={
    "validation.max_readings": 2, "validation.max_fields": 3, "validation.max_name_length": 8,
    "validation.max_string_length": 5, "validation.max_device_length": 10,
    "validation.max_future": 300.0, "validation.min_timestamp": MIN_TIMESTAMP})


def envelope(device="node-7", seq=1, readings=None, boot=None) -> Envelope:
    if readings is None:
        readings = [Reading({"t": 21.5}, ts=RECEIVED)]
    return Envelope(id="e", device=device, seq=seq, received=RECEIVED, source="[::1]:5683",
                    transport="coap", identity=None, path="/data", content_format=50,
                    readings=readings, boot=boot)


def one(fields=None, ts=RECEIVED, measurement="sense", tags=None) -> Envelope:
    """An envelope with a single reading."""
    return envelope(readings=[Reading({"t": 1} if fields is None else fields, ts=ts,
                                      measurement=measurement, tags=tags or {})])


class ValidationTests(SynchronousTestCase):
    def test_valid_envelope_has_no_problems(self):
        self.assertEqual(sense_validate(envelope(), CONFIG), [])

    def test_default_limits_accept_a_typical_envelope(self):
        self.assertEqual(sense_validate(envelope(), Config()), [])

    def test_every_problem_is_listed_most_basic_first(self):
        bad = envelope(device="", seq=-1,
                       readings=[Reading({"t": 1}), Reading({"t!": 1, "u": float("nan")})])
        self.assertEqual(sense_validate(bad, CONFIG), [
            "device id missing", "seq must be an integer from 0 to 4294967295",
            "reading 2: field 't!': bad name", "reading 2: field 'u': not a finite number"])

    def test_contents_of_too_many_readings_are_not_examined(self):
        bad = envelope(readings=[Reading({"t!": 1})] * 3)
        self.assertEqual(sense_validate(bad, CONFIG), ["more than 2 readings"])

    def test_long_names_are_clipped_in_diagnostics(self):
        [problem] = sense_validate(one({"x" * 200: 1}), CONFIG)
        self.assertEqual(problem, "reading 1: field 'xxxxxxxxxxxxxxxxxxxx...': name longer than 8")


class ValidationBoundaryTests(SynchronousTestCase):
    """Envelopes exactly at a limit, or otherwise unusual, that are fine."""


#: name -> envelope factory; each must have no problems
ACCEPTED = {
    "device_at_max_length": lambda: envelope(device="d" * 10),
    "device_is_an_ipv6_address": lambda: envelope(device="fd00::7"),
    "device_of_punctuation": lambda: envelope(device="u:x~!#"),
    "seq_absent": lambda: envelope(seq=None),
    "seq_zero": lambda: envelope(seq=0),
    "seq_at_32_bit_max": lambda: envelope(seq=2 ** 32 - 1),
    "boot_at_32_bit_max": lambda: envelope(boot=2 ** 32 - 1),
    "readings_at_max": lambda: envelope(readings=[Reading({"t": 1}, ts=RECEIVED)] * 2),
    "fields_at_max": lambda: one({"a": 1, "b": 2, "c": 3}),
    "name_at_max_length": lambda: one({"abcdefgh": 1}),
    "name_of_every_allowed_character": lambda: one({"a-b.c:/_": 1}),
    "name_starting_with_a_digit": lambda: one({"1wire": 1}),
    "string_at_max_length": lambda: one({"t": "12345"}),
    "empty_string_value": lambda: one({"t": ""}),
    "booleans": lambda: one({"a": True, "b": False}),
    "int64_max": lambda: one({"t": 2 ** 63 - 1}),
    "int64_min": lambda: one({"t": -(2 ** 63)}),
    "tags": lambda: one(tags={"room": "lab-1"}),
    "tag_value_at_max_length": lambda: one(tags={"room": "12345"}),
    "own_measurement": lambda: one(measurement="weather"),
    "timestamp_absent": lambda: one(ts=None),
    "timestamp_at_min": lambda: one(ts=MIN_TIMESTAMP),
    "timestamp_at_max_future": lambda: one(ts=RECEIVED + 300),
    "integer_timestamp": lambda: one(ts=1764300000),
}


def _accepted(self, make):
    self.assertEqual(sense_validate(make(), CONFIG), [])


parametrize(ValidationBoundaryTests, {name: (make,) for name, make in ACCEPTED.items()}, _accepted)


class ValidationProblemTests(SynchronousTestCase):
    """Each rule broken alone, with the problem the device is told."""


#: name -> (envelope factory, the only problem)
PROBLEMS = {
    "device_none": (lambda: envelope(device=None), "device id missing"),
    "device_empty": (lambda: envelope(device=""), "device id missing"),
    "device_not_a_string": (lambda: envelope(device=7), "device id is not a string"),
    "device_over_max_length": (lambda: envelope(device="d" * 11), "device id longer than 10"),
    "device_with_space": (lambda: envelope(device="node 7"), "device id: printable ASCII only, no spaces"),
    "device_with_tab": (lambda: envelope(device="node\t7"), "device id: printable ASCII only, no spaces"),
    "device_with_control_character": (lambda: envelope(device="node\x007"),
                                      "device id: printable ASCII only, no spaces"),
    "device_not_ascii": (lambda: envelope(device="n\u00f6de"), "device id: printable ASCII only, no spaces"),
    "seq_negative": (lambda: envelope(seq=-1), "seq must be an integer from 0 to 4294967295"),
    "seq_over_32_bits": (lambda: envelope(seq=2 ** 32), "seq must be an integer from 0 to 4294967295"),
    "seq_boolean": (lambda: envelope(seq=True), "seq must be an integer from 0 to 4294967295"),
    "seq_float": (lambda: envelope(seq=1.0), "seq must be an integer from 0 to 4294967295"),
    "boot_negative": (lambda: envelope(boot=-1), "boot must be an integer from 0 to 4294967295"),
    "boot_over_32_bits": (lambda: envelope(boot=2 ** 32),
                          "boot must be an integer from 0 to 4294967295"),
    "no_readings": (lambda: envelope(readings=[]), "no readings"),
    "readings_over_max": (lambda: envelope(readings=[Reading({"t": 1})] * 3), "more than 2 readings"),
    "no_fields": (lambda: one({}), "reading 1: no fields"),
    "unit_for_no_field": (lambda: envelope(readings=[Reading({"t": 1}, units={"h": "%RH"})]),
                          "reading 1: unit for 'h': no such field"),
    "unit_empty": (lambda: envelope(readings=[Reading({"t": 1}, units={"t": ""})]),
                   "reading 1: unit for 't': must be 1 to 8 characters"),
    "unit_with_newline": (lambda: envelope(readings=[Reading({"t": 1}, units={"t": "C\n"})]),
                          "reading 1: unit for 't': control character"),
    "fields_over_max": (lambda: one({"a": 1, "b": 1, "c": 1, "d": 1}), "reading 1: more than 3 fields"),
    "second_reading_is_named": (lambda: envelope(readings=[Reading({"t": 1}), Reading({"t!": 1})]),
                                "reading 2: field 't!': bad name"),
    "field_name_with_punctuation": (lambda: one({"temp!": 1}), "reading 1: field 'temp!': bad name"),
    "field_name_with_space": (lambda: one({"a b": 1}), "reading 1: field 'a b': bad name"),
    "field_name_not_ascii": (lambda: one({"t\u00e9": 1}), "reading 1: field 't\u00e9': bad name"),
    "field_name_starting_with_underscore": (lambda: one({"_t": 1}), "reading 1: field '_t': bad name"),
    "field_name_time_is_reserved": (lambda: one({"time": 1}), "reading 1: field 'time': reserved name"),
    "field_name_empty": (lambda: one({"": 1}), "reading 1: field '': empty name"),
    "field_name_over_max_length": (lambda: one({"abcdefghi": 1}),
                                   "reading 1: field 'abcdefghi': name longer than 8"),
    "field_name_not_a_string": (lambda: one({1: 1}), "reading 1: field '1': name is not a string"),
    "nan": (lambda: one({"t": float("nan")}), "reading 1: field 't': not a finite number"),
    "infinity": (lambda: one({"t": float("inf")}), "reading 1: field 't': not a finite number"),
    "minus_infinity": (lambda: one({"t": float("-inf")}), "reading 1: field 't': not a finite number"),
    "integer_over_int64": (lambda: one({"t": 2 ** 63}), "reading 1: field 't': integer out of 64-bit range"),
    "integer_under_int64": (lambda: one({"t": -(2 ** 63) - 1}),
                            "reading 1: field 't': integer out of 64-bit range"),
    "string_over_max_length": (lambda: one({"t": "123456"}), "reading 1: field 't': string longer than 5"),
    "string_with_newline": (lambda: one({"t": "a\nb"}), "reading 1: field 't': control characters in string"),
    "none_value": (lambda: one({"t": None}), "reading 1: field 't': not a number, boolean or string"),
    "bytes_value": (lambda: one({"t": b"x"}), "reading 1: field 't': not a number, boolean or string"),
    "list_value": (lambda: one({"t": [1]}), "reading 1: field 't': not a number, boolean or string"),
    "tag_name_bad": (lambda: one(tags={"ro om": "lab"}), "reading 1: tag 'ro om': bad name"),
    "tag_value_empty": (lambda: one(tags={"room": ""}),
                        "reading 1: tag 'room': value must be a non-empty string"),
    "tag_value_not_a_string": (lambda: one(tags={"room": 1}),
                               "reading 1: tag 'room': value must be a non-empty string"),
    "tag_value_over_max_length": (lambda: one(tags={"room": "123456"}),
                                  "reading 1: tag 'room': string longer than 5"),
    "tag_value_with_control_character": (lambda: one(tags={"room": "a\rb"}),
                                         "reading 1: tag 'room': control characters in string"),
    "measurement_bad": (lambda: one(measurement="my data"), "reading 1: measurement 'my data': bad name"),
    "measurement_empty": (lambda: one(measurement=""), "reading 1: measurement '': empty name"),
    "timestamp_before_min": (lambda: one(ts=MIN_TIMESTAMP - 0.5),
                             "reading 1: timestamp 946684799 before 946684800"),
    "timestamp_zero": (lambda: one(ts=0.0), "reading 1: timestamp 0 before 946684800"),
    "timestamp_past_max_future": (lambda: one(ts=RECEIVED + 300.5),
                                  "reading 1: timestamp more than 300 s in the future"),
    "timestamp_nan": (lambda: one(ts=float("nan")), "reading 1: timestamp is not a finite number"),
    "timestamp_infinite": (lambda: one(ts=float("inf")), "reading 1: timestamp is not a finite number"),
    "timestamp_a_string": (lambda: one(ts="now"), "reading 1: timestamp is not a finite number"),
}


def _problem(self, make, problem):
    self.assertEqual(sense_validate(make(), CONFIG), [problem])
    self.assertLess(len(problem), 100)


parametrize(ValidationProblemTests, PROBLEMS, _problem)
