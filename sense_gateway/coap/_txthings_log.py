"""Keep txthings' chatter out of the gateway's log.

txthings reports every step of every exchange ("Received ...", "Sending
message ...") through the legacy ``log.msg`` at the default level, which
would mean several lines per datagram under load. We route its messages to
a ``txthings`` namespace at debug level instead.
"""

from twisted.logger import Logger

import txthings.coap
import txthings.resource


class _DebugLog:
    """Stands in for ``twisted.python.log`` inside the txthings modules."""

    _log = Logger(namespace="txthings")

    def msg(self, *message, **kwargs):
        self._log.debug("{text}", text=" ".join(str(m) for m in message))

    def err(self, *args, **kwargs):
        self._log.failure("txthings error", *args[:1])


def install() -> None:
    quiet = _DebugLog()
    txthings.coap.log = quiet
    txthings.resource.log = quiet
