"""The load generator: many CoAP requests in flight over raw UDP sockets.

One thread runs a ``selectors`` loop over non-blocking, connected UDP
sockets. Requests are either kept ``window`` in flight (closed loop: a new
one leaves as soon as one finishes) or sent at a fixed ``rate`` (open
loop: the schedule does not wait for answers, so queueing in the server
shows up as latency). Confirmable requests are retransmitted as RFC 7252
4.2 says (ACK_TIMEOUT, ACK_RANDOM_FACTOR, doubling, MAX_RETRANSMIT); one
with no answer after the last retransmission's timeout is lost. A
non-confirmable request is lost when no response came within
``non_timeout``.

Latency runs from a request's first transmission to its response (the
piggybacked one, or the separate response after an empty ACK).
"""

from __future__ import annotations

import heapq
import os
import random
import selectors
import socket
import time
from collections import Counter
from dataclasses import dataclass, field

from sense_gateway.bench.workload import ACK, CON, NON, POST, RST, Workload, header


@dataclass
class LoadSettings:
    host: str = "::1"
    port: int = 5683
    workload: Workload = field(default_factory=Workload)
    #: closed loop: requests in flight (ignored when ``rate`` is set)
    window: int = 64
    #: open loop: requests per second
    rate: float | None = None
    duration: float | None = 10.0
    #: stop after this many requests (with or without ``duration``)
    count: int | None = None
    confirmable: bool = True
    ack_timeout: float = 2.0
    ack_random_factor: float = 1.5
    max_retransmit: int = 4
    non_timeout: float = 5.0
    #: source ports; device i always sends from socket i % sockets. Each
    #: has its own message ids: one socket reuses an id after 65,536
    #: requests, which a server still remembering the old exchange answers
    #: with the old response (RFC 7252 4.5), so fast runs need several.
    sockets: int = 32
    #: first sequence number of every device
    first_seq: int = 1
    seed: int | None = None


@dataclass
class LoadResult:
    sent: int = 0
    transmissions: int = 0
    retransmissions: int = 0
    #: requests that got their final response
    answered: int = 0
    lost: int = 0
    codes: Counter = field(default_factory=Counter)
    #: how many requests needed n retransmissions (answered or not)
    retransmission_histogram: Counter = field(default_factory=Counter)
    empty_acks: int = 0
    duplicate_responses: int = 0
    unexpected: int = 0
    #: open loop: transmissions that left later than 1 ms after their time
    late_sends: int = 0
    #: requests sent with a message id its socket had used before in this
    #: run (more than 65,536 from one socket): see ``LoadSettings.sockets``
    mid_reuses: int = 0
    elapsed: float = 0.0
    latencies: list = field(default_factory=list)

    @property
    def ok(self) -> int:
        return sum(n for code, n in self.codes.items() if code.startswith("2."))

    def summary(self) -> dict:
        lat = sorted(self.latencies)

        def pct(p: float) -> float | None:
            if not lat:
                return None
            return round(lat[min(len(lat) - 1, int(p / 100 * len(lat)))] * 1000, 3)

        elapsed = self.elapsed or 1e-9
        return {
            "sent": self.sent,
            "transmissions": self.transmissions,
            "retransmissions": self.retransmissions,
            "answered": self.answered,
            "ok": self.ok,
            "lost": self.lost,
            "codes": dict(sorted(self.codes.items())),
            "retransmitted": {str(k): v for k, v in sorted(self.retransmission_histogram.items())},
            "empty_acks": self.empty_acks,
            "duplicate_responses": self.duplicate_responses,
            "unexpected": self.unexpected,
            "late_sends": self.late_sends,
            "mid_reuses": self.mid_reuses,
            "elapsed_s": round(self.elapsed, 4),
            "rate": round(self.answered / elapsed, 1),
            "ok_rate": round(self.ok / elapsed, 1),
            "latency_ms": {"p50": pct(50), "p90": pct(90), "p99": pct(99),
                           "max": round(lat[-1] * 1000, 3) if lat else None},
        }


def _code_text(code: int) -> str:
    return f"{code >> 5}.{code & 0x1F:02d}"


class _Pending:
    __slots__ = ("token", "mid", "sock", "datagram", "first", "attempt", "timeout", "acked",
                 "scheduled")

    def __init__(self, token, mid, sock, datagram, first, timeout, scheduled):
        #: mid is (socket number, message id): message ids are per endpoint
        self.token, self.mid, self.sock, self.datagram = token, mid, sock, datagram
        self.first, self.attempt, self.timeout = first, 0, timeout
        self.acked = False
        self.scheduled = scheduled


class LoadGenerator:
    """Runs one load against one server; :meth:`run` blocks until done."""

    def __init__(self, settings: LoadSettings, progress=None, sample=None, sample_every=0.5):
        """*progress(done, elapsed)* and *sample()* are called about every
        *sample_every* seconds from the loop (progress bar, server RSS)."""
        self.s = settings
        self.progress = progress
        self.sample = sample
        self.sample_every = sample_every
        self.result = LoadResult()
        self.random = random.Random(settings.seed)

    def _sockets(self) -> list[socket.socket]:
        info = socket.getaddrinfo(self.s.host, self.s.port, type=socket.SOCK_DGRAM)[0]
        count = self.s.workload.devices if self.s.workload.format == "text" else self.s.sockets
        out = []
        for _ in range(max(1, min(count, self.s.workload.devices))):
            sock = socket.socket(info[0], socket.SOCK_DGRAM)
            sock.setblocking(False)
            for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
                try:
                    sock.setsockopt(socket.SOL_SOCKET, option, 4 << 20)
                except OSError:
                    pass
            sock.connect(info[4])
            out.append(sock)
        return out

    def run(self) -> LoadResult:
        s, r = self.s, self.result
        sockets = self._sockets()
        selector = selectors.DefaultSelector()
        for sock in sockets:
            selector.register(sock, selectors.EVENT_READ)
        builders = s.workload.builders()
        ndev = len(builders)
        # text devices are named by their source address: device i is socket i
        text = s.workload.format == "text"
        seqs = [s.first_seq] * ndev
        by_token: dict[bytes, _Pending] = {}
        by_mid: dict[tuple[int, int], _Pending] = {}
        timers: list = []  # (deadline, serial, pending, attempt)
        mtype = CON if s.confirmable else NON
        latencies = r.latencies
        codes = r.codes
        rand = self.random.random
        perf = time.perf_counter
        token_counter = self.random.getrandbits(32)
        mid_counters = [self.random.getrandbits(16) for _ in sockets]
        sent_on = [0] * len(sockets)
        socket_number = {sock.fileno(): n for n, sock in enumerate(sockets)}
        serial = 0
        next_device = 0
        outstanding = 0  # requests without their final answer
        limit_inflight = 60000  # message ids are 16 bits

        start = perf()
        end_time = start + s.duration if s.duration else None
        interval = 1.0 / s.rate if s.rate else 0.0
        next_send = start
        next_sample = start
        sending = True

        def finish(p: _Pending, now: float, code: int | None) -> None:
            nonlocal outstanding
            del by_token[p.token]
            by_mid.pop(p.mid, None)
            outstanding -= 1
            r.retransmission_histogram[p.attempt] += 1
            if code is None:
                r.lost += 1
            else:
                r.answered += 1
                latencies.append(now - p.first)
                codes[_code_text(code) if code >= 0 else "RST"] += 1

        def send_one(now: float, scheduled: float) -> None:
            nonlocal token_counter, next_device, outstanding, serial
            device = next_device
            next_device = (next_device + 1) % ndev
            seq = seqs[device]
            seqs[device] = (seq + 1) & 0xFFFFFFFF
            token_counter = (token_counter + 1) & 0xFFFFFFFF
            n = device % len(sockets)
            mid = mid_counters[n] = (mid_counters[n] + 1) & 0xFFFF
            sent_on[n] += 1
            token = token_counter.to_bytes(4, "big")
            datagram = header(mtype, POST, mid, token) + builders[device](seq)
            sock = sockets[n]
            if s.confirmable:
                timeout = s.ack_timeout * (1 + (s.ack_random_factor - 1) * rand())
            else:
                timeout = s.non_timeout
            p = _Pending(token, (n, mid), sock, datagram, now, timeout, scheduled)
            by_token[token] = p
            if s.confirmable:
                by_mid[n, mid] = p
            outstanding += 1
            r.sent += 1
            r.transmissions += 1
            serial += 1
            heapq.heappush(timers, (now + timeout, serial, p, 0))
            try:
                sock.send(datagram)
            except (BlockingIOError, ConnectionRefusedError):
                pass  # as if lost on the way: the retransmission covers it

        while True:
            now = perf()
            if sending:
                if (end_time is not None and now >= end_time) or (
                        s.count is not None and r.sent >= s.count):
                    sending = False
                elif s.rate:
                    behind = 0
                    while next_send <= now and outstanding < limit_inflight and behind < 256:
                        if now - next_send > 0.001:
                            r.late_sends += 1
                        send_one(now, next_send)
                        next_send += interval
                        behind += 1
                        if s.count is not None and r.sent >= s.count:
                            break
                else:
                    while outstanding < s.window:
                        send_one(now, now)
                        if s.count is not None and r.sent >= s.count:
                            break
            if not sending and outstanding == 0:
                break
            # expire timers
            while timers and timers[0][0] <= now:
                _, _, p, attempt = heapq.heappop(timers)
                if by_token.get(p.token) is not p or p.attempt != attempt:
                    continue  # answered, or an older timer of a retransmitted one
                if p.acked:
                    # An empty ACK came; the separate response did not.
                    # Wait as long as a whole exchange may take, then give up.
                    finish(p, now, None)
                    continue
                if s.confirmable and p.attempt < s.max_retransmit:
                    p.attempt += 1
                    p.timeout *= 2
                    r.retransmissions += 1
                    r.transmissions += 1
                    serial += 1
                    heapq.heappush(timers, (now + p.timeout, serial, p, p.attempt))
                    try:
                        p.sock.send(p.datagram)
                    except (BlockingIOError, ConnectionRefusedError):
                        pass
                else:
                    finish(p, now, None)
            # how long may we wait for datagrams
            wait = 0.05
            if timers:
                wait = min(wait, timers[0][0] - now)
            if sending and s.rate:
                wait = min(wait, next_send - now)
            elif sending and outstanding < s.window:
                wait = 0
            events = selector.select(max(0.0, wait))
            now = perf()
            for key, _ in events:
                sock = key.fileobj
                while True:
                    try:
                        data = sock.recv(2048)
                    except (BlockingIOError, InterruptedError):
                        break
                    except ConnectionRefusedError:
                        break  # ICMP port unreachable: the server is not there
                    if len(data) < 4 or data[0] >> 6 != 1:
                        r.unexpected += 1
                        continue
                    t = (data[0] >> 4) & 3
                    tkl = data[0] & 0x0F
                    code = data[1]
                    if t == RST or (t == ACK and code == 0):
                        p = by_mid.get((socket_number[sock.fileno()],
                                        int.from_bytes(data[2:4], "big")))
                        if p is None:
                            r.duplicate_responses += 1
                        elif t == RST:
                            finish(p, now, -1)
                        elif not p.acked:
                            p.acked = True
                            r.empty_acks += 1
                            # a separate response may take up to the exchange lifetime;
                            # give it as long as the retransmissions would have had
                            serial += 1
                            heapq.heappush(timers, (now + s.ack_timeout * 2 ** (s.max_retransmit + 1),
                                                    serial, p, p.attempt))
                        continue
                    token = data[4:4 + tkl]
                    p = by_token.get(token)
                    if t == CON:
                        # a separate response: acknowledge it, whoever it is for
                        sock.send(bytes([0x60, 0]) + data[2:4])
                    if p is None:
                        r.duplicate_responses += 1
                        continue
                    finish(p, now, code)
            if now >= next_sample:
                next_sample = now + self.sample_every
                if self.progress is not None:
                    self.progress(r.answered + r.lost, now - start)
                if self.sample is not None:
                    self.sample()
        r.elapsed = perf() - start
        r.mid_reuses = max(0, max(sent_on) - 65536)
        for sock in sockets:
            selector.unregister(sock)
            sock.close()
        selector.close()
        if self.sample is not None:
            self.sample()
        return r


class RssSampler:
    """The peak resident memory of a process, sampled with psutil."""

    def __init__(self, pid: int | None):
        self.peak = None
        self.process = None
        if pid is None:
            return
        try:
            import psutil
        except ImportError:  # psutil comes with the bench extra
            return
        try:
            self.process = psutil.Process(pid)
        except psutil.Error:
            self.process = None

    def __call__(self) -> None:
        if self.process is None:
            return
        try:
            rss = self.process.memory_info().rss
        except Exception:
            return
        if self.peak is None or rss > self.peak:
            self.peak = rss

    @property
    def peak_mb(self) -> float | None:
        return None if self.peak is None else round(self.peak / 2**20, 1)


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
