"""Built-in plugin: ``GET /time``, the server's clock, observable.

Devices without a real-time clock (the original SENSE nodes among them)
ask the gateway for the time. The representation follows the Accept
option:

- none or 0 (text/plain): whole epoch seconds, e.g. ``1764300000``
- 50 (application/json): ``{"time": 1764300000.123}``
- 60 (application/cbor): the epoch seconds as a CBOR float

With Observe (RFC 7641) a device gets a notification every
``coap.time_interval`` seconds (default 60); at most
``coap.max_observers`` observe at once, later ones get a plain response.
"""

from __future__ import annotations

import cbor2
import orjson
from twisted.application.service import Service
from twisted.internet import defer, task
from twisted.logger import Logger
from txthings import coap

from sense_gateway.coap.resources import GatewayResource
from sense_gateway.hookspecs import hookimpl

log = Logger()

TEXT_PLAIN, JSON, CBOR = 0, 50, 60
NOT_ACCEPTABLE = 134  # 4.06


class TimeResource(GatewayResource, Service):
    observable = True
    link_attributes = {"rt": "sense.time", "if": "core.s", "ct": [TEXT_PLAIN, JSON, CBOR]}

    def __init__(self, clock, interval: float, max_observers: int):
        GatewayResource.__init__(self)
        self.clock = clock
        self.interval = interval
        self.max_observers = max_observers
        self._notifier = task.LoopingCall(self._notify)
        self._notifier.clock = clock

    def render_GET(self, request):
        key = (request.remote, request.token)
        if request.opt.observe == 1:
            # Deregistration (RFC 7641 3.6): answer without Observe.
            self.observers.pop(key, None)
            request.opt.observe = None
        elif request.opt.observe is not None and key not in self.observers and (
                len(self.observers) >= self.max_observers):
            request.opt.observe = None

        now = self.clock.seconds()
        accept = request.opt.accept
        if accept in (None, TEXT_PLAIN):
            payload = str(int(now)).encode("ascii")
        elif accept == JSON:
            payload = orjson.dumps({"time": round(now, 3)})
        elif accept == CBOR:
            payload = cbor2.dumps(round(now, 3))
        else:
            request.opt.observe = None
            return defer.succeed(coap.Message(
                code=NOT_ACCEPTABLE, payload=b"accept one of 0, 50, 60"))
        response = coap.Message(code=coap.CONTENT, payload=payload)
        response.opt.content_format = accept or TEXT_PLAIN
        response.opt.addOption(coap.UintOption(coap.MAX_AGE, max(1, int(self.interval))))
        return defer.succeed(response)

    def _notify(self) -> None:
        if self.observers:
            try:
                self.updatedState()
            except Exception:
                # A failing notification must not stop the LoopingCall.
                log.failure("time notification failed")

    def startService(self) -> None:
        super().startService()
        self._notifier.start(self.interval, now=False)

    def stopService(self):
        super().stopService()
        if self._notifier.running:
            self._notifier.stop()


@hookimpl
def sense_coap_resources(config, reactor):
    return {"/time": TimeResource(reactor, config.coap.time_interval, config.coap.max_observers)}
