"""The processor's rate in two checkouts, side by side, alternating.

Runs ``sense bench --end-to-end --split`` (a role-gateway process takes
the readings, then a role-processor process drains the queue alone into
VictoriaMetrics) with each checkout's own ``sense`` in turn, RUNS times
each, and prints every run and the medians as Markdown: on a machine
others share, only figures measured alternately in one run compare.

    .venv/bin/python benchmarks/processor_side_by_side.py BEFORE_VENV AFTER_VENV [--runs 3]

With ``--drain`` it runs processor_drain.py (this directory's) with each
checkout's interpreter instead: the processor in one process and one
thread, wall clock and readings per CPU-second, steadier than the wall
clock when others share the machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
from pathlib import Path


def run(venv: Path, readings: int, devices: int) -> dict:
    out = subprocess.run([str(venv / "bin" / "sense"), "bench", "--end-to-end", "--split",
                          "--readings", str(readings), "--devices", str(devices), "--json",
                          "--no-progress"], capture_output=True, text=True, check=False)
    if not out.stdout.strip():
        raise RuntimeError(f"{venv}: sense bench failed: {out.stderr[-1500:]}")
    return json.loads(out.stdout)


def drain(venv: Path, readings: int, devices: int) -> dict:
    out = subprocess.run([str(venv / "bin" / "python"), str(Path(__file__).with_name(
        "processor_drain.py")), "--readings", str(readings), "--devices", str(devices)],
        capture_output=True, text=True, check=False)
    if not out.stdout.strip():
        raise RuntimeError(f"{venv}: processor_drain.py failed: {out.stderr[-1500:]}")
    document = json.loads(out.stdout)
    return {"processor": {"readings_per_s": document["wall_per_s"]},
            "cpu_per_s": document["cpu_per_s"], "queryable": document["queryable"],
            "expected": document["expected"],
            "all_queryable": document["queryable"] == document["expected"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("before", type=Path, help="the venv of the code before")
    parser.add_argument("after", type=Path, help="the venv of the code after")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--readings", type=int, default=100_000)
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--drain", action="store_true",
                        help="in-process drains (wall clock and per CPU-second)")
    args = parser.parse_args()
    measure = drain if args.drain else run
    cpu: dict[str, list[float]] = {"before": [], "after": []}
    rates: dict[str, list[float]] = {"before": [], "after": []}
    queryable: dict[str, list[bool]] = {"before": [], "after": []}
    for i in range(args.runs):
        for name in ("before", "after"):
            document = measure(getattr(args, name), args.readings, args.devices)
            rate = document["processor"]["readings_per_s"]
            rates[name].append(rate)
            if "cpu_per_s" in document:
                cpu[name].append(document["cpu_per_s"])
                print(f"<!-- run {i + 1} {name}: {document['cpu_per_s']:,.0f} "
                      "readings per CPU-second -->", flush=True)
            queryable[name].append(document["all_queryable"])
            print(f"<!-- run {i + 1} {name}: {rate:,.0f} readings/s, "
                  f"queryable {document['queryable']} of {document['expected']} -->", flush=True)
    print("| code | processor readings/s (runs in order) | median | all queryable |")
    print("|---|---|---:|---|")
    for name in ("before", "after"):
        print(f"| {name} | {runs_text(rates[name])} | **{statistics.median(rates[name]):,.0f}** | "
              f"{'yes' if all(queryable[name]) else 'NO'} |")
    print(f"\nRatio of the medians, after / before: {ratio_text(rates)}")
    if args.drain:
        for name in ("before", "after"):
            print(f"{name}: readings per CPU-second {runs_text(cpu[name])}, median "
                  f"{statistics.median(cpu[name]):,.0f}")
        print(f"Per CPU-second, after / before: {ratio_text(cpu)}")


def runs_text(rates: list[float]) -> str:
    return " / ".join(f"{r:,.0f}" for r in rates)


def ratio_text(rates: dict[str, list[float]]) -> str:
    return f"{statistics.median(rates['after']) / statistics.median(rates['before']):.2f}x"


if __name__ == "__main__":
    main()
