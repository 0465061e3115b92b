import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "resources" / "tests"))

from benchlib import Node, Sink, group  # noqa: E402


@pytest.fixture(scope="session")
def relays():
    return [Node(h, role="postfix") for h in group("mail_relays")]


@pytest.fixture(scope="session")
def balancers():
    return [Node(h, role="haproxy") for h in group("balancers")]


@pytest.fixture(scope="session")
def sink():
    return Sink(group("sinks")[0])


@pytest.fixture(scope="session")
def inside():
    return Node(group("inside_clients")[0])


@pytest.fixture(scope="session")
def outside():
    return Node(group("outside_clients")[0])
