import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "resources" / "tests"))

from bench_fixtures import inside, outside, pytest_configure, sink  # noqa: E402,F401  fixtures, marker
from benchlib import Node, group  # noqa: E402
from relay_contract import RelayContract  # noqa: E402


@pytest.fixture(scope="session")
def relay():
    return Node(group("relays")[0], role="exim")


@pytest.fixture(scope="session")
def balancer():
    return Node(group("balancers")[0])


@pytest.fixture(scope="session")
def contract(relay):
    return RelayContract.for_exim(relay)
