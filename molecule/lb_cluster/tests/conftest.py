import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "resources" / "tests"))

from bench_fixtures import inside, outside, pytest_configure, sink  # noqa: E402,F401  fixtures, marker
from benchlib import Node, group  # noqa: E402


MTA_SERVICE = {"postfix": "postfix", "exim": "exim4"}


def relay_node(name: str) -> Node:
    """A relay with the defaults of the role its group says it runs, and that MTA's service name."""
    mta = "exim" if name in group("exim_relays") else "postfix"
    node = Node(name, role=mta)
    node.mta, node.service = mta, MTA_SERVICE[mta]
    return node


@pytest.fixture(scope="session")
def relays():
    return [relay_node(h) for h in group("mail_relays")]


@pytest.fixture(scope="session")
def balancers():
    return [Node(h, role="haproxy") for h in group("balancers")]
