"""The ``sense`` command: look at a gateway's plugins and queue.

    sense plugins           loaded plugins, where each came from, its hooks
    sense queue             queue depth (visible, in flight, dead letters)
    sense plugin-docs       docs/plugins.md, assembled from the code

Both read the same configuration as the gateway (``--config``, ``SENSE_*``).
"""

from __future__ import annotations

import argparse
import sys

import orjson

from sense_gateway.config import load_config
from sense_gateway.errors import ConfigError, PluginLoadError
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
    from sense_gateway.queues.sqlite import SQLiteQueueStore

    if config.queue.backend != "sqlite":
        print(f"sense queue: backend {config.queue.backend!r} is not inspected here", file=sys.stderr)
        return 2
    if not config.queue_path.exists():
        print(f"sense queue: no queue at {config.queue_path}", file=sys.stderr)
        return 1
    store = SQLiteQueueStore(config.queue_path)
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


def cmd_plugin_docs(config, args) -> int:
    from sense_gateway.plugin_docs import render_plugin_docs

    sys.stdout.write(render_plugin_docs())
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sense", description="SENSE Gateway tools")
    parser.add_argument("--config", "-c", help="TOML configuration file")
    parser.add_argument("--data-dir", help="directory of the embedded queue and stores")
    parser.add_argument("--plugins-dir", help="directory of drop-in plugin modules")
    commands = parser.add_subparsers(dest="command", required=True)
    plugins = commands.add_parser("plugins", help="list loaded plugins and their hooks")
    plugins.add_argument("--json", action="store_true", help="machine-readable output")
    plugins.set_defaults(run=cmd_plugins)
    queue = commands.add_parser("queue", help="show the embedded queue's depth")
    queue.add_argument("--json", action="store_true", help="machine-readable output")
    queue.set_defaults(run=cmd_queue)
    docs = commands.add_parser("plugin-docs", help="print docs/plugins.md from the code")
    docs.set_defaults(run=cmd_plugin_docs)
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
