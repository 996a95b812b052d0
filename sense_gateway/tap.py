"""``twistd sense-gateway``: command-line options and the service maker.

:func:`makeService` is also where the process-wide settings are made, once
(:func:`settle_process`), not by the services: they belong to the process
twistd runs, not to a service that may be started and stopped in a test.
"""

from __future__ import annotations

import gc
import os

from twisted.python import usage

from sense_gateway.config import ROLES, load_config
from sense_gateway.errors import ConfigError, PluginLoadError


#: The collector's first threshold in a process that runs the processor
#: (roles ``all`` and ``processor``). The processor makes a dozen container
#: objects per reading, most of them alive until their batch is written:
#: at Python's default (700) the collector ran every few dozen readings and
#: kept scanning the batches in flight (raising it took the processor from
#: ~17,000 to ~23,000 readings/s in ``sense bench --end-to-end --split``,
#: BENCHMARKS.md). Only reference cycles, rare here, wait longer to be
#: freed; reference counting frees the rest.
GC_THRESHOLD = 50_000


def settle_process(role: str) -> None:
    """The process-wide settings for a gateway of *role*, made once at start-up.

    - the garbage collector's first threshold is raised to
      :data:`GC_THRESHOLD` where a processor runs (``all``, ``processor``;
      a threshold already higher, or 0 for a disabled collector, is kept);
      role ``gateway`` keeps Python's default;
    - everything that exists once the service tree is built (modules,
      plugins, configuration, resources) is frozen out of the collector's
      way (:func:`gc.freeze`): it lives as long as the process, and the
      collector's full collections, which stop the reactor, then scan only
      what requests and batches left behind (tens of ms less at a time).

    No logging is patched: txthings' protocol, which logged every datagram
    through ``twisted.python.log``, is not used (our message layer is), and
    everything else logs through ``twisted.logger``.
    """
    if role in ("all", "processor"):
        threshold, *older = gc.get_threshold()
        if 0 < threshold < GC_THRESHOLD:
            gc.set_threshold(GC_THRESHOLD, *older)
    gc.freeze()


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
        ["workers", None, None, "Processes doing the role's work, each on a queue shard "
                                "of its own: a count or 'auto' (one per core) [default: 1]."],
        ["worker", None, None, "Set by the master for its workers: run as worker "
                               "INDEX.", int],
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
        "workers": options["workers"],
    }
    try:
        config = load_config(options["config"], overrides=overrides)
        service = make_service(config, worker=options["worker"],
                               worker_args=_worker_args(options, config))
    except (ConfigError, PluginLoadError) as e:
        # One readable line instead of a traceback wall.
        raise SystemExit(f"sense-gateway: {e}") from None
    # After the tree is built: what it holds is frozen with the modules.
    settle_process(config.role)
    return service


def _worker_args(options: Options, config):
    """``args(index)``: the command line of worker *index* after ``twistd``:
    the master's own options, the ports it chose when asked for any free
    one (port 0: every worker must share one), its worker count."""
    from sense_gateway.coap.transport import free_shared_port
    from sense_gateway.config import worker_count

    shared = [("--config", options["config"]), ("--bind", options["bind"]),
              ("--data-dir", options["data-dir"]), ("--plugins-dir", options["plugins-dir"]),
              ("--role", options["role"])]
    ports = {"--coap-port": (config.coap.port, config.coap.bind),
             "--coaps-port": (config.coaps.port, config.coaps.bind)}
    # Asked for lazily: only a master with workers picks ports.
    chosen: list = []

    def args(index: int) -> list[str]:
        if not chosen:
            chosen.extend((option, str(port or free_shared_port(bind)))
                          for option, (port, bind) in ports.items())
        flags = [item for option, value in [*shared, *chosen] if value is not None
                 for item in (option, str(value))]
        return ["-n", "--pidfile=", "--logfile=-", "sense-gateway", *flags,
                "--workers", str(worker_count(config)), "--worker", str(index)]

    return args
