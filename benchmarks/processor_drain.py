"""One in-process drain of the processor into VictoriaMetrics: wall clock and CPU time.

Fills an SQLite queue with N envelopes from D devices (one reading each),
starts VictoriaMetrics, then receives, processes (SQLite registry, the
``influxdb`` sink) and deletes batch after batch in this one thread, as
the worker does without its threads. Prints one JSON line: readings per
second of wall-clock time and of this process's CPU time (user + system),
and whether every reading is queryable. Run with a checkout's own
interpreter to measure that checkout (processor_side_by_side.py --drain).

    .venv/bin/python benchmarks/processor_drain.py [--readings N] [--devices D] [--batch B]
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

from processor_throughput import start_victoria

from sense_gateway.config import InfluxConfig
from sense_gateway.envelope import Envelope, Reading, new_envelope_id
from sense_gateway.processor import BatchProcessor
from sense_gateway.queues.sqlite import SQLiteQueueStore
from sense_gateway.registry.sqlite import SQLiteRegistry
from sense_gateway.sinks.influxdb import InfluxSink


def queryable(url: str) -> int:
    urllib.request.urlopen(f"{url}/internal/force_flush", timeout=30).read()
    query = urllib.parse.urlencode({"query": "sum(count_over_time(sense_t[2d]))"})
    document = json.load(urllib.request.urlopen(f"{url}/api/v1/query?{query}", timeout=30))
    result = document["data"]["result"]
    return int(float(result[0]["value"][1])) if result else 0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--readings", type=int, default=100_000)
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=1000)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="sense-drain-"))
    process, url = start_victoria(root / "vm")
    try:
        queue = SQLiteQueueStore(root / "queue.sqlite3")
        base = time.time() - 3600
        queue.put_many([
            Envelope(new_envelope_id(), f"node-{i % args.devices}", i // args.devices + 1,
                     base + i / 1000, "[::1]:1", "coap", None, "/data", 50,
                     [Reading({"t": 20 + (i % 100) / 10}, base + i / 1000)]).to_json()
            for i in range(args.readings)])
        processor = BatchProcessor(SQLiteRegistry(root / "registry.sqlite3"),
                                   [InfluxSink(InfluxConfig(url=url))])
        # What the processor service sets while it runs.
        gc.collect()
        gc.set_threshold(50_000, 10, 10)
        gc.freeze()
        started, cpu = time.perf_counter(), time.process_time()
        while messages := queue.receive(args.batch):
            processor.process_batch([m.envelope for m in messages])
            queue.delete([m.receipt for m in messages])
        wall, cpu = time.perf_counter() - started, time.process_time() - cpu
        processor.close()
        queue.close()
        print(json.dumps({"wall_per_s": args.readings / wall, "cpu_per_s": args.readings / cpu,
                          "queryable": queryable(url), "expected": args.readings}))
    finally:
        process.terminate()
        process.wait()
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
