"""The in-process processor: drains the queue in batches, off the reactor.

Runs in roles ``all`` and ``processor``. Each round receives up to
``processor.batch_size`` messages, processes them on the worker's own
thread (registry and sinks block), deletes what was written or was a
duplicate (while the next batch, already received, is processed), and gives failed messages back to the queue with an
exponential delay (``retry_base`` doubled per receive, at most
``retry_max``); after ``queue.max_receives`` receives they go to the dead
letters with their last reason. An empty queue is polled every
``processor.poll_interval`` seconds.
"""

from __future__ import annotations

import gc

from twisted.application.service import Service
from twisted.internet import defer, task
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from sense_gateway.processor import BatchProcessor, Outcome
from sense_gateway.registry import RegistryUnavailable

log = Logger()

#: The collector's first threshold while a processor runs. The processor
#: makes a dozen container objects per reading, most of them alive until
#: their batch is written: at Python's default (700) the collector ran
#: every few dozen readings and kept scanning the batches in flight
#: (raising it took the processor from ~17,000 to ~23,000 readings/s in
#: ``sense bench --end-to-end --split``). Only reference cycles, rare
#: here, wait longer to be freed; reference counting frees the rest.
GC_THRESHOLD = 50_000


class ProcessorService(Service):
    def __init__(self, queue, make_processor, config, reactor):
        """*make_processor* builds the :class:`BatchProcessor` on the worker
        thread, so its connections belong to that thread."""
        self.queue = queue
        self.make_processor = make_processor
        self.batch_size = config.processor.batch_size
        self.poll_interval = config.processor.poll_interval
        self.retry_base = config.processor.retry_base
        self.retry_max = config.processor.retry_max
        self.reactor = reactor
        self.processor: BatchProcessor | None = None
        self._pool: ThreadPool | None = None
        self._round: defer.Deferred | None = None
        self._sleep: defer.Deferred | None = None
        #: the deletes of the last batch, still being written
        self._settling: defer.Deferred | None = None
        self.counts = {outcome: 0 for outcome in Outcome}
        self._gc_threshold = gc.get_threshold()

    def startService(self) -> None:
        super().startService()
        self._gc_threshold = gc.get_threshold()
        threshold, *older = self._gc_threshold
        if 0 < threshold < GC_THRESHOLD:
            gc.set_threshold(GC_THRESHOLD, *older)
        # What exists by now (modules, configuration) lives as long as the
        # process: the collector need not scan it again.
        gc.freeze()
        self._pool = ThreadPool(1, 1, name="sense-processor")
        self._pool.start()
        self._round = self._in_thread(self._open).addCallback(lambda _: self._run())
        self._round.addErrback(lambda f: log.failure("processor could not start", f))

    def _in_thread(self, function, *args):
        return deferToThreadPool(self.reactor, self._pool, function, *args)

    def _open(self) -> None:
        self.processor = self.make_processor()

    @defer.inlineCallbacks
    def _run(self):
        # While one batch is processed on the worker's thread, the next is
        # already being received on the queue's, and the previous one's
        # deletes are written: the two threads overlap, and the processor
        # never waits for the queue when there is work. Batches are still
        # processed one at a time, in queue order.
        prefetched = None
        while self.running or prefetched is not None:
            try:
                if prefetched is not None:
                    messages, prefetched = (yield prefetched), None
                else:
                    messages = yield self.queue.receive(self.batch_size)
                if messages and len(messages) == self.batch_size and self.running:
                    prefetched = self.queue.receive(self.batch_size)
                busy = yield self.process_messages(messages)
            except Exception:
                log.failure("processing round failed")
                busy = False
            if not busy and self.running:
                self._sleep = task.deferLater(self.reactor, self.poll_interval, lambda: None)
                try:
                    yield self._sleep
                except defer.CancelledError:
                    continue  # stopping: settle a prefetched batch, if any
                finally:
                    self._sleep = None
        yield self._settled()

    def process_round(self):
        """Receive, process, settle one batch; fires True if there was work."""
        return self.queue.receive(self.batch_size).addCallback(self.process_messages)

    @defer.inlineCallbacks
    def process_messages(self, messages):
        """Process one received batch. Fires True if there was work, once
        the batch is processed; its deletes may still be under way (see
        :attr:`_settling`), which the next batch's processing overlaps."""
        if not messages:
            return False  # (a long-polling queue has already waited)
        envelopes = [m.envelope for m in messages]
        try:
            results = yield self._in_thread(self.processor.process_batch, envelopes)
        except RegistryUnavailable as e:
            log.warn("registry unavailable, batch of {count} retried: {reason}",
                     count=len(messages), reason=str(e))
            yield self._settled()
            for message in messages:
                yield self.queue.release(message.receipt, str(e), self._delay(message))
            return False
        done = []
        failed = []
        for message, result in zip(messages, results):
            self.counts[result.outcome] += 1
            if result.outcome is Outcome.FAILED:
                log.info("{device} seq {seq} not written, retried: {reason}",
                         device=message.envelope.device, seq=message.envelope.seq,
                         reason=result.reason)
                failed.append((message, result.reason))
            else:
                done.append(message.receipt)
        yield self._settled()
        for message, reason in failed:
            yield self.queue.release(message.receipt, reason, self._delay(message))
        if done:
            self._settling = self.queue.delete(done)
            self._settling.addErrback(lambda f: log.failure("deleting processed messages failed", f))
        return True

    def _settled(self) -> defer.Deferred:
        """Fires when the last batch's deletes are written."""
        settling, self._settling = self._settling, None
        return settling if settling is not None else defer.succeed(None)

    def _delay(self, message) -> float:
        return min(self.retry_max, self.retry_base * 2 ** (message.receive_count - 1))

    @defer.inlineCallbacks
    def stopService(self):
        super().stopService()
        if self._sleep is not None:
            self._sleep.cancel()
        try:
            if self._round is not None:
                # A round in progress finishes settling its batch first.
                yield self._round
            if self.processor is not None:
                yield self._in_thread(self.processor.close)
        except Exception:
            log.failure("processor did not stop cleanly")
        finally:
            self._pool.stop()
            gc.set_threshold(*self._gc_threshold)
            gc.unfreeze()
