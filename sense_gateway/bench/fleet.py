"""Simulated devices that behave as RFC 7252 asks and never give up a reading.

Each device has a socket of its own and sends one reading at a time,
``{"id": "crash-00007", "seq": 12, "data": {"n": 12, "t": 21.7}}``
(``n`` repeats the number, so a reading stored twice shows in the store
as two points with the same ``n``). A confirmable POST is retransmitted
after ACK_TIMEOUT x (1..ACK_RANDOM_FACTOR), the timeout doubling each
time, MAX_RETRANSMIT times (RFC 7252 4.2); an empty ACK stops the
retransmissions and the device then waits as long again for the separate
response. When it gives up it sends the same reading again as a new
message (new message id and token, same ``seq``) until a 2.04 comes, for
any of the messages it sent for that reading; then, after ``interval``,
the next reading. 5.03 and 4.29 are obeyed: the reading is sent again
after Max-Age (times ``time_scale``). Any other answer is counted as an
error and the reading sent again, so a gateway that refuses a good
reading shows up in the counts, not as a gap.

The fleet runs on a thread of its own (:meth:`DeviceFleet.start`);
:meth:`DeviceFleet.drain` stops new readings and waits until every
device's current one is acknowledged.
"""

from __future__ import annotations

import heapq
import random
import selectors
import socket
import threading
import time
from collections import Counter

from sense_gateway.bench.workload import ACK, CON, POST, header, request_options
from sense_gateway.coap.message import MAX_AGE, MalformedMessage, parse

CHANGED = 0x44
SERVICE_UNAVAILABLE = 0xA3
TOO_MANY_REQUESTS = 0x9D


class Device:
    __slots__ = ("index", "name", "sock", "seq", "mid", "tokens", "datagram", "attempt",
                 "timeout", "waiting_separate", "first_sent", "acknowledged", "timer",
                 "idle", "gave_up", "retransmissions")

    def __init__(self, index: int, name: str, sock: socket.socket, mid: int):
        self.index, self.name, self.sock = index, name, sock
        self.seq = 1
        self.mid = mid
        #: tokens of every message sent for the current reading
        self.tokens: set[bytes] = set()
        self.datagram = b""
        self.attempt = 0
        self.timeout = 0.0
        self.waiting_separate = False
        self.first_sent = 0.0
        self.acknowledged: list[int] = []
        #: bumped whenever the device's pending timer no longer applies
        self.timer = 0
        self.idle = False
        self.gave_up = 0
        self.retransmissions = 0


class DeviceFleet:
    """*devices* devices sending to ``target`` (a proxy, or the gateway)."""

    def __init__(self, target: tuple[str, int], devices: int = 40, *, interval: float = 0.05,
                 ack_timeout: float = 2.0, ack_random_factor: float = 1.5,
                 max_retransmit: int = 4, time_scale: float = 1.0, seed: int | None = None,
                 prefix: str = "crash"):
        self.target = target
        self.interval = interval
        self.ack_timeout, self.ack_random_factor = ack_timeout, ack_random_factor
        self.max_retransmit = max_retransmit
        self.time_scale = time_scale
        self.random = random.Random(seed)
        family = socket.AF_INET6 if ":" in target[0] else socket.AF_INET
        self.head = request_options("data", 50) + b"\xff"
        width = max(5, len(str(devices - 1)))
        self.devices: list[Device] = []
        self._by_fd: dict[int, Device] = {}
        self._selector = selectors.DefaultSelector()
        for i in range(devices):
            sock = socket.socket(family, socket.SOCK_DGRAM)
            sock.setblocking(False)
            sock.connect(target)
            device = Device(i, f"{prefix}-{i:0{width}d}", sock, self.random.getrandbits(16))
            self.devices.append(device)
            self._by_fd[sock.fileno()] = device
            self._selector.register(sock, selectors.EVENT_READ)
        self._token = self.random.getrandbits(32)
        self._timers: list = []  # (when, serial, device, timer number, what)
        self._serial = 0
        self._draining = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.codes: Counter = Counter()
        self.errors: Counter = Counter()
        self.latencies: list[float] = []
        self.transmissions = 0
        self.separate_responses = 0
        self.unmatched = 0

    # -- control, from another thread

    def start(self) -> DeviceFleet:
        self._thread = threading.Thread(target=self.run, name="device-fleet", daemon=True)
        self._thread.start()
        return self

    def finish(self) -> None:
        """Send no new readings: each device still gets its current one
        acknowledged, then is :attr:`idle`."""
        self._draining.set()

    @property
    def idle(self) -> bool:
        """Whether every device has finished (after :meth:`finish`)."""
        return all(d.idle for d in self.devices)

    def drain(self, timeout: float) -> bool:
        """:meth:`finish`, and wait until :attr:`idle` (True) or *timeout*
        passed (False). The fleet stops."""
        self.finish()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self.idle:
            time.sleep(0.05)
        done = self.idle
        self.stop()
        return done

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
        for device in self.devices:
            try:
                self._selector.unregister(device.sock)
            except (KeyError, ValueError):
                pass
            device.sock.close()

    # -- what was done

    @property
    def acknowledged(self) -> dict[str, list[int]]:
        return {d.name: list(d.acknowledged) for d in self.devices}

    def summary(self) -> dict:
        lat = sorted(self.latencies)

        def pct(p: float):
            return round(lat[min(len(lat) - 1, int(p / 100 * len(lat)))] * 1000, 1) if lat else None
        return {
            "devices": len(self.devices),
            "acknowledged": sum(len(d.acknowledged) for d in self.devices),
            "transmissions": self.transmissions,
            "retransmissions": sum(d.retransmissions for d in self.devices),
            "gave_up": sum(d.gave_up for d in self.devices),
            "separate_responses": self.separate_responses,
            "codes": dict(sorted(self.codes.items())),
            "errors": dict(sorted(self.errors.items())),
            "unmatched": self.unmatched,
            "latency_ms": {"p50": pct(50), "p99": pct(99),
                           "max": round(lat[-1] * 1000, 1) if lat else None},
        }

    # -- the loop

    def _schedule(self, device: Device, delay: float, what: str) -> None:
        self._serial += 1
        heapq.heappush(self._timers, (time.monotonic() + delay, self._serial, device,
                                      device.timer, what))

    def _payload(self, device: Device) -> bytes:
        value = 20 + (device.index * 7 + device.seq) % 100 / 10
        return (b'{"id":"%s","seq":%d,"data":{"n":%d,"t":%s}}'
                % (device.name.encode(), device.seq, device.seq, repr(value).encode()))

    def _new_message(self, device: Device) -> None:
        """Send the current reading as a new confirmable message."""
        device.mid = (device.mid + 1) & 0xFFFF
        self._token = (self._token + 1) & 0xFFFFFFFF
        token = self._token.to_bytes(4, "big")
        device.tokens.add(token)
        device.datagram = header(CON, POST, device.mid, token) + self.head + self._payload(device)
        device.attempt = 0
        device.waiting_separate = False
        device.timeout = self.ack_timeout * (1 + (self.ack_random_factor - 1) * self.random.random())
        device.timer += 1
        self._send(device)
        self._schedule(device, device.timeout, "retransmit")

    def _next_reading(self, device: Device) -> None:
        if self._draining.is_set():
            device.idle = True
            return
        device.tokens = set()
        device.first_sent = time.monotonic()
        self._new_message(device)

    def _send(self, device: Device) -> None:
        self.transmissions += 1
        try:
            device.sock.send(device.datagram)
        except (BlockingIOError, ConnectionRefusedError):
            pass  # as if lost on the way: the retransmission covers it

    def _expired(self, device: Device, what: str) -> None:
        if what == "next":
            self._next_reading(device)
        elif what == "again":
            self._new_message(device)
        elif device.waiting_separate or device.attempt >= self.max_retransmit:
            device.gave_up += 1
            self._new_message(device)
        else:
            device.attempt += 1
            device.retransmissions += 1
            device.timeout *= 2
            device.timer += 1
            self._send(device)
            self._schedule(device, device.timeout, "retransmit")

    def _received(self, device: Device, data: bytes) -> None:
        try:
            message = parse(data)
        except MalformedMessage:
            self.errors["malformed response"] += 1
            return
        if message.mtype == CON:
            # A separate response: acknowledge it, whatever it answers.
            try:
                device.sock.send(bytes([0x60, 0]) + message.mid.to_bytes(2, "big"))
            except (BlockingIOError, ConnectionRefusedError):
                pass
        if message.code == 0:
            if message.mtype == ACK and message.mid == device.mid and not device.waiting_separate \
                    and not device.idle and device.datagram:
                # Empty ACK: the answer comes separately; wait as long as
                # the retransmissions would have taken.
                device.waiting_separate = True
                device.timer += 1
                span = self.ack_timeout * self.ack_random_factor * (2 ** (self.max_retransmit + 1))
                self._schedule(device, span, "retransmit")
            return
        if message.token not in device.tokens or device.idle or not device.tokens:
            self.unmatched += 1  # an answer to a reading already acknowledged
            return
        if message.mtype == CON:
            self.separate_responses += 1
        code = f"{message.code >> 5}.{message.code & 0x1F:02d}"
        self.codes[code] += 1
        device.timer += 1
        if message.code == CHANGED:
            device.acknowledged.append(device.seq)
            self.latencies.append(time.monotonic() - device.first_sent)
            device.seq += 1
            device.tokens = set()
            self._schedule(device, self.interval, "next")
        elif message.code in (SERVICE_UNAVAILABLE, TOO_MANY_REQUESTS):
            max_age = message.option(MAX_AGE, 60)
            self._schedule(device, max_age * self.time_scale, "again")
        else:
            self.errors[code] += 1
            self._schedule(device, self.interval, "again")

    def run(self) -> None:
        for device in self.devices:
            # Spread the first readings over one interval.
            device.first_sent = time.monotonic()
            self._schedule(device, self.random.random() * max(self.interval, 0.01), "start")
        while not self._stop.is_set():
            now = time.monotonic()
            while self._timers and self._timers[0][0] <= now:
                _, _, device, timer, what = heapq.heappop(self._timers)
                if what == "start":
                    self._next_reading(device)
                elif timer == device.timer:
                    self._expired(device, what)
            wait = 0.05
            if self._timers:
                wait = max(0.0, min(wait, self._timers[0][0] - time.monotonic()))
            for key, _ in self._selector.select(wait):
                device = self._by_fd[key.fileobj.fileno()]
                while True:
                    try:
                        data = device.sock.recv(2048)
                    except (BlockingIOError, InterruptedError):
                        break
                    except ConnectionRefusedError:
                        continue
                    self._received(device, data)
