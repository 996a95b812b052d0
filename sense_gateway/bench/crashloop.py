"""``sense bench --crash-loop``: devices through a lossy link while the
gateway is killed and restarted, then an account of every reading.

    sense bench --crash-loop [--kills 20] [--loss 0.2] [--devices 40] [--uptime 2:6]
                             [--ack-timeout 2] [--interval 0.05] [--seed S] [--json]

One ``twistd -n sense-gateway --role all`` process (queue, processor and
the embedded readings store in one data directory) listens on a fixed
port. A :class:`~sense_gateway.bench.fleet.DeviceFleet` sends through a
:class:`~sense_gateway.bench.lossy_proxy.LossyProxy` that drops ``loss``
of the datagrams each way. After a random uptime (``--uptime MIN:MAX``
seconds, from the seed) the gateway is SIGKILLed and started again on the
same port, ``--kills`` times. Then the devices finish their current
readings, the last gateway drains its queue and is stopped, and the
files are read:

- every reading a device got a 2.04 for must be in the store exactly once
  (its ``n`` field once per device and number), no number twice;
- the registry must count no loss (``lost`` 0 for every device);
- nothing in the dead letters.

The report says what was acknowledged, stored, missing, stored twice,
and the registry's counters (duplicates there are retransmissions the
restarted gateway could not recognise, dropped by the processor: they
cost nothing in the store).
"""

from __future__ import annotations

import random
import shutil
import sqlite3
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import orjson

from sense_gateway.bench.fleet import DeviceFleet
from sense_gateway.bench.lossy_proxy import LossyProxy
from sense_gateway.bench.processes import Gateway


@dataclass
class CrashLoopSettings:
    kills: int = 20
    devices: int = 40
    loss: float = 0.2
    #: seconds a gateway runs (once listening) before it is killed
    uptime: tuple[float, float] = (2.0, 6.0)
    #: RFC 7252 transmission parameters of the devices
    ack_timeout: float = 2.0
    ack_random_factor: float = 1.5
    max_retransmit: int = 4
    #: seconds between a device's acknowledged reading and its next one
    interval: float = 0.05
    #: Max-Age of a 5.03 is multiplied by this (tests run faster clocks)
    time_scale: float = 1.0
    seed: int | None = None
    #: gateway settings (``SENSE_*`` variables) besides the bench's own
    gateway_settings: dict | None = None
    #: seconds to wait, at the end, for readings and the queue to settle
    drain_timeout: float = 120.0


def run_crash_loop(settings: CrashLoopSettings, workdir: Path, log=lambda text: None) -> dict:
    """Run one crash loop with its files in *workdir*; the report."""
    rng = random.Random(settings.seed)
    data_dir = workdir / "gateway"
    gateway_settings = {"processor.poll_interval": 0.1, **(settings.gateway_settings or {})}
    runs = [0]

    def start(port=None, coaps_port=None) -> Gateway:
        runs[0] += 1
        return Gateway(data_dir, role="all", settings=gateway_settings, port=port,
                       coaps_port=coaps_port, label=f"run-{runs[0]:03d}")

    gateway = start()
    proxy = LossyProxy((gateway.host, gateway.port), settings.loss,
                       seed=rng.getrandbits(32), listen=(gateway.host, 0)).start()
    fleet = DeviceFleet((gateway.host, proxy.port), settings.devices,
                        interval=settings.interval, ack_timeout=settings.ack_timeout,
                        ack_random_factor=settings.ack_random_factor,
                        max_retransmit=settings.max_retransmit, time_scale=settings.time_scale,
                        seed=rng.getrandbits(32)).start()
    started = time.monotonic()
    downtime = []
    #: messages a killed gateway's processor had received and not deleted
    held = []
    drained = False
    try:
        for kill in range(settings.kills):
            # Every other kill waits (within the uptime) for the processor
            # to hold a batch: what it held must come back at once, in order.
            _wait_to_kill(data_dir / "queue.sqlite3", rng, settings.uptime, kill % 2 == 1)
            gateway.kill()
            down = time.monotonic()
            held.append(held_messages(data_dir / "queue.sqlite3"))
            gateway = start(gateway.port, gateway.coaps_port)
            downtime.append(time.monotonic() - down)
            log(f"kill {kill + 1}/{settings.kills}: "
                f"{sum(len(d.acknowledged) for d in fleet.devices)} acknowledged, "
                f"back after {downtime[-1]:.2f} s")
        time.sleep(rng.uniform(*settings.uptime))
        drained = fleet.drain(settings.drain_timeout)
        loop_s = time.monotonic() - started
        queue = _wait_for_empty_queue(gateway, settings.drain_timeout)
        gateway.stop()
    finally:
        fleet.stop()
        proxy.stop()
        gateway.stop()
    report = account(data_dir, fleet.acknowledged)
    report.update({
        "kills": settings.kills, "devices": settings.devices, "loss": settings.loss,
        "seed": settings.seed, "uptime_s": list(settings.uptime),
        "ack_timeout_s": settings.ack_timeout, "max_retransmit": settings.max_retransmit,
        "elapsed_s": round(loop_s, 2),
        "restart_s": {"mean": round(sum(downtime) / len(downtime), 3) if downtime else None,
                      "max": round(max(downtime), 3) if downtime else None},
        "held_at_kill": {"total": sum(held), "kills": sum(1 for n in held if n)},
        "devices_drained": drained, "queue_at_end": queue,
        "fleet": fleet.summary(), "proxy": proxy.counters.as_dict(),
    })
    report["ok"] = (drained and not report["missing"] and not report["stored_twice"]
                    and report["registry"]["lost"] == 0 and not report["registry"]["devices_lost"]
                    and queue.get("dead", 0) == 0 and not report["fleet"]["errors"])
    return report


def held_messages(queue_path: Path) -> int:
    """Messages now hidden in a queue file: received by a processor and
    not yet deleted (0 if the file cannot be read)."""
    db = sqlite3.connect(f"file:{queue_path}?mode=ro", uri=True)
    try:
        return db.execute("SELECT COUNT(*) FROM messages WHERE visible_at > ?",
                          (time.time(),)).fetchone()[0]
    except sqlite3.Error:
        return 0
    finally:
        db.close()


def _wait_to_kill(queue_path: Path, rng: random.Random, uptime: tuple[float, float],
                  holding: bool) -> None:
    low, high = uptime
    if not holding:
        time.sleep(rng.uniform(low, high))
        return
    time.sleep(low)
    deadline = time.monotonic() + high - low
    while time.monotonic() < deadline and not held_messages(queue_path):
        time.sleep(0.002)


def _wait_for_empty_queue(gateway: Gateway, timeout: float) -> dict:
    """Wait until the processor has taken everything out of the queue."""
    deadline = time.monotonic() + timeout
    depth: dict = {}
    while time.monotonic() < deadline:
        try:
            depth = gateway.stats().get("queue", {})
        except (OSError, RuntimeError, ValueError):
            depth = {}
        if depth and depth.get("visible", 1) == 0 and depth.get("in_flight", 1) == 0:
            break
        time.sleep(0.1)
    return depth


def account(data_dir: Path, acknowledged: dict[str, list[int]]) -> dict:
    """Compare what the devices were told with the store and the registry."""
    stored: dict[str, Counter] = {}
    db = sqlite3.connect(f"file:{data_dir / 'readings.sqlite3'}?mode=ro", uri=True)
    try:
        for device, value in db.execute(
                "SELECT device, value FROM readings WHERE measurement = 'sense' AND field = 'n'"):
            stored.setdefault(device, Counter())[int(value)] += 1
    finally:
        db.close()
    missing, twice, unacknowledged = {}, {}, {}
    for device, numbers in acknowledged.items():
        have = stored.get(device, Counter())
        gone = [n for n in numbers if have[n] == 0]
        if gone:
            missing[device] = gone
    for device, have in stored.items():
        doubled = sorted(n for n, count in have.items() if count > 1)
        if doubled:
            twice[device] = doubled
        extra = sorted(set(have) - set(acknowledged.get(device, ())))
        if extra:
            unacknowledged[device] = extra
    registry = _registry_counters(data_dir / "registry.sqlite3")
    return {
        "acknowledged": sum(len(n) for n in acknowledged.values()),
        "stored": sum(sum(c.values()) for c in stored.values()),
        "stored_distinct": sum(len(c) for c in stored.values()),
        "duplicates": sum(sum(c.values()) - len(c) for c in stored.values()),
        "missing": missing, "stored_twice": twice, "stored_unacknowledged": unacknowledged,
        "registry": registry,
    }


def _registry_counters(path: Path) -> dict:
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        rows = db.execute("SELECT id, received, duplicates, lost, resets FROM devices").fetchall()
    finally:
        db.close()
    return {
        "devices": len(rows),
        "received": sum(r[1] for r in rows),
        "duplicates": sum(r[2] for r in rows),
        "lost": sum(r[3] for r in rows),
        "resets": sum(r[4] for r in rows),
        "devices_lost": {r[0]: r[3] for r in rows if r[3]},
    }


def _uptime(text: str) -> tuple[float, float]:
    low, _, high = text.partition(":")
    low_s, high_s = float(low), float(high or low)
    if not 0 < low_s <= high_s:
        raise ValueError("--uptime: MIN:MAX seconds, 0 < MIN <= MAX")
    return low_s, high_s


def run_from_args(args) -> int:
    try:
        uptime = _uptime(args.uptime)
    except ValueError as e:
        print(f"sense bench: {e}", file=sys.stderr)
        return 2
    settings = CrashLoopSettings(
        kills=args.kills, devices=args.devices or 40, loss=args.loss, uptime=uptime,
        ack_timeout=args.ack_timeout, ack_random_factor=args.ack_random_factor,
        max_retransmit=args.max_retransmit, interval=args.interval,
        time_scale=args.ack_timeout / 2.0, seed=args.seed)
    workdir = Path(tempfile.mkdtemp(prefix="sense-bench-crash-"))
    log = (lambda text: None) if args.json else (lambda text: print(text, file=sys.stderr))
    try:
        report = run_crash_loop(settings, workdir, log)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        from sense_gateway.bench import machine

        document = {"machine": machine(), "result": report}
        sys.stdout.write(orjson.dumps(document, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        print(format_report(report))
    return 0 if report["ok"] else 1


def format_report(r: dict) -> str:
    f, reg = r["fleet"], r["registry"]

    def some(d: dict) -> str:
        return ", ".join(f"{k}: {v[:5]}{'...' if len(v) > 5 else ''}" for k, v in
                         list(d.items())[:3]) or "none"
    return "\n".join([
        f"crash loop    {r['kills']} kills, {r['devices']} devices, loss {r['loss']:.0%} each way, "
        f"uptime {r['uptime_s'][0]:g}-{r['uptime_s'][1]:g} s, {r['elapsed_s']:.1f} s",
        f"kills         {r['held_at_kill']['kills']} while the processor held messages "
        f"({r['held_at_kill']['total']} in all)",
        f"devices       {f['acknowledged']} readings acknowledged, {f['transmissions']} "
        f"transmissions, {f['retransmissions']} retransmissions, {f['gave_up']} given up and "
        f"sent again; errors {f['errors'] or 'none'}",
        f"store         {r['stored']} readings ({r['stored_distinct']} distinct), "
        f"{r['duplicates']} stored twice",
        f"missing       {sum(len(v) for v in r['missing'].values())} acknowledged readings "
        f"not stored ({some(r['missing'])})",
        f"registry      {reg['devices']} devices, received {reg['received']}, duplicates "
        f"{reg['duplicates']} (dropped), lost {reg['lost']}, resets {reg['resets']}",
        f"queue at end  {r['queue_at_end']}",
        f"restarts      mean {r['restart_s']['mean']} s, max {r['restart_s']['max']} s "
        "(kill to listening)",
        f"verdict       {'OK' if r['ok'] else 'FAILED'}",
    ])
