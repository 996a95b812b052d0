"""SENSE v1 JSON (Content-Format 50) and CBOR (60) on /data."""

from __future__ import annotations

import cbor2
import orjson
from twisted.trial.unittest import SynchronousTestCase

from sense_gateway.config import Config
from sense_gateway.envelope import Reading, RequestContext
from sense_gateway.errors import DecodeError
from sense_gateway.formats import sense

CONTEXT = RequestContext(path="/data", content_format=50, source_host="::1", source_port=5683,
                         received=1764300000.0)
FORMATS = {f.content_formats[0]: f for f in sense.sense_register_formats()}


def decode(doc, cf=50):
    payload = orjson.dumps(doc) if cf == 50 else cbor2.dumps(doc)
    return FORMATS[cf].decode(payload, CONTEXT)


class SenseFormatTests(SynchronousTestCase):
    def test_registered_on_data(self):
        self.assertEqual({(f.name, f.paths, f.content_formats) for f in FORMATS.values()},
                         {("sense-json", ("/data",), (50,)), ("sense-cbor", ("/data",), (60,))})

    def test_single_reading(self):
        decoded = decode({"id": "node-7", "seq": 42, "ts": 1764300000, "data": {"temperature": 21.5}})
        self.assertEqual((decoded.device, decoded.seq), ("node-7", 42))
        self.assertEqual(decoded.readings, [Reading(fields={"temperature": 21.5}, ts=1764300000.0)])

    def test_optional_timestamp_and_seq(self):
        decoded = decode({"id": "n", "data": {"on": True, "mode": "eco", "count": 3}})
        self.assertEqual((decoded.seq, decoded.readings[0].ts), (None, None))
        self.assertEqual(decoded.readings[0].fields, {"on": True, "mode": "eco", "count": 3})

    def test_fractional_timestamp(self):
        self.assertEqual(decode({"id": "n", "ts": 1764300000.25, "data": {"t": 1}}).readings[0].ts,
                         1764300000.25)

    def test_batch_form_with_tags(self):
        decoded = decode({"id": "n", "seq": 3, "tags": {"room": "lab"}, "readings": [
            {"ts": 1, "data": {"t": 1}}, {"ts": 2, "data": {"t": 2}, "tags": {"probe": "b"}}]})
        self.assertEqual([r.tags for r in decoded.readings],
                         [{"room": "lab"}, {"room": "lab", "probe": "b"}])
        self.assertEqual([r.ts for r in decoded.readings], [1.0, 2.0])

    def test_missing_id_is_left_to_the_validators(self):
        self.assertIsNone(decode({"data": {"t": 1}}).device)

    def test_cbor_same_structure(self):
        decoded = decode({"id": "node-9", "seq": 3, "data": {"t": 20.25, "door": True}}, cf=60)
        self.assertEqual((decoded.device, decoded.readings[0].fields), ("node-9", {"t": 20.25, "door": True}))


def _error_case(payload, message, cf=50):
    def test(self):
        error = self.assertRaises(DecodeError, FORMATS[cf].decode, payload, CONTEXT)
        self.assertEqual(str(error), message)
    return test


ERRORS = {
    "invalid_json": (b'{"id": "n",', "invalid JSON at byte 11"),
    "not_an_object": (b"[1, 2]", "expected an object"),
    "id_not_string": (b'{"id": 7, "data": {}}', "id: expected a string"),
    "seq_not_integer": (b'{"id": "n", "seq": "1", "data": {}}', "seq: expected an integer"),
    "seq_boolean": (b'{"id": "n", "seq": true, "data": {}}', "seq: expected an integer"),
    "data_not_object": (b'{"id": "n", "data": 5}', "data: expected an object"),
    "value_null": (b'{"id": "n", "data": {"t": null}}', "data.t: expected a number, boolean or string"),
    "value_list": (b'{"id": "n", "data": {"t": [1]}}', "data.t: expected a number, boolean or string"),
    "both_forms": (b'{"id": "n", "data": {}, "readings": []}', "both data and readings given"),
    "no_data": (b'{"id": "n"}', "data missing"),
    "readings_not_array": (b'{"id": "n", "readings": {}}', "readings: expected an array"),
    "reading_without_data": (b'{"id": "n", "readings": [{"ts": 1}]}', "readings[0]: data missing"),
    "bad_timestamp": (b'{"id": "n", "ts": "now", "data": {"t": 1}}', "ts: expected epoch seconds"),
    "bad_tags": (b'{"id": "n", "tags": {"a": 1}, "data": {"t": 1}}', "tags: expected an object of strings"),
    "cbor_trailing_bytes": (cbor2.dumps({"id": "n", "data": {}}) + b"\x00",
                            "invalid CBOR: 1 bytes after the item", 60),
    "cbor_truncated": (cbor2.dumps({"id": "n", "data": {"t": 1}})[:-2], "invalid CBOR: truncated", 60),
    "cbor_bytes_value": (cbor2.dumps({"id": "n", "data": {"t": b"x"}}),
                         "data.t: expected a number, boolean or string", 60),
    "cbor_integer_key": (cbor2.dumps({"id": "n", "data": {1: 2}}), "data: field names must be strings", 60),
    "cbor_unknown_tag": (b"\xd9\x27\x0f\x01", "CBOR tag 9999 not accepted", 60),
    "cbor_date_as_id": (cbor2.dumps({"id": cbor2.CBORTag(1, 1764300000), "data": {}}),
                        "id: expected a string", 60),
}

for _name, _case in ERRORS.items():
    setattr(SenseFormatTests, f"test_error_{_name}", _error_case(*_case))
