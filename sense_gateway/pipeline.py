"""From payload to queued envelope: route, decode, validate, enqueue.

:class:`IngestPipeline` knows nothing about CoAP or UDP. It gets a payload
and a :class:`~sense_gateway.envelope.RequestContext`, and either raises a
:class:`~sense_gateway.errors.RequestError` at once (the device gets the
error's code) or calls back once the envelope is durable.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable
from functools import partial

from prometheus_client.core import HistogramMetricFamily
from prometheus_client.utils import floatToGoString
from twisted.logger import Logger

from sense_gateway.config import Config
from sense_gateway.envelope import Envelope, Reading, RequestContext, new_envelope_id
from sense_gateway.errors import (
    DecodeError,
    PluginLoadError,
    RequestError,
    TooLarge,
    UnsupportedFormat,
    ValidationError,
)
from sense_gateway.formats import Format
from sense_gateway.queues import EnvelopeQueue

log = Logger()

#: the plugin of the built-in checks (sense_gateway.validation)
BUILTIN_VALIDATION = "sense_gateway.validation"


def _describe_format(cf: int | None) -> str:
    return "none" if cf is None else str(cf)


def cumulative_buckets(bounds, counts) -> list[tuple[str, int]]:
    """Prometheus histogram buckets from per-bucket *counts* (the last one
    above every bound)."""
    cumulative, buckets = 0, []
    for bound, count in zip([*bounds, float("inf")], counts):
        cumulative += count
        buckets.append((floatToGoString(bound), cumulative))
    return buckets


class LatencyHistogram:
    """A Prometheus histogram for the reactor thread alone: ``observe`` is a
    bisection and an increment (prometheus_client's takes a lock and walks
    the buckets, a noticeable share of the hot path), ``collect`` gives the
    same metric family a registry would."""

    def __init__(self, name: str, documentation: str, buckets: tuple[float, ...]):
        self.name, self.documentation = name, documentation
        self.bounds = list(buckets)
        self.counts = [0] * (len(buckets) + 1)  # the last: above every bound
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def snapshot(self) -> dict:
        """Its bounds, per-bucket counts and sum, as plain data."""
        return {"bounds": self.bounds, "counts": self.counts, "sum": self.sum}

    def collect(self):
        yield HistogramMetricFamily(self.name, self.documentation,
                                    buckets=cumulative_buckets(self.bounds, self.counts),
                                    sum_value=self.sum)


class IngestPipeline:
    """Decodes and validates readings, then hands them to the queue."""

    def __init__(self, formats: Iterable[Format], validate, queue, config: Config, clock=None,
                 policy=None):
        """
        *validate* is the ``sense_validate`` hook caller: called with
        ``envelope`` and ``config``, it returns one result per plugin. If
        it has ``implemented_only_by(plugin)`` (a
        :class:`~sense_gateway.plugins.DirectHook`) and says the built-in
        validation is alone, a request its decoder already checked
        against the configured limits is not validated twice.
        *policy* (an :class:`~sense_gateway.admission.IngestPolicy`), if
        given, decides who may write as which device.
        """
        self._routes: dict[str, dict[int | None, Format]] = {}
        for fmt in formats:
            for path in fmt.paths:
                route = self._routes.setdefault(path, {})
                for cf in fmt.content_formats:
                    if cf in route:
                        raise PluginLoadError(
                            f"formats {route[cf].name!r} and {fmt.name!r} both claim "
                            f"Content-Format {_describe_format(cf)} on {path}")
                    route[cf] = fmt
        self._validate = validate
        # The last limits a decoder checked that equal the configured ones.
        self._limits_checked = None
        self._builtin_alone = getattr(validate, "implemented_only_by", None)
        self.policy = policy
        self.queue = queue
        self.config = config
        self._max_payload = config.coap.max_payload
        self._keep_raw = config.keep_raw
        self._clock = clock
        self._put_then = (None, None)
        #: seconds from a request's arrival to its envelope being durable
        self.enqueue_latency = LatencyHistogram(
            "sense_enqueue_latency_seconds", "Time from a request's arrival to its envelope "
            "being stored",
            (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0))

    def _checked_enough(self, limits) -> bool:
        """Whether a decoder's own checks against *limits* make the
        validators redundant: the limits are the configured ones and the
        built-in validation is the only validator (another one sees every
        envelope, and may change what the built-in one would then check)."""
        if limits is not self._limits_checked:
            if limits != self.config.validation:
                return False
            self._limits_checked = limits
        return self._builtin_alone is not None and self._builtin_alone(BUILTIN_VALIDATION)

    def paths(self) -> list[str]:
        return sorted(self._routes)

    def content_formats(self, path: str) -> list[int | None]:
        return list(self._routes.get(path, {}))

    def submit(self, payload: bytes, context: RequestContext,
               done: Callable[[BaseException | None], object]) -> None:
        """Turn one request into a queued envelope.

        Raises a :class:`RequestError` at once for a request refused as it
        is (undecodable, invalid, too large...); otherwise calls
        ``done(None)`` once the envelope is durable, or ``done(error)``
        (possibly before returning) when the queue cannot take it. No
        Deferred per request: the CoAP layer answers from *done*.
        """
        envelope = self.prepare(payload, context)
        queue = self.queue
        if self._put_then[0] is not queue:
            # Looked up once per queue (tests swap it): a queue that only has
            # the basic contract gets the default, through put().
            put = getattr(queue, "put_then", None) or partial(EnvelopeQueue.put_then, queue)
            self._put_then = (queue, put)
        put_then = self._put_then[1]
        if self._clock is None:
            put_then([envelope], done)
            return
        received, clock, latency = context.received, self._clock, self.enqueue_latency

        def stored(error: BaseException | None) -> None:
            if error is None:
                latency.observe(clock.seconds() - received)
            done(error)
        put_then([envelope], stored)

    def prepare(self, payload: bytes, context: RequestContext) -> Envelope:
        """Decode and validate one request into an envelope, or raise why not."""
        if len(payload) > self._max_payload:
            raise TooLarge(f"payload over {self._max_payload} bytes")
        route = self._routes[context.path]
        fmt = route.get(context.content_format)
        if fmt is None:
            accepted = ", ".join(_describe_format(cf) for cf in route)
            raise UnsupportedFormat(
                f"Content-Format {_describe_format(context.content_format)} not accepted "
                f"on {context.path}; use {accepted}")
        try:
            decoded = fmt.decode(payload, context)
        except RequestError:
            raise
        except Exception as e:
            # A decoder bug must cost one request, not the server.
            log.failure("decoder {format} failed", format=fmt.name)
            raise DecodeError(f"{fmt.name} decoder failed: {type(e).__name__}") from e

        received = context.received
        readings = [
            r if r.ts is not None else Reading(r.fields, received, r.measurement, r.tags, r.units)
            for r in decoded.readings
        ]
        host = context.source_host
        device = decoded.device
        if device is None:
            # A format without a device id: over DTLS the identity names it.
            device = context.identity or ""
        # Positional: this runs for every request.
        envelope = Envelope(
            new_envelope_id(),
            device,
            decoded.seq,
            received,
            f"[{host}]:{context.source_port}" if ":" in host else f"{host}:{context.source_port}",
            context.transport,
            context.identity,
            context.path,
            context.content_format,
            readings,
            payload if self._keep_raw else None,
            decoded.boot,
        )
        if decoded.checked is None or not self._checked_enough(decoded.checked):
            for problems in self._validate(envelope=envelope, config=self.config):
                if problems:
                    raise ValidationError(problems[0])
        if self.policy is not None:
            # The device as it stands after the validators: what is stored.
            self.policy.check(envelope.device, context)
        return envelope
