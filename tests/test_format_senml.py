"""RFC 8428 SenML as JSON (Content-Format 110) and CBOR (112) on /data.

Every pack case runs twice: as SenML JSON, and as SenML CBOR built with
cbor2 from the RFC 8428 section 6 label table written out here (not
imported), so the module's table is checked too.
"""

from __future__ import annotations

from typing import Any

import cbor2
import orjson
from hypothesis import given, settings, strategies as st
from twisted.trial.unittest import SynchronousTestCase

from sense_gateway.envelope import Decoded, Reading, RequestContext
from sense_gateway.errors import DecodeError
from sense_gateway.formats import senml

from tests.support import assert_refused, parametrize

RECEIVED = 1764300000.0
FORMATS = {fmt.content_formats[0]: fmt for fmt in senml.sense_register_formats()}

#: RFC 8428 Table 4.
RFC_CBOR_LABELS = {"bver": -1, "bn": -2, "bt": -3, "bu": -4, "bv": -5, "bs": -6,
                   "n": 0, "u": 1, "v": 2, "vs": 3, "vb": 4, "s": 5, "t": 6, "ut": 7, "vd": 8}


def senml_cbor(records: Any) -> bytes:
    """*records* as SenML CBOR: integer labels where RFC 8428 has one."""
    if not isinstance(records, list):
        return cbor2.dumps(records)
    return cbor2.dumps([
        {RFC_CBOR_LABELS.get(label, label): value for label, value in record.items()}
        if isinstance(record, dict) else record
        for record in records])


ENCODERS = {"json": (110, orjson.dumps), "cbor": (112, senml_cbor)}


def decode(payload: bytes, content_format: int) -> Decoded:
    context = RequestContext(path="/data", content_format=content_format, source_host="::1",
                             source_port=5683, received=RECEIVED)
    return FORMATS[content_format].decode(payload, context)


class SenmlRegistrationTests(SynchronousTestCase):
    def test_json_and_cbor_are_registered_on_data(self):
        registered = {(f.name, f.paths, f.content_formats) for f in senml.sense_register_formats()}
        self.assertEqual(registered, {("senml-json", ("/data",), (110,)),
                                      ("senml-cbor", ("/data",), (112,))})


class SenmlPackTests(SynchronousTestCase):
    """Good packs, each decoded from JSON and from CBOR."""


DEVICE = "urn:dev:ow:10e2073a01080063"
BT = 1.276020076001e09

#: name -> (records, expected Decoded)
GOOD_PACKS = {
    # RFC 8428 5.1.2: no time anywhere, so both are "now", in one reading.
    "rfc_multiple_datapoints": (
        [{"bn": DEVICE + ":", "n": "voltage", "u": "V", "v": 120.1},
         {"n": "current", "u": "A", "v": 1.2}],
        Decoded([Reading({"voltage": 120.1, "current": 1.2}, ts=RECEIVED,
                         units={"voltage": "V", "current": "A"})], DEVICE)),
    # RFC 8428 5.1.3: bt plus negative t; the last current shares bt with
    # voltage; the base unit is the unit of the records that name none.
    "rfc_multiple_measurements": (
        [{"bn": DEVICE + ":", "bt": BT, "bu": "A", "bver": 5, "n": "voltage", "u": "V", "v": 120.1},
         {"n": "current", "t": -5, "v": 1.2}, {"n": "current", "t": -4, "v": 1.3},
         {"n": "current", "t": -3, "v": 1.4}, {"n": "current", "t": -2, "v": 1.5},
         {"n": "current", "t": -1, "v": 1.6}, {"n": "current", "v": 1.7}],
        Decoded([Reading({"current": c}, ts=BT - 5 + i, units={"current": "A"})
                 for i, c in enumerate((1.2, 1.3, 1.4, 1.5, 1.6))]
                + [Reading({"voltage": 120.1, "current": 1.7}, ts=BT,
                           units={"voltage": "V", "current": "A"})], DEVICE)),
    # RFC 8428 5.1.5 without its vd record: string and boolean values.
    "rfc_multiple_data_types": (
        [{"bn": DEVICE + ":", "n": "temperature", "u": "Cel", "v": 23.1},
         {"n": "label", "vs": "Machine Room"}, {"n": "open", "vb": False}],
        Decoded([Reading({"temperature": 23.1, "label": "Machine Room", "open": False},
                         ts=RECEIVED, units={"temperature": "Cel"})], DEVICE)),
    "base_value_is_added": (
        [{"bn": "d:", "bv": 20, "n": "t", "v": 1.5, "t": -1}, {"n": "t", "v": -0.5}],
        Decoded([Reading({"t": 21.5}, ts=RECEIVED - 1), Reading({"t": 19.5}, ts=RECEIVED)], "d")),
    "integers_become_floats": (
        [{"bn": "d:", "n": "count", "v": 3}],
        Decoded([Reading({"count": 3.0}, ts=RECEIVED)], "d")),
    "sum_with_base_sum_goes_to_its_own_field": (
        [{"bn": "d:", "bs": 100, "n": "energy", "s": 5, "v": 2}],
        Decoded([Reading({"energy": 2.0, "energy_sum": 105.0}, ts=RECEIVED)], "d")),
    "sum_alone": (
        [{"bn": "d:", "n": "rain", "s": 12}],
        Decoded([Reading({"rain_sum": 12.0}, ts=RECEIVED)], "d")),
    "relative_times_count_from_receipt": (
        [{"bn": "d:", "bt": -60, "n": "t", "v": 1, "t": 5}, {"n": "t", "v": 2, "t": 60}],
        Decoded([Reading({"t": 1.0}, ts=RECEIVED - 55), Reading({"t": 2.0}, ts=RECEIVED)], "d")),
    "time_just_below_2_28_is_relative": (
        [{"bn": "d:", "n": "t", "v": 1, "t": 2 ** 28 - 1}],
        Decoded([Reading({"t": 1.0}, ts=RECEIVED + 2 ** 28 - 1)], "d")),
    "time_at_2_28_is_absolute": (
        [{"bn": "d:", "n": "t", "v": 1, "t": 2 ** 28}],
        Decoded([Reading({"t": 1.0}, ts=float(2 ** 28))], "d")),
    "base_time_changes_midway": (
        [{"bn": "d:", "bt": 1764299000, "n": "t", "v": 1},
         {"bt": 1764299500, "n": "t", "v": 2}, {"n": "t", "t": 10, "v": 3}],
        Decoded([Reading({"t": 1.0}, ts=1764299000.0), Reading({"t": 2.0}, ts=1764299500.0),
                 Reading({"t": 3.0}, ts=1764299510.0)], "d")),
    "readings_come_out_in_time_order": (
        [{"bn": "d:", "n": "t", "v": 2, "t": -1}, {"n": "t", "v": 1, "t": -2}],
        Decoded([Reading({"t": 1.0}, ts=RECEIVED - 2), Reading({"t": 2.0}, ts=RECEIVED - 1)], "d")),
    "base_name_repeated_for_the_same_device": (
        [{"bn": "node-1:", "n": "a", "v": 1}, {"bn": "node-1/", "n": "b", "v": 2}],
        Decoded([Reading({"a": 1.0, "b": 2.0}, ts=RECEIVED)], "node-1")),
    "slash_separator_is_stripped": (
        [{"bn": "2001:db8::7/", "n": "t", "v": 1}],
        Decoded([Reading({"t": 1.0}, ts=RECEIVED)], "2001:db8::7")),
    "dot_separator_is_stripped": (
        [{"bn": "plant.pump-3.", "n": "t", "v": 1}],
        Decoded([Reading({"t": 1.0}, ts=RECEIVED)], "plant.pump-3")),
    "base_name_without_separator_is_the_device": (
        [{"bn": "pump-3", "n": "pressure", "v": 2.5}],
        Decoded([Reading({"pressure": 2.5}, ts=RECEIVED)], "pump-3")),
    "record_without_n_is_the_value_field": (
        [{"bn": "thermo-1:", "v": 21.5}],
        Decoded([Reading({"value": 21.5}, ts=RECEIVED)], "thermo-1")),
    "no_base_name_leaves_the_device_to_the_validators": (
        [{"n": DEVICE, "u": "Cel", "v": 23.1}],
        Decoded([Reading({DEVICE: 23.1}, ts=RECEIVED, units={DEVICE: "Cel"})], None)),
    "units_are_kept_update_time_and_unknown_labels_are_ignored": (
        [{"bn": "d:", "bu": "Cel", "n": "t", "u": "Cel", "ut": 60, "v": 1, "colour": "blue"}],
        Decoded([Reading({"t": 1.0}, ts=RECEIVED, units={"t": "Cel"})], "d")),
    "a_record_unit_wins_over_the_base_unit_and_sums_share_it": (
        [{"bn": "d:", "bu": "Cel", "n": "t", "v": 1}, {"n": "h", "u": "%RH", "v": 40},
         {"n": "energy", "u": "J", "s": 5}],
        Decoded([Reading({"t": 1.0, "h": 40.0, "energy_sum": 5.0}, ts=RECEIVED,
                         units={"t": "Cel", "h": "%RH", "energy_sum": "J"})], "d")),
    "current_senml_version": (
        [{"bver": 10, "bn": "d:", "n": "t", "v": 1}],
        Decoded([Reading({"t": 1.0}, ts=RECEIVED)], "d")),
}


def _decoded(self, payload: bytes, content_format: int, expected):
    self.assertEqual(decode(payload, content_format), expected)


parametrize(SenmlPackTests, {f"{encoding}_{name}": (encode(records), cf, expected)
                             for name, (records, expected) in GOOD_PACKS.items()
                             for encoding, (cf, encode) in ENCODERS.items()}, _decoded)


class SenmlRefusalTests(SynchronousTestCase):
    """Each refusal with its diagnostic, which becomes the 4.00 payload."""

    def assertRefused(self, payload: bytes, content_format: int, diagnostic: str):
        assert_refused(self, diagnostic, decode, payload, content_format)


#: name -> (records, diagnostic); refused the same way in JSON and CBOR
BAD_PACKS = {
    "not_an_array": ({"bn": "d:", "v": 1}, "expected an array of records"),
    "empty_pack": ([], "empty pack"),
    "record_not_an_object": ([{"bn": "d:", "v": 1}, 5], "record 2: expected an object"),
    "record_without_value": ([{"bn": "d:", "n": "a", "v": 1}, {"n": "b"}],
                             "record 2: no value (v, vs, vb or s)"),
    "base_fields_only": ([{"bn": "d:", "bt": 1764300000}], "record 1: no value (v, vs, vb or s)"),
    "two_values": ([{"bn": "d:", "n": "a", "v": 1, "vs": "x"}],
                   "record 1: more than one value (v, vs)"),
    "data_value": ([{"bn": "d:", "n": "a", "v": 1}, {"n": "nfc-reader", "vd": "aGkgCg"}],
                   "record 2: data values (vd) not accepted"),
    "two_devices": ([{"bn": "node-1:", "n": "t", "v": 1}, {"bn": "node-2:", "n": "t", "v": 1}],
                    "records name more than one device"),
    "base_name_after_records_without": ([{"n": "t", "v": 1}, {"bn": "node-2:", "n": "t", "v": 1}],
                                        "records name more than one device"),
    "same_field_twice_at_the_same_time": ([{"bn": "d:", "n": "t", "v": 1}, {"n": "t", "v": 2}],
                                          "record 2: 't' twice at the same time"),
    "sum_colliding_with_a_field": ([{"bn": "d:", "n": "a_sum", "v": 1}, {"n": "a", "s": 2}],
                                   "record 2: 'a_sum' twice at the same time"),
    "v_a_string": ([{"bn": "d:", "n": "t", "v": "21.5"}], "record 1: v must be a number"),
    "v_a_boolean": ([{"bn": "d:", "n": "t", "v": True}], "record 1: v must be a number"),
    "t_a_string": ([{"bn": "d:", "n": "t", "v": 1, "t": "now"}], "record 1: t must be a number"),
    "bt_a_string": ([{"bn": "d:", "bt": "now", "n": "t", "v": 1}], "record 1: bt must be a number"),
    "vs_a_number": ([{"bn": "d:", "n": "t", "vs": 1}], "record 1: vs must be a string"),
    "vb_a_number": ([{"bn": "d:", "n": "t", "vb": 1}], "record 1: vb must be a boolean"),
    "n_a_number": ([{"bn": "d:", "n": 7, "v": 1}], "record 1: n must be a string"),
    "bn_a_number": ([{"bn": 7, "n": "t", "v": 1}], "record 1: bn must be a string"),
    "u_a_number": ([{"bn": "d:", "n": "t", "u": 1, "v": 1}], "record 1: u must be a string"),
    "newer_senml_version": ([{"bver": 11, "bn": "d:", "n": "t", "v": 1}],
                            "record 1: bver 11 not supported (max 10)"),
    "must_understand_label": ([{"bn": "d:", "n": "t", "v": 1, "scale_": 2}],
                              "record 1: unsupported label 'scale_'"),
}

#: name -> (payload, diagnostic)
BAD_JSON = {
    "invalid_json": (b'[{"bn": "d:", "v": 1}', "invalid JSON at byte 21"),
    "empty": (b"", "empty payload"),
}

#: name -> (payload, diagnostic)
BAD_CBOR = {
    "unknown_integer_label": (cbor2.dumps([{-2: "d:", 0: "t", 2: 1, 9: 3}]),
                              "record 1: unknown label 9"),
    "label_as_integer_and_text": (cbor2.dumps([{-2: "d:", 0: "t", 2: 1, "v": 2}]),
                                  "record 1: label 'v' given twice"),
    "label_neither_integer_nor_text": (cbor2.dumps([{-2: "d:", 2: 1, 1.5: 2}]),
                                       "record 1: labels must be integers or strings"),
    "data_value_as_bytes": (cbor2.dumps([{-2: "d:", 0: "nfc-reader", 8: b"hi\n"}]),
                            "record 1: data values (vd) not accepted"),
    "tagged_time": (cbor2.dumps([{-2: "d:", 2: 1, 6: cbor2.CBORTag(1, 1764300000)}]),
                    "CBOR tag 1 not accepted"),
    "trailing_bytes": (cbor2.dumps([{-2: "d:", 2: 1}]) + b"\xff", "invalid CBOR: 1 bytes after the item"),
    "truncated": (cbor2.dumps([{-2: "d:", 2: 1}])[:-1], "invalid CBOR: truncated"),
}


parametrize(SenmlRefusalTests, {
    **{f"{encoding}_{name}": (encode(records), cf, diagnostic)
       for name, (records, diagnostic) in BAD_PACKS.items()
       for encoding, (cf, encode) in ENCODERS.items()},
    **{f"json_{name}": (payload, 110, diagnostic) for name, (payload, diagnostic) in BAD_JSON.items()},
    **{f"cbor_{name}": (payload, 112, diagnostic) for name, (payload, diagnostic) in BAD_CBOR.items()},
}, SenmlRefusalTests.assertRefused)


def _outcome(payload: bytes, content_format: int):
    """The readings decoded, or the diagnostic of the refusal."""
    try:
        return decode(payload, content_format)
    except DecodeError as e:
        return ("refused", e.diagnostic)


def _resolved(pack: list[dict]) -> list[dict]:
    """RFC 8428 section 4.6 by hand: every record with its base values
    applied and the base fields gone (the base name repeated, since the
    base name is the device)."""
    base = {"bn": "", "bt": 0, "bv": 0, "bs": 0, "bu": ""}
    out = []
    for record in pack:
        base.update({label: record[label] for label in base if label in record})
        resolved = {"bn": base["bn"], "t": base["bt"] + record.get("t", 0)}
        resolved.update({label: record[label] for label in ("n", "vs", "vb") if label in record})
        if "v" in record:
            resolved["v"] = base["bv"] + record["v"]
        if "s" in record:
            resolved["s"] = base["bs"] + record["s"]
        if record.get("u") or base["bu"]:
            resolved["u"] = record.get("u") or base["bu"]
        out.append(resolved)
    return out


_NUMBER = st.one_of(st.integers(-1000, 1000),
                    st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False))
_UNIT = st.sampled_from(["Cel", "%RH", "W", "J"])
_VALUE = st.one_of(st.fixed_dictionaries({"v": _NUMBER}), st.fixed_dictionaries({"vs": st.text(max_size=4)}),
                   st.fixed_dictionaries({"vb": st.booleans()}), st.fixed_dictionaries({"s": _NUMBER}),
                   st.fixed_dictionaries({"v": _NUMBER, "s": _NUMBER}))
_RECORD = st.tuples(_VALUE, st.fixed_dictionaries({}, optional={
    "bt": st.one_of(st.integers(1_700_000_000, 1_800_000_000), st.integers(-50, 50)),
    "bv": _NUMBER, "bs": _NUMBER, "bu": _UNIT, "t": st.integers(-50, 50), "u": _UNIT,
    "n": st.sampled_from(["t", "h", "p", "e"]),
    # the same device, with or without its separator
    "bn": st.sampled_from([f"{DEVICE}:", DEVICE])}))


class SenmlResolutionProperties(SynchronousTestCase):
    @settings(max_examples=300, deadline=None)
    @given(st.lists(_RECORD, min_size=1, max_size=6))
    def test_base_values_are_only_a_shorter_way_to_write_the_pack(self, records):
        pack = [{**extra, **value} for value, extra in records]
        pack[0].setdefault("bn", f"{DEVICE}:")
        outcomes = {encoding: (_outcome(encode(pack), cf), _outcome(encode(_resolved(pack)), cf))
                    for encoding, (cf, encode) in ENCODERS.items()}
        self.assertEqual(outcomes["json"][0], outcomes["json"][1])
        # And the encoding does not matter.
        self.assertEqual(outcomes["json"], outcomes["cbor"])
