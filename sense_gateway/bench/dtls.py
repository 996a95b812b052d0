"""``sense bench --dtls``: the gateway loaded over CoAPS (DTLS 1.2 PSK) by
many simulated devices, each with its own key and session, side by side
with plain CoAP against the same gateway in the same run.

One gateway (role gateway, the keys provisioned before it starts) gets the
plain load first (the same closed loop as ``sense bench``), then the
devices handshake (handshakes per second) and post over their established
sessions (readings per second, latency). A device has at most one request
in flight, as NSTART = 1 asks; ``--window`` devices are busy at a time.
"""

from __future__ import annotations

import secrets
import selectors
import shutil
import socket
import sys
import tempfile
import time
from collections import deque
from pathlib import Path

import orjson

from sense_gateway.bench import describe_load, machine, run_load, settings_from
from sense_gateway.bench.dtls_client import DTLSClient
from sense_gateway.bench.loadgen import LoadResult
from sense_gateway.bench.processes import Gateway
from sense_gateway.bench.workload import ACK, CON, POST, Workload, header

#: seconds after which an unanswered request over DTLS is lost
REQUEST_TIMEOUT = 5.0


class Device:
    """One simulated device: a DTLS client on a connected UDP socket."""

    __slots__ = ("client", "sock", "seq", "pending", "build")

    def __init__(self, identity: str, key: bytes, address, build):
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        self.sock.connect(address)
        self.sock.setblocking(False)
        self.client = DTLSClient(identity, key)
        self.seq = 1
        #: (token, sent at) of the request in flight, or None
        self.pending = None
        self.build = build

    def send(self, datagrams) -> None:
        for datagram in datagrams:
            try:
                self.sock.send(datagram)
            except (BlockingIOError, ConnectionRefusedError):
                pass  # as if lost on the way

    def receive(self) -> list[bytes]:
        """Datagrams waiting on the socket, through the session: the CoAP
        messages they held."""
        while True:
            try:
                data = self.sock.recv(4096)
            except (BlockingIOError, ConnectionRefusedError, InterruptedError):
                break
            self.send(self.client.receive([data]))
        messages, self.client.received = self.client.received, []
        return messages


def handshake(devices: list[Device], concurrency: int, timeout: float) -> tuple[int, float]:
    """Establish every device's session, *concurrency* at a time; returns
    how many succeeded and the seconds it took."""
    selector = selectors.DefaultSelector()
    waiting = deque(devices)
    busy: dict[int, tuple[Device, float]] = {}
    done = 0
    start = time.perf_counter()
    while waiting or busy:
        while waiting and len(busy) < concurrency:
            device = waiting.popleft()
            device.send(device.client.start())
            busy[device.sock.fileno()] = (device, time.perf_counter())
            selector.register(device.sock, selectors.EVENT_READ)
        for key, _ in selector.select(0.05):
            device, _ = busy[key.fd]
            device.receive()
            if device.client.established or device.client.error:
                done += device.client.established
                selector.unregister(device.sock)
                del busy[key.fd]
        now = time.perf_counter()
        for fd, (device, began) in list(busy.items()):
            if now - began > timeout:
                selector.unregister(device.sock)
                del busy[fd]
    selector.close()
    return done, time.perf_counter() - start


def post_over_sessions(devices: list[Device], window: int, duration: float) -> LoadResult:
    """Closed loop over established sessions: *window* devices with a
    request in flight, each next request from the next idle device."""
    result = LoadResult()
    selector = selectors.DefaultSelector()
    by_fd = {}
    for device in devices:
        selector.register(device.sock, selectors.EVENT_READ)
        by_fd[device.sock.fileno()] = device
    idle = deque(devices)
    in_flight: dict[int, Device] = {}
    token_counter = secrets.randbits(32)
    perf = time.perf_counter
    start = perf()
    end = start + duration

    def send_next(now: float) -> None:
        nonlocal token_counter
        device = idle.popleft()
        token_counter = (token_counter + 1) & 0xFFFFFFFF
        token = token_counter.to_bytes(4, "big")
        mid = token_counter & 0xFFFF
        datagram = header(CON, POST, mid, token) + device.build(device.seq)
        device.seq += 1
        device.pending = (token, now)
        in_flight[device.sock.fileno()] = device
        result.sent += 1
        result.transmissions += 1
        device.send(device.client.send(datagram))

    while True:
        now = perf()
        sending = now < end
        while sending and idle and len(in_flight) < window:
            send_next(now)
        if not sending and not in_flight:
            break
        for key, _ in selector.select(0.02):
            device = by_fd[key.fd]
            for message in device.receive():
                if len(message) < 4 or device.pending is None:
                    result.unexpected += 1
                    continue
                kind, code = (message[0] >> 4) & 3, message[1]
                if kind == ACK and code == 0:
                    result.empty_acks += 1  # the separate response follows
                    continue
                token = message[4:4 + (message[0] & 0x0F)]
                if kind == CON:
                    device.send(device.client.send(bytes([0x60, 0]) + message[2:4]))
                if token != device.pending[0]:
                    result.duplicate_responses += 1
                    continue
                t = perf()
                result.answered += 1
                result.latencies.append(t - device.pending[1])
                result.codes[f"{code >> 5}.{code & 31:02d}"] += 1
                device.pending = None
                del in_flight[key.fd]
                idle.append(device)
        now = perf()
        for fd, device in list(in_flight.items()):
            if now - device.pending[1] > REQUEST_TIMEOUT:
                result.lost += 1
                device.pending = None
                del in_flight[fd]
                idle.append(device)
    result.elapsed = perf() - start
    selector.close()
    return result


def _provision(data_dir: Path, keys: dict[str, bytes]) -> None:
    from sense_gateway.credentials.sqlite import SQLiteCredentialStore

    store = SQLiteCredentialStore(data_dir / "credentials.sqlite3")
    try:
        for device, key in keys.items():
            store.set_key(device, key)
    finally:
        store.close()


def run_dtls(args) -> int:
    devices = args.devices or 1000
    duration = args.duration if args.duration is not None else 10.0
    host = "::1"
    workload = Workload(format=args.format, devices=devices, path=args.path)
    keys = {workload.device_id(i): secrets.token_bytes(16) for i in range(devices)}
    workdir = Path(tempfile.mkdtemp(prefix="sense-bench-dtls-"))
    data_dir = workdir / "gateway"
    data_dir.mkdir()
    _provision(data_dir, keys)
    gateway = Gateway(data_dir, role="gateway", host=host, settings={
        # Every device comes from one address here: no per-source limits.
        "queue.sqlite.synchronous": args.synchronous, "coaps.max_sessions": devices + 16,
        "coaps.handshakes_per_source": 1_000_000,
        "coaps.handshakes_in_progress_per_source": devices + 16})
    rows = []
    try:
        args.duration = duration
        plain_settings = settings_from(args, host, gateway.port)
        if not args.json:
            print(f"plain CoAP: {duration:g} s ...", file=sys.stderr)
        plain = run_load(plain_settings, gateway.pid, args.progress, label="coap")
        rows.append({"transport": "coap", **plain})
        if not args.json:
            print(f"CoAPS: {devices} handshakes, then {duration:g} s ...", file=sys.stderr)
        builders = workload.builders()
        simulated = [Device(workload.device_id(i), keys[workload.device_id(i)],
                            (host, gateway.coaps_port), builders[i]) for i in range(devices)]
        try:
            established, took = handshake(simulated, concurrency=64, timeout=20.0)
            sessions = [d for d in simulated if d.client.established]
            result = post_over_sessions(sessions, args.window, duration)
        finally:
            for device in simulated:
                device.sock.close()
        summary = result.summary()
        rows.append({"transport": "coaps", **summary, "handshakes": established,
                     "handshake_s": round(took, 3),
                     "handshakes_per_s": round(established / took, 1) if took else None})
    finally:
        gateway.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    plain_rate, secure_rate = rows[0]["ok_rate"], rows[1]["ok_rate"]
    document = {"machine": machine(), "load": describe_load(plain_settings),
                "devices": devices, "window": args.window, "results": rows,
                "coaps_over_coap": round(secure_rate / plain_rate, 3) if plain_rate else None}
    if args.json:
        sys.stdout.write(orjson.dumps(document, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        print(format_table(document))
    return 0 if rows[1]["ok"] and established == devices else 1


def format_table(document: dict) -> str:
    m, coap, coaps = document["machine"], document["results"][0], document["results"][1]
    lines = [
        f"{m['cpus']} CPUs, {m['cpu_model']}, Python {m['python']}, {m['time']}",
        f"{document['devices']} devices, closed loop, window {document['window']}",
        "",
        f"handshakes: {coaps['handshakes']} in {coaps['handshake_s']} s "
        f"({coaps['handshakes_per_s']:,.0f}/s)",
        "",
        "| transport | 2.xx/s | p50 ms | p99 ms | lost |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in (coap, coaps):
        lat = row["latency_ms"]
        lines.append(f"| {row['transport']} | {row['ok_rate']:,.0f} | {_ms(lat['p50'])} | "
                     f"{_ms(lat['p99'])} | {row['lost']} |")
    ratio = document["coaps_over_coap"]
    if ratio is not None:
        lines += ["", f"CoAPS / CoAP: {ratio:.2f}"]
    return "\n".join(lines)



def _ms(value) -> str:
    return "-" if value is None else f"{value:.2f}"
