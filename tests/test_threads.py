"""The service every component runs its blocking work on (sense_gateway.threads)."""

from __future__ import annotations

import threading

from twisted.internet import defer, reactor, threads
from twisted.trial.unittest import TestCase

from sense_gateway.threads import BlockingThreads, Unavailable


class BlockingThreadsTests(TestCase):
    def start(self, **options) -> BlockingThreads:
        service = BlockingThreads("sense-test", reactor, **options)
        service.startService()
        self.addCleanup(service.stopService)
        return service

    @defer.inlineCallbacks
    def test_calls_run_on_a_thread_of_their_own_not_the_reactors_nor_its_pool(self):
        service = self.start()
        reactor_thread = threading.get_ident()
        ran_on = yield service.run(threading.get_ident)
        pool_thread = yield threads.deferToThread(threading.get_ident)
        self.assertNotEqual(ran_on, reactor_thread)
        self.assertNotEqual(ran_on, pool_thread)

    @defer.inlineCallbacks
    def test_one_thread_runs_every_call_in_order(self):
        service = self.start()
        seen = []
        yield defer.gatherResults([
            service.run(lambda i=i: seen.append((i, threading.get_ident()))) for i in range(50)])
        self.assertEqual([i for i, _ in seen], list(range(50)))
        self.assertEqual(len({thread for _, thread in seen}), 1)

    @defer.inlineCallbacks
    def test_results_and_errors_come_back_with_keyword_arguments(self):
        service = self.start()
        self.assertEqual((yield service.run(int, "ff", base=16)), 255)
        yield self.assertFailure(service.run(int, "nope"), ValueError)

    @defer.inlineCallbacks
    def test_a_bounded_pool_runs_calls_side_by_side(self):
        service = self.start(threads=2)
        both = threading.Barrier(2, timeout=10)
        # Each call waits for the other: only two threads let both return.
        yield defer.gatherResults([service.run(both.wait), service.run(both.wait)])

    @defer.inlineCallbacks
    def test_after_stop_calls_fail_with_unavailable_naming_the_service(self):
        service = self.start(max_age=7)
        yield service.stopService()
        error = yield self.assertFailure(service.run(lambda: None), Unavailable)
        self.assertEqual((error.diagnostic, error.max_age), ("sense-test stopped", 7))

    @defer.inlineCallbacks
    def test_before_start_calls_fail_with_the_given_refusal(self):
        service = BlockingThreads("sense-test", reactor, refusal="queue stopped")
        error = yield self.assertFailure(service.run(lambda: None), Unavailable)
        self.assertEqual(error.diagnostic, "queue stopped")

    @defer.inlineCallbacks
    def test_stop_waits_for_running_work_runs_close_last_and_joins_the_thread(self):
        order = []
        service = self.start(close=lambda: order.append(("close", threading.current_thread())))
        release = threading.Event()

        def slow():
            release.wait(10)
            order.append(("slow", threading.current_thread()))
        running = service.run(slow)
        queued = service.run(lambda: order.append(("queued", threading.current_thread())))
        stopped = service.stopService()
        # Refused from the moment stopping begins, while the others still run.
        yield self.assertFailure(service.run(lambda: None), Unavailable)
        yield threads.deferToThread(lambda: None)  # a turn or two of the reactor
        self.assertNoResult(stopped)
        release.set()
        yield defer.gatherResults([running, queued])
        yield stopped
        self.assertEqual([what for what, _ in order], ["slow", "queued", "close"])
        [thread] = {thread for _, thread in order}
        self.assertFalse(thread.is_alive())

    @defer.inlineCallbacks
    def test_stop_never_blocks_the_reactor_while_a_call_runs(self):
        service = self.start(threads=2)
        release = threading.Event()
        running = service.run(release.wait, 5)
        stopped = service.stopService()
        # The reactor still turns (a join here would hold it until the wait
        # times out), and the stop waits for the call.
        yield threads.deferToThread(lambda: None)
        self.assertNoResult(stopped)
        release.set()
        self.assertTrue((yield running))
        yield stopped
