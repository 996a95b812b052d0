"""How many envelopes per second the SQLite queue commits, with group commit
and with one transaction per put, side by side.

A closed-loop load like devices waiting for their ACK: CONCURRENCY puts are
outstanding at any time, and each one that fires (committed) is replaced by
a new one, for SECONDS per run. Both modes go through the same
:class:`SQLiteQueue`; "one transaction per put" is ``max_batch = 1``, which
still starts the next transaction the instant the previous one commits, so
it is the best case for that design, not a strawman. Each cell is the
median of RUNS runs on a fresh file, for ``synchronous`` full and normal.

    .venv/bin/python benchmarks/queue_put.py [--seconds 1] [--runs 5]
        [--concurrency 256] [--dir DIRECTORY]

Use ``--dir`` to put the queue file on the disk the gateway will use; the
numbers are about that disk's fsync as much as about the code.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from twisted.internet import defer, task

from sense_gateway.envelope import Envelope, Reading, new_envelope_id
from sense_gateway.queues.sqlite import SQLiteQueue

MODES = {"group commit": 2000, "one transaction per put": 1}


def sample_envelopes(count: int) -> list[Envelope]:
    """Envelopes of the size the SENSE JSON format produces (one reading)."""
    return [Envelope(new_envelope_id(), f"node-{i % 50}", i, 1764300000.0 + i, "[2001:db8::7]:5683",
                     "coap", None, "/data", 50,
                     [Reading({"temperature": 21.5 + i % 10, "humidity": 40.0}, 1764300000.0 + i)])
            for i in range(count)]


@defer.inlineCallbacks
def one_run(reactor, directory: Path, synchronous: str, max_batch: int, seconds: float,
            concurrency: int, envelopes: list[Envelope]):
    """Fire with (envelopes committed per second, envelopes per transaction)."""
    queue = SQLiteQueue(directory / "queue.sqlite3", reactor, synchronous=synchronous,
                        max_batch=max_batch, max_pending=concurrency * 2)
    queue.startService()
    yield queue.depth()  # the store is open: do not time the schema creation
    committed = 0
    deadline = time.perf_counter() + seconds
    done = defer.Deferred()
    outstanding = 0

    def issue(i: int) -> None:
        nonlocal outstanding
        outstanding += 1
        queue.put([envelopes[i % len(envelopes)]]).addCallbacks(acked, failed, (i,))

    def acked(_, i: int) -> None:
        nonlocal committed, outstanding
        committed += 1
        outstanding -= 1
        if time.perf_counter() < deadline:
            issue(i + concurrency)
        elif outstanding == 0:
            done.callback(None)

    def failed(failure) -> None:
        if not done.called:
            done.errback(failure)

    start = time.perf_counter()
    for i in range(concurrency):
        issue(i)
    yield done
    elapsed = time.perf_counter() - start
    transactions = queue.transactions
    yield queue.stopService()
    return committed / elapsed, committed / max(transactions, 1)


@defer.inlineCallbacks
def main(reactor, options):
    envelopes = sample_envelopes(1000)
    print(f"closed loop, {options.concurrency} puts outstanding, {options.seconds:g} s per run, "
          f"median of {options.runs} runs, one envelope per put")
    rows = []
    for synchronous in ("full", "normal"):
        for mode, max_batch in MODES.items():
            rates, sizes = [], []
            for _ in range(options.runs):
                directory = Path(tempfile.mkdtemp(prefix="sense-queue-bench-", dir=options.dir))
                try:
                    rate, size = yield one_run(reactor, directory, synchronous, max_batch,
                                               options.seconds, options.concurrency, envelopes)
                finally:
                    shutil.rmtree(directory, ignore_errors=True)
                rates.append(rate)
                sizes.append(size)
            rows.append((synchronous, mode, statistics.median(rates), min(rates), max(rates),
                         statistics.median(sizes)))
    header = ("synchronous", "mode", "envelopes/s", "min", "max", "envelopes/txn")
    print()
    print(f"{header[0]:<12} {header[1]:<24} {header[2]:>12} {header[3]:>10} {header[4]:>10} "
          f"{header[5]:>14}")
    for synchronous, mode, median, low, high, size in rows:
        print(f"{synchronous:<12} {mode:<24} {median:>12,.0f} {low:>10,.0f} {high:>10,.0f} "
              f"{size:>14,.1f}")
    for synchronous in ("full", "normal"):
        group, single = [r[2] for r in rows if r[0] == synchronous]
        print(f"synchronous={synchronous}: group commit is {group / single:.1f}x "
              "one transaction per put")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.0)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument("--dir", default=None, help="where to create the queue files")
    task.react(main, [parser.parse_args()])
