"""The DTLS server's one timer: every handshake's retransmissions and
deadline, and every established session's idle time, on one ``callLater``
kept for the soonest thing due (it may fire early and look again, never
late). A part of :class:`~sense_gateway.coap.dtls.DTLSServer`, which keeps
the state it reads: ``_wakeups`` (a heap of handshakes by next wake-up),
``_idle`` (sessions, least recently active first), ``_clock``.
"""

from __future__ import annotations

import heapq

from OpenSSL import SSL
from twisted.logger import Logger

from sense_gateway.coap.dtls_openssl import Session

log = Logger()

#: Never wake up sooner than this for a retransmission OpenSSL says is due.
_MIN_WAKEUP = 0.01


class Timing:
    def _arm(self, session: Session) -> None:
        """Put a handshake on the heap for its next retransmission or its deadline."""
        wakeup = session.deadline
        retransmit = session.retransmit_in()
        if retransmit is not None:
            # OpenSSL keeps its retransmission timer on the wall clock; we ask
            # how far off it is and come back then, by our own clock.
            wakeup = min(wakeup, self._clock.seconds() + max(retransmit, _MIN_WAKEUP))
        if wakeup != session.wakeup:
            session.wakeup = wakeup
            heapq.heappush(self._wakeups, (wakeup, next(self._order), session))

    @staticmethod
    def _stale(entry) -> bool:
        wakeup, _, session = entry
        return session.closed or session.established or session.wakeup != wakeup

    def _schedule(self) -> None:
        """Keep the one timer set for the soonest thing due."""
        if self._stopped:
            return
        if len(self._wakeups) > 2 * self.handshake_count() + 64:
            self._wakeups = [entry for entry in self._wakeups if not self._stale(entry)]
            heapq.heapify(self._wakeups)
        while self._wakeups and self._stale(self._wakeups[0]):
            heapq.heappop(self._wakeups)
        soonest = self._wakeups[0][0] if self._wakeups else None
        if self._idle:
            expiry = next(iter(self._idle.values())).last_active + self.idle_timeout
            soonest = expiry if soonest is None else min(soonest, expiry)
        timer = self._timer
        if timer is not None and timer.active():
            if soonest is not None and self._timer_at <= soonest:
                return   # it fires early at worst, and looks again then
            timer.cancel()
        self._timer = None
        if soonest is not None:
            self._timer_at = soonest
            self._timer = self._clock.callLater(max(0.0, soonest - self._clock.seconds()), self._tick)

    def _tick(self) -> None:
        self._timer = None
        try:
            now = self._clock.seconds()
            while self._wakeups and self._wakeups[0][0] <= now:
                entry = heapq.heappop(self._wakeups)
                if not self._stale(entry):
                    self._handshake_due(entry[2], now)
            while self._idle:
                oldest = next(iter(self._idle.values()))
                if oldest.last_active + self.idle_timeout > now:
                    break
                self._close(oldest, "sessions_expired")
        except Exception:
            self.counters["internal_errors"] += 1
            log.failure("DTLS timer failed")
        self._schedule()

    def _handshake_due(self, session: Session, now: float) -> None:
        if now >= session.deadline:
            self._refuse("timeout", session.addr, session)
            return
        try:
            session.handle_timeout()
        except SSL.Error:
            self._flush(session)
            self._refuse("failed", session.addr, session)
            return
        self._flush(session)
        self._arm(session)
