import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "resources" / "tests"))

from benchlib import Node, Sink, group  # noqa: E402


@pytest.fixture(scope="session")
def relay():
    return Node(group("relays")[0], role="postfix")


@pytest.fixture(scope="session")
def sink():
    return Sink(group("sinks")[0])


@pytest.fixture(scope="session")
def inside():
    return Node(group("inside_clients")[0])


@pytest.fixture(scope="session")
def outside():
    return Node(group("outside_clients")[0])


@pytest.fixture(scope="session")
def balancer():
    return Node(group("balancers")[0])
