"""RFC 8428 SenML on /data: senml+json (110) and senml+cbor (112)."""

from __future__ import annotations

import cbor2
import orjson
from twisted.trial.unittest import SynchronousTestCase

from sense_gateway.envelope import Reading, RequestContext
from sense_gateway.errors import DecodeError
from sense_gateway.formats import senml

RECEIVED = 1764300000.0
CONTEXT = RequestContext(path="/data", content_format=110, source_host="::1", source_port=5683,
                         received=RECEIVED)
FORMATS = {f.content_formats[0]: f for f in senml.sense_register_formats()}


def decode(records, cf=110):
    return FORMATS[cf].decode(orjson.dumps(records) if cf == 110 else cbor2.dumps(records), CONTEXT)


class SenMLTests(SynchronousTestCase):
    def test_single_datapoint(self):
        # RFC 8428 5.1.1
        decoded = decode([{"n": "urn:dev:ow:10e2073a01080063", "u": "Cel", "v": 23.1}])
        # No base name: the device is unknown (the validators refuse it).
        self.assertIsNone(decoded.device)
        self.assertEqual(decoded.readings, [Reading(fields={"urn:dev:ow:10e2073a01080063": 23.1},
                                                    ts=RECEIVED)])

    def test_base_name_names_the_device(self):
        # RFC 8428 5.1.2, with an absolute base time
        decoded = decode([
            {"bn": "urn:dev:ow:10e2073a01080063:", "bt": 1.320067464e9, "n": "voltage", "u": "V", "v": 120.1},
            {"n": "current", "u": "A", "v": 1.2}])
        self.assertEqual(decoded.device, "urn:dev:ow:10e2073a01080063")
        self.assertEqual(decoded.readings, [Reading(fields={"voltage": 120.1, "current": 1.2},
                                                    ts=1.320067464e9)])

    def test_relative_times_and_base_value(self):
        decoded = decode([{"bn": "dev/", "bt": RECEIVED - 10, "bv": 20, "n": "t", "v": 1.5, "t": 0},
                          {"n": "t", "v": 2.5, "t": 5}])
        self.assertEqual(decoded.device, "dev")
        self.assertEqual([(r.ts, r.fields) for r in decoded.readings],
                         [(RECEIVED - 10, {"t": 21.5}), (RECEIVED - 5, {"t": 22.5})])

    def test_small_times_are_relative_to_receive_time(self):
        decoded = decode([{"bn": "d:", "n": "t", "v": 1, "t": -60}])
        self.assertEqual(decoded.readings[0].ts, RECEIVED - 60)

    def test_string_boolean_and_sum_values(self):
        decoded = decode([{"bn": "d:", "n": "state", "vs": "open"}, {"n": "alarm", "vb": False},
                          {"n": "energy", "s": 12.5, "v": 3}])
        self.assertEqual(decoded.readings[0].fields,
                         {"state": "open", "alarm": False, "energy_sum": 12.5, "energy": 3})

    def test_base_only_record_is_allowed(self):
        decoded = decode([{"bn": "d:", "bt": RECEIVED}, {"n": "t", "v": 1}])
        self.assertEqual((decoded.device, decoded.readings[0].ts), ("d", RECEIVED))

    def test_cbor_integer_labels(self):
        decoded = decode([{-2: "urn:dev:mac:0024befffe804ff1:", -3: RECEIVED, 0: "temperature", 2: 22.0},
                          {0: "humidity", 2: 40}], cf=112)
        self.assertEqual(decoded.device, "urn:dev:mac:0024befffe804ff1")
        self.assertEqual(decoded.readings[0].fields, {"temperature": 22.0, "humidity": 40})

    def test_no_sequence_number(self):
        self.assertIsNone(decode([{"bn": "d:", "n": "t", "v": 1}]).seq)


def _error_case(records, message, cf=110):
    def test(self):
        payload = records if isinstance(records, bytes) else (
            orjson.dumps(records) if cf == 110 else cbor2.dumps(records))
        error = self.assertRaises(DecodeError, FORMATS[cf].decode, payload, CONTEXT)
        self.assertEqual(str(error), message)
    return test


ERRORS = {
    "invalid_json": (b"[{", "invalid JSON at byte 2"),
    "not_an_array": ({"n": "t", "v": 1}, "expected an array of records"),
    "empty_pack": ([], "empty pack"),
    "record_not_object": ([1], "record 0: expected an object"),
    "no_value": ([{"bn": "d:"}, {"n": "u", "u": "V"}], "record 1: no value"),
    "two_values": ([{"n": "t", "v": 1, "vs": "x"}], "record 0: more than one value"),
    "data_value": ([{"n": "t", "vd": "AAE"}], "record 0: data values (vd) not accepted"),
    "value_not_number": ([{"n": "t", "v": "1"}], "record 0: v must be a number"),
    "vb_not_boolean": ([{"n": "t", "vb": 1}], "record 0: vb must be a boolean"),
    "must_understand_label": ([{"n": "t", "v": 1, "xyz_": 1}], "record 0: unsupported label xyz_"),
    "two_devices": ([{"bn": "a:", "n": "t", "v": 1}, {"bn": "b:", "n": "t", "v": 1}],
                    "records name more than one device"),
    "cbor_unknown_label": ([{0: "t", 2: 1, 99: 1}], "record 0: unknown label 99", 112),
    "cbor_not_array": ({0: "t"}, "expected an array of records", 112),
}

for _name, _case in ERRORS.items():
    setattr(SenMLTests, f"test_error_{_name}", _error_case(*_case))
