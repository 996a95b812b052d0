"""The built-in validators: what a device is told when its data breaks a rule."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from sense_gateway.config import load_config
from sense_gateway.envelope import Envelope, Reading
from sense_gateway.validation import sense_validate

RECEIVED = 1764300000.0
CONFIG = load_config(environ={}, overrides={"validation.max_fields": 3, "validation.max_readings": 2,
                                            "validation.max_name_length": 8,
                                            "validation.max_string_length": 5,
                                            "validation.max_device_length": 10})


def envelope(device="node-7", seq=1, readings=None) -> Envelope:
    return Envelope(id="e", device=device, seq=seq, received=RECEIVED, source="[::1]:1",
                    transport="coap", identity=None, path="/data", content_format=50,
                    readings=readings if readings is not None else [Reading({"t": 1.0}, RECEIVED)])


class ValidationTests(SynchronousTestCase):
    def test_valid_envelope_has_no_problems(self):
        self.assertEqual(sense_validate(envelope(), CONFIG), [])

    def test_limits_are_inclusive(self):
        readings = [Reading({"abcdefgh": 1, "b": "12345", "c": True}, RECEIVED + 300)] * 2
        self.assertEqual(sense_validate(envelope("d" * 10, 2 ** 32 - 1, readings), CONFIG), [])


def _case(make, problem):
    def test(self):
        self.assertEqual(sense_validate(make(), CONFIG)[0], problem)
    return test


CASES = {
    "missing_device": (lambda: envelope(device=""), "device id missing"),
    "long_device": (lambda: envelope(device="d" * 11), "device id longer than 10"),
    "device_with_space": (lambda: envelope(device="node 7"), "device id has spaces or control characters"),
    "negative_seq": (lambda: envelope(seq=-1), "seq must be 0 to 4294967295"),
    "seq_over_32_bits": (lambda: envelope(seq=2 ** 32), "seq must be 0 to 4294967295"),
    "no_readings": (lambda: envelope(readings=[]), "no readings"),
    "too_many_readings": (lambda: envelope(readings=[Reading({"t": 1})] * 3), "more than 2 readings"),
    "no_fields": (lambda: envelope(readings=[Reading({})]), "reading: no fields"),
    "too_many_fields": (lambda: envelope(readings=[Reading({"a": 1, "b": 1, "c": 1, "d": 1})]),
                        "reading: more than 3 fields"),
    "bad_field_name": (lambda: envelope(readings=[Reading({"temp!": 1})]), "reading: field 'temp!': bad name"),
    "reserved_field_name": (lambda: envelope(readings=[Reading({"_t": 1})]), "reading: field '_t': bad name"),
    "long_field_name": (lambda: envelope(readings=[Reading({"abcdefghi": 1})]),
                        "reading: field 'abcdefghi': name too long"),
    "nan": (lambda: envelope(readings=[Reading({"t": float("nan")})]), "reading: field 't': not a finite number"),
    "infinity": (lambda: envelope(readings=[Reading({"t": float("inf")})]), "reading: field 't': not a finite number"),
    "huge_integer": (lambda: envelope(readings=[Reading({"t": 2 ** 63})]),
                     "reading: field 't': integer out of 64-bit range"),
    "long_string": (lambda: envelope(readings=[Reading({"t": "123456"})]), "reading: field 't': string too long"),
    "bad_tag": (lambda: envelope(readings=[Reading({"t": 1}, tags={"room": "x" * 6})]),
                "reading: tag 'room': bad tag value"),
    "old_timestamp": (lambda: envelope(readings=[Reading({"t": 1}, ts=100.0)]),
                      "reading: timestamp before 946684800"),
    "future_timestamp": (lambda: envelope(readings=[Reading({"t": 1}, ts=RECEIVED + 301)]),
                         "reading: timestamp in the future"),
    "second_reading_named": (lambda: envelope(readings=[Reading({"t": 1}), Reading({"t!": 1})]),
                             "reading 2: field 't!': bad name"),
}

for _name, (_make, _problem) in CASES.items():
    setattr(ValidationTests, f"test_{_name}", _case(_make, _problem))
