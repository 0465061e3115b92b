import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "resources" / "tests"))

from benchlib import Node, group  # noqa: E402


@pytest.fixture(scope="session")
def client():
    return Node(group("clients")[0])


@pytest.fixture(scope="session")
def cache():
    return Node("redis-cache", role="redis")


@pytest.fixture(scope="session")
def store():
    return Node("redis-store", role="redis")


@pytest.fixture(scope="session")
def nodes():
    """The replicated group (test_redis_sentinel.py)."""
    return [Node(h, role="redis") for h in group("redis_replicated")]
