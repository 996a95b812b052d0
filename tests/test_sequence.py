"""Sequence numbers judged per device: next, gap, late, duplicate, reset,
with RFC 1982 serial arithmetic on 32 bits."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from sense_gateway.sequence import SequenceState, Verdict, judge


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
