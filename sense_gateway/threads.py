"""One way to run blocking work: :class:`BlockingThreads`, a service that
owns a dedicated thread (or a small bounded pool) and runs callables on it.

sqlite3, boto3 and the sinks' clients block; the reactor thread must not.
Each component that uses them (the SQLite queue, the SQS queue, the
processor, the web, the device directory) owns one of these, never the
reactor's own pool (DNS uses it). With one thread, calls run one after the
other in the order they were made, so a connection opened by the first
call is used by that thread only.

The rules, the same for every component:

- :meth:`~BlockingThreads.run` returns a Deferred that fires on the
  reactor's thread with the callable's result or failure;
- before start and from the moment stopping begins, ``run`` fails at
  once with :class:`~sense_gateway.errors.Unavailable` (never a Deferred
  that does not fire: a stopped Twisted pool drops work silently);
- stopping waits for every call already handed over, then runs *close*
  (if given) last on the same thread, then joins the threads::

      threads = BlockingThreads("sense-queue", reactor, close=store.close)
      threads.startService()
      rows = yield threads.run(store.receive, 100)
      yield threads.stopService()
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from sense_gateway.errors import Unavailable

__all__ = ["BlockingThreads", "Unavailable"]

log = Logger()


class BlockingThreads(Service):
    """A dedicated thread (or up to *threads*) for one component's blocking calls.

    *refusal* is the diagnostic of the :class:`Unavailable` a call gets
    while the service is not running (default ``"<name> stopped"``), with
    Max-Age *max_age*; *close* runs on the thread as the last call of a
    stop.
    """

    def __init__(self, name: str, reactor, *, threads: int = 1,
                 close: Callable[[], object] | None = None, refusal: str | None = None,
                 max_age: int = 5):
        if threads < 1:
            raise ValueError(f"threads must be at least 1, not {threads}")
        self.name = name
        self.reactor = reactor
        self.threads = threads
        self.close = close
        self.refusal = refusal or f"{name} stopped"
        self.max_age = max_age
        self._pool: ThreadPool | None = None
        self._accepting = False
        #: calls handed over and not yet answered
        self.busy = 0
        self._idle: list[Deferred[None]] = []

    def startService(self) -> None:
        super().startService()
        self._pool = ThreadPool(1, self.threads, name=self.name)
        self._pool.start()
        self._accepting = True

    def run(self, function: Callable, *args, **kwargs) -> Deferred:
        """*function(*args, **kwargs)* on this service's thread."""
        if not self._accepting:
            return fail(Unavailable(self.refusal, max_age=self.max_age))
        return self._hand_over(function, args, kwargs)

    def _hand_over(self, function, args, kwargs) -> Deferred:
        self.busy += 1
        answer: Deferred = Deferred()

        def done(outcome):
            try:
                # The caller's callbacks first: what they start is still
                # "running" for a stop that waits (or refused, if stopping).
                if isinstance(outcome, Failure):
                    answer.errback(outcome)
                else:
                    answer.callback(outcome)
            finally:
                self.busy -= 1
                if not self.busy:
                    idle, self._idle = self._idle, []
                    for d in idle:
                        d.callback(None)
        deferToThreadPool(self.reactor, self._pool, function, *args, **kwargs).addBoth(done)
        return answer

    def _until_idle(self) -> Deferred[None]:
        if not self.busy:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._idle.append(d)
        return d

    def stopService(self) -> Deferred[None]:
        """Refuse new calls, wait for those handed over, run *close*, join."""
        if not self.running:
            return succeed(None)
        super().stopService()
        self._accepting = False
        pool = self._pool

        def close(_: object) -> Deferred | None:
            if self.close is None:
                return None
            return self._hand_over(self.close, (), {}).addErrback(
                lambda f: log.failure("{name}: closing failed", f, name=self.name))

        def join(_: object) -> None:
            # Every thread is idle by now: the join does not wait.
            self._pool = None
            pool.stop()
        return self._until_idle().addCallback(close).addCallback(join)
