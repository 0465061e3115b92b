import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "resources" / "tests"))

from bench_fixtures import inside, outside, sink  # noqa: E402,F401  fixtures used by the tests
from benchlib import Node, group  # noqa: E402


@pytest.fixture(scope="session")
def relays():
    return [Node(h, role="postfix") for h in group("mail_relays")]


@pytest.fixture(scope="session")
def balancers():
    return [Node(h, role="haproxy") for h in group("balancers")]
