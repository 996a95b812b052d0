"""``sense bench --soak``: an open-loop load for a long time, a row a minute.

    sense bench --soak [--duration 1800] [--rate R | --fraction 0.5] [--every 60]
                       [--devices 1000] [--role all] [--json]
    sense bench --soak coap://HOST:PORT --rate R [--server-pid PID] [--stats URL]

Without a target it starts ``twistd -n sense-gateway --role all`` (queue,
processor and readings store: what a newcomer runs) in a temporary
directory. Without ``--rate`` it first measures the full rate against
that gateway, and soaks at ``--fraction`` (default half) of it. The full
rate is the whole path's: a closed loop (window 64) for 20 s, then until
the processor has emptied the queue; the readings acknowledged divided
by that time. (The ingest alone goes faster, with the processor falling
behind, and half of that is more than one process can keep up with for
long: the queue would grow until ``queue.max_depth``.)

Every ``--every`` seconds it prints one row: requests answered and their
rate, latency percentiles of that interval, losses, the gateway's
resident memory (psutil) and its queue (``/api/stats``: envelopes waiting
or in the processor's hands, and how many the processor has taken out).
At the end the table again, the whole run's percentiles, and how the
memory moved: the slope of RSS over the rows after the first (MB per 10
minutes) and the growth from the second row to the last.

Latencies are kept as a histogram of 0.1 ms buckets, not one float per
request, so the bench's own memory stays flat too.
"""

from __future__ import annotations

import shutil
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import orjson

from sense_gateway.bench.loadgen import LoadGenerator, LoadSettings
from sense_gateway.bench.processes import Gateway, http_get
from sense_gateway.bench.workload import Workload

#: seconds of closed-loop load that measure the full rate
FULL_RATE_SECONDS = 20.0
BUCKET = 1e-4  # latency histogram resolution, seconds


def percentiles(histogram: Counter, points=(50, 90, 99)) -> dict:
    """``{"p50": ms, ...}`` and ``max`` from a bucket -> count histogram."""
    total = sum(histogram.values())
    out = {f"p{p}": None for p in points}
    out["max"] = None
    if not total:
        return out
    keys = sorted(histogram)
    wanted = [(p, min(total - 1, int(p / 100 * total))) for p in points]
    seen = 0
    for key in keys:
        seen += histogram[key]
        while wanted and seen > wanted[0][1]:
            out[f"p{wanted.pop(0)[0]}"] = round(key * BUCKET * 1000, 2)
    out["max"] = round(keys[-1] * BUCKET * 1000, 2)
    return out


class StatsPoller:
    """The gateway's ``/api/stats`` every few seconds, on a thread of its
    own, so a slow answer never holds up the load generator."""

    def __init__(self, base_url: str | None, interval: float = 2.0):
        self.base_url, self.interval = base_url, interval
        self.latest: dict = {}
        self._stop = threading.Event()
        self._thread = None
        if base_url:
            self._thread = threading.Thread(target=self._run, daemon=True, name="soak-stats")
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                status, body = http_get(self.base_url.rstrip("/") + "/api/stats", timeout=5)
                if status == 200:
                    self.latest = orjson.loads(body)
            except (OSError, ValueError):
                pass
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)


class Rows:
    """The load generator's sample hook: closes a row every *every* s."""

    def __init__(self, generator: LoadGenerator, every: float, pid: int | None,
                 stats: StatsPoller, echo):
        self.generator, self.every, self.stats, self.echo = generator, every, stats, echo
        self.process = None
        if pid is not None:
            import psutil

            self.process = psutil.Process(pid)
        self.rows: list[dict] = []
        self.histogram: Counter = Counter()
        self._interval: Counter = Counter()
        self._started = time.monotonic()
        self._next = self._started + every
        self._last = {"answered": 0, "ok": 0, "lost": 0, "sent": 0, "retransmissions": 0}

    def _fold_latencies(self) -> None:
        latencies = self.generator.result.latencies
        interval = self._interval
        for latency in latencies:
            interval[int(latency / BUCKET)] += 1
        latencies.clear()  # the same list the generator appends to

    def __call__(self) -> None:
        self._fold_latencies()
        now = time.monotonic()
        if now >= self._next:
            self.close_row(now)

    def close_row(self, now: float) -> None:
        r = self.generator.result
        counts = {"answered": r.answered, "ok": r.ok, "lost": r.lost, "sent": r.sent,
                  "retransmissions": r.retransmissions}
        delta = {k: counts[k] - self._last[k] for k in counts}
        self._last = counts
        span = now - (self._next - self.every)
        rss = None
        if self.process is not None:
            try:
                rss = round(self.process.memory_info().rss / 2**20, 1)
            except Exception:
                rss = None
        stats = self.stats.latest
        backlog = stats.get("backlog", {}).get("waiting")
        processor = stats.get("processor", {})
        row = {"t_s": round(now - self._started), **delta,
               "ok_per_s": round(delta["ok"] / max(span, 1e-9), 1),
               "latency_ms": percentiles(self._interval), "rss_mb": rss,
               "queue_waiting": backlog,
               "processed": processor.get("written", 0) + processor.get("duplicate", 0)
               if processor else None}
        self.rows.append(row)
        self.histogram.update(self._interval)
        self._interval = Counter()
        self._next += self.every
        self.echo(format_row(row, header=len(self.rows) == 1))


def format_row(row: dict, header: bool = False) -> str:
    lat = row["latency_ms"]

    def show(value, fmt="{:,.0f}"):
        return "-" if value is None else fmt.format(value)
    line = (f"| {row['t_s']:>6} | {show(row['ok_per_s'])} | {show(lat['p50'], '{:.2f}')} | "
            f"{show(lat['p90'], '{:.2f}')} | {show(lat['p99'], '{:.2f}')} | "
            f"{show(lat['max'], '{:.1f}')} | {row['lost']} | {row['retransmissions']} | "
            f"{show(row['rss_mb'], '{:.1f}')} | {show(row['queue_waiting'])} | "
            f"{show(row['processed'])} |")
    if not header:
        return line
    return ("| t s | 2.xx/s | p50 ms | p90 ms | p99 ms | max ms | lost | retransmissions | "
            "gateway RSS MB | queue waiting | processed |\n"
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n" + line)


def rss_trend(rows: list[dict]) -> dict:
    """Least-squares slope of RSS over the rows after the first (warm-up),
    in MB per 10 minutes, and the growth from the second row to the last."""
    points = [(row["t_s"], row["rss_mb"]) for row in rows[1:] if row["rss_mb"] is not None]
    if len(points) < 2:
        return {"slope_mb_per_10min": None, "growth_mb": None,
                "min_mb": min((r for _, r in points), default=None),
                "max_mb": max((r for _, r in points), default=None)}
    n = len(points)
    mean_t = sum(t for t, _ in points) / n
    mean_r = sum(r for _, r in points) / n
    var = sum((t - mean_t) ** 2 for t, _ in points)
    slope = sum((t - mean_t) * (r - mean_r) for t, r in points) / var if var else 0.0
    return {"slope_mb_per_10min": round(slope * 600, 2),
            "growth_mb": round(points[-1][1] - points[0][1], 1),
            "min_mb": min(r for _, r in points), "max_mb": max(r for _, r in points)}


def _wait_for_backlog(stats_url: str, timeout: float = 600.0) -> bool:
    """Wait until the gateway's queue is empty (True) or *timeout* passed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            status, body = http_get(stats_url + "/api/stats")
            if status == 200 and orjson.loads(body).get("backlog", {}).get("waiting", 1) == 0:
                return True
        except (OSError, ValueError):
            pass
        time.sleep(0.2)
    return False


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def run_soak(args) -> int:
    from sense_gateway.bench import describe_load, machine, parse_target

    echo = (lambda text: print(text, file=sys.stderr, flush=True)) if args.json else (
        lambda text: print(text, flush=True))
    duration = args.duration or 1800.0
    workdir = gateway = None
    pid, stats_url = args.server_pid, args.stats
    try:
        if args.target:
            host, port = parse_target(args.target)
        else:
            workdir = Path(tempfile.mkdtemp(prefix="sense-bench-soak-"))
            gateway = Gateway(workdir / "gateway", role=args.role)
            host, port, pid = gateway.host, gateway.port, gateway.pid
            stats_url = f"http://127.0.0.1:{gateway.web_port}"
        workload = Workload(format=args.format, devices=args.devices or 1000)
        full = ingest = None
        rate = args.rate
        if rate is None:
            echo(f"measuring the full rate ({FULL_RATE_SECONDS:g} s, window {args.window}) ...")
            # Devices of their own: the soak's readings start at seq 1 again.
            probe_devices = Workload(format=args.format, devices=workload.devices, prefix="probe")
            probe_started = time.monotonic()
            probe = LoadGenerator(LoadSettings(host=host, port=port, workload=probe_devices,
                                               window=args.window, duration=FULL_RATE_SECONDS,
                                               sockets=args.sockets, seed=args.seed)).run()
            measured = probe.summary()
            ingest = measured["ok_rate"]
            full = ingest
            if stats_url:
                echo(f"ingest {ingest:,.0f}/s; waiting for the processor to empty the queue ...")
                if not _wait_for_backlog(stats_url):
                    raise RuntimeError("the queue did not empty within 600 s")
                full = measured["ok"] / (time.monotonic() - probe_started)
            rate = round(full * args.fraction)
            echo(f"full rate {full:,.0f}/s end to end; soaking at {rate:,}/s for {duration:g} s")
        settings = LoadSettings(
            host=host, port=port, workload=workload, rate=rate, duration=duration,
            ack_timeout=args.ack_timeout, ack_random_factor=args.ack_random_factor,
            max_retransmit=args.max_retransmit, sockets=args.sockets,
            first_seq=args.first_seq, seed=args.seed)
        stats = StatsPoller(stats_url)
        generator = LoadGenerator(settings)
        rows = Rows(generator, args.every, pid, stats, echo)
        generator.sample, generator.sample_every = rows, 0.5
        # A SIGTERM (or ^C) ends the load early: the rows so far are kept.
        previous = signal.signal(signal.SIGTERM, _interrupt)
        interrupted = False
        try:
            result = generator.run()
        except KeyboardInterrupt:
            interrupted = True
            result = generator.result
            result.elapsed = time.monotonic() - rows._started
        finally:
            signal.signal(signal.SIGTERM, previous)
            stats.stop()
        rows._fold_latencies()
        if rows._interval:
            rows.close_row(time.monotonic())
        summary = result.summary()
        summary["latency_ms"] = percentiles(rows.histogram)
        document = {"machine": machine(),
                    "load": {**describe_load(settings), "full_rate": full,
                             "ingest_rate": ingest, "interrupted": interrupted},
                    "rows": rows.rows, "result": summary, "rss": rss_trend(rows.rows)}
    finally:
        if gateway is not None:
            gateway.stop()
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        sys.stdout.write(orjson.dumps(document, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        print(format_soak(document))
    return 0 if summary["answered"] else 1


def format_soak(d: dict) -> str:
    r, load, trend = d["result"], d["load"], d["rss"]
    lines = ["", "\n".join(format_row(row, header=i == 0) for i, row in enumerate(d["rows"])), ""]
    lat = r["latency_ms"]
    lines += [
        f"load          {load['rate']:,.0f}/s open loop for {load['duration_s']:g} s, "
        f"{load['devices']} devices" + (
            f" (full rate {load['full_rate']:,.0f}/s end to end, ingest alone "
            f"{load['ingest_rate']:,.0f}/s)" if load.get("full_rate") else "")
        + (" -- interrupted" if load.get("interrupted") else ""),
        f"answered      {r['answered']} of {r['sent']}, 2.xx {r['ok']}, lost {r['lost']}, "
        f"retransmissions {r['retransmissions']}, late sends {r['late_sends']}",
        f"latency       p50 {lat['p50']} ms  p90 {lat['p90']} ms  p99 {lat['p99']} ms  "
        f"max {lat['max']} ms",
        f"gateway RSS   {trend.get('min_mb')}-{trend.get('max_mb')} MB after the first row; "
        f"slope {trend['slope_mb_per_10min']} MB per 10 min, {trend['growth_mb']} MB from the "
        "second row to the last",
    ]
    return "\n".join(lines)
