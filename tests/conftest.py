"""Suite-wide options.

``--runslow`` runs the tests marked ``@pytest.mark.slow`` (soaks, crash
matrices, benchmarks at full size); without it they are skipped.
"""

import os

import pytest

# Every daemon a test mounts runs with the lock-ownership assertions, which
# a daemon leaves off by default (delafs/lib/locks.py).
os.environ.setdefault("DELAFS_DEBUG_LOCKS", "1")


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False,
                     help="also run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
