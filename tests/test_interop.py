"""Interop over real UDP on loopback with two independent CoAP
implementations, libcoap's ``coap-client-notls`` and aiocoap's client,
over IPv4 and IPv6, against a gateway bound to ``::`` (dual stack).

One test method per (client, address family, case), generated below.
"""

from __future__ import annotations

import cbor2
import orjson
from twisted.internet import defer
from twisted.trial.unittest import TestCase

from tests.support import aiocoap_request, coap_url, libcoap_request, parametrize, queued, start_gateway

NOW = 1764300000


def parity(value: int) -> int:
    """The odd-parity bit the original SENSE devices send after a value."""
    return 0 if bin(value & 0xFFFF).count("1") % 2 else 1


def sense_text(values) -> bytes:
    return "".join(f"{v},{parity(v)}," for v in values).encode()


TEMPERATURES = [2150, 2151, 2153, 2155, 2160, 2158, 2157, 2160, 2162, 2165]

#: name -> (method, path, content format, payload, expected code, device or None)
CASES = {
    "sense_json": ("post", "/data", 50,
                   orjson.dumps({"id": "node-7", "seq": 1, "ts": NOW, "data": {"temperature": 21.5}}),
                   "2.04", "node-7"),
    "sense_json_batch": ("post", "/data", 50,
                         orjson.dumps({"id": "node-8", "seq": 2, "readings": [
                             {"ts": NOW, "data": {"temperature": 21.5}},
                             {"ts": NOW + 1, "data": {"temperature": 21.6, "humidity": 40}}]}),
                         "2.04", "node-8"),
    "sense_cbor": ("post", "/data", 60,
                   cbor2.dumps({"id": "node-9", "seq": 3, "data": {"temperature": 20.25, "door": True}}),
                   "2.04", "node-9"),
    "senml_json": ("post", "/data", 110,
                   orjson.dumps([{"bn": "urn:dev:mac:0024befffe804ff1:", "bt": NOW,
                                  "n": "temperature", "u": "Cel", "v": 23.1},
                                 {"n": "humidity", "u": "%RH", "v": 41}]),
                   "2.04", "urn:dev:mac:0024befffe804ff1"),
    "senml_cbor": ("post", "/data", 112,
                   cbor2.dumps([{-2: "urn:dev:mac:0024befffe804ff2:", -3: NOW, 0: "temperature", 2: 22.0}]),
                   "2.04", "urn:dev:mac:0024befffe804ff2"),
    "sense_text": ("post", "/temperature", None, sense_text(TEMPERATURES), "2.04", "source"),
    "sense_text_temp_path": ("post", "/temp", 0, sense_text(TEMPERATURES), "2.04", "source"),
    "invalid_json": ("post", "/data", 50, b'{"id": "node-7", "seq": 1,', "4.00", None),
    "missing_device_id": ("post", "/data", 50, orjson.dumps({"seq": 1, "data": {"t": 1}}), "4.00", None),
    "string_for_number_in_cbor": ("post", "/data", 60, cbor2.dumps({"id": "n", "data": {"t": b"x"}}),
                                  "4.00", None),
    "bad_parity_everywhere": ("post", "/temperature", 0, b"2150,1,2151,0,", "4.00", None),
    "unsupported_content_format": ("post", "/data", 42, b"\x00\x01", "4.15", None),
    "too_large": ("post", "/data", 50, b'{"id":"n","data":{"t":1},"pad":"' + b"x" * 1100 + b'"}',
                  "4.13", None),
    "unknown_path": ("post", "/nowhere", 50, b"{}", "4.04", None),
    "wrong_method": ("get", "/data", None, None, "4.05", None),
}

HOSTS = {"ipv4": "127.0.0.1", "ipv6": "::1"}
CLIENTS = {"libcoap": libcoap_request, "aiocoap": aiocoap_request}


class InteropBase(TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        self.gateway = yield start_gateway(self)

    #: set by each generated class below
    client = host = None

    @defer.inlineCallbacks
    def check(self, case):
        client, host = self.client, self.host
        method, path, content_format, payload, expected, device = CASES[case]
        url = coap_url(host, self.gateway.port, path)
        response = yield CLIENTS[client](method, url, payload, content_format)
        self.assertEqual(response.code, expected, response)
        envelopes = queued(self.gateway)
        if not expected.startswith("2."):
            self.assertEqual(envelopes, [])
            self.assertTrue(response.payload, "error responses carry a diagnostic")
            return
        self.assertEqual(len(envelopes), 1)
        envelope = envelopes[0]
        self.assertEqual(envelope.device, host if device == "source" else device)
        self.assertEqual(envelope.path, path)
        self.assertTrue(envelope.source.startswith(f"[{host}]:" if ":" in host else f"{host}:"))
        if case.startswith("sense_text"):
            self.assertEqual([r.fields["temperature"] for r in envelope.readings],
                             [v / 100 for v in TEMPERATURES])
            times = [r.ts for r in envelope.readings]
            self.assertEqual([b - a for a, b in zip(times, times[1:])], [1.0] * 9)
            self.assertEqual(times[-1], envelope.received)

    @defer.inlineCallbacks
    def check_well_known_core(self):
        client, host = self.client, self.host
        response = yield CLIENTS[client]("get", coap_url(host, self.gateway.port, "/.well-known/core"))
        self.assertEqual(response.code, "2.05", response)
        links = response.payload.decode().split(",")
        for path in ("/data", "/temperature", "/temp", "/time"):
            self.assertIn(f"<{path}>", [link.split(";")[0] for link in links])
        self.assertIn('</data>;rt="sense.readings";if="core.b";ct="50 60 110 112"', links)


# One class per (client, address family), so a run names both; in it, one
# method per case.
for _client in CLIENTS:
    for _family, _host in HOSTS.items():
        _name = f"{_client.capitalize()}{_family.upper()}Tests"
        globals()[_name] = parametrize(
            parametrize(type(_name, (InteropBase,), {"client": _client, "host": _host}),
                        {case: (case,) for case in CASES}, InteropBase.check),
            {"well_known_core": ()}, InteropBase.check_well_known_core)
