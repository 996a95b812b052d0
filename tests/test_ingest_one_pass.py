"""A SENSE v1 request checked in one pass by its decoder is not validated
twice, and is still refused by every rule the gateway is configured with:
stricter ``[validation]`` limits than the decoder's, and validator plugins,
including one registered while the gateway runs."""

from __future__ import annotations

import orjson
from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase, TestCase

from sense_gateway.config import load_config
from sense_gateway.envelope import RequestContext
from sense_gateway.errors import ValidationError
from sense_gateway.hookspecs import hookimpl
from sense_gateway.pipeline import IngestPipeline
from sense_gateway.plugins import DirectHook, call_collecting, make_plugin_manager
from tests.support import FakeQueue, coap_url, libcoap_request, start_gateway

RECEIVED = 1764300000.0


class RefusesTestDevices:
    @staticmethod
    @hookimpl
    def sense_validate(envelope, config):
        if envelope.device.startswith("test-"):
            return ["test devices are not accepted here"]
        return None


def pipeline_of(pm, **overrides):
    config = load_config(environ={}, overrides=overrides)
    formats = [f for _, group in call_collecting(pm, "sense_register_formats", config=config)
               for f in group]
    return IngestPipeline(formats, DirectHook(pm, "sense_validate"), FakeQueue(auto_commit=True),
                          config)


def json_context() -> RequestContext:
    return RequestContext("/data", 50, "::1", 5683, RECEIVED)


class ValidatorsAreStillConsulted(SynchronousTestCase):
    def test_a_validator_registered_later_refuses(self):
        pm = make_plugin_manager(load_entrypoints=False)
        pipeline = pipeline_of(pm)
        payload = orjson.dumps({"id": "test-1", "data": {"t": 1}})
        self.assertEqual(pipeline.prepare(payload, json_context()).device, "test-1")
        pm.register(RefusesTestDevices(), name="no-test-devices")
        error = self.assertRaises(ValidationError, pipeline.prepare, payload, json_context())
        self.assertEqual(error.payload, b"test devices are not accepted here")
        pm.unregister(name="no-test-devices")
        self.assertEqual(pipeline.prepare(payload, json_context()).device, "test-1")

    def test_stricter_limits_than_the_decoders_refuse(self):
        pipeline = pipeline_of(make_plugin_manager(load_entrypoints=False),
                               **{"validation.max_fields": 1})
        payload = orjson.dumps({"id": "n", "data": {"a": 1, "b": 2}})
        error = self.assertRaises(ValidationError, pipeline.prepare, payload, json_context())
        self.assertEqual(error.payload, b"reading 1: more than 1 fields")

    def test_looser_limits_than_the_decoders_accept(self):
        pipeline = pipeline_of(make_plugin_manager(load_entrypoints=False),
                               **{"validation.max_fields": 40})
        payload = orjson.dumps({"id": "n", "data": {f"f{i}": i for i in range(40)}})
        self.assertEqual(len(pipeline.prepare(payload, json_context()).readings[0].fields), 40)


class OnePassOverCoap(TestCase):
    @defer.inlineCallbacks
    def test_each_rule_is_told_as_before(self):
        gateway = yield start_gateway(self, **{"validation.max_string_length": 4})
        url = coap_url("::1", gateway.port, "/data")
        cases = [
            (b'{"id": "n", "data": {"t": 1}}', "2.04", b""),
            (b'{"id": "n", "data": {"t": "12345"}}', "4.00",
             b"reading 1: field 't': string longer than 4"),
            (b'{"id": "n", "data": {"time": 1}}', "4.00",
             b"reading 1: field 'time': reserved name"),
            (b'{"id": "n", "data": {"t": 1}, "tz": 1}', "4.00", b"unknown key 'tz'"),
            (b'{"id": "n", "data": {"t": 1}', "4.00", b"invalid JSON at byte 28"),
        ]
        for payload, code, diagnostic in cases:
            answer = yield libcoap_request("post", url, payload, 50)
            self.assertEqual((answer.code, answer.payload), (code, diagnostic), payload)
