"""Fuzz targets: the datagram parser and every built-in decoder.

Each target takes one input (bytes) and may raise only what its contract
documents: :class:`~sense_gateway.coap.message.MalformedMessage` for the
parser, a :class:`~sense_gateway.errors.RequestError` subclass for a
decoder. Anything else is a finding. A decoder's result is taken on
through what the gateway and the processor do with it (validation, the
envelope's JSON there and back, the content digest, metric points and
line protocol), since a decoder that returns something those steps choke
on fails a request just the same (or, worse, a processor batch).

``tests/fuzz.py`` runs them under atheris (coverage-guided);
``tests/test_fuzz_targets.py`` replays the corpus in ``tests/fuzz_corpus/``
through them on every test run.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CORPUS = REPO / "tests" / "fuzz_corpus"

#: target name -> (module, decoder, content format, path) for decoders
DECODERS = {
    "sense-json": ("sense_gateway.formats.sense", "decode_json", 50, "/data"),
    "sense-cbor": ("sense_gateway.formats.sense", "decode_cbor", 60, "/data"),
    "senml-json": ("sense_gateway.formats.senml", "decode_json", 110, "/data"),
    "senml-cbor": ("sense_gateway.formats.senml", "decode_cbor", 112, "/data"),
    "sense-text": ("sense_gateway.formats.sense_text", "decode", 0, "/temperature"),
    "example-kv": ("example_kv", "decode_kv", 0, "/kv"),
}
TARGETS = ("coap-parse", *DECODERS)


class Finding(AssertionError):
    """A target broke its contract (an undocumented exception, or a
    decoded result the next steps cannot handle)."""


@functools.lru_cache(maxsize=None)
def _after_decode():
    """What runs on a decoder's result, built once per process."""
    from sense_gateway.config import load_config
    from sense_gateway.envelope import Envelope, new_envelope_id
    from sense_gateway.sequence import content_digest
    from sense_gateway.sinks import reading_points
    from sense_gateway.sinks.influxdb import InfluxSink
    from sense_gateway.validation import envelope_problems

    config = load_config(environ={}, overrides={"influxdb.api": "v1"})
    sink = InfluxSink(config.influxdb)
    received = 1_764_300_000.0

    def after(decoded, content_format, path):
        readings = decoded.readings
        if not isinstance(readings, list):
            raise Finding(f"readings is a {type(readings).__name__}")
        from sense_gateway.envelope import Reading

        readings = [r if r.ts is not None else Reading(r.fields, received, r.measurement, r.tags)
                    for r in readings]
        envelope = Envelope(new_envelope_id(), decoded.device or "", decoded.seq, received,
                            "[::1]:5683", "coap", None, path, content_format, readings, None,
                            decoded.boot)
        if envelope_problems(envelope, config.validation):
            return  # refused with 4.00: fine
        again = Envelope.from_json(envelope.to_json())
        if again.readings != envelope.readings or again.seq != envelope.seq:
            raise Finding("the envelope's JSON does not give back what it was made of")
        content_digest(again.readings, again.received)
        sink.lines(reading_points(again))
    return after


@functools.lru_cache(maxsize=None)
def target(name: str):
    """The callable for target *name*: ``one_input(data: bytes) -> None``."""
    if name == "coap-parse":
        from sense_gateway.coap.message import MalformedMessage, encode, parse

        def one_input(data: bytes) -> None:
            try:
                message = parse(data)
            except MalformedMessage:
                return
            # What the parser gives back, the one encoder must take, and
            # parsing that again must give the same message.
            datagram = encode(message.mtype, message.code, message.mid, message.token,
                              message.all_options(), message.payload)
            if message.problem is not None:
                return  # refused as it is; what it would encode to is moot
            again = parse(datagram)
            if ((again.mtype, again.code, again.mid, again.token, again.all_options(),
                 again.payload) != (message.mtype, message.code, message.mid, message.token,
                                    message.all_options(), message.payload)):
                raise Finding(f"{data.hex()} parses, encodes and parses as another message")
        return one_input

    import importlib

    from sense_gateway.envelope import RequestContext
    from sense_gateway.errors import RequestError

    module_name, function, content_format, path = DECODERS[name]
    if module_name == "example_kv" and str(REPO / "plugins") not in sys.path:
        sys.path.insert(0, str(REPO / "plugins"))
    decode = getattr(importlib.import_module(module_name), function)
    if name == "example-kv":
        decode = functools.partial(decode, measurement="kv")
    context = RequestContext(path, content_format, "::1", 5683, 1_764_300_000.0)
    after = _after_decode()

    def one_input(data: bytes) -> None:
        try:
            decoded = decode(data, context)
        except RequestError:
            return
        after(decoded, content_format, path)
    return one_input


def corpus(name: str) -> list[Path]:
    """The kept inputs of target *name*, regressions included."""
    directory = CORPUS / name
    return sorted(p for p in directory.iterdir() if p.is_file()) if directory.exists() else []
