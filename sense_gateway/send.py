"""``sense send``: simulated devices that post readings to a gateway, to try
it out without hardware, printing what each sent and what came back.

    sense send [URL] [--devices 3] [--interval 1s] [--count N | --duration 1m]
               [--format json|cbor|senml|senml-cbor|text] [--prefix sim-]
               [--loss 0.1] [--reboot 0.01] [--keys FILE] [--make-keys FILE]

``URL`` is ``coap://[::1]:5683`` by default; a ``coaps://`` URL (port 5684
by default) sends over DTLS 1.2 with a pre-shared key per device, each
device with its own session, identity = device id. The keys come from
``--keys FILE``: one device a line, ``ID HEX`` (the key in hexadecimal,
``#`` starts a comment), the devices being the file's ids in order.
``--make-keys FILE`` writes such a file for ``--devices`` new random keys
(owner-only) and provisions them as ``sense devices add ID --psk-hex HEX``
would (same ``--config``, ``SENSE_*``), then exits; a key provisioned by
hand goes into the file as a line of its own.

Each device reports a temperature (``Cel``) and a humidity (``%RH``)
that wander slowly, with its own sequence number (and boot counter in
SENSE v1), every ``--interval``, the devices spread over the interval.
``--loss P`` skips a message with probability P (the gateway counts it
lost), ``--reboot P`` restarts a device with probability P before a
message: it counts from 1 again in a new boot. The ``text`` format is the
original SENSE devices' (``/temperature``): over plain CoAP the gateway
names such a device by its address, so all of them look like one.

Runs until ``--count`` messages per device, ``--duration`` or Ctrl-C, and
exits 0 only if every message sent was acknowledged with 2.xx.
"""

from __future__ import annotations

import argparse
import os
import random
import secrets
import selectors
import socket
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import cbor2
import orjson

from sense_gateway.coap.message import ACK, CON, EMPTY, POST, RST, encode, parse
from sense_gateway.liveness import parse_duration

#: RFC 7252 4.8: ACK_TIMEOUT and MAX_RETRANSMIT, without the random factor
ACK_TIMEOUT, MAX_RETRANSMIT = 2.0, 4
FORMATS = ("json", "cbor", "senml", "senml-cbor", "text")
_CONTENT_FORMAT = {"json": 50, "cbor": 60, "senml": 110, "senml-cbor": 112, "text": 0}
URI_PATH, CONTENT_FORMAT_OPTION = 11, 12


def read_keys(path: Path) -> list[tuple[str, bytes]]:
    """(device, key) pairs of a keys file: ``ID HEX`` a line."""
    pairs = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        try:
            if len(parts) != 2:
                raise ValueError("expected: ID HEX")
            pairs.append((parts[0], bytes.fromhex(parts[1])))
        except ValueError as e:
            raise SystemExit(f"sense send: {path}:{number}: {e}") from None
    if not pairs:
        raise SystemExit(f"sense send: {path}: no keys")
    return pairs


class Device:
    """One simulated device: its socket, numbers, values, request in flight."""

    def __init__(self, name: str, address, fmt: str, rng: random.Random, key: bytes | None):
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        self.sock.connect(address)
        self.sock.setblocking(False)
        self.name, self.format, self.rng = name, fmt, rng
        self.seq, self.boot = 0, 1
        self.temperature = round(rng.uniform(18, 24), 2)
        self.humidity = round(rng.uniform(35, 60), 1)
        self.dtls = None
        if key is not None:
            from sense_gateway.bench.dtls_client import DTLSClient

            self.dtls = DTLSClient(name, key)
        #: (message id, token, datagram, sent at, transmissions, first sent) or None
        self.pending = None
        self.sent = 0

    # -- what the device says ------------------------------------------------

    def reading(self) -> tuple[str, bytes]:
        """The next request's path and payload."""
        self.temperature = round(self.temperature + self.rng.uniform(-0.15, 0.15), 2)
        self.humidity = round(min(95.0, max(5.0, self.humidity + self.rng.uniform(-0.5, 0.5))), 1)
        t, h = self.temperature, self.humidity
        if self.format == "text":
            value = round(t * 100)
            parity = (bin(value & 0xFFFF).count("1") + 1) % 2
            return "temperature", f"{value},{parity},".encode()
        if self.format in ("senml", "senml-cbor"):
            if self.format == "senml":
                return "data", orjson.dumps([
                    {"bn": self.name + ":", "n": "temperature", "u": "Cel", "v": t},
                    {"n": "humidity", "u": "%RH", "v": h}])
            # RFC 8428 section 6's integer labels: bn -2, n 0, u 1, v 2.
            return "data", cbor2.dumps([{-2: self.name + ":", 0: "temperature", 1: "Cel", 2: t},
                                        {0: "humidity", 1: "%RH", 2: h}])
        document = {"id": self.name, "seq": self.seq, "boot": self.boot,
                    "units": {"temperature": "Cel", "humidity": "%RH"},
                    "data": {"temperature": t, "humidity": h}}
        return "data", (orjson.dumps(document) if self.format == "json" else cbor2.dumps(document))

    # -- the wire ------------------------------------------------------------

    def transmit(self, datagram: bytes) -> None:
        out = self.dtls.send(datagram) if self.dtls is not None else [datagram]
        self._send_raw(out)

    def _send_raw(self, datagrams) -> None:
        for datagram in datagrams:
            try:
                self.sock.send(datagram)
            except (BlockingIOError, ConnectionRefusedError):
                pass  # as if lost on the way: retransmission covers it

    def handshake(self, timeout: float = 10.0) -> None:
        """Establish the DTLS session (blocking: done before sending starts)."""
        self._send_raw(self.dtls.start())
        deadline = time.monotonic() + timeout
        while not self.dtls.established:
            if self.dtls.error is not None or time.monotonic() > deadline:
                raise SystemExit(f"sense send: {self.name}: DTLS handshake failed: "
                                 f"{self.dtls.error or 'no answer'} (is its key provisioned?)")
            ready = select_one(self.sock, 0.2)
            if ready:
                self.receive()

    def receive(self) -> list[bytes]:
        """CoAP messages waiting on the socket."""
        messages = []
        while True:
            try:
                data = self.sock.recv(4096)
            except (BlockingIOError, InterruptedError):
                break
            except ConnectionRefusedError:
                continue
            if self.dtls is None:
                messages.append(data)
            else:
                self._send_raw(self.dtls.receive([data]))
        if self.dtls is not None:
            messages, self.dtls.received = self.dtls.received, []
        return messages


def select_one(sock, timeout: float) -> bool:
    with selectors.DefaultSelector() as selector:
        selector.register(sock, selectors.EVENT_READ)
        return bool(selector.select(timeout))


class Sender:
    """The event loop: due messages out, answers in, retransmissions."""

    def __init__(self, devices: list[Device], interval: float, count: int | None,
                 duration: float | None, loss: float, reboot: float, rng: random.Random,
                 out=sys.stdout):
        self.devices, self.interval, self.count = devices, interval, count
        self.loss, self.reboot, self.rng, self.out = loss, reboot, rng, out
        self.end = time.monotonic() + duration if duration is not None else None
        self.mid = rng.randrange(0x10000)
        self.totals = {"sent": 0, "acknowledged": 0, "refused": 0, "no answer": 0,
                       "lost on purpose": 0, "reboots": 0}
        start = time.monotonic()
        # Spread over the interval, so the gateway sees a steady trickle.
        self.due = {d: start + i * interval / len(devices) for i, d in enumerate(devices)}

    def say(self, device: Device, text: str) -> None:
        clock = time.strftime("%H:%M:%S")
        print(f"{clock}  {device.name}  {text}", file=self.out, flush=True)

    def run(self) -> int:
        selector = selectors.DefaultSelector()
        by_fd = {d.sock.fileno(): d for d in self.devices}
        for device in self.devices:
            selector.register(device.sock, selectors.EVENT_READ)
        try:
            while not self._finished():
                now = time.monotonic()
                for device, due in list(self.due.items()):
                    if now >= due and device.pending is None and self._may_send(device, now):
                        self.due[device] = due + self.interval
                        self._next_message(device, now)
                    self._retransmit(device, now)
                for key, _ in selector.select(0.02):
                    device = by_fd[key.fd]
                    for message in device.receive():
                        self._answer(device, message)
        except KeyboardInterrupt:
            pass
        finally:
            selector.close()
        totals = self.totals
        print(", ".join(f"{name} {count}" for name, count in totals.items()), file=self.out)
        return 0 if totals["sent"] and totals["acknowledged"] == totals["sent"] else 1

    def _may_send(self, device: Device, now: float) -> bool:
        if self.end is not None and now >= self.end:
            return False
        return self.count is None or device.sent < self.count

    def _finished(self) -> bool:
        now = time.monotonic()
        busy = any(d.pending is not None for d in self.devices)
        if busy:
            return False
        if self.end is not None and now >= self.end:
            return True
        return self.count is not None and all(d.sent >= self.count for d in self.devices)

    def _next_message(self, device: Device, now: float) -> None:
        if self.reboot and self.rng.random() < self.reboot:
            device.seq, device.boot = 0, device.boot + 1
            self.totals["reboots"] += 1
            self.say(device, f"rebooted: boot {device.boot}, counting from 1 again")
        device.seq += 1
        device.sent += 1
        path, payload = device.reading()
        if self.loss and self.rng.random() < self.loss:
            self.totals["lost on purpose"] += 1
            self.say(device, f"seq {device.seq}  {device.format}  lost on purpose (not sent)")
            return
        self.mid = (self.mid + 1) & 0xFFFF
        token = secrets.token_bytes(4)
        options = [(URI_PATH, path), (CONTENT_FORMAT_OPTION, _CONTENT_FORMAT[device.format])]
        datagram = encode(CON, POST, self.mid, token, options, payload)
        device.pending = (self.mid, token, datagram, now, 1, now, payload)
        self.totals["sent"] += 1
        device.transmit(datagram)

    def _retransmit(self, device: Device, now: float) -> None:
        if device.pending is None:
            return
        mid, token, datagram, sent_at, tries, first, payload = device.pending
        if now - sent_at < ACK_TIMEOUT * 2 ** (tries - 1):
            return
        if tries > MAX_RETRANSMIT:
            self.totals["no answer"] += 1
            self.say(device, f"seq {device.seq}  {device.format}  no answer")
            device.pending = None
            return
        device.pending = (mid, token, datagram, now, tries + 1, first, payload)
        device.transmit(datagram)

    def _answer(self, device: Device, data: bytes) -> None:
        try:
            message = parse(data)
        except Exception:
            return
        if device.pending is None:
            return
        mid, token, _, _, _, first, payload = device.pending
        if message.mtype == ACK and message.code == EMPTY and message.mid == mid:
            return  # the response follows separately
        if message.mtype == CON:
            device.transmit(encode(ACK, EMPTY, message.mid))
        if message.mtype == RST or message.token != token:
            return
        code = f"{message.code >> 5}.{message.code & 31:02d}"
        took = (time.monotonic() - first) * 1000
        detail = message.payload.decode("utf-8", "replace") if message.payload else ""
        if message.code >> 5 == 2:
            self.totals["acknowledged"] += 1
        else:
            self.totals["refused"] += 1
        sent = payload.decode("utf-8", "replace") if device.format in ("json", "senml", "text") \
            else f"{len(payload)} bytes of CBOR"
        self.say(device, f"seq {device.seq}  {device.format} {sent}  ->  {code} {detail}"
                         f"  {took:.1f} ms".rstrip())
        device.pending = None


def make_keys(args) -> int:
    """Write a keys file for new simulated devices and provision the keys."""
    from sense_gateway.credentials.cli import open_credential_store
    from sense_gateway.config import load_config

    path = Path(args.make_keys)
    keys = [(f"{args.prefix}{i}", secrets.token_bytes(16)) for i in range(1, args.devices + 1)]
    config = load_config(args.config, overrides={"data_dir": args.data_dir})
    store = open_credential_store(config)
    try:
        for device, key in keys:
            store.set_key(device, key)
    finally:
        store.close()
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as f:
        f.write("# sense send --keys: device id and its pre-shared key (hex)\n")
        f.writelines(f"{device} {key.hex()}\n" for device, key in keys)
    print(f"{len(keys)} keys provisioned and written to {path}; gateways use them within "
          f"{config.security.refresh_interval:g} s")
    return 0


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="sense send", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("url", nargs="?", default="coap://[::1]:5683",
                        help="coap://HOST[:PORT] or coaps://HOST[:PORT] (default coap://[::1]:5683)")
    parser.add_argument("--devices", type=int, default=3, help="simulated devices (default 3)")
    parser.add_argument("--interval", type=parse_duration, default=1.0,
                        help="each device sends every INTERVAL (1s, 500ms, 1m; default 1s)")
    parser.add_argument("--count", type=int, help="messages per device, then stop")
    parser.add_argument("--duration", type=parse_duration, help="stop after this long")
    parser.add_argument("--format", choices=FORMATS, default="json")
    parser.add_argument("--prefix", default="sim-", help="device ids: PREFIX1, PREFIX2, ...")
    parser.add_argument("--loss", type=float, default=0.0, help="chance a message is skipped")
    parser.add_argument("--reboot", type=float, default=0.0,
                        help="chance a device reboots before a message")
    parser.add_argument("--keys", help="coaps: a file of 'ID HEX' lines, one device each")
    parser.add_argument("--make-keys", metavar="FILE",
                        help="provision --devices new keys, write them to FILE, and exit")
    parser.add_argument("--config", "-c", default=os.environ.get("SENSE_CONFIG"),
                        help="with --make-keys: the gateway's configuration")
    parser.add_argument("--data-dir", help="with --make-keys: the gateway's data directory")
    parser.add_argument("--seed", type=int, help="for values, losses and reboots that repeat")
    args = parser.parse_args(argv)
    if args.devices < 1 or (args.count is not None and args.count < 1):
        parser.error("--devices and --count must be at least 1")
    if not (0 <= args.loss < 1 and 0 <= args.reboot < 1):
        parser.error("--loss and --reboot are chances from 0 to below 1")
    return args


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.make_keys:
        return make_keys(args)
    url = urlsplit(args.url)
    if url.scheme not in ("coap", "coaps") or not url.hostname:
        print(f"sense send: {args.url}: expected coap://HOST[:PORT] or coaps://HOST[:PORT]",
              file=sys.stderr)
        return 2
    secure = url.scheme == "coaps"
    address = (url.hostname, url.port or (5684 if secure else 5683))
    rng = random.Random(args.seed)
    if secure:
        if not args.keys:
            print("sense send: coaps needs --keys FILE (or --make-keys FILE first)",
                  file=sys.stderr)
            return 2
        keys = read_keys(Path(args.keys))
        if len(keys) < args.devices:
            print(f"sense send: {args.keys} has keys for {len(keys)} devices; sending as those",
                  file=sys.stderr)
        named = keys[:args.devices]
    else:
        named = [(f"{args.prefix}{i}", None) for i in range(1, args.devices + 1)]
    devices = [Device(name, address, args.format, random.Random(rng.random()), key)
               for name, key in named]
    try:
        for device in devices:
            if device.dtls is not None:
                device.handshake()
        print(f"{len(devices)} devices -> {args.url}, {args.format}, every {args.interval:g} s"
              + (" (Ctrl-C stops)" if args.count is None and args.duration is None else ""),
              flush=True)
        return Sender(devices, args.interval, args.count, args.duration, args.loss,
                      args.reboot, rng).run()
    finally:
        for device in devices:
            device.sock.close()
