"""The servers ``sense bench --compare`` measures the gateway against.

    python -m sense_gateway.bench.peers aiocoap|txthings|udp-ack --port N [--bind ::1]
                                         [--drop FRACTION --seed S]

- ``aiocoap``: aiocoap's server with one resource answering every POST
  with 2.04 Changed (what the original system ran, minus the SQS call).
- ``txthings``: the same on txthings, the library our gateway builds on.
- ``udp-ack``: a Twisted DatagramProtocol answering each datagram with a
  piggybacked 2.04 ACK by copying its message id and token, no CoAP
  parsing: the ceiling of Python, Twisted and UDP on this machine.

``udp-ack --drop F --seed S`` drops a known set of datagrams: the one
whose options and payload are ``key``, seen for the ``n``-th time, is
dropped when :func:`dropped` says so. The bench's tests compute the same
function to know exactly what the bench must count.

Each prints ``listening on PORT`` on stdout once it listens.
"""

from __future__ import annotations

import argparse
import hashlib
import sys


def dropped(seed: int, fraction: float, key: bytes, attempt: int) -> bool:
    """Whether the lossy peer drops the *attempt*-th (from 0) copy of the
    request whose bytes after the token are *key*."""
    if fraction <= 0:
        return False
    digest = hashlib.blake2b(key + attempt.to_bytes(2, "big"), digest_size=8,
                             key=seed.to_bytes(8, "big")).digest()
    return int.from_bytes(digest, "big") / 2**64 < fraction


def _ready(port: int) -> None:
    sys.stdout.write(f"listening on {port}\n")
    sys.stdout.flush()


def run_udp_ack(bind: str, port: int, drop: float, seed: int) -> None:
    from twisted.internet import reactor
    from twisted.internet.protocol import DatagramProtocol

    class Ack(DatagramProtocol):
        def datagramReceived(self, data, address):
            tkl = data[0] & 0x0F
            # ACK (type 2) with 2.04 Changed, same message id and token.
            self.transport.write(bytes([0x60 | tkl, 0x44]) + data[2:4 + tkl], address)

    class LossyAck(Ack):
        def __init__(self):
            self.seen: dict[bytes, int] = {}

        def datagramReceived(self, data, address):
            if len(data) < 4:
                return
            key = data[4 + (data[0] & 0x0F):]
            attempt = self.seen.get(key, 0)
            self.seen[key] = attempt + 1
            if dropped(seed, drop, key, attempt):
                return
            if data[0] & 0x30 == 0x10:  # NON request: NON response
                tkl = data[0] & 0x0F
                self.transport.write(bytes([0x50 | tkl, 0x44]) + data[2:4 + tkl], address)
                return
            super().datagramReceived(data, address)

    listener = reactor.listenUDP(port, LossyAck() if drop > 0 else Ack(), interface=bind)
    reactor.callWhenRunning(_ready, listener.getHost().port)
    reactor.run()


def run_txthings(bind: str, port: int) -> None:
    from twisted.internet import defer, reactor
    from txthings import coap, resource

    class Sink(resource.CoAPResource):
        def __init__(self):
            super().__init__()
            self.addParam(resource.LinkParam("title", "bench"))

        def render_POST(self, request):
            return defer.succeed(coap.Message(code=coap.CHANGED))

    root = resource.CoAPResource()
    sink = Sink()
    for name in (b"data", b"temperature", b"temp"):
        root.putChild(name, sink)
    listener = reactor.listenUDP(port, coap.Coap(resource.Endpoint(root)), interface=bind)
    reactor.callWhenRunning(_ready, listener.getHost().port)
    reactor.run()


def run_aiocoap(bind: str, port: int) -> None:
    import asyncio

    import aiocoap
    import aiocoap.resource

    class Sink(aiocoap.resource.Resource):
        async def render_post(self, request):
            return aiocoap.Message(code=aiocoap.CHANGED)

    async def serve():
        root = aiocoap.resource.Site()
        for name in ("data", "temperature", "temp"):
            root.add_resource([name], Sink())
        await aiocoap.Context.create_server_context(root, bind=(bind, port))
        _ready(port)
        await asyncio.get_running_loop().create_future()

    asyncio.run(serve())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sense_gateway.bench.peers")
    parser.add_argument("kind", choices=["aiocoap", "txthings", "udp-ack"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--bind", default="::1")
    parser.add_argument("--drop", type=float, default=0.0,
                        help="udp-ack: fraction of datagrams to drop (deterministic)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.drop and args.kind != "udp-ack":
        parser.error("--drop is for udp-ack only")
    if args.kind == "udp-ack":
        run_udp_ack(args.bind, args.port, args.drop, args.seed)
    elif args.kind == "txthings":
        run_txthings(args.bind, args.port)
    else:
        run_aiocoap(args.bind, args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
