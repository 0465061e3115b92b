"""pytest plugin of the test bench: each test gives way to a timed step elsewhere (mailstack.gate).

Loaded by the suite runner (`-p mailstack.pytest_gate`) in the steps that are not timed. A test
enters the gate before its setup and leaves it after its teardown, so that a timed step elsewhere
waits at most for the tests running now. The programs a test starts (an ansible-playbook run that
converges a node with bad input, say) run inside the test's turn: the plugin takes the gate's
name out of the environment they inherit.
"""

from __future__ import annotations

import os

import pytest

from mailstack import gate as _gate

_GATE: _gate.Gate | None = None


def pytest_configure(config):
    global _GATE
    _GATE = _gate.from_environment()
    os.environ.pop(_gate.ENV, None)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    if _GATE is None:
        yield
        return
    with _GATE.shared() as waited:
        if waited:
            _gate.record_wait(waited, item.nodeid)
        yield
