"""Sequence numbers judged per device: next, gap, late, duplicate, reset,
with RFC 1982 serial arithmetic on 32 bits."""

from __future__ import annotations

from hypothesis import assume, given, settings, strategies as st
from twisted.trial.unittest import SynchronousTestCase

from sense_gateway.sequence import (
    DIGEST_SIZE, HALF, MODULUS, WINDOW, SequenceState, Verdict, judge,
)


def run(seqs, state=None):
    """Feed *seqs* to one device; returns (verdicts, final state)."""
    state = state or SequenceState()
    verdicts = []
    for seq in seqs:
        result = judge(state, seq)
        verdicts.append(result.verdict)
        state = result.state
    return verdicts, state


class SequenceTests(SynchronousTestCase):
    def test_consecutive_numbers_are_next(self):
        verdicts, state = run([7, 8, 9])
        self.assertEqual(verdicts, [Verdict.FIRST, Verdict.NEXT, Verdict.NEXT])
        self.assertEqual((state.counters.received, state.counters.lost), (3, 0))

    def test_gap_of_five_counts_five_lost(self):
        verdicts, state = run([10, 16])
        self.assertEqual(verdicts[1], Verdict.GAP)
        self.assertEqual(state.counters.lost, 5)

    def test_repeated_number_is_a_counted_duplicate(self):
        verdicts, state = run([1, 2, 2])
        self.assertEqual(verdicts[2], Verdict.DUPLICATE)
        self.assertFalse(verdicts[2].accepted)
        self.assertEqual((state.counters.duplicates, state.counters.received), (1, 2))

    def test_older_number_seen_before_is_a_duplicate(self):
        verdicts, _ = run([1, 2, 3, 4, 2])
        self.assertEqual(verdicts[-1], Verdict.DUPLICATE)

    def test_reordered_number_is_late_and_no_longer_lost(self):
        verdicts, state = run([1, 4, 2, 3])
        self.assertEqual(verdicts, [Verdict.FIRST, Verdict.GAP, Verdict.LATE, Verdict.LATE])
        self.assertEqual((state.counters.lost, state.counters.received), (0, 4))
        self.assertEqual(state.last_seq, 4)

    def test_reboot_back_near_zero_is_a_reset(self):
        verdicts, state = run(list(range(995, 1001)) + [0, 1])
        self.assertEqual(verdicts[-2:], [Verdict.RESET, Verdict.NEXT])
        self.assertEqual((state.counters.resets, state.last_seq, state.counters.lost), (1, 1, 0))

    def test_wrap_around_is_next_not_reset(self):
        verdicts, state = run([2 ** 32 - 2, 2 ** 32 - 1, 0, 1])
        self.assertEqual(verdicts[1:], [Verdict.NEXT] * 3)
        self.assertEqual((state.counters.resets, state.counters.lost), (0, 0))

    def test_gap_across_wrap_around(self):
        verdicts, state = run([2 ** 32 - 1, 3])
        self.assertEqual(verdicts[1], Verdict.GAP)
        self.assertEqual(state.counters.lost, 3)

    def test_duplicate_just_after_wrap_around(self):
        verdicts, _ = run([2 ** 32 - 1, 0, 2 ** 32 - 1])
        self.assertEqual(verdicts[-1], Verdict.DUPLICATE)

    def test_readings_without_number_are_unsequenced(self):
        verdicts, state = run([None, 5, None])
        self.assertEqual(verdicts, [Verdict.UNSEQUENCED, Verdict.FIRST, Verdict.UNSEQUENCED])
        self.assertEqual((state.counters.unsequenced, state.counters.received, state.last_seq),
                         (2, 3, 5))

    def test_big_jump_forward_forgets_the_window(self):
        verdicts, state = run([1, 1000, 999])
        self.assertEqual(verdicts, [Verdict.FIRST, Verdict.GAP, Verdict.LATE])
        self.assertEqual(state.counters.lost, 997)


class EarlyRebootTests(SynchronousTestCase):
    def test_back_to_zero_within_the_window_is_a_reset(self):
        verdicts, state = run([0, 1, 2, 3, 4, 5, 0, 1])
        self.assertEqual(verdicts[-2:], [Verdict.RESET, Verdict.NEXT])
        self.assertEqual(state.counters.resets, 1)


def carrying(*contents, boots=None):
    """(seq, digest, boot) per message: *contents* are (seq, reading value)."""
    from sense_gateway.envelope import Reading
    from sense_gateway.sequence import content_digest

    boots = boots or [None] * len(contents)
    return [(seq, content_digest([Reading({"t": value}, 1764300000.0 + i)], 1764300000.0 + i),
             boot) for i, ((seq, value), boot) in enumerate(zip(contents, boots))]


def run_carrying(messages, state=None):
    state = state or SequenceState()
    verdicts = []
    for seq, digest, boot in messages:
        result = judge(state, seq, digest, boot)
        verdicts.append(result.verdict)
        state = result.state
    return verdicts, state


class RebootTests(SynchronousTestCase):
    """A number seen before is told from a reboot by what it carried."""

    def test_the_issues_reboot_sequence_keeps_the_reading_after_the_reboot(self):
        # 1, 2, 3, 9, 9 again (the same message), then the device reboots
        # and counts from 1 with a new reading.
        verdicts, state = run_carrying(carrying((1, 22.0), (2, 22.1), (3, 22.2), (9, 22.3),
                                                (9, 22.3), (1, 30.5)))
        self.assertEqual(verdicts, [Verdict.FIRST, Verdict.NEXT, Verdict.NEXT, Verdict.GAP,
                                    Verdict.DUPLICATE, Verdict.RESET])
        self.assertEqual((state.counters.resets, state.counters.duplicates, state.last_seq,
                          state.window), (1, 1, 1, 0))

    def test_same_number_same_content_is_a_duplicate_anywhere_in_the_window(self):
        messages = carrying(*[(seq, seq / 10) for seq in range(1, 70)])
        verdicts, state = run_carrying(messages + [messages[-1], messages[5]])
        self.assertEqual(verdicts[-2:], [Verdict.DUPLICATE, Verdict.DUPLICATE])
        self.assertEqual(state.counters.resets, 0)

    def test_same_number_other_content_restarts_the_window(self):
        verdicts, state = run_carrying(carrying((1, 1.0), (2, 2.0), (3, 3.0), (2, 9.0), (3, 3.0)))
        # After the reset at 2, the old 3 is simply the next number.
        self.assertEqual(verdicts[3:], [Verdict.RESET, Verdict.NEXT])
        self.assertEqual((state.counters.resets, state.counters.received), (1, 5))

    def test_the_state_stays_small(self):
        from sense_gateway.sequence import DIGESTS_SIZE

        _, state = run_carrying(carrying(*[(seq, float(seq)) for seq in range(1, 500)]))
        self.assertEqual(len(state.digests), DIGESTS_SIZE)
        self.assertEqual(DIGESTS_SIZE, 260)

    def test_a_late_number_remembers_its_content(self):
        messages = carrying((1, 1.0), (4, 4.0), (2, 2.0))
        verdicts, state = run_carrying(messages + [messages[2]] + carrying((2, 7.0)))
        self.assertEqual(verdicts[2:], [Verdict.LATE, Verdict.DUPLICATE, Verdict.RESET])

    def test_numbers_seen_before_digests_were_kept_are_judged_as_before(self):
        # A registry written by an earlier version: a window, no digests.
        old = SequenceState(last_seq=5, window=0b1111)
        [(seq, digest, _)] = carrying((3, 1.0))
        self.assertEqual(judge(old, 3, digest).verdict, Verdict.DUPLICATE)
        self.assertEqual(judge(old, 6, digest).verdict, Verdict.NEXT)

    def test_back_to_zero_with_the_same_content_is_a_duplicate(self):
        messages = carrying((0, 1.0), (1, 1.1), (2, 1.2))
        verdicts, state = run_carrying(messages + [messages[0]] + carrying((0, 5.0)))
        self.assertEqual(verdicts[3:], [Verdict.DUPLICATE, Verdict.RESET])
        self.assertEqual(state.counters.resets, 1)


class BootCounterTests(SynchronousTestCase):
    def test_a_new_boot_is_a_reset_even_with_the_same_content(self):
        messages = carrying((1, 22.0), (2, 22.0), (1, 22.0), boots=[7, 7, 8])
        messages[2] = (1, messages[0][1], 8)  # byte for byte what boot 7 sent first
        verdicts, state = run_carrying(messages)
        self.assertEqual(verdicts, [Verdict.FIRST, Verdict.NEXT, Verdict.RESET])
        self.assertEqual((state.boot, state.last_seq, state.counters.resets), (8, 1, 1))

    def test_the_same_boot_never_resets(self):
        verdicts, state = run_carrying(carrying(*[(seq, float(seq)) for seq in range(100, 200)],
                                                (150, 1.5), (3, 0.3), boots=[4] * 102))
        # A number seen in this boot is a duplicate whatever it carries; one
        # far behind is an old message of this boot, kept, not a reboot.
        self.assertEqual(verdicts[-2:], [Verdict.DUPLICATE, Verdict.LATE])
        self.assertEqual((state.counters.resets, state.last_seq, state.boot), (0, 199, 4))

    def test_a_message_from_an_earlier_boot_changes_nothing_but_is_kept(self):
        verdicts, state = run_carrying(carrying((1, 1.0), (2, 2.0), (9, 9.0), boots=[5, 5, 4]))
        self.assertEqual(verdicts[-1], Verdict.LATE)
        self.assertEqual((state.last_seq, state.boot, state.counters.received), (2, 5, 3))

    def test_boot_counters_wrap_around(self):
        verdicts, state = run_carrying(carrying((5, 1.0), (1, 1.0), boots=[2 ** 32 - 1, 0]))
        self.assertEqual(verdicts[-1], Verdict.RESET)
        self.assertEqual(state.boot, 0)

    def test_without_a_boot_on_both_sides_the_content_decides(self):
        verdicts, _ = run_carrying(carrying((1, 1.0), (1, 2.0), boots=[3, None]))
        self.assertEqual(verdicts[-1], Verdict.RESET)


class ContentDigestTests(SynchronousTestCase):
    def digest(self, fields=None, ts=None, received=1764300000.5, tags=None, measurement="sense"):
        from sense_gateway.envelope import Reading
        from sense_gateway.sequence import content_digest

        return content_digest([Reading(fields or {"t": 1.0}, received if ts is None else ts,
                                       measurement, tags or {})], received)

    def test_the_receive_time_stamped_on_a_reading_does_not_count(self):
        # The same message sent again arrives later; without a timestamp of
        # its own each copy was stamped with its own receive time.
        self.assertEqual(self.digest(received=1764300000.5), self.digest(received=1764300099.0))

    def test_what_the_device_sent_counts(self):
        base = self.digest(ts=1764300000.0)
        for other in (self.digest(ts=1764300001.0), self.digest({"t": 1.5}, ts=1764300000.0),
                      self.digest(ts=1764300000.0, tags={"room": "a"}),
                      self.digest(ts=1764300000.0, measurement="m")):
            self.assertNotEqual(other, base)
        self.assertEqual(self.digest({"a": 1, "b": 2}), self.digest({"b": 2, "a": 1}))

    def test_a_digest_is_never_the_unknown_one(self):
        from sense_gateway.sequence import DIGEST_SIZE, UNKNOWN

        digest = self.digest()
        self.assertEqual(len(digest), DIGEST_SIZE)
        self.assertNotEqual(digest, UNKNOWN)


#: 32-bit sequence numbers, often close to where they wrap around
_SEQ = st.one_of(st.integers(0, MODULUS - 1), st.integers(MODULUS - 80, MODULUS - 1))


def _digest(n: int) -> bytes:
    """A content digest of its own for message *n* (never the unknown one)."""
    return (n + 1).to_bytes(DIGEST_SIZE, "big")


def _judged(messages, boot=None):
    """(verdict, lost) per (seq, content) message, and the final state."""
    state, out = SequenceState(), []
    for seq, content in messages:
        result = judge(state, seq, _digest(content), boot)
        out.append((result.verdict, result.lost))
        state = result.state
    return out, state


class SequenceProperties(SynchronousTestCase):
    """What holds for every stream, wrap-around included (RFC 1982)."""

    @settings(max_examples=300, deadline=None)
    @given(start=_SEQ, shift=_SEQ, steps=st.lists(st.integers(-80, 80), min_size=1, max_size=40))
    def test_verdicts_depend_only_on_differences_between_numbers(self, start, shift, steps):
        # One boot, so going back to 0 is not taken for a reboot: moving the
        # whole stream anywhere in the 32-bit space, across the wrap or not,
        # judges every message the same.
        seqs = [(start + sum(steps[:i])) % MODULUS for i in range(len(steps) + 1)]
        shifted = [(seq + shift) % MODULUS for seq in seqs]
        self.assertEqual(_judged([(s, i) for i, s in enumerate(seqs)], boot=1)[0],
                         _judged([(s, i) for i, s in enumerate(shifted)], boot=1)[0])

    @settings(max_examples=300, deadline=None)
    @given(start=_SEQ, count=st.integers(1, WINDOW), data=st.data(), with_boot=st.booleans())
    def test_numbers_within_the_window_in_any_order_are_each_accepted_and_none_lost(
            self, start, count, data, with_boot):
        numbers = [(start + i) % MODULUS for i in range(count)]
        # Without a boot counter, going back to 0 is a reboot (RebootTests).
        assume(with_boot or 0 not in numbers)
        boot = 7 if with_boot else None
        order = data.draw(st.permutations(numbers))
        judged, state = _judged([(seq, numbers.index(seq)) for seq in order], boot)
        self.assertEqual(judged[0], (Verdict.FIRST, 0))
        self.assertLessEqual({verdict for verdict, _ in judged[1:]},
                             {Verdict.NEXT, Verdict.GAP, Verdict.LATE})
        self.assertEqual((state.counters.received, state.counters.lost, state.counters.duplicates,
                          state.counters.resets), (count, 0, 0, 0))
        self.assertEqual(state.last_seq, numbers[-1])
        # Every one of them sent again with the same content is a duplicate.
        for seq in data.draw(st.permutations(numbers)):
            result = judge(state, seq, _digest(numbers.index(seq)), boot)
            self.assertEqual(result.verdict, Verdict.DUPLICATE, seq)
            self.assertEqual(result.state.counters.received, count)

    @settings(max_examples=300, deadline=None)
    @given(start=_SEQ, ahead=st.integers(1, HALF - 1))
    def test_a_number_ahead_counts_the_ones_between_as_lost(self, start, ahead):
        first = judge(SequenceState(), start, _digest(0)).state
        result = judge(first, (start + ahead) % MODULUS, _digest(1))
        self.assertEqual((result.verdict, result.lost, result.state.counters.lost),
                         (Verdict.NEXT if ahead == 1 else Verdict.GAP, ahead - 1, ahead - 1))
