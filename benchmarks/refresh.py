"""Run every measurement BENCHMARKS.md quotes and print its results section.

    .venv/bin/python benchmarks/refresh.py [--runs 3] [--duration 10] [--json FILE]

1. ``sense bench --compare --json`` RUNS times: per server the median
   2.xx/s, and the median of each run's gateway ratios (ratios are only
   meaningful within one run, on a machine others share);
2. a ``--role gateway`` gateway at full rate for 60 s with 10,000 devices,
   its peak RSS; then at half that rate (open loop) for 30 s: p99 latency,
   losses, retransmissions;
3. ``sense bench --end-to-end`` (one role-all process), ``--split``
   (role gateway, then role processor alone) and ``--split --workers 2``
   (two shards, two processor processes), 100,000 readings from 1,000
   devices, RUNS times each, with the median processor rate;
4. ``sense bench --dtls`` RUNS times: plain CoAP, then CoAPS (a session
   per device) against one gateway, and the median CoAPS / CoAP ratio.

Everything is printed as Markdown on stdout; ``--json FILE`` also keeps
the raw documents.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from sense_gateway.bench import describe_load, machine, run_load
from sense_gateway.bench.compare import format_table
from sense_gateway.bench.loadgen import LoadSettings
from sense_gateway.bench.processes import Gateway
from sense_gateway.bench.workload import Workload

SENSE = str(Path(sys.executable).parent / "sense")


def sense_bench(*args: str) -> dict:
    out = subprocess.run([SENSE, "bench", *args, "--json", "--no-progress"], check=False,
                         capture_output=True, text=True)
    if not out.stdout.strip():
        raise RuntimeError(f"sense bench {' '.join(args)} failed: {out.stderr[-1500:]}")
    return json.loads(out.stdout)


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def compare(runs: int, duration: float, devices: int) -> tuple[list[dict], str]:
    documents = []
    for i in range(runs):
        log(f"compare run {i + 1}/{runs} ...")
        documents.append(sense_bench("--compare", "--duration", str(duration),
                                     "--devices", str(devices)))
    servers = [row["server"] for row in documents[0]["results"]]
    lines = [
        f"Median of {runs} `--compare` runs ({duration:g} s per server, window 64, CON, "
        f"SENSE JSON, {devices} devices); each ratio is the median of the ratios measured "
        "within one run.",
        "",
        "| server | 2.xx/s | our gateway / this | p50 ms | p99 ms | lost | retransmissions | "
        "peak RSS MB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for server in servers:
        rows = [next(r for r in d["results"] if r["server"] == server) for d in documents]
        ratios = [d["gateway_ratio"][server] for d in documents if server in d["gateway_ratio"]]
        med = lambda values: statistics.median(values) if values else None  # noqa: E731
        lines.append(
            f"| {server} | {med([r['ok_rate'] for r in rows]):,.0f} | "
            f"{'' if not ratios else f'{med(ratios):.2f}x'} | "
            f"{med([r['latency_ms']['p50'] for r in rows]):.2f} | "
            f"{med([r['latency_ms']['p99'] for r in rows]):.2f} | "
            f"{sum(r['lost'] for r in rows)} | {sum(r['retransmissions'] for r in rows)} | "
            f"{max(r['server_rss_mb'] or 0 for r in rows):.0f} |")
    lines += ["", "Each run on its own:", ""]
    for d in documents:
        lines += ["```", format_table(d), "```", ""]
    return documents, "\n".join(lines)


def rss_and_half_rate(devices: int, full_duration: float, half_duration: float):
    log(f"gateway at full rate, {devices} devices, {full_duration:g} s ...")
    with tempfile.TemporaryDirectory(prefix="sense-bench-") as directory:
        # Role gateway keeps everything it takes (no processor): a minute at
        # full rate is over the default queue.max_depth of a million, and
        # the half-rate run would time 5.03 refusals.
        gateway = Gateway(Path(directory) / "gateway", settings={"queue.max_depth": 100_000_000})
        try:
            full_settings = LoadSettings(host=gateway.host, port=gateway.port,
                                         workload=Workload(devices=devices),
                                         duration=full_duration)
            full = run_load(full_settings, gateway.pid, progress=False)
            rate = round(full["ok_rate"] / 2)
            log(f"gateway at half rate ({rate}/s), {half_duration:g} s ...")
            half_settings = LoadSettings(host=gateway.host, port=gateway.port,
                                         workload=Workload(devices=devices), rate=rate,
                                         duration=half_duration, first_seq=1_000_000)
            half = run_load(half_settings, gateway.pid, progress=False)
        finally:
            gateway.stop()
    documents = {"full": {"load": describe_load(full_settings), "result": full},
                 "half": {"load": describe_load(half_settings), "result": half}}
    worst = max((int(k) for k in half["retransmitted"]), default=0)
    lines = [
        "| run | 2.xx/s | p50 ms | p90 ms | p99 ms | max ms | lost | retransmissions "
        "(most for one request) | peak RSS MB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, d, most in (("full rate (window 64)", full,
                           max((int(k) for k in full["retransmitted"]), default=0)),
                          (f"half rate ({rate:,}/s, open loop)", half, worst)):
        lat = d["latency_ms"]
        other = {code: n for code, n in d["codes"].items() if not code.startswith("2.")}
        if other:  # what the latencies are of, besides 2.xx
            name += " (also " + ", ".join(f"{n:,} {code}" for code, n in other.items()) + ")"
        lines.append(f"| {name}, {devices:,} devices | {d['ok_rate']:,.0f} | {lat['p50']:.2f} | "
                     f"{lat['p90']:.2f} | {lat['p99']:.2f} | {lat['max']:.2f} | {d['lost']} | "
                     f"{d['retransmissions']} ({most}) | {d['server_rss_mb']} |")
    return documents, "\n".join(lines)


def end_to_end(runs: int, readings: int, devices: int):
    documents = []
    lines = [
        "| roles | workers | readings acknowledged/s | all queryable | time to queryable s | "
        "after last ACK s | processor readings/s | peak RSS MB |",
        "|---|---:|---:|---|---:|---:|---:|---:|",
    ]
    for split, workers in ((False, 1), (True, 1), (True, 2)):
        rates = []
        for i in range(runs):
            log(f"end to end {'split' if split else 'role all'}, --workers {workers}, "
                f"{i + 1}/{runs} ...")
            args = ["--end-to-end", "--readings", str(readings), "--devices", str(devices),
                    "--workers", str(workers)]
            d = sense_bench(*args, *(["--split"] if split else []))
            documents.append(d)
            proc = d["processor"]
            rates.append(proc["readings_per_s"])
            lines.append(
                f"| {d['load']['roles']} | {workers} | {d['ingest']['ok_rate']:,.0f} | "
                f"{'yes' if d['all_queryable'] else 'NO'} ({d['queryable']:,}) | "
                f"{d['time_to_queryable_s']:.2f} | {d['after_last_ack_s']:.2f} | "
                f"{proc['readings_per_s']:,.0f}{' (kept pace)' if proc.get('kept_pace') else ''}"
                f" | {d['server_rss_mb']} |")
        lines.append(f"| **median** | {workers} | | | | | **{statistics.median(rates):,.0f}** | |")
    return documents, "\n".join(lines)


def dtls(runs: int, duration: float, devices: int):
    documents = []
    lines = [
        "| run | coap 2.xx/s | coap p99 ms | handshakes/s | coaps 2.xx/s | coaps p99 ms | "
        "lost | CoAPS / CoAP |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for i in range(runs):
        log(f"dtls run {i + 1}/{runs} ...")
        d = sense_bench("--dtls", "--duration", str(duration), "--devices", str(devices))
        documents.append(d)
        coap, coaps = d["results"]
        lines.append(
            f"| {i + 1} | {coap['ok_rate']:,.0f} | {coap['latency_ms']['p99']:.1f} | "
            f"{coaps['handshakes_per_s'] or 0:,.0f} | {coaps['ok_rate']:,.0f} | "
            f"{coaps['latency_ms']['p99']:.1f} | {coap['lost'] + coaps['lost']} | "
            f"{d['coaps_over_coap']:.2f} |")
    ratios = [d["coaps_over_coap"] for d in documents]
    lines.append(f"| **median** | | | | | | | **{statistics.median(ratios):.2f}** |")
    return documents, "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--json", help="also write every raw document to this file")
    parser.add_argument("--skip", default="", help="comma-separated: compare,rss,e2e,dtls")
    args = parser.parse_args()
    skip = set(args.skip.split(","))
    m = machine()
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((line.split(":", 1)[1].strip() for line in cpu.splitlines()
                  if line.startswith("Model name")), m["cpu_model"])
    raw = {"machine": m}
    print(f"Measured {m['time']}: {m['cpus']} CPUs (`nproc`), `lscpu` model name: {model}, "
          f"Python {m['python']}.\n")
    if "compare" not in skip:
        raw["compare"], text = compare(args.runs, args.duration, args.devices)
        print("### Side by side\n\n" + text + "\n")
    if "rss" not in skip:
        raw["rss"], text = rss_and_half_rate(10_000, 60.0, 30.0)
        print("### Full rate for 60 s with 10,000 devices, then half that rate\n\n" + text + "\n")
    if "e2e" not in skip:
        raw["e2e"], text = end_to_end(args.runs, 100_000, 1_000)
        print("### End to end: 100,000 readings from 1,000 devices into VictoriaMetrics\n\n"
              + text + "\n")
    if "dtls" not in skip:
        raw["dtls"], text = dtls(args.runs, args.duration, args.devices)
        print("### CoAPS beside plain CoAP (`sense bench --dtls`)\n\n" + text + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps(raw, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
