"""The plugin contract: every hook a SENSE Gateway plugin may implement.

Hooks are cheap and synchronous. Anything that does I/O (queues, later
sinks and registries) is an object a ``sense_register_*`` hook returns a
factory for; the core calls those objects and owns retries and threads.

Implement a hook with the ``hookimpl`` marker::

    from sense_gateway.hookspecs import hookimpl

    @hookimpl
    def sense_register_formats():
        return [Format(...)]
"""

from __future__ import annotations

import pluggy

PROJECT = "sense_gateway"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def sense_register_formats(config):
    """Return the payload formats this plugin decodes.

    Called once at start-up with the :class:`sense_gateway.config.Config`
    (``config.section("myplugin")`` is the plugin's own TOML table; like
    every hook argument it may be left out of the implementation). Return an iterable of
    :class:`sense_gateway.formats.Format`. Each format names the CoAP
    Content-Format numbers it accepts (``None`` for "no option"), the
    paths it accepts them on (each path becomes a POST resource listed in
    ``/.well-known/core``), and a ``decode(payload, context)`` callable
    returning :class:`sense_gateway.envelope.Decoded` or raising
    :class:`sense_gateway.errors.DecodeError`. ``decode`` runs on the
    reactor thread for every request: keep it fast and free of I/O.

    Two formats may not claim the same (path, Content-Format) pair; a
    clash fails start-up naming both.

    Example::

        @hookimpl
        def sense_register_formats():
            return [Format("kv", content_formats=(0,), paths=("/kv",),
                           decode=decode_kv)]
    """


@hookspec
def sense_validate(envelope, config):
    """Check an accepted-looking envelope before it is queued.

    Called for every decoded request, on the reactor thread, with the
    :class:`sense_gateway.envelope.Envelope` about to be queued and the
    :class:`sense_gateway.config.Config`. Every implementation is called.
    Return ``None`` (or an empty list) when it is fine, or a list of short
    problem strings; the device gets 4.00 Bad Request with the first
    problem as diagnostic payload. Do not raise. (While the built-in
    validation is the only implementation, a request that its decoder
    already checked against the configured limits, as the built-in SENSE
    formats do in one pass, is not checked a second time.)

    Example::

        @hookimpl
        def sense_validate(envelope, config):
            if envelope.device.startswith("test-"):
                return ["test devices are not accepted here"]
    """


@hookspec
def sense_register_queues():
    """Return queue backends by name: ``{name: QueueBackend}``.

    Called once at start-up and by the ``sense queue`` and ``sense dlq``
    commands; the core picks the backend named by the ``queue.backend``
    key. A :class:`sense_gateway.queues.QueueBackend` brings these,
    the same for the built-in ``sqlite`` and ``sqs`` as for a plugin's:

    - ``open(config, settings, reactor)``: the
      :class:`sense_gateway.queues.EnvelopeQueue` the gateway runs (a
      Twisted service, started and stopped with the gateway), or raise
      :class:`sense_gateway.errors.ConfigError` naming the key at fault;
    - ``open_store(config, settings)``: a synchronous
      :class:`sense_gateway.queues.QueueStore` (``depth``,
      ``dead_letters``, ``replay``, ``close``) for the commands;
    - ``settings``: a frozen dataclass declaring the backend's own keys,
      the table ``[queue.NAME]`` (environment ``SENSE_QUEUE_NAME_KEY``),
      each with its type and default. The core converts and checks them
      at start-up (a wrong type fails start-up naming the key) and passes
      the instance to both callables. The keys of ``[queue]`` itself
      (``max_receives``, ``max_depth``, ...) are for every backend;
    - ``shards(config, settings, count)`` (optional): the settings of each
      shard for ``--workers`` (one per ingest worker, all drained by the
      processor; docs/workers.md). Without it every worker shares the
      one queue.

    A bare ``factory(config, reactor)`` is still taken, as a backend with
    no settings and no commands.

    Example::

        @dataclass(frozen=True)
        class FileSettings:
            directory: str = "files-queue"

        @hookimpl
        def sense_register_queues():
            return {"files": QueueBackend(open=open_file_queue,
                                          open_store=FileStore, settings=FileSettings)}
    """


@hookspec
def sense_register_registries():
    """Return device registry backends by name: ``{name: factory}``.

    Called once at start-up (and by the Lambda handler); the core picks
    the factory named by ``registry.backend`` and calls
    ``factory(config)`` on the processor's thread. The factory returns a
    :class:`sense_gateway.registry.DeviceRegistry`: synchronous, with a
    ``commit`` that is conditional on the version each record was loaded
    with.
    """


@hookspec
def sense_register_credential_stores():
    """Return device credential backends by name: ``{name: factory}``.

    Credentials live with the registry: the core picks the factory named
    like ``registry.backend`` (a plugin registry brings its credential
    store under the same name) and calls ``factory(config)`` on the thread
    that will use it (the gateway's directory thread, or a ``sense
    devices`` command). The factory returns a
    :class:`sense_gateway.credentials.CredentialStore`: synchronous,
    numbering every change with a store-wide serial. Keys must never
    appear in logs, errors or reprs.

    Example::

        @hookimpl
        def sense_register_credential_stores():
            return {"vault": lambda config: VaultCredentialStore(config.section("vault"))}
    """


@hookspec
def sense_register_sinks():
    """Return metric sinks by name: ``{name: factory}``.

    Called once at start-up; every sink named in ``sinks.enabled`` is
    built with ``factory(config)`` on the processor's thread and gets every
    batch. A sink is a :class:`sense_gateway.sinks.MetricSink`:
    ``write(points)`` stores :class:`sense_gateway.sinks.MetricPoint` or
    raises :class:`sense_gateway.sinks.SinkError` (``retryable`` tells a
    server that is down from one that refused the points; ``refused``
    names the points at fault when the server said which). Writing the
    same points twice must leave one copy.
    """


@hookspec
def sense_coap_resources(config, reactor):
    """Return extra CoAP resources: ``{path: resource}``.

    Called once at start-up with the configuration and the reactor.
    ``path`` is ``"/name"`` or ``"/a/b"``; ``resource`` is a txthings
    ``CoAPResource`` (see :mod:`sense_gateway.coap.resources` for the
    helpers our own resources use). Resources with ``visible = True`` are
    listed in ``/.well-known/core`` with their link parameters. A resource
    that needs a clock or periodic work may also be a Twisted service; the
    gateway then starts and stops it.

    Example::

        @hookimpl
        def sense_coap_resources(config, reactor):
            return {"/version": VersionResource()}
    """
