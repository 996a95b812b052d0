"""What one SENSE request costs on the reactor thread, in process: a parsed
datagram through the message layer, the dispatcher and the pipeline (the
built-in plugins, the real SENSE decoder and validators) to a queue that
serialises the envelope like the SQLite queue does and answers at once,
and the ACK encoded; no sockets, no disk.

    .venv/bin/python benchmarks/ingest_road.py [--requests 60000] [--runs 5]
        [--format json|cbor]

Prints the minimum over RUNS of microseconds per request. Run it with
``PYTHONPATH`` set to another revision's tree to compare two revisions on
one machine, alternately.
"""

from __future__ import annotations

import argparse
import time

from twisted.internet import task

from sense_gateway.bench.workload import Workload, header
from sense_gateway.coap.blockwise import Uploads
from sense_gateway.coap.dispatch import Dispatcher
from sense_gateway.coap.layer import MessageLayer
from sense_gateway.coap.message import CON, POST
from sense_gateway.coap.resources import build_tree
from sense_gateway.coap.tree import ResourceTree
from sense_gateway.config import load_config
from sense_gateway.pipeline import IngestPipeline
from sense_gateway.plugins import call_collecting, make_plugin_manager


class AnsweringQueue:
    """Serialises each envelope as the SQLite queue does, and answers."""

    def put_then(self, envelopes, done) -> None:
        for envelope in envelopes:
            envelope.to_json()
        done(None)


class CountingTransport:
    name = "coap"

    def __init__(self):
        self.sent = 0

    def send(self, datagram: bytes, addr) -> None:
        self.sent += 1


def validator(pm):
    try:
        from sense_gateway.plugins import DirectHook
    except ImportError:  # a revision before DirectHook
        return pm.hook.sense_validate
    return DirectHook(pm, "sense_validate")


def one_run(requests: int, fmt: str) -> float:
    from txthings import resource as txresource

    clock = task.Clock()
    clock.advance(1_764_300_000)
    config = load_config(environ={}, overrides={"coap.rate_limit": 0})
    pm = make_plugin_manager(load_entrypoints=False)
    formats = [f for _, group in call_collecting(pm, "sense_register_formats", config=config)
               for f in group]
    pipeline = IngestPipeline(formats, validator(pm), AnsweringQueue(), config)
    tree = ResourceTree(txresource.Endpoint(build_tree(pipeline, {})))
    dispatcher = Dispatcher(pipeline, tree, lambda: Uploads(config.coap.max_payload, clock),
                            wall_clock=clock)
    transport = CountingTransport()
    layer = MessageLayer(transport, dispatcher, clock, max_exchanges=requests + 1,
                         exchanges_per_source=requests + 1)
    builders = Workload(format=fmt, devices=1000).builders()
    datagrams = [header(CON, POST, i & 0xFFFF, (i).to_bytes(4, "big"))
                 + builders[i % 1000](1 + i // 1000) for i in range(requests)]
    ports = [("::1", 40000 + i // 0x10000) for i in range(requests)]
    received = layer.datagram_received
    start = time.perf_counter()
    for datagram, addr in zip(datagrams, ports):
        received(datagram, addr)
    elapsed = time.perf_counter() - start
    layer.stop()
    if transport.sent != requests or layer.responses.get(0x44) != requests:
        raise RuntimeError(f"answered {dict(layer.responses)} of {requests}")
    return elapsed / requests * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=60_000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--format", default="json", choices=["json", "cbor"])
    args = parser.parse_args()
    costs = [one_run(args.requests, args.format) for _ in range(args.runs)]
    print(f"{min(costs):.2f} us per request ({args.format}, min of {args.runs} runs of "
          f"{args.requests})")


if __name__ == "__main__":
    main()
