"""pytest and hypothesis configuration for the whole test suite."""
import os

from hypothesis import settings

# "ci" (the default) replays the same examples on every run, so a failure is reproducible and never flaky;
# HYPOTHESIS_PROFILE=thorough searches many more, freshly random examples when hunting for bugs locally.
settings.register_profile("ci", derandomize=True, deadline=None, max_examples=50, print_blob=True)
settings.register_profile("thorough", deadline=None, max_examples=2000, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than a few seconds; deselect with -m 'not slow'")
