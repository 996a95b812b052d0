"""The workers' counters, carried to the master.

Each worker writes a JSON line every :data:`REPORT_INTERVAL` seconds (and
a last one once it has drained) to file descriptor :data:`REPORT_FD`, a
pipe the master opened when it spawned it: its message layers' counters,
its refusals and DTLS counters, its enqueue latency histogram, its
processor's outcomes and state. The master keeps the latest line of each
worker and, when a worker's process ends, adds its counters to what
earlier processes of that worker counted, so a worker's totals never go
backwards across restarts (what a SIGKILLed worker counted after its last
line, at most a quarter of a second's worth, is not counted). See
docs/workers.md.
"""

from __future__ import annotations

import os
import stat

import orjson
from twisted.application.service import Service
from twisted.logger import Logger

log = Logger()

#: the worker's end of the master's report pipe
REPORT_FD = 3
#: seconds between a worker's reports: often enough for a dashboard or a
#: benchmark timing the workers' processors, a few small lines a second
REPORT_INTERVAL = 0.25
#: a longer report line is garbage (a real one is a few hundred bytes)
MAX_LINE = 64 * 1024

#: values that are a state, not a count: of the running process only,
#: never carried over from a worker's earlier processes
GAUGES = {("coap", "exchanges"), ("security", "plain_ingest"),
          ("security", "credentialed_devices"), ("dtls", "sessions"), ("dtls", "handshakes"),
          ("processing", "problem"), ("processing", "running")}
#: never added up: the same in every worker (policy, credentials loaded,
#: the histogram's bucket bounds), the later value stands
SAME = {"plain_ingest", "credentialed_devices", "bounds"}


def _merge(into: dict, more: dict, parent: str = "", counters_only: bool = False) -> dict:
    """*into* plus *more*, key by key, in place: numbers and lists of
    numbers (histogram buckets) add up, nested tables merge; with
    *counters_only*, the :data:`GAUGES` of *more* are left out."""
    for key, value in more.items():
        if counters_only and (parent, key) in GAUGES:
            continue
        old = into.get(key)
        if isinstance(value, dict):
            into[key] = _merge(dict(old) if isinstance(old, dict) else {}, value, key,
                               counters_only)
        elif key in SAME or old is None or value is None or type(value) in (str, bool) or (
                isinstance(value, list) and len(value) != len(old)):
            into[key] = list(value) if isinstance(value, list) else value
        elif isinstance(value, list):
            into[key] = [a + b for a, b in zip(old, value)]
        else:
            into[key] = old + value
    return into


class WorkerReports:
    """The master's view of the workers' counters: per worker index, the
    totals of its earlier processes plus the latest report of the running
    one. Bounded: one table per worker index."""

    def __init__(self):
        self._latest: dict[int, dict] = {}
        self._earlier: dict[int, dict] = {}

    def reported(self, index: int, line: bytes) -> None:
        try:
            report = orjson.loads(line)
        except orjson.JSONDecodeError:
            log.warn("worker {index}: unreadable counter report dropped", index=index)
            return
        if isinstance(report, dict):
            self._latest[index] = report

    def ended(self, index: int) -> None:
        """Worker *index*'s process is gone: its counts join its earlier ones."""
        last = self._latest.pop(index, None)
        if last is not None:
            self._earlier[index] = _merge(self._earlier.get(index, {}), last,
                                          counters_only=True)

    def by_worker(self) -> dict[str, dict]:
        """Every worker that ever reported: ``{index: {"coap": ..., "security": ...,
        "latency": ...}}``, counters since the master started."""
        indexes = sorted(set(self._latest) | set(self._earlier))
        return {str(i): _merge(_merge({}, self._earlier.get(i, {})), self._latest.get(i, {}))
                for i in indexes}

    def summed(self) -> dict:
        """The same summed over the workers (what one process would show)."""
        total: dict = {}
        for report in self.by_worker().values():
            _merge(total, report)
        return total


class CounterReporter(Service):
    """In a worker: writes ``counters()`` as a JSON line to the report pipe
    every *interval* seconds and once more when it stops (after the
    drain). The pipe is non-blocking: while the master does not read, the
    rest of a line waits and newer reports are skipped (each one holds
    totals, so the next one says everything)."""

    def __init__(self, reactor, counters, fd: int = REPORT_FD,
                 interval: float = REPORT_INTERVAL):
        self.reactor, self.counters, self.fd, self.interval = reactor, counters, fd, interval
        self._pending = b""
        self._call = None

    @staticmethod
    def available(fd: int = REPORT_FD) -> bool:
        """Whether *fd* is a pipe (the master's); a worker started by hand has none."""
        try:
            return stat.S_ISFIFO(os.fstat(fd).st_mode)
        except OSError:
            return False

    def startService(self) -> None:
        super().startService()
        os.set_blocking(self.fd, False)
        self._call = self.reactor.callLater(self.interval, self._tick)

    def _tick(self) -> None:
        self._call = self.reactor.callLater(self.interval, self._tick)
        self.report()

    def report(self) -> None:
        try:
            if not self._pending:
                self._pending = orjson.dumps(self.counters()) + b"\n"
            written = os.write(self.fd, self._pending)
            self._pending = self._pending[written:]
        except BlockingIOError:
            pass
        except BrokenPipeError:
            self._pending = b""
            # The master is gone. OrphanWatch misses it when it was gone
            # before this worker looked at its parent: it stops here.
            if self.running:
                log.warn("master process gone: stopping")
                self.reactor.stop()
        except OSError:
            log.failure("counter report failed")
            self._pending = b""
        except Exception:
            # Called from callLater: one failure must not end the reports.
            log.failure("counter report failed")
            self._pending = b""

    def stopService(self):
        super().stopService()
        if self._call is not None and self._call.active():
            self._call.cancel()
        self.report()


def worker_report(gateway) -> dict:
    """What a worker reports: its CoAP counters (responses by code text),
    refusals and DTLS counters, its enqueue latency histogram, and its
    processor's outcomes and state (each as the worker has them)."""
    from sense_gateway.errors import code_text

    report = {}
    coap = gateway.coap_counters()
    if coap is not None:
        report["coap"] = {**coap, "responses": {code_text(c): n
                                                for c, n in coap["responses"].items()}}
    processor = gateway.worker
    if processor is not None:
        report["processor"] = processor.outcomes()
        report["processing"] = processor.state()
    security = gateway.security_counters()
    if security is not None:
        report["security"] = security
    if gateway.pipeline is not None:
        report["latency"] = gateway.pipeline.enqueue_latency.snapshot()
    return report
