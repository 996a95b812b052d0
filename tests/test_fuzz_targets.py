"""The fuzz corpus, replayed through every fuzz target on every test run.

``tests/fuzz_corpus/NAME/`` holds the inputs worth keeping for target
NAME (seeds, inputs that reached new code, and every input that once
broke a target, named ``crash-*``): each must now pass through its target
raising nothing but the documented errors. The coverage-guided runs
themselves are ``tests/fuzz.py`` (``make fuzz``; ``make test`` runs each
target for a few seconds). One test method per target, so a failure
names the target and trial keeps going.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from tests.fuzz_targets import TARGETS, corpus, target
from tests.support import parametrize


class CorpusTests(SynchronousTestCase):
    def test_every_target_has_a_corpus(self):
        for name in TARGETS:
            self.assertGreater(len(corpus(name)), 0, name)


def _replay(self, name: str):
    """Every kept input of the target passes through it."""
    one_input = target(name)
    for path in corpus(name):
        try:
            one_input(path.read_bytes())
        except Exception as e:
            self.fail(f"{path.name}: {type(e).__name__}: {e}")


parametrize(CorpusTests, {name: (name,) for name in TARGETS}, _replay, "test_corpus_of_{}_passes")
