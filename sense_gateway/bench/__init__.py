"""``sense bench``: a CoAP load generator, the gateway side by side with
bare aiocoap and txthings servers (``--compare``), and the whole way into
a metrics server (``--end-to-end``).

    sense bench [coap://HOST:PORT] [--window 64 | --rate R] [--duration S | --count N]
                [--devices D] [--format json|cbor|senml|senml-cbor|text] [--non] [--json]
    sense bench --compare [--duration S] [--peers udp-ack,aiocoap,txthings] [--json]
    sense bench --end-to-end [--readings 100000] [--devices 1000] [--json]
    sense bench --dtls [--devices 1000] [--duration S] [--json]
    sense bench --crash-loop [--kills 20] [--loss 0.2] [--devices 40] [--uptime 2:6] [--json]
    sense bench --soak [TARGET] [--duration 1800] --rate R [--every 60] [--json]

Manual: docs/bench.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from urllib.parse import urlsplit

import orjson

from sense_gateway.bench.loadgen import LoadGenerator, LoadSettings, RssSampler, cpu_count
from sense_gateway.bench.workload import FORMATS, Workload


def parse_target(url: str) -> tuple[str, int]:
    parts = urlsplit(url if "://" in url else f"coap://{url}")
    if parts.scheme != "coap":
        raise ValueError(f"{url}: only coap:// URLs")
    return parts.hostname or "::1", parts.port or 5683


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sense bench",
        description="CoAP load generator: throughput, latency, responses, retransmissions, losses.")
    p.add_argument("target", nargs="?",
                   help="server to load (default coap://[::1]:5683; --soak: a gateway it starts)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--compare", action="store_true",
                      help="start the peers and our gateway, same load against each, print ratios")
    mode.add_argument("--end-to-end", action="store_true",
                      help="readings through the gateway and processor into VictoriaMetrics")
    mode.add_argument("--dtls", action="store_true",
                      help="CoAPS (DTLS PSK, a key and session per device) beside plain CoAP "
                           "against one gateway: handshakes/s and readings/s")
    mode.add_argument("--crash-loop", action="store_true",
                      help="devices through a lossy relay while the gateway is SIGKILLed and "
                           "restarted; then every acknowledged reading is looked for in the store")
    mode.add_argument("--soak", action="store_true",
                      help="open-loop load for --duration (default 1800 s): a row of RSS, "
                           "latency percentiles and queue depth every --every seconds")
    load = p.add_argument_group("load")
    load.add_argument("--window", type=int, default=64,
                      help="closed loop: requests in flight (default 64)")
    load.add_argument("--rate", type=float, help="open loop: requests per second")
    load.add_argument("--duration", type=float, help="seconds of sending (default 10)")
    load.add_argument("--count", type=int, help="requests to send (with or without --duration)")
    load.add_argument("--devices", type=int, help="simulated devices (default 100)")
    load.add_argument("--format", choices=FORMATS, default="json")
    load.add_argument("--path", help="request path (default: /data, /temperature for text)")
    load.add_argument("--non", action="store_true", help="non-confirmable requests")
    load.add_argument("--sockets", type=int, default=32,
                      help="UDP sockets (source ports) the devices share, each with its own "
                           "message ids (default 32); text: one per device")
    load.add_argument("--ack-timeout", type=float, default=2.0, help="RFC 7252 ACK_TIMEOUT")
    load.add_argument("--ack-random-factor", type=float, default=1.5)
    load.add_argument("--max-retransmit", type=int, default=4)
    load.add_argument("--non-timeout", type=float, default=5.0,
                      help="NON: seconds after which an unanswered request is lost")
    load.add_argument("--first-seq", type=int, default=1)
    load.add_argument("--seed", type=int, help="random seed (message ids, tokens, timeouts)")
    load.add_argument("--server-pid", type=int, help="report this process's peak RSS")
    cmp_ = p.add_argument_group("--compare")
    cmp_.add_argument("--peers", default="udp-ack,aiocoap,txthings",
                      help="peers to run before the gateway (comma-separated)")
    cmp_.add_argument("--role", choices=["gateway", "all"],
                      help="the gateway's role under --compare (default gateway) and --soak "
                           "(default all)")
    cmp_.add_argument("--workers", default="1",
                      help="the gateway's --workers; a list (1,2) runs it once per count, "
                           "side by side, the ratio against the last (--end-to-end: one "
                           "count, for the ingest and the processor alike)")
    cmp_.add_argument("--synchronous", default="full", choices=["full", "normal"],
                      help="the gateway's queue.sqlite.synchronous under --compare")
    e2e = p.add_argument_group("--end-to-end")
    e2e.add_argument("--readings", type=int, default=100_000)
    e2e.add_argument("--split", action="store_true",
                     help="role gateway first, then role processor on its queue (times the "
                          "processor alone) instead of one role-all process")
    e2e.add_argument("--sinks", default="influxdb", help="sinks.enabled (default influxdb)")
    e2e.add_argument("--batch-size", type=int, help="processor.batch_size")
    crash = p.add_argument_group("--crash-loop")
    crash.add_argument("--kills", type=int, default=20, help="SIGKILLs and restarts (default 20)")
    crash.add_argument("--loss", type=float, default=0.2,
                       help="fraction of datagrams the relay drops each way (default 0.2)")
    crash.add_argument("--uptime", default="2:6",
                       help="MIN:MAX seconds a gateway runs before it is killed (default 2:6)")
    crash.add_argument("--interval", type=float, default=0.05,
                       help="seconds between a device's acknowledged reading and its next one")
    soak = p.add_argument_group("--soak")
    soak.add_argument("--every", type=float, default=60.0,
                      help="seconds per row (default 60)")
    soak.add_argument("--fraction", type=float, default=0.5,
                      help="without --rate: soak at this fraction of the full rate, measured "
                           "first (default 0.5)")
    soak.add_argument("--stats", help="a target's web base URL, for its queue (/api/stats)")
    out = p.add_argument_group("output")
    out.add_argument("--json", action="store_true", help="one JSON document on stdout")
    out.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                     help="progress bar on stderr (default: runs over 3 s on a terminal)")
    return p


def settings_from(args, host: str, port: int) -> LoadSettings:
    return LoadSettings(
        host=host, port=port,
        workload=Workload(format=args.format, devices=args.devices or 100, path=args.path),
        window=args.window, rate=args.rate,
        duration=args.duration if args.duration is not None else (None if args.count else 10.0),
        count=args.count, confirmable=not args.non, ack_timeout=args.ack_timeout,
        ack_random_factor=args.ack_random_factor, max_retransmit=args.max_retransmit,
        non_timeout=args.non_timeout, sockets=args.sockets, first_seq=args.first_seq,
        seed=args.seed)


class Progress:
    """A tqdm bar on stderr for runs longer than a few seconds."""

    def __init__(self, settings: LoadSettings, enabled: bool | None, label: str = "bench"):
        expected = settings.duration or 0.0
        if enabled is None:
            enabled = sys.stderr.isatty() and (expected > 3 or (settings.count or 0) > 100_000)
        self.bar = None
        if enabled:
            from tqdm import tqdm

            total = settings.count
            self.bar = tqdm(total=total, desc=label, unit="msg", file=sys.stderr,
                            leave=False, dynamic_ncols=True)
        self.last = 0

    def __call__(self, done: int, elapsed: float) -> None:
        if self.bar is not None:
            self.bar.update(done - self.last)
            self.last = done

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_load(settings: LoadSettings, server_pid: int | None = None, progress=None,
             label: str = "bench") -> dict:
    """One load; the summary as a dict (with ``server_rss_mb`` if a pid is known)."""
    rss = RssSampler(server_pid)
    bar = Progress(settings, progress, label)
    try:
        result = LoadGenerator(settings, progress=bar, sample=rss).run()
    finally:
        bar.close()
    summary = result.summary()
    summary["server_rss_mb"] = rss.peak_mb
    return summary


def describe_load(s: LoadSettings) -> dict:
    return {
        "target": f"coap://{'[' + s.host + ']' if ':' in s.host else s.host}:{s.port}",
        "mode": f"rate {s.rate:g}/s" if s.rate else f"window {s.window}",
        "window": None if s.rate else s.window, "rate": s.rate,
        "duration_s": s.duration, "count": s.count,
        "type": "CON" if s.confirmable else "NON", "format": s.workload.format,
        "devices": s.workload.devices, "sockets": s.sockets,
        "ack_timeout": s.ack_timeout, "max_retransmit": s.max_retransmit,
    }


def machine() -> dict:
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cpus": cpu_count(), "cpu_model": model, "python": sys.version.split()[0],
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def format_summary(summary: dict, load: dict) -> str:
    lat = summary["latency_ms"]
    codes = ", ".join(f"{c} x{n}" for c, n in summary["codes"].items()) or "none"
    retrans = ", ".join(f"{k}: {v}" for k, v in summary["retransmitted"].items())
    lines = [
        f"target        {load['target']}  ({load['type']} {load['format']}, {load['mode']}, "
        f"{load['devices']} devices)",
        f"sent          {summary['sent']} requests, {summary['transmissions']} transmissions "
        f"in {summary['elapsed_s']:.2f} s",
        f"throughput    {summary['rate']:,.0f} responses/s, {summary['ok_rate']:,.0f} 2.xx/s",
        "latency       " + "  ".join(
            f"{k} {'-' if v is None else f'{v:.2f}'} ms" for k, v in lat.items()),
        f"responses     {codes}",
        f"retransmitted {summary['retransmissions']} times; per request: {retrans or '-'}",
        f"lost          {summary['lost']}",
    ]
    if summary.get("empty_acks"):
        lines.append(f"empty ACKs    {summary['empty_acks']} (separate responses)")
    if summary.get("duplicate_responses") or summary.get("unexpected"):
        lines.append(f"other         {summary['duplicate_responses']} duplicate responses, "
                     f"{summary['unexpected']} unexpected datagrams")
    if summary.get("mid_reuses"):
        lines.append(f"message ids   {summary['mid_reuses']} requests reused a message id of "
                     "their socket: a server may answer them from its dedup cache; "
                     "use more --sockets")
    if summary.get("late_sends"):
        lines.append(f"late sends    {summary['late_sends']} (the generator fell behind its rate)")
    if summary.get("server_rss_mb") is not None:
        lines.append(f"server RSS    {summary['server_rss_mb']} MB peak")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("window", "devices", "count", "sockets"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name}: must be at least 1")
    if args.rate is not None and args.rate <= 0:
        parser.error("--rate: must be positive")
    if args.soak:
        from sense_gateway.bench.soak import run_soak

        if args.every <= 0 or not 0 < args.fraction <= 1:
            parser.error("--every: positive; --fraction: above 0, at most 1")
        args.role = args.role or "all"
        return run_soak(args)
    args.role = args.role or "gateway"
    if args.compare:
        from sense_gateway.bench.compare import run_compare

        return run_compare(args)
    if args.end_to_end:
        from sense_gateway.bench.endtoend import run_end_to_end

        return run_end_to_end(args)
    if args.dtls:
        from sense_gateway.bench.dtls import run_dtls

        return run_dtls(args)
    if args.crash_loop:
        from sense_gateway.bench.crashloop import run_from_args

        if args.kills < 1 or not 0 <= args.loss < 1:
            parser.error("--kills: at least 1; --loss: a fraction below 1")
        return run_from_args(args)
    try:
        host, port = parse_target(args.target or "coap://[::1]:5683")
        settings = settings_from(args, host, port)
    except ValueError as e:
        parser.error(str(e))
    summary = run_load(settings, args.server_pid, args.progress)
    load = describe_load(settings)
    if args.json:
        document = {"machine": machine(), "load": load, "result": summary}
        sys.stdout.write(orjson.dumps(document, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        print(format_summary(summary, load))
    return 0 if summary["answered"] else 1
