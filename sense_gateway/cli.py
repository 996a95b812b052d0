"""The ``sense`` command: look at a gateway's plugins and queue.

    sense plugins           loaded plugins, where each came from, its hooks
    sense queue             queue depth (visible, in flight, dead letters)
    sense devices           the device registry (--json for scripts): liveness, who has a credential
    sense devices set ID --interval 60s|auto
                            the interval a device reports at (auto: learned)
    sense devices add ID --generate | --psk-file FILE|- | --psk-hex HEX
                            give a device its DTLS pre-shared key (docs/security.md)
    sense devices rotate ID [--psk-hex HEX]   a new key; the old one stops working
    sense devices revoke ID   the key stops working, the device's sessions end
    sense dlq list|replay   dead letters with their reasons; back into the queue
    sense plugin-docs       docs/plugins.md, assembled from the code
    sense bench             a CoAP load generator; --compare, --end-to-end
    sense send              simulated devices posting readings (coap:// or coaps://)
    sense package-lambda    the AWS Lambda zip of the processor

Both read the same configuration as the gateway (``--config``, ``SENSE_*``).
"""

from __future__ import annotations

import argparse
import os
import sys

import orjson

from sense_gateway.config import load_config
from sense_gateway.errors import ConfigError, PluginLoadError
from sense_gateway.credentials.cli import (credential_state, latest_credentials, cmd_devices_add,
                                           cmd_devices_revoke, cmd_devices_rotate)
from sense_gateway.plugins import call_collecting, make_plugin_manager


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip()
             for row in [header, *rows]]
    return "\n".join(lines)


def cmd_plugins(config, args) -> int:
    pm = make_plugin_manager(config.disable_plugins, plugins_dir=config.plugins_dir)
    formats = {name: group for name, group in call_collecting(pm, "sense_register_formats", config=config)}
    rows = []
    for name, plugin in pm.list_name_plugin():
        if plugin is None:  # blocked by disable_plugins
            continue
        hooks = sorted(h.name for h in pm.get_hookcallers(plugin) or [])
        rows.append({
            "name": name,
            "origin": pm.origin(name),
            "hooks": hooks,
            "formats": [
                {"name": f.name, "paths": list(f.paths), "content_formats": list(f.content_formats)}
                for f in formats.get(name, [])
            ],
        })
    if args.json:
        sys.stdout.write(orjson.dumps(rows, option=orjson.OPT_INDENT_2).decode() + "\n")
        return 0
    table = [[r["name"], ", ".join(r["hooks"]), r["origin"] if r["origin"] != r["name"] else ""]
             for r in rows]
    print(_table(table, ["plugin", "hooks", "from"]))
    described = [(f, r["name"]) for r in rows for f in r["formats"]]
    if described:
        print()
        print(_table(
            [[f["name"], " ".join(f["paths"]),
              " ".join("none" if c is None else str(c) for c in f["content_formats"]), plugin]
             for f, plugin in described],
            ["format", "paths", "content-formats", "plugin"]))
    return 0


def cmd_queue(config, args) -> int:
    store = _open_queue_store(config)
    try:
        depth = store.depth()
    finally:
        store.close()
    if args.json:
        print(orjson.dumps(depth).decode())
    else:
        print(_table([[str(depth["visible"]), str(depth["in_flight"]), str(depth["dead"])]],
                     ["visible", "in flight", "dead letters"]))
    return 0


def _open_queue_store(config):
    """A synchronous handle on the configured queue, from its backend."""
    from sense_gateway.queues import queue_backend

    pm = make_plugin_manager(config.disable_plugins, plugins_dir=config.plugins_dir)
    backend, settings = queue_backend(config, pm)
    if backend.open_store is None:
        raise ConfigError(f"queue.backend: {config.queue.backend!r} offers no store for "
                          "this command")
    if backend.shards is None:
        return backend.open_store(config, settings)
    # Every shard there is (--workers leaves one per worker).
    stores = [backend.open_store(config, shard) for shard in backend.shards(config, settings, 1)]
    if len(stores) == 1:
        return stores[0]
    from sense_gateway.queues.shards import ShardedStore

    return ShardedStore(stores)


def _iso(seconds: float) -> str:
    import datetime

    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).strftime(
        "%Y-%m-%dT%H:%M:%SZ")


def cmd_dlq_list(config, args) -> int:
    store = _open_queue_store(config)
    try:
        letters = store.dead_letters(args.limit)
    finally:
        store.close()
    rows = [{"id": d.id,
             # An unreadable body (damaged, or from a newer gateway) is still listed.
             "device": d.envelope.device if d.envelope else "?",
             "seq": d.envelope.seq if d.envelope else None,
             "received": _iso(d.envelope.received) if d.envelope else None,
             "failed": _iso(d.failed_at),
             "receives": d.receive_count, "reason": d.reason} for d in letters]
    if args.json:
        sys.stdout.write(orjson.dumps(rows, option=orjson.OPT_INDENT_2).decode() + "\n")
    elif not rows:
        print("no dead letters")
    else:
        print(_table([[str(r[k]) for k in ("id", "device", "seq", "failed", "receives", "reason")]
                      for r in rows], ["id", "device", "seq", "failed", "receives", "reason"]))
    return 0


def cmd_dlq_replay(config, args) -> int:
    store = _open_queue_store(config)
    ids = [int(i) if i.isdigit() else i for i in args.id] if args.id else None
    try:
        moved = store.replay(ids)
    finally:
        store.close()
    print(f"{moved} message{'s' if moved != 1 else ''} back in the queue")
    return 0


def _registry(config):
    from sense_gateway.backends import registry_factory

    pm = make_plugin_manager(config.disable_plugins, plugins_dir=config.plugins_dir)
    return registry_factory(config, pm)(config)


def cmd_devices(config, args) -> int:
    import time

    from sense_gateway.liveness import LivenessPolicy, duration_text, fleet_order

    registry = _registry(config)
    try:
        records = registry.devices()
    finally:
        registry.close()
    try:
        credentials = latest_credentials(config)
    except ConfigError:
        credentials = {}
    rows = []
    # Offline and late devices first, silent longest first: what to look at.
    for r, judged in fleet_order(records, time.time(), LivenessPolicy.from_config(config)):
        c = r.state.counters
        rows.append({"id": r.id, "state": judged.state.value, "silent": round(judged.silent, 3),
                     "interval": judged.interval, "interval_source": judged.interval_source,
                     "first_seen": _iso(r.first_seen), "last_seen": _iso(r.last_seen),
                     "last_source": r.last_source, "last_seq": r.state.last_seq,
                     "received": c.received, "lost": c.lost, "duplicates": c.duplicates,
                     "resets": c.resets, "unsequenced": c.unsequenced,
                     "credential": credential_state(credentials.pop(r.id, None))})
    # Devices with a credential that have not written yet.
    for device, credential in sorted(credentials.items()):
        rows.append({"id": device, "state": None, "silent": None, "interval": None,
                     "interval_source": None, "first_seen": None, "last_seen": None,
                     "last_source": None, "last_seq": None, "received": 0, "lost": 0,
                     "duplicates": 0, "resets": 0, "unsequenced": 0,
                     "credential": credential_state(credential)})
    if args.json:
        sys.stdout.write(orjson.dumps(rows, option=orjson.OPT_INDENT_2).decode() + "\n")
        return 0
    if not rows:
        print("no devices yet")
        return 0
    table = []
    for r in rows:
        interval = duration_text(r["interval"])
        if r["interval_source"] == "set":
            interval += " (set)"
        silent = duration_text(r["silent"]) if r["state"] in ("late", "offline") else "-"
        table.append(["-" if r[c] is None else str(r[c]) for c in ("id", "state")]
                     + [silent, interval]
                     + ["-" if r[c] is None else str(r[c]) for c in
                        ("credential", "first_seen", "last_seen", "received", "lost",
                         "duplicates", "resets")])
    print(_table(table, ["device", "state", "silent", "interval", "credential", "first seen",
                         "last seen", "received", "lost", "duplicates", "resets"]))
    return 0


def cmd_devices_set(config, args) -> int:
    from sense_gateway.liveness import duration_text, parse_duration

    if args.interval is None:
        print("sense: devices set: give --interval DURATION (60s, 5m) or --interval auto",
              file=sys.stderr)
        return 2
    try:
        seconds = None if args.interval == "auto" else parse_duration(args.interval)
    except ValueError as e:
        print(f"sense: --interval: {e}", file=sys.stderr)
        return 2
    registry = _registry(config)
    try:
        found = registry.set_interval(args.device, seconds)
    finally:
        registry.close()
    if not found:
        print(f"sense: {args.device}: not registered (a device is registered by its first "
              "message)", file=sys.stderr)
        return 1
    print(f"{args.device}: interval " + ("learned from its messages" if seconds is None
                                         else f"set to {duration_text(seconds)}"))
    return 0


def cmd_plugin_docs(config, args) -> int:
    from sense_gateway.plugin_docs import render_plugin_docs

    sys.stdout.write(render_plugin_docs())
    return 0


# Commands with their own argument parsers, in modules imported only when run.
DELEGATED = {
    "bench": ("sense_gateway.bench", "CoAP load generator: throughput, latency, --compare, --end-to-end"),
    "package-lambda": ("sense_gateway.aws.package", "build the AWS Lambda zip of the processor"),
    "send": ("sense_gateway.send", "simulated devices posting readings, over CoAP or CoAPS"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in DELEGATED:
        import importlib

        return importlib.import_module(DELEGATED[argv[0]][0]).main(argv[1:])
    parser = argparse.ArgumentParser(prog="sense", description="SENSE Gateway tools")
    parser.add_argument("--config", "-c", default=os.environ.get("SENSE_CONFIG"),
                        help="TOML configuration file (default: $SENSE_CONFIG)")
    parser.add_argument("--data-dir", help="directory of the embedded queue and stores")
    parser.add_argument("--plugins-dir", help="directory of drop-in plugin modules")
    commands = parser.add_subparsers(dest="command", required=True)
    plugins = commands.add_parser("plugins", help="list loaded plugins and their hooks")
    plugins.add_argument("--json", action="store_true", help="machine-readable output")
    plugins.set_defaults(run=cmd_plugins)
    queue = commands.add_parser("queue", help="show the embedded queue's depth")
    queue.add_argument("--json", action="store_true", help="machine-readable output")
    queue.set_defaults(run=cmd_queue)
    devices = commands.add_parser("devices", help="the device registry and credentials")
    devices.add_argument("--json", action="store_true", help="machine-readable output")
    devices.set_defaults(run=cmd_devices)
    device_commands = devices.add_subparsers(dest="devices_command")
    add = device_commands.add_parser("add", help="give a device a DTLS pre-shared key")
    add.add_argument("device")
    key = add.add_mutually_exclusive_group()
    key.add_argument("--psk-hex", metavar="HEX", help="the key, in hexadecimal (it shows in "
                                                      "the process list: prefer --psk-file)")
    key.add_argument("--psk-file", metavar="FILE",
                     help="read the key, in hexadecimal, from FILE (- for standard input)")
    key.add_argument("--generate", action="store_true",
                     help="a fresh random 16-byte key, printed once as hex")
    add.set_defaults(run=cmd_devices_add)
    rotate = device_commands.add_parser("rotate", help="a new key (generated unless given)")
    rotate.add_argument("device")
    new_key = rotate.add_mutually_exclusive_group()
    new_key.add_argument("--psk-hex", metavar="HEX", help="the new key, in hexadecimal")
    new_key.add_argument("--psk-file", metavar="FILE",
                         help="read the new key, in hexadecimal, from FILE (- for standard input)")
    rotate.set_defaults(run=cmd_devices_rotate)
    revoke = device_commands.add_parser("revoke", help="withdraw a device's key")
    revoke.add_argument("device")
    revoke.set_defaults(run=cmd_devices_revoke)
    setting = device_commands.add_parser(
        "set", help="the interval a device reports at: late after 2, offline after "
                    "devices.offline_after intervals of silence")
    setting.add_argument("device")
    setting.add_argument("--interval", metavar="DURATION",
                         help="60s, 5m, 1h; auto: learn it from the device's messages")
    setting.set_defaults(run=cmd_devices_set)
    dlq = commands.add_parser("dlq", help="dead letters: list them, replay them")
    dlq_commands = dlq.add_subparsers(dest="dlq_command", required=True)
    dlq_list = dlq_commands.add_parser("list", help="list dead letters with their reasons")
    dlq_list.add_argument("--limit", type=int, default=100)
    dlq_list.add_argument("--json", action="store_true", help="machine-readable output")
    dlq_list.set_defaults(run=cmd_dlq_list)
    dlq_replay = dlq_commands.add_parser("replay", help="move dead letters back into the queue")
    dlq_replay.add_argument("--id", action="append",
                            help="replay only this dead letter (repeatable); default: all")
    dlq_replay.set_defaults(run=cmd_dlq_replay)
    docs = commands.add_parser("plugin-docs", help="print docs/plugins.md from the code")
    docs.set_defaults(run=cmd_plugin_docs)
    for name, (_, summary) in DELEGATED.items():
        commands.add_parser(name, help=summary + f" (sense {name} --help)")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, overrides={
            "data_dir": args.data_dir, "plugins_dir": args.plugins_dir})
        return args.run(config, args)
    except (ConfigError, PluginLoadError) as e:
        print(f"sense: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
