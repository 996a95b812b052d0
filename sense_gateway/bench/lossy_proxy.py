"""A lossy UDP relay between simulated devices and a gateway.

    python -m sense_gateway.bench.lossy_proxy --listen [::1]:5700 --target [::1]:5683
                                              --loss 0.2 [--seed 7]

Each client address (a device's socket) gets an upstream socket of its
own, connected to the target, so the gateway sees one source per device,
as behind a border router that keeps ports apart. Every datagram, either
way, is dropped with probability ``loss`` (or ``loss_up`` / ``loss_down``
for one direction), drawn from a seeded generator per direction, and
otherwise forwarded at once: nothing is delayed, reordered or changed.

A target that is not listening (a gateway being restarted) answers with
ICMP port unreachable, which a connected socket reports as a refused
connection on its next call: the relay ignores it, as the network would.

The relay runs on a thread of its own (:meth:`LossyProxy.start`), so the
same object serves the tests, ``sense bench --crash-loop`` and the command
line.
"""

from __future__ import annotations

import argparse
import random
import selectors
import socket
import threading
from dataclasses import dataclass


@dataclass
class ProxyCounters:
    up_forwarded: int = 0
    up_dropped: int = 0
    down_forwarded: int = 0
    down_dropped: int = 0

    def as_dict(self) -> dict:
        return {"up_forwarded": self.up_forwarded, "up_dropped": self.up_dropped,
                "down_forwarded": self.down_forwarded, "down_dropped": self.down_dropped}


def _family(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


class LossyProxy:
    """Relays datagrams between clients and ``target``, dropping some."""

    def __init__(self, target: tuple[str, int], loss: float = 0.2, *, seed: int | None = None,
                 listen: tuple[str, int] = ("::1", 0), loss_up: float | None = None,
                 loss_down: float | None = None):
        for name, value in (("loss", loss), ("loss_up", loss_up), ("loss_down", loss_down)):
            if value is not None and not 0 <= value < 1:
                raise ValueError(f"{name}: a fraction from 0 up to (not including) 1")
        self.target = target
        self.loss_up = loss if loss_up is None else loss_up
        self.loss_down = loss if loss_down is None else loss_down
        # One generator per direction: what is dropped one way does not
        # depend on how much traffic went the other way.
        seeds = random.Random(seed)
        self._up_random = random.Random(seeds.getrandbits(64)).random
        self._down_random = random.Random(seeds.getrandbits(64)).random
        self.counters = ProxyCounters()
        self.listener = socket.socket(_family(listen[0]), socket.SOCK_DGRAM)
        self.listener.bind(listen)
        self.listener.setblocking(False)
        self.address = self.listener.getsockname()[:2]
        self._upstream: dict[tuple, socket.socket] = {}
        self._client_of: dict[int, tuple] = {}
        self._selector = selectors.DefaultSelector()
        self._selector.register(self.listener, selectors.EVENT_READ)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self.address[1]

    def start(self) -> LossyProxy:
        self._thread = threading.Thread(target=self.run, name="lossy-proxy", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        for sock in [self.listener, *self._upstream.values()]:
            sock.close()
        self._selector.close()

    def run(self) -> None:
        while not self._stop.is_set():
            for key, _ in self._selector.select(0.05):
                if key.fileobj is self.listener:
                    self._from_clients()
                else:
                    self._from_target(key.fileobj)

    def _upstream_for(self, client: tuple) -> socket.socket:
        sock = self._upstream.get(client)
        if sock is None:
            sock = socket.socket(_family(self.target[0]), socket.SOCK_DGRAM)
            sock.setblocking(False)
            sock.connect(self.target)
            self._upstream[client] = sock
            self._client_of[sock.fileno()] = client
            self._selector.register(sock, selectors.EVENT_READ)
        return sock

    def _from_clients(self) -> None:
        counters, loss, draw = self.counters, self.loss_up, self._up_random
        while True:
            try:
                data, client = self.listener.recvfrom(65535)
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionRefusedError:
                continue
            if loss and draw() < loss:
                counters.up_dropped += 1
                continue
            counters.up_forwarded += 1
            try:
                self._upstream_for(client).send(data)
            except (BlockingIOError, ConnectionRefusedError):
                pass  # the target is down: lost on the way

    def _from_target(self, sock: socket.socket) -> None:
        counters, loss, draw = self.counters, self.loss_down, self._down_random
        client = self._client_of[sock.fileno()]
        while True:
            try:
                data = sock.recv(65535)
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionRefusedError:
                continue  # ICMP port unreachable for an earlier send
            if loss and draw() < loss:
                counters.down_dropped += 1
                continue
            counters.down_forwarded += 1
            try:
                self.listener.sendto(data, client)
            except (BlockingIOError, ConnectionRefusedError):
                pass


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]") or "::1", int(port)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sense_gateway.bench.lossy_proxy",
                                description="Relay UDP datagrams, dropping a fraction each way.")
    p.add_argument("--listen", type=_address, default=("::1", 0), help="HOST:PORT to listen on")
    p.add_argument("--target", type=_address, required=True, help="HOST:PORT to relay to")
    p.add_argument("--loss", type=float, default=0.2, help="fraction dropped each way")
    p.add_argument("--seed", type=int)
    args = p.parse_args(argv)
    proxy = LossyProxy(args.target, args.loss, seed=args.seed, listen=args.listen)
    print(f"listening on {proxy.port}", flush=True)
    try:
        proxy.run()
    except KeyboardInterrupt:
        pass
    print(proxy.counters.as_dict(), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
