"""``sense bench --end-to-end``: N readings from D devices over CoAP,
through the queue and the processor, into VictoriaMetrics; how long until
the last one is queryable, and how fast the processor wrote them.

Every reading carries its own timestamp (a second apart per device), so
each is its own point and the count in VictoriaMetrics is exact.

By default one ``--role all`` process ingests and processes at once (the
processor can only go as fast as the readings arrive). With ``--split``
a ``--role gateway`` process takes all readings first, then a ``--role
processor`` process on the same queue drains it alone: that times the
processor by itself.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import orjson

from sense_gateway.bench import Progress, describe_load, machine
from sense_gateway.bench.loadgen import LoadGenerator, LoadSettings, RssSampler
from sense_gateway.bench.processes import Gateway, VictoriaMetrics
from sense_gateway.bench.workload import Workload

METRIC = "sense_t"  # measurement "sense", field "t"


def run_end_to_end(args) -> int:
    devices = args.devices or 1000
    readings = args.readings
    if readings % devices:
        print("sense bench: --readings must be a multiple of --devices", file=sys.stderr)
        return 2
    per_device = readings // devices
    workdir = Path(tempfile.mkdtemp(prefix="sense-bench-e2e-"))
    log = (lambda *a: None) if args.json else (lambda text: print(text, file=sys.stderr))
    processes = []
    try:
        vm = VictoriaMetrics(workdir)
        processes.append(vm)
        settings = {"sinks.enabled": args.sinks, "influxdb.url": vm.url, "influxdb.api": "v2",
                    "queue.sqlite.synchronous": args.synchronous, "processor.poll_interval": 0.2}
        if args.batch_size:
            settings["processor.batch_size"] = args.batch_size
        workers = str(args.workers or "1")
        if not workers.isdigit() and workers != "auto":
            print("sense bench: --end-to-end takes one --workers count", file=sys.stderr)
            return 2
        settings["workers"] = workers
        data_dir = workdir / "gateway"
        gateway = Gateway(data_dir, role="gateway" if args.split else "all", settings=settings)
        processes.append(gateway)

        # A second apart per device, ending an hour ago: distinct points, all in the past.
        base = int(time.time()) - 3600 - per_device
        load = LoadSettings(
            host=gateway.host, port=gateway.port, count=readings, duration=None,
            window=args.window, rate=args.rate, confirmable=not args.non,
            workload=Workload(format="json", devices=devices, timestamp_base=base),
            ack_timeout=args.ack_timeout, max_retransmit=args.max_retransmit,
            seed=args.seed)
        log(f"sending {readings} readings from {devices} devices to "
            f"{'role gateway' if args.split else 'role all'} ...")
        rss = RssSampler(gateway.pid)
        bar = Progress(load, args.progress, "send")
        # The processor's progress, from its own counters, all along (in
        # role all it works while the readings arrive).
        samples = _Samples(gateway)
        started = time.monotonic()
        try:
            result = LoadGenerator(load, progress=bar, sample=rss).run()
        finally:
            bar.close()
        sent_at = time.monotonic()
        ingest = result.summary()
        ingest["server_rss_mb"] = rss.peak_mb

        if args.split:
            samples.stop()
            gateway.stop()
            processes.remove(gateway)
            log("draining the queue with role processor ...")
            processor_started = time.monotonic()
            gateway = Gateway(data_dir, role="processor", settings=settings)
            processes.append(gateway)
            processor_ready = time.monotonic()
            samples = _Samples(gateway)
        else:
            processor_started = processor_ready = started

        deadline = time.monotonic() + max(120.0, readings / 1000)
        while samples.written < ingest["ok"] and time.monotonic() < deadline:
            time.sleep(0.05)
        samples.stop()
        all_written = samples.reached(ingest["ok"]) or time.monotonic()
        queryable = vm.count(METRIC)
        while queryable < ingest["ok"] and time.monotonic() < deadline:
            time.sleep(0.2)
            queryable = vm.count(METRIC)
        done = time.monotonic()
        rss()

        first = samples.first_write() or all_written
        busy_from = processor_ready if args.split else first
        processor_rate = samples.written / max(all_written - busy_from, 1e-9)
        document = {
            "machine": machine(),
            "load": {**describe_load(load), "readings": readings,
                     "roles": "gateway, then processor" if args.split else "all",
                     "sinks": args.sinks, "batch_size": args.batch_size or "default",
                     "workers": workers},
            "ingest": ingest,
            "queryable": queryable,
            "expected": readings,
            "all_queryable": queryable == readings,
            "time_to_queryable_s": round(done - started, 3),
            "after_last_ack_s": round(done - sent_at, 3),
            "processor": {
                "written": samples.written,
                "kept_pace": not args.split and all_written - sent_at < 1.0,
                "start_s": round(processor_ready - processor_started, 3),
                "busy_s": round(all_written - busy_from, 3),
                "readings_per_s": round(processor_rate, 1),
            },
            "server_rss_mb": rss.peak_mb,
        }
    finally:
        for process in reversed(processes):
            process.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    if args.json:
        sys.stdout.write(orjson.dumps(document, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        print(format_end_to_end(document))
    return 0 if document["all_queryable"] else 1


class _Samples:
    """Samples the processor's written count (``/api/stats``) every 0.2 s on
    a thread of its own, so the load generator's loop is not held up.
    (With workers the master's count is at most a report, 0.25 s, behind:
    the rate measured is low by that much, never high.)"""

    def __init__(self, gateway: Gateway, interval: float = 0.2):
        self.gateway, self.interval = gateway, interval
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="stats-sampler")
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.monotonic(), _written(self.gateway)))
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append((time.monotonic(), _written(self.gateway)))

    @property
    def written(self) -> int:
        return max((w for _, w in self.samples), default=0)

    def first_write(self) -> float | None:
        return next((t for t, w in self.samples if w > 0), None)

    def reached(self, count: int) -> float | None:
        return next((t for t, w in self.samples if w >= count), None)


def _written(gateway: Gateway) -> int:
    """Messages the processor has written or found duplicate so far."""
    try:
        stats = gateway.stats()
    except (OSError, RuntimeError, ValueError):
        return 0
    processor = stats.get("processor", {})
    return processor.get("written", 0) + processor.get("duplicate", 0)


def format_end_to_end(d: dict) -> str:
    ingest, proc = d["ingest"], d["processor"]
    return "\n".join([
        f"{d['expected']} readings from {d['load']['devices']} devices, roles: {d['load']['roles']}, "
        f"sinks: {d['load']['sinks']}",
        f"ingest        {ingest['ok']} acknowledged in {ingest['elapsed_s']:.2f} s "
        f"({ingest['ok_rate']:,.0f}/s), lost {ingest['lost']}, "
        f"retransmissions {ingest['retransmissions']}",
        f"queryable     {d['queryable']} of {d['expected']} in VictoriaMetrics, "
        f"{d['time_to_queryable_s']:.2f} s after the first send "
        f"({d['after_last_ack_s']:.2f} s after the last acknowledgement)",
        f"processor     {proc['written']} written in {proc['busy_s']:.2f} s: "
        f"{proc['readings_per_s']:,.0f} readings/s"
        + (" (kept pace with the ingest)" if proc.get("kept_pace") else ""),
        f"server RSS    {d['server_rss_mb']} MB peak",
    ])
