"""SENSE v1 as JSON (Content-Format 50) and CBOR (60) on /data.

Every document case runs twice, once per encoding, so the two decoders
cannot drift apart; encoding-specific failures have tables of their own.
"""

from __future__ import annotations

import datetime

import cbor2
import orjson
from twisted.trial.unittest import SynchronousTestCase

from sense_gateway.envelope import Decoded, Reading, RequestContext
from sense_gateway.formats import sense

from tests.support import assert_refused, parametrize

RECEIVED = 1764300000.0
FORMATS = {fmt.content_formats[0]: fmt for fmt in sense.sense_register_formats()}
ENCODERS = {"json": (50, orjson.dumps), "cbor": (60, cbor2.dumps)}


def context(content_format: int) -> RequestContext:
    return RequestContext(path="/data", content_format=content_format, source_host="::1",
                          source_port=5683, received=RECEIVED)


def decode(payload: bytes, content_format: int) -> Decoded:
    return FORMATS[content_format].decode(payload, context(content_format))


class SenseRegistrationTests(SynchronousTestCase):
    def test_json_and_cbor_are_registered_on_data(self):
        registered = {(f.name, f.paths, f.content_formats) for f in sense.sense_register_formats()}
        self.assertEqual(registered, {("sense-json", ("/data",), (50,)),
                                      ("sense-cbor", ("/data",), (60,))})


class SenseDocumentTests(SynchronousTestCase):
    """Good documents, each decoded from JSON and from CBOR."""


#: name -> (document, expected Decoded)
GOOD_DOCUMENTS = {
    "single_reading": (
        {"id": "node-7", "seq": 42, "ts": 1764300000, "data": {"temperature": 21.5}},
        Decoded([Reading({"temperature": 21.5}, ts=1764300000.0)], "node-7", 42)),
    "without_ts_and_seq": (
        {"id": "node-7", "data": {"temperature": 21.5}},
        Decoded([Reading({"temperature": 21.5}, ts=None)], "node-7", None)),
    "fractional_ts": (
        {"id": "n", "ts": 1764300000.25, "data": {"t": 1}},
        Decoded([Reading({"t": 1}, ts=1764300000.25)], "n", None)),
    "every_field_type": (
        {"id": "n", "data": {"count": 3, "level": 0.5, "on": True, "off": False, "mode": "eco"}},
        Decoded([Reading({"count": 3, "level": 0.5, "on": True, "off": False, "mode": "eco"})],
                "n", None)),
    "seq_zero": (
        {"id": "n", "seq": 0, "data": {"t": 1}},
        Decoded([Reading({"t": 1})], "n", 0)),
    "boot_counter": (
        {"id": "n", "seq": 1, "boot": 12, "data": {"t": 1}},
        Decoded([Reading({"t": 1})], "n", 1, 12)),
    "tags_on_single_reading": (
        {"id": "n", "tags": {"room": "lab"}, "data": {"t": 1}},
        Decoded([Reading({"t": 1}, tags={"room": "lab"})], "n", None)),
    "batch_with_merged_tags": (
        {"id": "node-8", "seq": 3, "tags": {"room": "lab", "probe": "a"}, "readings": [
            {"ts": 1764299990, "data": {"t": 1}},
            {"ts": 1764300000, "data": {"t": 2}, "tags": {"probe": "b"}},
            {"data": {"t": 3}}]},
        Decoded([Reading({"t": 1}, ts=1764299990.0, tags={"room": "lab", "probe": "a"}),
                 Reading({"t": 2}, ts=1764300000.0, tags={"room": "lab", "probe": "b"}),
                 Reading({"t": 3}, ts=None, tags={"room": "lab", "probe": "a"})],
                "node-8", 3)),
    "empty_batch_is_left_to_the_validators": (
        {"id": "n", "readings": []},
        Decoded([], "n", None)),
    "missing_id_is_left_to_the_validators": (
        {"seq": 1, "data": {"t": 1}},
        Decoded([Reading({"t": 1})], None, 1)),
    "units_go_with_their_fields": (
        {"id": "n", "units": {"t": "Cel", "h": "%RH"}, "data": {"t": 21.5, "h": 40, "on": True}},
        Decoded([Reading({"t": 21.5, "h": 40, "on": True}, units={"t": "Cel", "h": "%RH"})],
                "n", None)),
    "batch_units_top_level_and_per_reading": (
        {"id": "n", "units": {"t": "Cel"},
         "readings": [{"data": {"t": 1}}, {"data": {"p": 2}, "units": {"p": "hPa"}},
                      {"data": {"t": 2}, "units": {"t": "K"}}]},
        Decoded([Reading({"t": 1}, units={"t": "Cel"}), Reading({"p": 2}, units={"p": "hPa"}),
                 Reading({"t": 2}, units={"t": "K"})], "n", None)),
}


def _decoded(self, payload: bytes, content_format: int, expected):
    self.assertEqual(decode(payload, content_format), expected)


parametrize(SenseDocumentTests, {f"{encoding}_{name}": (encode(document), cf, expected)
                                 for name, (document, expected) in GOOD_DOCUMENTS.items()
                                 for encoding, (cf, encode) in ENCODERS.items()}, _decoded)


class SenseRefusalTests(SynchronousTestCase):
    """Each refusal with its diagnostic, which becomes the 4.00 payload."""

    def assertRefused(self, payload: bytes, content_format: int, diagnostic: str):
        assert_refused(self, diagnostic, decode, payload, content_format)


LONG_NAME = "x" * 50

#: name -> (document, diagnostic); refused the same way in JSON and CBOR
BAD_DOCUMENTS = {
    "top_level_array": ([1, 2], "top level: expected an object"),
    "top_level_string": ("node-7", "top level: expected an object"),
    "unknown_key": ({"id": "n", "date": 1, "data": {"t": 1}}, "unknown key 'date'"),
    "id_not_a_string": ({"id": 7, "data": {"t": 1}}, "id: expected a string"),
    "seq_a_string": ({"id": "n", "seq": "1", "data": {"t": 1}}, "seq: expected an integer"),
    "seq_a_boolean": ({"id": "n", "seq": True, "data": {"t": 1}}, "seq: expected an integer"),
    "seq_a_float": ({"id": "n", "seq": 1.0, "data": {"t": 1}}, "seq: expected an integer"),
    "boot_a_string": ({"id": "n", "seq": 1, "boot": "2", "data": {"t": 1}},
                      "boot: expected an integer"),
    "boot_a_boolean": ({"id": "n", "seq": 1, "boot": True, "data": {"t": 1}},
                       "boot: expected an integer"),
    "boot_without_seq": ({"id": "n", "boot": 2, "data": {"t": 1}}, "boot: only with seq"),
    "ts_a_string": ({"id": "n", "ts": "now", "data": {"t": 1}}, "ts: expected epoch seconds"),
    "ts_a_boolean": ({"id": "n", "ts": True, "data": {"t": 1}}, "ts: expected epoch seconds"),
    "data_not_an_object": ({"id": "n", "data": 5}, "data: expected an object"),
    "field_null": ({"id": "n", "data": {"t": None}}, "data: 't': not a number, boolean or string"),
    "field_array": ({"id": "n", "data": {"t": [1]}}, "data: 't': not a number, boolean or string"),
    "field_object": ({"id": "n", "data": {"t": {"c": 1}}},
                     "data: 't': not a number, boolean or string"),
    "long_field_name_is_clipped": ({"id": "n", "data": {LONG_NAME: None}},
                                   "data: 'xxxxxxxxxxxxxxxxxxxx...': not a number, boolean or string"),
    "tags_not_an_object": ({"id": "n", "tags": ["a"], "data": {"t": 1}}, "tags: expected an object"),
    "tag_value_not_a_string": ({"id": "n", "tags": {"room": 1}, "data": {"t": 1}},
                               "tags: 'room': expected a string"),
    "both_data_and_readings": ({"id": "n", "data": {"t": 1}, "readings": []},
                               "both data and readings given"),
    "neither_data_nor_readings": ({"id": "n", "seq": 1}, "data or readings missing"),
    "readings_not_an_array": ({"id": "n", "readings": {"t": 1}}, "readings: expected an array"),
    "ts_beside_readings": ({"id": "n", "ts": 1, "readings": [{"data": {"t": 1}}]},
                           "ts: not allowed with readings; give each reading its ts"),
    "reading_not_an_object": ({"id": "n", "readings": [{"data": {"t": 1}}, 5]},
                              "reading 2: expected an object"),
    "reading_without_data": ({"id": "n", "readings": [{"ts": 1}]}, "reading 1: data missing"),
    "reading_unknown_key": ({"id": "n", "readings": [{"data": {"t": 1}, "tz": 1}]},
                            "reading 1: unknown key 'tz'"),
    "reading_bad_ts": ({"id": "n", "readings": [{"ts": "x", "data": {"t": 1}}]},
                       "reading 1: ts: expected epoch seconds"),
    "reading_bad_field": ({"id": "n", "readings": [{"data": {"t": 1}}, {"data": {"t": None}}]},
                          "reading 2: data: 't': not a number, boolean or string"),
    "reading_bad_tags": ({"id": "n", "readings": [{"data": {"t": 1}, "tags": {"probe": 2}}]},
                         "reading 1: tags: 'probe': expected a string"),
    "unit_for_no_field": ({"id": "n", "units": {"x": "Cel"}, "data": {"t": 1}},
                          "units: 'x' is not a field"),
    "unit_not_a_string": ({"id": "n", "units": {"t": 1}, "data": {"t": 1}},
                          "units: 't': expected a string"),
}

#: name -> (payload, diagnostic)
BAD_JSON = {
    "truncated": (b'{"id": "n",', "invalid JSON at byte 11"),
    "position_counts_bytes": ('{"id": "\u00e4", x}'.encode(), "invalid JSON at byte 13"),
    "trailing_content": (b'{"id": "n", "data": {"t": 1}} x', "invalid JSON at byte 30"),
    "not_utf8": (b'{"id": "\xff"}', "invalid JSON: not UTF-8 at byte 8"),
    "nan_is_not_json": (b'{"id": "n", "data": {"t": NaN}}', "invalid JSON at byte 26"),
    "empty": (b"", "empty payload"),
    "only_whitespace": (b" \n", "empty payload"),
}

#: name -> (payload, diagnostic)
BAD_CBOR = {
    "trailing_bytes": (cbor2.dumps({"id": "n", "data": {"t": 1}}) + b"\x00\x00",
                       "invalid CBOR: 2 bytes after the item"),
    "two_items": (cbor2.dumps({"id": "n", "data": {"t": 1}}) * 2,
                  f"invalid CBOR: {len(cbor2.dumps({'id': 'n', 'data': {'t': 1}}))} bytes after the item"),
    "truncated": (cbor2.dumps({"id": "n", "data": {"t": 1}})[:-2], "invalid CBOR: truncated"),
    "empty": (b"", "empty payload"),
    "bytes_value": (cbor2.dumps({"id": "n", "data": {"t": b"x"}}),
                    "data: 't': not a number, boolean or string"),
    "undefined_value": (cbor2.dumps({"id": "n", "data": {"t": cbor2.undefined}}),
                        "data: 't': not a number, boolean or string"),
    "integer_key_in_data": (cbor2.dumps({"id": "n", "data": {1: 2}}), "data: keys must be strings"),
    "integer_key_at_top_level": (cbor2.dumps({1: "n", "data": {"t": 1}}),
                                 "top level: keys must be strings"),
    "integer_key_in_tags": (cbor2.dumps({"id": "n", "tags": {1: "a"}, "data": {"t": 1}}),
                            "tags: keys must be strings"),
    "bytes_id": (cbor2.dumps({"id": b"node-7", "data": {"t": 1}}), "id: expected a string"),
    "datetime_tag": (cbor2.dumps({"id": "n", "ts": datetime.datetime(2025, 11, 28, tzinfo=datetime.UTC),
                                  "data": {"t": 1}}), "CBOR tag 0 not accepted"),
    "epoch_tag": (cbor2.dumps({"id": "n", "ts": cbor2.CBORTag(1, 1764300000), "data": {"t": 1}}),
                  "CBOR tag 1 not accepted"),
    "bignum_tag": (cbor2.dumps({"id": "n", "data": {"t": 2 ** 70}}), "CBOR tag 2 not accepted"),
    "self_describe_tag": (b"\xd9\xd9\xf7" + cbor2.dumps({"id": "n", "data": {"t": 1}}),
                          "CBOR tag 55799 not accepted"),
    "unknown_tag": (b"\xd9\x27\x0f\x01", "CBOR tag 9999 not accepted"),
    "duplicate_map_key": (b"\xa2\x62id\x61a\x62id\x61b", "invalid CBOR: duplicate map key"),
    "text_not_utf8": (b"\xa1\x62id\x61\xff", "invalid CBOR: text string not UTF-8"),
    "nested_too_deep": (b"\x81" * 20 + b"\x01", "invalid CBOR: nested too deep"),
}


parametrize(SenseRefusalTests, {
    **{f"{encoding}_{name}": (encode(document), cf, diagnostic)
       for name, (document, diagnostic) in BAD_DOCUMENTS.items()
       for encoding, (cf, encode) in ENCODERS.items()},
    **{f"json_{name}": (payload, 50, diagnostic) for name, (payload, diagnostic) in BAD_JSON.items()},
    **{f"cbor_{name}": (payload, 60, diagnostic) for name, (payload, diagnostic) in BAD_CBOR.items()},
}, SenseRefusalTests.assertRefused)
