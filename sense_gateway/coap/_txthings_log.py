"""Keep txthings' chatter out of the gateway's log.

txthings reports every step of every exchange ("Received ...", "Sending
message ...") through the legacy ``log.msg``, several lines per datagram,
and twistd writes every one of them. We replace the ``log`` its modules
use with one that drops those messages; txthings' errors still reach the
log, and our own code logs what matters (rejections, counters).
"""

from twisted.logger import Logger

import txthings.coap
import txthings.resource


class _QuietLog:
    """Stands in for ``twisted.python.log`` inside the txthings modules."""

    _log = Logger(namespace="txthings")

    def msg(self, *message, **kwargs) -> None:
        pass

    def err(self, failure=None, why=None, **kwargs) -> None:
        self._log.failure(why or "txthings error", failure)


def install() -> None:
    quiet = _QuietLog()
    txthings.coap.log = quiet
    txthings.resource.log = quiet
