"""``sense bench --compare``: the same load against the bare peers and our
gateway, one after the other in one run, and the ratios.

Each server runs alone while it is measured (the others are stopped), so
they do not share the CPU with each other, only with the load generator.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import orjson

from sense_gateway.bench import describe_load, machine, run_load, settings_from
from sense_gateway.bench.processes import Gateway, Peer

PEERS = ("udp-ack", "aiocoap", "txthings")

DESCRIPTIONS = {
    "udp-ack": "Twisted UDP, ACK per datagram, no CoAP parsing",
    "aiocoap": "aiocoap, bare POST handler returning 2.04",
    "txthings": "txthings, bare POST handler returning 2.04",
    "gateway": "SENSE gateway: parse, dedup, decode, validate, durable enqueue, ACK",
}


def run_compare(args) -> int:
    peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    unknown = [p for p in peers if p not in PEERS]
    if unknown:
        print(f"sense bench: --peers: unknown {', '.join(unknown)} (known: {', '.join(PEERS)})",
              file=sys.stderr)
        return 2
    if args.duration is None and args.count is None:
        args.duration = 10.0
    host = "::1"
    workdir = Path(tempfile.mkdtemp(prefix="sense-bench-"))
    rows = []
    counts = [int(n) for n in str(args.workers).split(",") if n.strip()]
    gateways = {"gateway": 1} if counts == [1] else {f"gateway-{n}w": n for n in counts}
    try:
        for name in [*peers, *gateways]:
            if name in gateways:
                server = Gateway(workdir / name, role=args.role, host=host, settings={
                    "queue.sqlite.synchronous": args.synchronous, "workers": gateways[name]})
            else:
                server = Peer(name, workdir, host=host)
            try:
                settings = settings_from(args, host, server.port)
                if not args.json:
                    print(f"{name}: {settings.duration or settings.count} "
                          f"{'s' if settings.duration else 'requests'} ...", file=sys.stderr)
                cpu = ServerCpu(server.pid)
                summary = run_load(settings, server.pid, args.progress, label=name)
                summary.update(cpu.used(summary["ok"]))
            finally:
                server.stop()
            description = DESCRIPTIONS.get(name) or (
                f"{DESCRIPTIONS['gateway']}, --workers {gateways[name]}")
            rows.append({"server": name, "description": description, **summary})
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    gateway = rows[-1]
    ratios = {}
    for row in rows[:-1]:
        if row["ok_rate"]:
            ratios[row["server"]] = round(gateway["ok_rate"] / row["ok_rate"], 2)
    document = {"machine": machine(), "load": describe_load(settings_from(args, host, 0)),
                "gateway": {"role": args.role, "queue.sqlite.synchronous": args.synchronous,
                            "workers": counts},
                "results": rows, "gateway_ratio": ratios}
    if args.json:
        sys.stdout.write(orjson.dumps(document, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        print(format_table(document))
    return 0 if gateway["ok"] else 1


class ServerCpu:
    """CPU seconds a server and its children (``--workers``) spend while a
    load runs, and the load generator's own (this process): what two
    cores are shared between."""

    def __init__(self, pid: int):
        import resource

        try:
            import psutil
        except ImportError:  # psutil comes with the bench extra
            self.tree = None
        else:
            self.tree = psutil.Process(pid)
        self.before = self._server()
        self.resource = resource
        usage = resource.getrusage(resource.RUSAGE_SELF)
        self.self_before = usage.ru_utime + usage.ru_stime

    def _server(self) -> dict:
        if self.tree is None:
            return {}
        times = {}
        for process in [self.tree, *self.tree.children(recursive=True)]:
            try:
                t = process.cpu_times()
            except Exception:  # ended meanwhile
                continue
            times[process.pid] = t.user + t.system
        return times

    def used(self, ok: int) -> dict:
        usage = self.resource.getrusage(self.resource.RUSAGE_SELF)
        loadgen = usage.ru_utime + usage.ru_stime - self.self_before
        if self.tree is None:
            return {"server_cpu_s": None, "loadgen_cpu_s": round(loadgen, 2)}
        after = self._server()
        server = sum(t - self.before.get(pid, 0.0) for pid, t in after.items())
        return {"server_cpu_s": round(server, 2), "loadgen_cpu_s": round(loadgen, 2),
                "server_cpu_us_per_ok": round(server / ok * 1e6, 1) if ok else None}


def format_table(document: dict) -> str:
    """The comparison as a Markdown table (also what BENCHMARKS.md shows)."""
    m, load = document["machine"], document["load"]
    lines = [
        f"{m['cpus']} CPUs, {m['cpu_model']}, Python {m['python']}, {m['time']}",
        f"load: {load['type']} POST {load['format']}, {load['mode']}, {load['devices']} devices, "
        f"{load['duration_s'] or load['count']} {'s' if load['duration_s'] else 'requests'} each",
        "",
        "| server | 2.xx/s | our gateway / this | p50 ms | p99 ms | lost | retransmissions "
        "| peak RSS MB | server CPU µs per 2.xx |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in document["results"]:
        ratio = document["gateway_ratio"].get(row["server"])
        lat = row["latency_ms"]
        lines.append(
            f"| {row['server']} | {row['ok_rate']:,.0f} | "
            f"{'' if ratio is None else f'{ratio:.2f}x'} | "
            f"{_ms(lat['p50'])} | {_ms(lat['p99'])} | {row['lost']} | {row['retransmissions']} | "
            f"{'' if row['server_rss_mb'] is None else row['server_rss_mb']} | "
            f"{row.get('server_cpu_us_per_ok') or ''} |")
    return "\n".join(lines)


def _ms(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def table_from_json(path: str) -> int:
    """``python -m sense_gateway.bench.compare FILE``: a saved ``--compare
    --json`` document as the Markdown table."""
    with open(path, "rb") as f:
        print(format_table(orjson.loads(f.read())))
    return 0


if __name__ == "__main__":
    sys.exit(table_from_json(sys.argv[1]))
