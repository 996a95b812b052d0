"""Which devices went silent: each device's expected reporting interval
and its state (``online``, ``late``, ``offline``, ``new``) at a moment.

The state is a pure function of what the registry keeps (the last time a
message arrived, the recent inter-arrival times, an interval set by hand)
and the time it is asked at, so it needs no timer per device and reads
the same wherever it is computed: the processor, the web side, ``sense
devices``, or whatever reads a registry a Lambda function wrote.

- The expected interval is the one set with ``sense devices set ID
  --interval 60s``, else the median of the last ``INTERVAL_SAMPLES``
  inter-arrival times (a median, so one long outage or one burst does
  not move it), once there are ``MIN_SAMPLES`` of them.
- ``new``: no interval is known yet (fewer than ``MIN_SAMPLES + 1``
  messages, and none set).
- ``late``: silent for ``devices.late_after`` intervals (2) or more;
  ``offline``: for ``devices.offline_after`` intervals (5) or more;
  ``online`` otherwise.

Arrivals closer together than ``MIN_GAP`` seconds (a device sending a
burst, or a backlog it kept while offline) are one report, not an
interval: counted, they would make a bursty device's interval zero.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

#: inter-arrival times kept per device
INTERVAL_SAMPLES = 9
#: inter-arrival times needed before an interval is learned
MIN_SAMPLES = 3
#: seconds below which two arrivals are the same report
MIN_GAP = 0.1


class DeviceState(enum.Enum):
    NEW = "new"
    ONLINE = "online"
    LATE = "late"
    OFFLINE = "offline"


#: the order a fleet view lists them in: the ones to look at first
STATE_ORDER = {DeviceState.OFFLINE: 0, DeviceState.LATE: 1, DeviceState.NEW: 2,
               DeviceState.ONLINE: 3}


@dataclass(frozen=True, slots=True)
class LivenessPolicy:
    """When a device counts as late and as offline, in intervals."""

    late_after: float = 2.0
    offline_after: float = 5.0

    @classmethod
    def from_config(cls, config) -> "LivenessPolicy":
        return cls(config.devices.late_after, config.devices.offline_after)


# Judged per device for every batch the processor writes: not frozen
# (see sense_gateway/sequence.py). Treat it as a value.
@dataclass(slots=True)
class Liveness:
    state: DeviceState
    #: seconds between messages the device is expected to keep (None: unknown)
    interval: float | None
    #: "set" (by hand), "learned", or None
    interval_source: str | None
    #: seconds since its last message
    silent: float


def learned_interval(intervals) -> float | None:
    """The median of the recent inter-arrival times, once there are enough."""
    count = len(intervals)
    if count < MIN_SAMPLES:
        return None
    # What statistics.median gives, without its generality: this runs for
    # every device of every batch the processor writes.
    ordered = sorted(intervals)
    middle = count // 2
    if count % 2:
        return float(ordered[middle])
    return (ordered[middle - 1] + ordered[middle]) / 2


def add_arrival(intervals: list[float], last_seen: float, received: float) -> None:
    """Record in *intervals* (in place) a message *received* after one at
    *last_seen*, keeping the newest ``INTERVAL_SAMPLES``."""
    gap = received - last_seen
    if gap >= MIN_GAP:
        intervals.append(round(gap, 3))
        if len(intervals) > INTERVAL_SAMPLES:
            del intervals[:-INTERVAL_SAMPLES]


def liveness(record, now: float, policy: LivenessPolicy = LivenessPolicy()) -> Liveness:
    """The state of the device *record* (a DeviceRecord) at *now*."""
    silent = max(0.0, now - record.last_seen)
    if record.interval:
        interval, source = record.interval, "set"
    else:
        interval = learned_interval(record.intervals)
        source = "learned" if interval is not None else None
    if interval is None:
        state = DeviceState.NEW
    elif silent >= policy.offline_after * interval:
        state = DeviceState.OFFLINE
    elif silent >= policy.late_after * interval:
        state = DeviceState.LATE
    else:
        state = DeviceState.ONLINE
    return Liveness(state, interval, source, silent)


_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*\Z")
_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}


def parse_duration(text: str) -> float:
    """``60s``, ``5m``, ``1.5h``, ``250ms`` or plain seconds, as seconds."""
    match = _DURATION.match(text)
    if not match or float(match.group(1)) <= 0:
        raise ValueError(f"not a duration: {text!r} (say 60s, 5m, 1h)")
    return float(match.group(1)) * _SECONDS[match.group(2)]


def duration_text(seconds: float | None) -> str:
    """A duration as people read it: ``45 s``, ``12 min``, ``3 h``, ``2 days``."""
    if seconds is None:
        return "-"
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    if seconds < 129600:
        return f"{seconds / 3600:.0f} h"
    return f"{seconds / 86400:.0f} days"


def fleet_order(records, now: float, policy: LivenessPolicy):
    """(record, liveness) pairs, the ones to look at first first: offline
    and late devices silent longest first, then the others by id."""
    judged = [(record, liveness(record, now, policy)) for record in records]
    judged.sort(key=lambda pair: (STATE_ORDER[pair[1].state],
                                  -pair[1].silent if STATE_ORDER[pair[1].state] < 2 else 0,
                                  pair[0].id))
    return judged
