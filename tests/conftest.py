"""pytest only: run in a scratch directory, as trial does (``_trial_temp``),
so ``TestCase.mktemp()`` paths do not land in the checkout."""

import os

import pytest


@pytest.fixture(autouse=True, scope="session")
def _scratch_directory(tmp_path_factory):
    previous = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("trial"))
    yield
    os.chdir(previous)
