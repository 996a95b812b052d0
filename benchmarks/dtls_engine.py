"""What the DTLS engine costs: CPU per handshake and per record, memory per session.

Throughput is measured in one process, with OpenSSL's own client over
memory BIOs as the peers (tests/dtls_harness.py), so no socket or kernel
time is in it. Two figures per handshake: the rate with both sides in the
process, and the server's share of it (the time spent inside
``datagram_received``). Records are encrypted by the clients beforehand,
so the records-in figure is the server alone: header check, routing,
decryption, delivery to a no-op.

Memory is measured in a separate server process, fed over a datagram
socket pair, so the clients' memory is not counted: its resident set
before any session, with ``--sessions`` sessions established (and after
one record each way), and with as many handshakes left hanging after the
server's first flight, the state an attacker with real addresses can make
it hold.

    .venv/bin/python benchmarks/dtls_engine.py [--handshakes 1000] [--records 20000]
        [--sessions 1000] [--runs 3]
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import hmac
import secrets
import socket
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path

from twisted.internet import task

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sense_gateway.coap.dtls import DTLSServer  # noqa: E402
from tests.dtls_harness import MemoryClient, Wire, new_key  # noqa: E402

IDENTITIES = [f"node-{i}" for i in range(65536)]


def address(i: int) -> tuple[str, int]:
    return (f"2001:db8::{i:x}", 5684)


class TimedServer(DTLSServer):
    """Adds up the time spent inside the engine."""

    busy = 0.0

    def datagram_received(self, data, addr):
        start = time.perf_counter()
        super().datagram_received(data, addr)
        self.busy += time.perf_counter() - start


def handshakes(count: int) -> tuple[float, float, list, Wire]:
    keys = {IDENTITIES[i]: new_key() for i in range(count)}
    server = TimedServer(keys.get, task.Clock(), max_sessions=count, handshakes_per_source=1e9)
    wire = Wire(server)
    clients = [MemoryClient(IDENTITIES[i], keys[IDENTITIES[i]]) for i in range(count)]
    start = time.perf_counter()
    for i, client in enumerate(clients):
        wire.handshake(client, address(i))
    elapsed = time.perf_counter() - start
    assert server.session_count() == count, server.counters
    return count / elapsed, count / server.busy, clients, wire


def records_in(clients, wire, count: int) -> float:
    message = b"\x40\x02\x12\x34\xb4data\xff" + b'{"id":"node-7","seq":42,"data":{"t":21.5}}'
    datagrams = []
    for n in range(count):
        i = n % len(clients)
        datagrams.append((clients[i].send(message)[0], address(i)))
    server = wire.server
    server.deliver = lambda plaintext, addr, identity: None
    start = time.perf_counter()
    for datagram, addr in datagrams:
        server.datagram_received(datagram, addr)
    elapsed = time.perf_counter() - start
    assert server.counters["records_delivered"] >= count
    return count / elapsed


def records_out(clients, wire, count: int) -> float:
    server = wire.server
    server.send = lambda datagram, addr: None
    answer = b"\x60\x44\x12\x34"
    addrs = [address(n % len(clients)) for n in range(count)]
    start = time.perf_counter()
    for addr in addrs:
        server.send_to(answer, addr)
    return count / (time.perf_counter() - start)


def cookieless_hellos(count: int) -> float:
    server = DTLSServer({}.get, task.Clock())
    server.send = lambda datagram, addr: None
    hello = MemoryClient("node-7", b"k" * 16).start()[0]
    addrs = [address(i) for i in range(count)]
    start = time.perf_counter()
    for addr in addrs:
        server.datagram_received(hello, addr)
    elapsed = time.perf_counter() - start
    assert server.counters["cookies_sent"] == count and server.handshake_count() == 0
    return count / elapsed


# -- memory, in a server process of its own -----------------------------------

_CONTROL = 0xFFFFFFFF


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def _key(seed: bytes, identity: str) -> bytes:
    return hmac.digest(seed, identity.encode(), "sha256")[:16]


def _serve(fd: int) -> None:
    """The server process: a fresh interpreter, so its memory is the engine's alone."""
    seed = bytes.fromhex(sys.stdin.readline())
    sock = socket.socket(fileno=fd)
    server = DTLSServer(lambda identity: _key(seed, identity), task.Clock(), max_sessions=1 << 20,
                        handshakes_per_source=1e9, handshake_timeout=3600, idle_timeout=3600)
    by_address = {}

    def send(datagram, addr):
        sock.send(struct.pack("!I", by_address[addr]) + datagram)

    server.send = send
    server.deliver = lambda plaintext, addr, identity: server.send_to(b"\x60\x44" + plaintext[2:4], addr)
    while True:
        packet = sock.recv(70000)
        (index,) = struct.unpack("!I", packet[:4])
        if index == _CONTROL:
            if packet[4:] == b"stop":
                return
            gc.collect()
            rss = _rss_kib()
            # What the heap still holds once glibc gives back its free pages:
            # the live memory, as against what the process keeps resident.
            ctypes.CDLL("libc.so.6").malloc_trim(0)
            report = f"{rss} {_rss_kib()} {server.session_count()} {server.handshake_count()}"
            sock.send(struct.pack("!I", _CONTROL) + report.encode())
            continue
        addr = address(index)
        by_address[addr] = index
        server.datagram_received(packet[4:], addr)


def memory(sessions: int) -> dict:
    seed = secrets.token_bytes(32)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    for s in (ours, theirs):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    child = subprocess.Popen([sys.executable, __file__, "--serve", str(theirs.fileno())],
                             stdin=subprocess.PIPE, pass_fds=(theirs.fileno(),))
    child.stdin.write(seed.hex().encode() + b"\n")
    child.stdin.close()
    theirs.close()
    clients: dict[int, MemoryClient] = {}

    def control(what: bytes = b"rss") -> tuple[int, int, int, int]:
        ours.send(struct.pack("!I", _CONTROL) + what)
        ours.settimeout(30.0)
        while True:
            packet = ours.recv(70000)
            (index,) = struct.unpack("!I", packet[:4])
            if index == _CONTROL:
                return tuple(int(x) for x in packet[4:].split())
            clients[index].receive([packet[4:]])   # a late answer

    def exchange(index: int, datagrams, stop_after_server_hello=False) -> None:
        client = clients[index]
        for _ in range(10):
            if not datagrams:
                return
            for datagram in datagrams:
                ours.send(struct.pack("!I", index) + datagram)
            ours.settimeout(2.0)
            replies = []
            try:
                while True:
                    packet = ours.recv(70000)
                    replies.append(packet[4:])
                    ours.settimeout(0.002)
            except socket.timeout:
                pass
            if stop_after_server_hello and any(r[13] == 2 for r in replies if len(r) > 13):
                return
            datagrams = client.receive(replies)

    result = {}
    try:
        result["baseline"] = control()[:2]
        for i in range(sessions):
            clients[i] = MemoryClient(IDENTITIES[i], _key(seed, IDENTITIES[i]))
            exchange(i, clients[i].start())
        rss, live, established, _ = control()
        assert established == sessions, established
        result["established"] = (rss, live)
        for i in range(sessions):
            exchange(i, clients[i].send(b"\x40\x02\x00\x01"))
        result["after_records"] = control()[:2]
        for i in range(sessions, 2 * sessions):
            clients[i] = MemoryClient(IDENTITIES[i], _key(seed, IDENTITIES[i]))
            exchange(i, clients[i].start(), stop_after_server_hello=True)
        rss, live, _, hanging = control()
        result["hanging"] = (rss, live)
        result["hanging_count"] = hanging
    finally:
        ours.send(struct.pack("!I", _CONTROL) + b"stop")
        child.wait(30)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--handshakes", type=int, default=1000)
    parser.add_argument("--records", type=int, default=20000)
    parser.add_argument("--sessions", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve is not None:
        _serve(args.serve)
        return
    m = memory(args.sessions)
    rows = {"handshakes/s, both sides in process": [], "handshakes/s, server's share": [],
            "records/s in (decrypt + deliver)": [], "records/s out (send_to)": [],
            "ClientHellos without cookie/s": []}
    for _ in range(args.runs):
        both, server_only, clients, wire = handshakes(args.handshakes)
        rows["handshakes/s, both sides in process"].append(both)
        rows["handshakes/s, server's share"].append(server_only)
        rows["records/s in (decrypt + deliver)"].append(records_in(clients, wire, args.records))
        rows["records/s out (send_to)"].append(records_out(clients, wire, args.records))
        rows["ClientHellos without cookie/s"].append(cookieless_hellos(args.records))
        del clients, wire
        gc.collect()
    for name, values in rows.items():
        print(f"{name:40s} median {statistics.median(values):9.0f}   runs {', '.join(f'{v:.0f}' for v in values)}")
    n, hanging = args.sessions, m["hanging_count"]
    rows = [("before any session", "baseline", None, 1),
            (f"{n} sessions established", "established", "baseline", n),
            ("after a record each way", "after_records", "baseline", n),
            (f"and {hanging} handshakes hanging", "hanging", "after_records", hanging)]
    print(f"{'server process':34s} {'RSS MiB':>8s} {'KiB each':>9s} {'live MiB':>9s} {'KiB each':>9s}")
    for label, key, base, count in rows:
        (rss, live) = m[key]
        cells = f"{rss / 1024:8.1f} {'':9s} {live / 1024:9.1f} {'':9s}"
        if base:
            cells = (f"{rss / 1024:8.1f} {(rss - m[base][0]) / count:9.1f} "
                     f"{live / 1024:9.1f} {(live - m[base][1]) / count:9.1f}")
        print(f"{label:34s} {cells}")

if __name__ == "__main__":
    main()
