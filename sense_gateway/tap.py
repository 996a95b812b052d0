"""``twistd sense-gateway``: command-line options and the service maker."""

from __future__ import annotations

import os

from twisted.python import usage

from sense_gateway.config import ROLES, load_config
from sense_gateway.errors import ConfigError, PluginLoadError


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "Receive sensor readings over CoAP, decode and validate them through "
        "plugins, and queue them durably. Options override the --config file "
        "and SENSE_* environment variables (e.g. SENSE_COAP_PORT)."
    )
    optParameters = [
        ["config", "c", os.environ.get("SENSE_CONFIG"), "TOML configuration file (etc/sense-gateway.toml shows every key)."],
        ["coap-port", None, None, "UDP port for CoAP [default: 5683].", int],
        ["coaps-port", None, None, "UDP port for CoAP over DTLS [default: 5684].", int],
        ["bind", None, None, "Address to listen on (both ports); :: serves IPv6 and IPv4 "
                             "[default: ::]."],
        ["data-dir", None, None, "Directory for the embedded queue and stores [default: ./var]."],
        ["plugins-dir", None, None, "Directory of drop-in plugin modules [default: plugins]."],
        ["web-port", None, None, "HTTP port of the API, /healthz and /metrics [default: 8080].", int],
        ["role", None, None, f"What this process runs: {'|'.join(ROLES)} [default: all]."],
    ]

    def postOptions(self):
        if self["role"] is not None and self["role"] not in ROLES:
            raise usage.UsageError(f"--role must be one of {', '.join(ROLES)}")


def makeService(options: Options):
    from sense_gateway.service import make_service

    overrides = {
        "coap.port": options["coap-port"],
        "coap.bind": options["bind"],
        "coaps.port": options["coaps-port"],
        "coaps.bind": options["bind"],
        "data_dir": options["data-dir"],
        "plugins_dir": options["plugins-dir"],
        "role": options["role"],
        "web.port": options["web-port"],
    }
    try:
        config = load_config(options["config"], overrides=overrides)
        return make_service(config)
    except (ConfigError, PluginLoadError) as e:
        # One readable line instead of a traceback wall.
        raise SystemExit(f"sense-gateway: {e}") from None
