"""SENSE v1 decoded and validated in one pass: the typed road accepts what
the strict decoder and the built-in validation accept, with the same
readings, and nothing else (it hands everything else to them).

Each payload is judged both ways: the strict decoder, then the built-in
validation of the envelope the pipeline would make (a reading without
``ts`` gets the receive time). Payloads: every document the other format
and validation tests use, each rule broken alone, and the fuzz corpus.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import cbor2
from twisted.trial.unittest import SynchronousTestCase

from sense_gateway.config import ValidationConfig
from sense_gateway.envelope import Envelope, Reading, RequestContext
from sense_gateway.errors import DecodeError
from sense_gateway.formats import sense
from sense_gateway.formats.sense_typed import TypedSenseDecoder
from sense_gateway.validation import envelope_problems
from tests.test_format_sense import BAD_DOCUMENTS, GOOD_DOCUMENTS, RECEIVED

LIMITS = ValidationConfig()
CORPUS = Path(__file__).parent / "fuzz_corpus"
BASE = {"id": "node-7", "seq": 1, "data": {"t": 21.5}}


def varied(**changes) -> dict:
    document = copy.deepcopy(BASE)
    document.update(changes)
    return document


def batch(*readings, **changes) -> dict:
    document = {"id": "node-7", "seq": 1, "readings": list(readings)}
    document.update(changes)
    return document


#: name -> document: one rule of the validation at or over its limit
EDGES = {
    "device_at_max_length": varied(id="d" * 64),
    "device_over_max_length": varied(id="d" * 65),
    "device_empty": varied(id=""),
    "device_with_space": varied(id="node 7"),
    "device_not_ascii": varied(id="n\u00f6de"),
    "device_with_newline_at_end": varied(id="node\n"),
    "seq_at_32_bit_max": varied(seq=2 ** 32 - 1),
    "seq_over_32_bits": varied(seq=2 ** 32),
    "seq_negative": varied(seq=-1),
    "boot_over_32_bits": varied(boot=2 ** 32),
    "boot_at_32_bit_max": varied(boot=2 ** 32 - 1),
    "fields_at_max": varied(data={f"f{i}": i for i in range(32)}),
    "fields_over_max": varied(data={f"f{i}": i for i in range(33)}),
    "no_fields": varied(data={}),
    "name_at_max_length": varied(data={"n" * 64: 1}),
    "name_over_max_length": varied(data={"n" * 65: 1}),
    "name_time_reserved": varied(data={"time": 1}),
    "name_timer_allowed": varied(data={"timer": 1}),
    "name_with_underscore_first": varied(data={"_t": 1}),
    "name_with_underscore_inside": varied(data={"t_1": 1}),
    "name_with_newline_at_end": varied(data={"t\n": 1}),
    "name_of_every_allowed_character": varied(data={"a-b.c:/_": 1}),
    "name_empty": varied(data={"": 1}),
    "int64_max": varied(data={"t": 2 ** 63 - 1}),
    "int64_over": varied(data={"t": 2 ** 63}),
    "int64_under": varied(data={"t": -(2 ** 63) - 1}),
    "booleans": varied(data={"a": True, "b": False}),
    "string_at_max_length": varied(data={"t": "s" * 256}),
    "string_over_max_length": varied(data={"t": "s" * 257}),
    "string_with_newline": varied(data={"t": "a\nb"}),
    "string_with_delete": varied(data={"t": "a\x7fb"}),
    "string_empty": varied(data={"t": ""}),
    "tags": varied(tags={"room": "lab"}),
    "tag_value_empty": varied(tags={"room": ""}),
    "tag_value_with_tab": varied(tags={"room": "a\tb"}),
    "tag_name_bad": varied(tags={"ro om": "lab"}),
    "tag_name_time": varied(tags={"time": "x"}),
    "units": varied(units={"t": "Cel"}),
    "unit_empty": varied(units={"t": ""}),
    "unit_over_max_length": varied(units={"t": "u" * 65}),
    "unit_with_newline": varied(units={"t": "C\n"}),
    "ts_at_min": varied(ts=946684800),
    "ts_before_min": varied(ts=946684799.5),
    "ts_at_max_future": varied(ts=RECEIVED + 300),
    "ts_past_max_future": varied(ts=RECEIVED + 300.5),
    "readings_at_max": batch(*[{"data": {"t": i}} for i in range(100)]),
    "readings_over_max": batch(*[{"data": {"t": i}} for i in range(101)]),
    "readings_empty": batch(),
    "reading_tags_merged": batch({"data": {"t": 1}, "tags": {"probe": "b"}},
                                 {"data": {"t": 2}}, tags={"room": "lab"}),
    "reading_tag_overrides": batch({"data": {"t": 1}, "tags": {"room": "b"}}, tags={"room": "a"}),
    "reading_units_and_common_units": batch({"data": {"t": 1, "h": 2}, "units": {"h": "%RH"}},
                                            {"data": {"t": 2}}, units={"t": "Cel"}),
    "reading_unit_for_no_field": batch({"data": {"t": 1}, "units": {"h": "%RH"}}),
    "common_unit_for_no_reading": batch({"data": {"t": 1}}, units={"h": "%RH"}),
    "reading_ts_before_min": batch({"data": {"t": 1}, "ts": 1}),
    "reading_ts_fine": batch({"data": {"t": 1}, "ts": RECEIVED - 60},
                             {"data": {"t": 2}, "ts": RECEIVED}),
    "second_reading_bad_name": batch({"data": {"t": 1}}, {"data": {"t!": 1}}),
}


def payloads():
    """(name, content format, payload) of every case."""
    documents = {**{k: d for k, (d, _) in GOOD_DOCUMENTS.items()},
                 **{k: d for k, (d, _) in BAD_DOCUMENTS.items()}, **EDGES}
    for name, document in documents.items():
        # json, not orjson: it writes integers past 64 bits
        yield f"{name}_json", 50, json.dumps(document).encode()
        yield f"{name}_cbor", 60, cbor2.dumps(document)
    for content_format, folder in ((50, "sense-json"), (60, "sense-cbor")):
        for path in sorted((CORPUS / folder).iterdir()):
            yield f"corpus_{folder}_{path.name}", content_format, path.read_bytes()


def strict_verdict(content_format: int, payload: bytes):
    """The strict road's readings, or None if it refuses the request."""
    decode = sense.decode_json if content_format == 50 else sense.decode_cbor
    context = RequestContext("/data", content_format, "::1", 5683, RECEIVED)
    try:
        decoded = decode(payload, context)
    except DecodeError:
        return None
    readings = [r if r.ts is not None else Reading(r.fields, RECEIVED, r.measurement, r.tags,
                                                   r.units)
                for r in decoded.readings]
    envelope = Envelope("id", decoded.device, decoded.seq, RECEIVED, "[::1]:5683", "coap",
                        None, "/data", content_format, readings, None, decoded.boot)
    return None if envelope_problems(envelope, LIMITS) else decoded


#: accepted by the strict road, left to it by the typed one: JSON integers
#: past 64 bits, which orjson reads as floats and msgspec refuses
LEFT_TO_THE_STRICT_ROAD = {
    "int64_under_json",
    "corpus_sense-json_0858bbaec2966f7426855dd25ed7b86805eac600",
    "corpus_sense-json_999dc7dae1a746cda0ee8d04fcb0844250e635f7",
}


class TypedRoadAgreesWithTheStrictRoad(SynchronousTestCase):
    pass


def _case(name: str, content_format: int, payload: bytes):
    def test(self):
        expected = strict_verdict(content_format, payload)
        typed = TypedSenseDecoder(LIMITS)
        if content_format == 50:
            got = typed.decode_json(payload, RECEIVED)
        else:
            try:
                got = typed.decode_object(sense.load_cbor(payload), RECEIVED)
            except DecodeError:
                got = None
        if expected is None:
            self.assertIsNone(got, "the typed road accepted what the strict road refuses")
        elif name in LEFT_TO_THE_STRICT_ROAD:
            self.assertIsNone(got)
        else:
            # Accepted by both, with the same readings and who sent them.
            self.assertEqual(got, expected)
            self.assertEqual([r.ts for r in got.readings], [r.ts for r in expected.readings])
            self.assertEqual(got.checked, LIMITS)
    return test


for _name, _cf, _payload in payloads():
    setattr(TypedRoadAgreesWithTheStrictRoad, f"test_{_name}", _case(_name, _cf, _payload))
