"""Judging a device's sequence numbers: next, gap, late, duplicate, reset.

Sequence numbers are unsigned 32-bit and compared with serial-number
arithmetic (RFC 1982), so 4294967295 -> 0 is simply the next one. Besides
the highest number accepted, a device's state keeps a 64-bit window of
which of the 64 numbers below it were seen, and a 4-byte digest of what
each of those 65 numbers carried: a number seen before with the same
content is a duplicate (a redelivery or a retransmission sent as a new
message); with other content it is a reboot that counts from 1 again (a
reset). A reordered message that was counted lost is a late arrival
(accepted, no longer lost), and a number more than the window behind means
the device restarted its counter (a reset too). A device that sends a boot
counter (``boot``, incremented at every start) is judged by it without
doubt: another boot is a reset, the same boot never is.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from zlib import crc32

import orjson

SERIAL_BITS = 32
MODULUS = 1 << SERIAL_BITS
HALF = 1 << (SERIAL_BITS - 1)
WINDOW = 64
WINDOW_MASK = (1 << WINDOW) - 1
#: bytes of content digest kept per sequence number
DIGEST_SIZE = 4
#: the highest number's digest and those of the WINDOW below it
DIGESTS_SIZE = (WINDOW + 1) * DIGEST_SIZE
#: a digest that says nothing (a number seen before digests were kept)
UNKNOWN = bytes(DIGEST_SIZE)
_NONZERO = (1).to_bytes(DIGEST_SIZE, "big")


class Verdict(enum.Enum):
    FIRST = "first"  # first sequenced message of a device
    NEXT = "next"
    GAP = "gap"  # ahead by more than one: the ones between are lost
    LATE = "late"  # behind, not seen before (or from an earlier boot)
    DUPLICATE = "duplicate"
    RESET = "reset"  # the device restarted its counter (rebooted)
    UNSEQUENCED = "unsequenced"

    @property
    def accepted(self) -> bool:
        return self is not Verdict.DUPLICATE


# The processor makes these per message (and the registry per device):
# plain slotted dataclasses, as the envelope's records are, since a frozen
# one sets each field through object.__setattr__ at three times the cost.
# Nothing changes one once built: judge() makes new ones; treat them as
# values.


@dataclass(slots=True)
class DeviceCounters:
    received: int = 0
    duplicates: int = 0
    lost: int = 0
    resets: int = 0
    unsequenced: int = 0


@dataclass(slots=True)
class SequenceState:
    """What a registry keeps per device to judge the next number."""

    last_seq: int | None = None
    #: bit i set: (last_seq - 1 - i) mod 2**32 was accepted
    window: int = 0
    counters: DeviceCounters = field(default_factory=DeviceCounters)
    #: DIGEST_SIZE bytes per number, from last_seq down: entry i is the
    #: digest of (last_seq - i) mod 2**32; zeros (or missing) for unknown
    digests: bytes = b""
    #: the device's boot counter with last_seq, if it sends one
    boot: int | None = None


@dataclass(slots=True)
class SequenceVerdict:
    verdict: Verdict
    #: how many numbers this message showed (or stopped showing) as lost
    lost: int
    state: SequenceState


def content_digest(readings, received: float) -> bytes:
    """DIGEST_SIZE bytes that differ when what a message carried differs.

    Over each reading's measurement, fields, tags and its own timestamp,
    not the time the gateway received it: a reading without a timestamp of
    its own was stamped with the envelope's receive time, which a device
    sending the same message again cannot repeat.
    """
    doc = [(r.measurement, None if r.ts == received else r.ts, r.fields, r.tags)
           for r in readings]
    # CRC-32 tells contents apart as well as a 4-byte slice of a
    # cryptographic hash (nobody gains by forging a match) at a third of
    # the cost, and this runs once per message.
    digest = crc32(orjson.dumps(doc, option=orjson.OPT_SORT_KEYS)).to_bytes(DIGEST_SIZE, "big")
    # Zeros mean "unknown", which compares equal to anything.
    return digest if digest != UNKNOWN else _NONZERO


def judge(state: SequenceState, seq: int | None, digest: bytes = UNKNOWN,
          boot: int | None = None) -> SequenceVerdict:
    """The verdict on *seq* (carrying content *digest*, sent in *boot*) and
    the device state if the message is kept."""
    # Counters are built field by field: dataclasses.replace costs more
    # than the rest of the judgement, and this runs once per message.
    c = state.counters
    if seq is None:
        counters = DeviceCounters(c.received + 1, c.duplicates, c.lost, c.resets,
                                  c.unsequenced + 1)
        return SequenceVerdict(Verdict.UNSEQUENCED, 0, SequenceState(
            state.last_seq, state.window, counters, state.digests, state.boot))
    if state.last_seq is None:
        return SequenceVerdict(Verdict.FIRST, 0, SequenceState(seq, 0, DeviceCounters(
            c.received + 1, c.duplicates, c.lost, c.resets, c.unsequenced), digest, boot))

    same_boot = False
    if boot is not None and state.boot is not None:
        if boot != state.boot:
            if (boot - state.boot) % MODULUS < HALF:
                return _reset(c, seq, digest, boot)
            # From a boot before the current one (delayed on the way): it
            # cannot be judged against this boot's window. Kept, since
            # points are idempotent, but it changes nothing else.
            return _outside(state)
        same_boot = True

    ahead = (seq - state.last_seq) % MODULUS
    if ahead == 0:
        if same_boot or _same(state.digests, 0, digest) is not False:
            return _duplicate(state)
        return _reset(c, seq, digest, boot)
    if ahead < HALF:
        lost = ahead - 1
        if ahead <= WINDOW:
            # Shift the window: the old last becomes bit (ahead - 1).
            window = ((state.window << ahead) | (1 << (ahead - 1))) & WINDOW_MASK
            digests = (digest + state.digests[:DIGESTS_SIZE - DIGEST_SIZE] if not lost else
                       (digest + bytes(DIGEST_SIZE * lost) + state.digests)[:DIGESTS_SIZE])
        else:
            window, digests = 0, digest
        counters = DeviceCounters(c.received + 1, c.duplicates, c.lost + lost, c.resets,
                                  c.unsequenced)
        return SequenceVerdict(Verdict.NEXT if lost == 0 else Verdict.GAP, lost,
                               SequenceState(seq, window, counters, digests,
                                             boot if boot is not None else state.boot))

    behind = MODULUS - ahead
    if behind <= WINDOW:
        bit = 1 << (behind - 1)
        # Counters restart at 0: going back to it is a reboot, even early
        # on, unless its content (or boot) shows it is the same message.
        to_zero = seq == 0 and behind > 1 and not same_boot
        if state.window & bit:
            same = True if same_boot else _same(state.digests, behind, digest)
            if same or (same is None and not to_zero):
                return _duplicate(state)
            return _reset(c, seq, digest, boot)
        if to_zero:
            return _reset(c, seq, digest, boot)
        counters = DeviceCounters(c.received + 1, c.duplicates, max(0, c.lost - 1), c.resets,
                                  c.unsequenced)
        digests = state.digests.ljust(DIGEST_SIZE * (behind + 1), b"\0")
        digests = digests[:DIGEST_SIZE * behind] + digest + digests[DIGEST_SIZE * (behind + 1):]
        return SequenceVerdict(Verdict.LATE, -1, SequenceState(
            state.last_seq, state.window | bit, counters, digests, state.boot))
    if same_boot:
        # Far behind in the same boot: an old message, not a reboot. Kept
        # (it may have been counted lost); whether it was seen is unknown.
        return _outside(state)
    return _reset(c, seq, digest, boot)


def _same(digests: bytes, index: int, digest: bytes) -> bool | None:
    """Whether entry *index* of *digests* is *digest*; None if either is unknown."""
    stored = digests[DIGEST_SIZE * index:DIGEST_SIZE * (index + 1)]
    if len(stored) < DIGEST_SIZE or stored == UNKNOWN or digest == UNKNOWN:
        return None
    return stored == digest


def _reset(c: DeviceCounters, seq: int, digest: bytes, boot: int | None) -> SequenceVerdict:
    counters = DeviceCounters(c.received + 1, c.duplicates, c.lost, c.resets + 1, c.unsequenced)
    return SequenceVerdict(Verdict.RESET, 0, SequenceState(seq, 0, counters, digest, boot))


def _outside(state: SequenceState) -> SequenceVerdict:
    c = state.counters
    counters = DeviceCounters(c.received + 1, c.duplicates, c.lost, c.resets, c.unsequenced)
    return SequenceVerdict(Verdict.LATE, 0, SequenceState(
        state.last_seq, state.window, counters, state.digests, state.boot))


def _duplicate(state: SequenceState) -> SequenceVerdict:
    c = state.counters
    counters = DeviceCounters(c.received, c.duplicates + 1, c.lost, c.resets, c.unsequenced)
    return SequenceVerdict(Verdict.DUPLICATE, 0, SequenceState(
        state.last_seq, state.window, counters, state.digests, state.boot))
