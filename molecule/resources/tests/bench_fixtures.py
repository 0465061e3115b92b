"""Fixtures every scenario with a sink and inside/outside clients shares, and the `timed` marker.

A scenario's conftest.py imports the ones it needs: `from bench_fixtures import sink, inside, outside`.
Groups: `sinks`, `inside_clients`, `outside_clients`. A scenario with tests marked `timed` also
imports pytest_configure, which declares the marker.
"""

import pytest
from benchlib import Node, Sink, group


@pytest.fixture(scope="session")
def sink():
    return Sink(group("sinks")[0])


@pytest.fixture(scope="session")
def inside():
    return Node(group("inside_clients")[0])


@pytest.fixture(scope="session")
def outside():
    return Node(group("outside_clients")[0])


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "timed: measures time, or loss under load; the bench runs it alone (verify-timed step), "
                   "after the scenario's ordinary tests")
    config.addinivalue_line(
        "markers", "last: leaves the scenario changed for good; runs after every other test (in a scenario "
                   "with timed tests, in a step of its own: verify-last)")


def pytest_collection_modifyitems(items):
    # `molecule verify` run by hand runs everything: the tests that leave the scenario changed last.
    items.sort(key=lambda item: item.get_closest_marker("last") is not None)
