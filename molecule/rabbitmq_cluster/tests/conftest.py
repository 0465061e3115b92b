import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "resources" / "tests"))

from benchlib import Node, group  # noqa: E402


@pytest.fixture(scope="session")
def client():
    return Node(group("clients")[0])


@pytest.fixture(scope="session")
def nodes():
    return [Node(h, role="rabbitmq") for h in group("rabbitmq")]
