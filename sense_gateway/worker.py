"""The in-process processor: drains the queue in batches, off the reactor.

Runs in roles ``all`` and ``processor``. Each round receives up to
``processor.batch_size`` messages, processes them on the worker's own
thread (registry and sinks block), deletes what was written or was a
duplicate (while the next batch, already received, is processed), and
settles the rest:

- a message a sink refused goes to the dead letters at once, with the
  server's message;
- a message that failed on its own (a lost race for its device, a sink's
  bug) goes back to the queue with an exponential delay (``retry_base``
  doubled per receive, at most ``retry_max``); after
  ``queue.max_receives`` receives it goes to the dead letters with its
  last reason;
- when a sink or the registry is unavailable (a server down, a full
  disk), the batch goes back without counting the receive (SQLite; SQS
  cannot), and the worker pauses: ``retry_base`` doubled per failed try,
  at most ``retry_max``, asking the sinks and the registry (``check``)
  before it receives again. The readings wait in the queue, bounded by
  ``queue.max_depth``, for as long as the outage lasts.

Starting (opening the registry and the sinks) is retried with the same
backoff until it succeeds, and so is a receive that fails (the queue's
server unreachable, its file damaged; one damaged shard of a sharded
queue holds back only its own messages).
:attr:`ProcessorService.problem` says why the worker is not processing,
for ``/healthz``. A failure to settle one
message (a release, a dead letter) is logged and counted; it never keeps
the round's deletes from being written. An empty queue is polled every
``processor.poll_interval`` seconds.

Every ``devices.sweep_interval`` seconds the worker also writes the state
of the devices that are late or offline to the sinks (one registry read
on the worker's thread, between batches; no timer per device), so a
device that went silent shows as such in InfluxDB too.
"""

from __future__ import annotations

from twisted.application.service import Service
from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.python.failure import Failure

from sense_gateway.errors import failure_text
from sense_gateway.limits import backoff
from sense_gateway.processor import BatchProcessor, Outcome, Result
from sense_gateway.registry import RegistryUnavailable
from sense_gateway.threads import BlockingThreads

log = Logger()
_WRITTEN = Outcome.WRITTEN


class ProcessorService(Service):
    def __init__(self, queue, make_processor, config, reactor, sweep: bool = True):
        """*make_processor* builds the :class:`BatchProcessor` on the worker
        thread, so its connections belong to that thread. With *sweep*
        false it leaves the liveness sweeps to another process."""
        self.queue = queue
        self.make_processor = make_processor
        self.batch_size = config.processor.batch_size
        self.poll_interval = config.processor.poll_interval
        self.retry_base = config.processor.retry_base
        self.retry_max = config.processor.retry_max
        self.sweep_interval = config.devices.sweep_interval if sweep else None
        self._sweeper: task.LoopingCall | None = None
        #: devices the last liveness sweep wrote as late or offline
        self.swept = 0
        self.reactor = reactor
        self.processor: BatchProcessor | None = None
        #: the worker's thread: opens, uses and (stopping, last) closes the processor
        self.threads = BlockingThreads("sense-processor", reactor, close=self._close)
        self._round: defer.Deferred | None = None
        self._sleep: defer.Deferred | None = None
        #: the deletes of the last batch, still being written
        self._settling: defer.Deferred | None = None
        self.counts = {outcome: 0 for outcome in Outcome}
        #: releases, dead letters and deletes the queue failed to make
        self.settle_failures = 0
        # why the worker is not processing now: starting failed, an outage
        self._problem: str | None = None
        # receives failed in a row, and why the last one did
        self._receive_failures = 0
        self._receive_problem: str | None = None
        #: failed tries in a row of the current outage (or of starting)
        self._failures = 0

    @property
    def problem(self) -> str | None:
        """Why the worker is not processing (all of its queue) now, for
        ``/healthz``; None while it is. Besides its own outages, a shard
        of its queue that cannot be received from."""
        shards_failing = getattr(self.queue, "receive_problem", None)
        return (self._problem or self._receive_problem
                or (shards_failing() if shards_failing else None))

    @problem.setter
    def problem(self, value: str | None) -> None:
        self._problem = value

    def startService(self) -> None:
        super().startService()
        self.threads.startService()
        self._round = self._start()
        self._round.addErrback(lambda f: log.failure("processor stopped", f))
        if self.sweep_interval is None:
            return
        self._sweeper = task.LoopingCall(self._sweep)
        self._sweeper.clock = self.reactor
        self._sweeper.start(self.sweep_interval, now=False).addErrback(
            lambda f: log.failure("liveness sweeps stopped", f))

    @defer.inlineCallbacks
    def _sweep(self):
        # Not while starting or in an outage: the sinks are down anyway.
        if self.processor is None or self._problem is not None:
            return
        try:
            self.swept = yield self._in_thread(self.processor.sweep)
        except Exception as e:
            # LoopingCall stops for good after one exception.
            log.warn("liveness sweep failed: {reason}", reason=f"{type(e).__name__}: {e}")

    def outcomes(self) -> dict[str, int]:
        """Messages processed so far, by outcome (``written``, ...)."""
        return {outcome.value: count for outcome, count in self.counts.items()}

    def state(self) -> dict:
        """Whether it processes (and why not), and its settle failures."""
        problem = self.problem
        return {"problem": problem, "running": 1 if problem is None else 0,
                "settle_failures": self.settle_failures}

    def _in_thread(self, function, *args):
        return self.threads.run(function, *args)

    def _close(self) -> None:
        if self.processor is not None:
            self.processor.close()

    def _open(self) -> None:
        processor = self.make_processor()
        try:
            processor.registry.check()
        except BaseException:
            processor.close()
            raise
        self.processor = processor

    def backoff(self, failures: int | None = None) -> float:
        """Seconds to wait after *failures* failed tries in a row (default:
        those of the current outage or start)."""
        failures = self._failures if failures is None else failures
        return backoff(self.retry_base, self.retry_max, failures)

    @defer.inlineCallbacks
    def _start(self):
        while self.running:
            try:
                yield self._in_thread(self._open)
            except Exception as e:
                self._failures += 1
                self.problem = f"not started: {type(e).__name__}: {e}"[:300]
                log.warn("processor could not start, trying again in {delay} s: {reason}",
                         delay=self.backoff(), reason=f"{type(e).__name__}: {e}")
                yield self._pause(self.backoff())
                continue
            self._failures = 0
            self.problem = None
            log.info("processor started: batches of {size}", size=self.batch_size)
            yield self._run()
            return

    def _pause(self, seconds: float) -> defer.Deferred:
        """Sleep *seconds*, cut short (firing None all the same) by a stop."""
        self._sleep = task.deferLater(self.reactor, seconds, lambda: None)

        def woken(result):
            self._sleep = None
            if isinstance(result, Failure) and result.check(defer.CancelledError):
                return None
            return result
        return self._sleep.addBoth(woken)

    @defer.inlineCallbacks
    def _run(self):
        # While one batch is processed on the worker's thread, the next is
        # already being received on the queue's, and the previous one's
        # deletes are written: the two threads overlap, and the processor
        # never waits for the queue when there is work. Batches are still
        # processed one at a time, in queue order.
        prefetched = None
        while self.running or prefetched is not None:
            probing = bool(self._failures) and prefetched is None
            if probing:
                # An outage: nothing is received until the sinks and the
                # registry answer again, so waiting messages keep their
                # receives.
                yield self._pause(self.backoff())
                if not self.running:
                    break
                try:
                    yield self._in_thread(self.processor.check)
                except Exception as e:
                    self._failures += 1
                    self.problem = f"unavailable: {type(e).__name__}: {e}"[:300]
                    continue
            try:
                if prefetched is not None:
                    messages, prefetched = (yield prefetched), None
                else:
                    messages = yield self.queue.receive(self.batch_size)
            except Exception as e:
                prefetched = None
                yield self._receive_failed(e)
                continue
            if self._receive_failures:
                log.info("receiving from the queue again after: {problem}",
                         problem=self._receive_problem)
                self._receive_failures, self._receive_problem = 0, None
            try:
                if probing and not messages:
                    # Everything answers and nothing waits to prove it:
                    # back to polling; the next batch shows what is left.
                    self._failures, self.problem = 0, None
                if (messages and len(messages) == self.batch_size and self.running
                        and not self._failures):
                    prefetched = self.queue.receive(self.batch_size)
                busy = yield self.process_messages(messages)
            except Exception:
                log.failure("processing round failed")
                busy = False
            if self._failures and prefetched is not None:
                # Received before the outage showed: back, uncounted.
                try:
                    messages, prefetched = (yield prefetched), None
                    yield self._settle_each(self.queue.postpone,
                                            [[m.receipt for m in messages], self._problem or ""])
                except Exception:
                    log.failure("giving a prefetched batch back failed")
                    prefetched = None
            if not busy and not self._failures and self.running:
                yield self._pause(self.poll_interval)
        yield self._settled()

    def _receive_failed(self, error: Exception) -> defer.Deferred:
        """A receive failed (the queue's server unreachable, its file
        damaged): say so in :attr:`problem`, log it once, and wait the
        backoff before the next try."""
        reason = failure_text(error)
        self._receive_failures += 1
        self._receive_problem = f"receiving failed: {reason}"[:300]
        if not self.running:
            return defer.succeed(None)  # stopping: no pause a stop would not cut short
        delay = self.backoff(self._receive_failures)
        if self._receive_failures == 1:
            log.warn("receiving from the queue failed, trying again in {delay} s (then "
                     "with the backoff, logged once): {reason}", delay=delay, reason=reason)
        return self._pause(delay)

    def process_round(self):
        """Receive, process, settle one batch; fires True if there was work."""
        return self.queue.receive(self.batch_size).addCallback(self.process_messages)

    @defer.inlineCallbacks
    def process_messages(self, messages):
        """Process one received batch. Fires True if there was work, once
        the batch is processed and settled but for its deletes, which may
        still be under way (see :attr:`_settling`) while the next batch's
        processing overlaps them."""
        if not messages:
            return False  # (a long-polling queue has already waited)
        envelopes = [m.envelope for m in messages]
        try:
            results = yield self._in_thread(self.processor.process_batch, envelopes)
        except RegistryUnavailable as e:
            results = [Result(Outcome.FAILED, str(e), True, True)] * len(messages)
        done, postponed, refused, failed = [], [], [], []
        outage = None
        counts = self.counts
        written = 0
        for message, result in zip(messages, results):
            outcome = result.outcome
            if outcome is _WRITTEN:
                # Nearly every message: no enum hashing, one count per batch.
                written += 1
                done.append(message.receipt)
                continue
            counts[outcome] += 1
            if outcome is Outcome.FAILED:
                if result.unavailable:
                    outage = result.reason
                    postponed.append(message.receipt)
                else:
                    log.info("{device} seq {seq} not written, retried: {reason}",
                             device=message.envelope.device, seq=message.envelope.seq,
                             reason=result.reason)
                    failed.append((message, result.reason))
            elif outcome is Outcome.REFUSED:
                log.warn("{device} seq {seq} refused, to the dead letters: {reason}",
                         device=message.envelope.device, seq=message.envelope.seq,
                         reason=result.reason)
                refused.append((message, result.reason))
            else:
                done.append(message.receipt)
        counts[Outcome.WRITTEN] += written
        if outage is not None:
            self._failures += 1
            self.problem = f"unavailable: {outage}"[:300]
            log.warn("{count} messages wait in the queue, trying again in {delay} s: {reason}",
                     count=len(postponed), delay=self.backoff(), reason=outage)
        elif self._failures:
            log.info("processing again after: {problem}", problem=self._problem)
            self._failures, self.problem = 0, None
        yield self._settled()
        # The deletes first: nothing that goes wrong settling the others
        # may keep written messages from being deleted.
        if done:
            self._settling = self.queue.delete(done)
            self._settling.addErrback(self._settle_failed, "deleting processed messages")
        if postponed:
            yield self._settle_each(self.queue.postpone, [postponed, outage])
        for message, reason in refused:
            yield self._settle_each(self.queue.dead_letter, [message.receipt, reason])
        for message, reason in failed:
            yield self._settle_each(self.queue.release,
                                    [message.receipt, reason, self._delay(message)])
        return True

    def _settle_each(self, operation, args) -> defer.Deferred:
        """*operation(*args)* on the queue; a failure is logged and counted."""
        return defer.maybeDeferred(operation, *args).addErrback(
            self._settle_failed, getattr(operation, "__name__", "settling"))

    def _settle_failed(self, failure, what: str) -> None:
        self.settle_failures += 1
        log.failure("{what} failed", failure, what=what)

    def _settled(self) -> defer.Deferred:
        """Fires when the last batch's deletes are written."""
        settling, self._settling = self._settling, None
        return settling if settling is not None else defer.succeed(None)

    def _delay(self, message) -> float:
        return self.backoff(message.receive_count)

    @defer.inlineCallbacks
    def stopService(self):
        super().stopService()
        if self._sweeper is not None and self._sweeper.running:
            self._sweeper.stop()
        if self._sleep is not None:
            self._sleep.cancel()
        try:
            if self._round is not None:
                # A round in progress finishes settling its batch first.
                yield self._round
        except Exception:
            log.failure("processor did not stop cleanly")
        finally:
            yield self.threads.stopService()
