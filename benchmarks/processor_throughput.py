"""How many readings per second the processor writes into VictoriaMetrics.

Starts VictoriaMetrics on a free port, fills an SQLite queue with N
envelopes from D devices (one reading each), then drains it the way the
worker does (receive a batch, process it, delete it) with the SQLite
registry and both sinks (sqlite store + influxdb), for several batch sizes
side by side. Prints the median of R runs per batch size.

    .venv/bin/python benchmarks/processor_throughput.py [N] [D] [R]
"""

from __future__ import annotations

import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from sense_gateway.config import InfluxConfig
from sense_gateway.envelope import Envelope, Reading, new_envelope_id
from sense_gateway.processor import BatchProcessor
from sense_gateway.queues.sqlite import SQLiteQueueStore
from sense_gateway.registry.sqlite import SQLiteRegistry
from sense_gateway.sinks.influxdb import InfluxSink
from sense_gateway.sinks.sqlite import SQLiteStore


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_victoria(directory: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    process = subprocess.Popen(
        ["victoria-metrics", f"-httpListenAddr=127.0.0.1:{port}", f"-storageDataPath={directory}",
         "-retentionPeriod=100y", "-loggerLevel=ERROR"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            urllib.request.urlopen(f"{url}/health", timeout=1)
            return process, url
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("victoria-metrics did not start")


def run(directory: Path, url: str, count: int, devices: int, batch_size: int) -> float:
    queue = SQLiteQueueStore(directory / "queue.sqlite3", synchronous="normal")
    base = time.time() - 86400
    queue.put_many([
        Envelope(new_envelope_id(), f"node-{i % devices}", i // devices, base + i / 1000, "[::1]:1",
                 "coap", None, "/data", 50,
                 [Reading({"temperature": 20 + (i % 100) / 10}, base + i / 1000)]).to_json()
        for i in range(count)])
    processor = BatchProcessor(SQLiteRegistry(directory / "registry.sqlite3"), [
        SQLiteStore(directory / "readings.sqlite3", retention_days=36500),
        InfluxSink(InfluxConfig(url=url))])
    started = time.perf_counter()
    while True:
        messages = queue.receive(batch_size)
        if not messages:
            break
        processor.process_batch([m.envelope for m in messages])
        queue.delete([m.receipt for m in messages])
    elapsed = time.perf_counter() - started
    processor.close()
    queue.close()
    return count / elapsed


def main(count: int = 20000, devices: int = 100, repeats: int = 3) -> None:
    root = Path(tempfile.mkdtemp(prefix="sense-bench-"))
    process, url = start_victoria(root / "vm")
    try:
        print(f"{count} readings from {devices} devices, median of {repeats} runs")
        print(f"{'batch size':>10}  {'readings/s':>10}")
        for batch_size in (10, 100, 1000):
            rates = []
            for r in range(repeats):
                directory = root / f"b{batch_size}-{r}"
                directory.mkdir()
                rates.append(run(directory, url, count, devices, batch_size))
            print(f"{batch_size:>10}  {statistics.median(rates):>10.0f}")
    finally:
        process.terminate()
        process.wait()
        shutil.rmtree(root)


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:]))
