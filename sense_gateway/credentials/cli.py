"""``sense devices add | rotate | revoke``: device credentials from the
command line (docs/security.md). Never prints a key but the one it has
just generated."""

from __future__ import annotations

import sys

from sense_gateway.errors import ConfigError
from sense_gateway.plugins import make_plugin_manager


def open_credential_store(config):
    from sense_gateway.backends import credential_store_factory

    pm = make_plugin_manager(config.disable_plugins, plugins_dir=config.plugins_dir)
    factory = credential_store_factory(config, pm)
    if factory is None:
        raise ConfigError(f"registry.backend: {config.registry.backend!r} keeps no credentials")
    return factory(config)


def latest_credentials(config) -> dict:
    """device -> Credential, the latest of each (revoked ones included)."""
    store = open_credential_store(config)
    try:
        return {c.device: c for c in store.changes(0)}
    finally:
        store.close()


def credential_state(credential) -> str:
    """What ``sense devices`` says of a credential: never the key."""
    if credential is None:
        return "none"
    return "revoked" if credential.revoked else "psk"


def _new_key(args) -> tuple[bytes, bool]:
    """The key the command line gives, or a generated one (then True)."""
    from sense_gateway.credentials import generate_key, parse_key_hex

    if getattr(args, "psk_file", None):
        # Kept off the command line (shell history, the process list).
        text = sys.stdin.read() if args.psk_file == "-" else open(args.psk_file).read()
        return parse_key_hex(text.strip()), False
    if getattr(args, "psk_hex", None):
        return parse_key_hex(args.psk_hex), False
    return generate_key(), True


def cmd_devices_add(config, args) -> int:
    from sense_gateway.validation import device_problem

    problem = device_problem(args.device, config.validation)
    if problem is not None:
        print(f"sense: {args.device!r}: {problem}", file=sys.stderr)
        return 2
    if not args.psk_hex and not args.psk_file and not args.generate:
        print("sense: devices add: give --generate, --psk-file FILE or --psk-hex HEX",
              file=sys.stderr)
        return 2
    return _set_key(config, args, "added")


def cmd_devices_rotate(config, args) -> int:
    current = latest_credentials(config).get(args.device)
    if current is None or current.revoked:
        print(f"sense: {args.device}: has no credential to rotate (sense devices add)",
              file=sys.stderr)
        return 1
    return _set_key(config, args, "rotated")


def _set_key(config, args, done: str) -> int:
    try:
        key, generated = _new_key(args)
    except ValueError as e:
        print(f"sense: {e}", file=sys.stderr)
        return 2
    store = open_credential_store(config)
    try:
        store.set_key(args.device, key)
    finally:
        store.close()
    print(f"{args.device}: credential {done}; gateways use it within "
          f"{config.security.refresh_interval:g} s")
    if generated:
        # Shown once: it is stored, but no command prints it again.
        print(f"pre-shared key (hex, shown only now): {key.hex()}")
    return 0


def cmd_devices_revoke(config, args) -> int:
    store = open_credential_store(config)
    try:
        revoked = store.revoke(args.device)
    finally:
        store.close()
    if not revoked:
        print(f"sense: {args.device}: has no credential", file=sys.stderr)
        return 1
    print(f"{args.device}: credential revoked; its sessions end within "
          f"{config.security.refresh_interval:g} s")
    return 0
