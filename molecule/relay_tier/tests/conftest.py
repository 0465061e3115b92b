"""Fixtures of the relay tier: its balancers and relays, the sink and the inside and outside clients.
test_postfix.py and test_exim.py each run the relay contract against one relay of their MTA (their
own `relay` and `contract` fixtures); the first balancer is the trusted PROXY sender the contract
needs."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "resources" / "tests"))

from bench_fixtures import (inside, outside, pytest_collection_modifyitems, pytest_configure,  # noqa: E402,F401
                            sink)  # fixtures, the markers, the `last` tests last
from benchlib import Node, group  # noqa: E402

MTA_SERVICE = {"postfix": "postfix", "exim": "exim4"}


def relay_node(name: str) -> Node:
    """A relay with the defaults of the role its group says it runs, and that MTA's service name."""
    mta = "exim" if name in group("exim_relays") else "postfix"
    node = Node(name, role=mta)
    node.mta, node.service = mta, MTA_SERVICE[mta]
    return node


def contract_fixtures(group_name: str, contract_for):
    """The `relay` and `contract` fixtures of a test module that runs the relay contract against the
    first relay of group_name: `relay, contract = contract_fixtures("postfix_relays", RelayContract.for_postfix)`."""

    @pytest.fixture(scope="module")
    def relay():
        return relay_node(group(group_name)[0])

    @pytest.fixture(scope="module")
    def contract(relay):
        return contract_for(relay)

    return relay, contract


@pytest.fixture(scope="session")
def relays():
    return [relay_node(h) for h in group("mail_relays")]


@pytest.fixture(scope="session")
def balancers():
    return [Node(h, role="haproxy") for h in group("balancers")]


@pytest.fixture(scope="session")
def balancer(balancers):
    """The relay contract's trusted PROXY sender."""
    return balancers[0]
