"""Judging a device's sequence numbers: next, gap, late, duplicate, reset.

Sequence numbers are unsigned 32-bit and compared with serial-number
arithmetic (RFC 1982), so 4294967295 -> 0 is simply the next one. Besides
the highest number accepted, a device's state keeps a 64-bit window of
which of the 64 numbers below it were seen: a redelivered message inside
the window is a duplicate, a reordered one that was counted lost is a
late arrival (accepted, no longer lost), and a number more than the
window behind means the device restarted its counter (a reset).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

SERIAL_BITS = 32
MODULUS = 1 << SERIAL_BITS
HALF = 1 << (SERIAL_BITS - 1)
WINDOW = 64
WINDOW_MASK = (1 << WINDOW) - 1


class Verdict(enum.Enum):
    FIRST = "first"  # first sequenced message of a device
    NEXT = "next"
    GAP = "gap"  # ahead by more than one: the ones between are lost
    LATE = "late"  # behind, inside the window, not seen before
    DUPLICATE = "duplicate"
    RESET = "reset"  # far behind: the device restarted its counter
    UNSEQUENCED = "unsequenced"

    @property
    def accepted(self) -> bool:
        return self is not Verdict.DUPLICATE


@dataclass(frozen=True, slots=True)
class DeviceCounters:
    received: int = 0
    duplicates: int = 0
    lost: int = 0
    resets: int = 0
    unsequenced: int = 0


@dataclass(frozen=True, slots=True)
class SequenceState:
    """What a registry keeps per device to judge the next number."""

    last_seq: int | None = None
    #: bit i set: (last_seq - 1 - i) mod 2**32 was accepted
    window: int = 0
    counters: DeviceCounters = DeviceCounters()


@dataclass(frozen=True, slots=True)
class SequenceVerdict:
    verdict: Verdict
    #: how many numbers this message showed (or stopped showing) as lost
    lost: int
    state: SequenceState


def judge(state: SequenceState, seq: int | None) -> SequenceVerdict:
    """The verdict on *seq* and the device state if the message is kept."""
    # Counters are built field by field: dataclasses.replace costs more
    # than the rest of the judgement, and this runs once per message.
    c = state.counters
    if seq is None:
        counters = DeviceCounters(c.received + 1, c.duplicates, c.lost, c.resets,
                                  c.unsequenced + 1)
        return SequenceVerdict(Verdict.UNSEQUENCED, 0,
                               SequenceState(state.last_seq, state.window, counters))
    if state.last_seq is None:
        return SequenceVerdict(Verdict.FIRST, 0, SequenceState(seq, 0, DeviceCounters(
            c.received + 1, c.duplicates, c.lost, c.resets, c.unsequenced)))

    ahead = (seq - state.last_seq) % MODULUS
    if ahead == 0:
        return _duplicate(state)
    if ahead < HALF:
        lost = ahead - 1
        # Shift the window: the old last becomes bit (ahead - 1).
        window = ((state.window << ahead) | (1 << (ahead - 1))) & WINDOW_MASK if ahead <= WINDOW else 0
        counters = DeviceCounters(c.received + 1, c.duplicates, c.lost + lost, c.resets,
                                  c.unsequenced)
        return SequenceVerdict(Verdict.NEXT if lost == 0 else Verdict.GAP, lost,
                               SequenceState(seq, window, counters))

    behind = MODULUS - ahead
    if seq == 0 and behind > 1:
        # Counters restart at 0: going back to it is a reboot, even early on
        # (queue redeliveries are caught by envelope id before this).
        return SequenceVerdict(Verdict.RESET, 0, SequenceState(seq, 0, _reset(c)))
    if behind <= WINDOW:
        bit = 1 << (behind - 1)
        if state.window & bit:
            return _duplicate(state)
        counters = DeviceCounters(c.received + 1, c.duplicates, max(0, c.lost - 1), c.resets,
                                  c.unsequenced)
        return SequenceVerdict(Verdict.LATE, -1,
                               SequenceState(state.last_seq, state.window | bit, counters))
    return SequenceVerdict(Verdict.RESET, 0, SequenceState(seq, 0, _reset(c)))


def _reset(c: DeviceCounters) -> DeviceCounters:
    return DeviceCounters(c.received + 1, c.duplicates, c.lost, c.resets + 1, c.unsequenced)


def _duplicate(state: SequenceState) -> SequenceVerdict:
    c = state.counters
    counters = DeviceCounters(c.received, c.duplicates + 1, c.lost, c.resets, c.unsequenced)
    return SequenceVerdict(Verdict.DUPLICATE, 0,
                           SequenceState(state.last_seq, state.window, counters))
