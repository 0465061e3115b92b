import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "resources" / "tests"))

from benchlib import Node, group  # noqa: E402


@pytest.fixture(scope="session")
def client():
    return Node(group("clients")[0])


@pytest.fixture(scope="session")
def node():
    """The standalone node (test_rabbitmq.py)."""
    return Node(group("rabbitmq_standalone")[0], role="rabbitmq")


@pytest.fixture(scope="session")
def nodes():
    """The cluster (test_rabbitmq_cluster.py)."""
    return [Node(h, role="rabbitmq") for h in group("rabbitmq_cluster")]


@pytest.fixture(scope="session")
def worker_host():
    """The client also runs the mail worker (consuming from the cluster) and the sink it sends to."""
    from benchlib import Sink

    return Sink(group("mail_workers")[0], role="mail_worker")
