"""The lab proof that `make test` runs: the whole stack from inventories/lab, through the CLI a user
runs. The lab is built anew at the start (replacing one that runs) and removed at the end unless
MAILSTACK_KEEP_LAB=1.

The tests that measure time and loss under load are marked `timed`. The bench's runner runs the
others first (`-m "not timed"`, keeping the lab), then the timed ones alone on the lab they left
(`-m timed` with MAILSTACK_LAB_RUNNING=1: nothing is rebuilt), then removes the lab.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MAILSTACK = str(Path(sys.executable).parent / "mailstack")


def pytest_addoption(parser):
    parser.addoption("--distro", default=os.environ.get("TEST_DISTRO", "debian12"),
                     help="Debian release of the lab's containers")


def pytest_configure(config):
    config.addinivalue_line("markers", "timed: measures time or loss under load; the bench runs it alone")


LAB_RUNNING = os.environ.get("MAILSTACK_LAB_RUNNING") == "1"


def mailstack(*args: str, check: bool = False, progress: bool = False, timeout: float = 1800):
    """Run the mailstack CLI as a user would; progress (stderr) goes to the terminal if asked."""
    proc = subprocess.run([MAILSTACK, *args], cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=None if progress else subprocess.PIPE, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"mailstack {' '.join(args)} exited {proc.returncode}:\n"
                             f"{proc.stdout[-3000:]}\n{(proc.stderr or '')[-3000:]}")
    return proc


def containers() -> dict[str, str]:
    proc = subprocess.run(["podman", "ps", "--all", "--filter", "label=mailstack.lab=1",
                           "--format", "{{.Names}} {{.ID}}"], capture_output=True, text=True, check=True)
    return dict(line.split() for line in proc.stdout.splitlines() if line.strip())


@pytest.fixture(scope="session")
def distro(request) -> str:
    return request.config.getoption("--distro")


@pytest.fixture(scope="session")
def first_up(distro):
    """`mailstack lab up` on no lab: creates every container and converges it."""
    mailstack("lab", "down", check=True)
    started = time.monotonic()
    proc = mailstack("lab", "up", "--distro", distro, "--json", progress=True)
    seconds = time.monotonic() - started
    assert proc.returncode == 0, f"lab up failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}"
    state = json.loads(proc.stdout)
    print(f"\nMEASURED lab up ({distro}), new containers: {seconds:.0f}s")
    yield {"state": state, "containers": containers(), "seconds": seconds}
    if os.environ.get("MAILSTACK_KEEP_LAB") != "1":
        mailstack("lab", "down")


@pytest.fixture(scope="session")
def second_up(request, distro):
    """`mailstack lab up` again on the running lab; with MAILSTACK_LAB_RUNNING=1, the state of the lab
    that an earlier run of the proof built and converged twice."""
    if LAB_RUNNING:
        proc = mailstack("lab", "status", "--json")
        assert proc.returncode == 0, f"the lab is not running or not healthy:\n{proc.stdout[-3000:]}"
        yield {"state": json.loads(proc.stdout), "containers": containers(), "seconds": 0.0}
        if os.environ.get("MAILSTACK_KEEP_LAB") != "1":
            mailstack("lab", "down")
        return
    first_up = request.getfixturevalue("first_up")
    started = time.monotonic()
    proc = mailstack("lab", "up", "--distro", distro, "--json", progress=True)
    seconds = time.monotonic() - started
    assert proc.returncode == 0, f"second lab up failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}"
    print(f"\nMEASURED lab up ({distro}), running lab: {seconds:.0f}s")
    yield {"state": json.loads(proc.stdout), "containers": containers(), "seconds": seconds}


@pytest.fixture()
def lab_exec():
    def run(container: str, command: str) -> subprocess.CompletedProcess:
        return subprocess.run(["podman", "exec", container, "sh", "-c", command], capture_output=True,
                              text=True, timeout=120)
    return run
