"""``--workers N``: N ingest processes on the same CoAP ports, supervised.

The master process (the one twistd started) spawns each worker with
``reactor.spawnProcess`` as ``twistd -n sense-gateway --worker I`` with the
master's own options and environment, relays its log lines into its own
log (``worker I: ...``), starts a dead worker again (after 1 s, doubled up
to 30 s while it keeps dying young) and, on its own stop, sends every
worker SIGTERM (each drains like a single gateway does: new requests get
5.03, those taken are stored and answered) and waits for them, SIGKILL
after ``shutdown_timeout`` plus a margin. A worker whose master is gone
(SIGKILLed) stops by itself within a second.

Each worker binds the ports with ``SO_REUSEPORT``; the kernel spreads
peers over the sockets by a hash of the 4-tuple, so all datagrams of one
peer (one address and port) reach the same worker: its retransmission
memory and DTLS session stay in one process. See docs/workers.md.
"""

from __future__ import annotations

import os
import sys

from twisted.application.service import Service
from twisted.internet import defer, protocol
from twisted.logger import Logger

from sense_gateway.worker_reports import MAX_LINE, REPORT_FD, WorkerReports

log = Logger()

#: runs twistd in a child with this interpreter, whatever the install
TWISTD = "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"

#: seconds before a dead worker is started again: first, and at most
RESPAWN_FIRST, RESPAWN_MAX = 1.0, 30.0
#: a worker that lived this long died of something new: start it again soon
YOUNG = 10.0


class WorkersDown(Exception):
    """Fewer ingest workers run than ``--workers`` asks for."""


class _WorkerProtocol(protocol.ProcessProtocol):
    def __init__(self, supervisor: WorkerSupervisor, index: int):
        self.supervisor = supervisor
        self.index = index
        self.pid = None
        #: the unfinished last line of each of the child's pipes
        self._partial: dict[int, bytes] = {}

    def connectionMade(self) -> None:
        self.pid = self.transport.pid
        self.transport.closeStdin()

    def childDataReceived(self, fd: int, data: bytes) -> None:
        *lines, partial = (self._partial.get(fd, b"") + data).split(b"\n")
        # A line without end in sight is cut (bounded memory): a log line
        # is logged in pieces, a report is dropped.
        if len(partial) > MAX_LINE:
            if fd != REPORT_FD:
                lines.append(partial)
            partial = b""
        self._partial[fd] = partial
        for line in lines:
            self._line(fd, line)

    def _line(self, fd: int, line: bytes) -> None:
        if fd == REPORT_FD:
            if len(line) <= MAX_LINE:
                self.supervisor.reports.reported(self.index, line)
            return
        stamp, _, rest = line.partition(b" ")
        # Our own log line has a time stamp: the worker's goes.
        text = rest if stamp[:2] == b"20" and rest else line
        log.info("worker {index}: {line}", index=self.index,
                 line=text.decode(errors="replace").rstrip())

    def processEnded(self, reason) -> None:
        # Its last words (a traceback's last line, say) end without a newline.
        for fd, partial in sorted(self._partial.items()):
            if partial and fd != REPORT_FD:
                self._line(fd, partial)
        self._partial.clear()
        self.supervisor.ended(self, reason.value)


class WorkerSupervisor(Service):
    """Keeps *count* workers running; ``args(index)`` is a worker's
    command line after ``twistd``."""

    def __init__(self, reactor, count: int, args, stop_timeout: float):
        self.reactor = reactor
        self.count = count
        self.args = args
        self.stop_timeout = stop_timeout
        #: the running workers by index
        self.workers: dict[int, _WorkerProtocol] = {}
        #: how many times each worker was started
        self.starts = dict.fromkeys(range(count), 0)
        self._delay = dict.fromkeys(range(count), RESPAWN_FIRST)
        self._born: dict[int, float] = {}
        self._respawns: dict[int, object] = {}
        self._all_ended: defer.Deferred | None = None
        #: the workers' CoAP counters, from their report pipes
        self.reports = WorkerReports()

    def startService(self) -> None:
        super().startService()
        for index in range(self.count):
            self._spawn(index)

    def _spawn(self, index: int) -> None:
        self._respawns.pop(index, None)
        if not self.running:
            return
        worker = _WorkerProtocol(self, index)
        self._born[index] = self.reactor.seconds()
        try:
            self.reactor.spawnProcess(worker, sys.executable,
                                      [sys.executable, "-c", TWISTD, *self.args(index)],
                                      env=dict(os.environ),
                                      childFDs={0: "w", 1: "r", 2: "r", REPORT_FD: "r"})
        except OSError as e:
            # No process at all (out of file descriptors, of processes):
            # nothing will end, so nothing would start it again.
            self._again(index, f"not started: {e}")
            return
        self.workers[index] = worker
        self.starts[index] += 1
        log.info("worker {index} started, pid {pid}", index=index, pid=worker.pid)

    def state(self) -> dict:
        """For ``/api/stats`` and ``/metrics``: workers asked for, running,
        and how many times each was started."""
        return {"configured": self.count, "running": len(self.workers),
                "starts": {str(i): n for i, n in self.starts.items()}}

    def check(self) -> defer.Deferred:
        """Fails (for ``/healthz``) while a worker is down."""
        missing = sorted(set(range(self.count)) - set(self.workers))
        if missing and self.running:
            return defer.fail(WorkersDown(
                f"{len(self.workers)} of {self.count} running; down: "
                + ", ".join(map(str, missing))))
        return defer.succeed(None)

    def ended(self, worker: _WorkerProtocol, reason) -> None:
        if self.workers.get(worker.index) is worker:
            del self.workers[worker.index]
        self.reports.ended(worker.index)
        if not self.running:
            if not self.workers and self._all_ended is not None:
                self._all_ended.callback(None)
            return
        self._again(worker.index, f"(pid {worker.pid}) ended: {reason}")

    def _again(self, index: int, what: str) -> None:
        """Start worker *index* again, later and later while it dies young."""
        lived = self.reactor.seconds() - self._born[index]
        delay = RESPAWN_FIRST if lived >= YOUNG else self._delay[index]
        self._delay[index] = min(RESPAWN_MAX, delay * 2)
        log.warn("worker {index} {what}; starting it again in {delay} s",
                 index=index, what=what, delay=delay)
        self._respawns[index] = self.reactor.callLater(delay, self._spawn, index)

    def stopService(self):
        super().stopService()
        for call in self._respawns.values():
            call.cancel()
        self._respawns.clear()
        if not self.workers:
            return defer.succeed(None)
        self._all_ended = defer.Deferred()
        for worker in list(self.workers.values()):
            _signal(worker, "TERM")
        kill = self.reactor.callLater(self.stop_timeout, self._kill_the_rest)
        return self._all_ended.addBoth(lambda result: (kill.active() and kill.cancel(), result)[1])

    def _kill_the_rest(self) -> None:
        for worker in list(self.workers.values()):
            log.warn("worker {index} (pid {pid}) did not stop: SIGKILL", index=worker.index,
                     pid=worker.pid)
            _signal(worker, "KILL")


def _signal(worker: _WorkerProtocol, name: str) -> None:
    try:
        worker.transport.signalProcess(name)
    except Exception:  # ended meanwhile
        pass


class OrphanWatch(Service):
    """A worker whose master is gone stops: nobody would stop it else."""

    def __init__(self, reactor, interval: float = 1.0):
        self.reactor = reactor
        self.interval = interval
        self.parent_pid = os.getppid()
        self._call = None

    def startService(self) -> None:
        super().startService()
        self._call = self.reactor.callLater(self.interval, self._check)

    def _check(self) -> None:
        if os.getppid() != self.parent_pid:
            log.warn("master process gone: stopping")
            self.reactor.stop()
            return
        self._call = self.reactor.callLater(self.interval, self._check)

    def stopService(self):
        super().stopService()
        if self._call is not None and self._call.active():
            self._call.cancel()
