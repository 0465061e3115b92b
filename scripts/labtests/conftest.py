"""The lab proof that `make test` runs: the whole stack from inventories/lab, through the CLI a user
runs. The lab is built anew at the start (replacing one that runs) and removed at the end unless
MAILSTACK_KEEP_LAB=1.

The bench's runner runs the proof in steps, so that a step elsewhere that measures time never waits
long for it: the first `lab up` (test_first_up), the second (test_second_up), the other tests, the
tests that measure time and loss under load (marked `timed`, run while nothing else runs), then
`lab down`. Each step after the first runs with MAILSTACK_LAB_RUNNING=1 on the lab the first left
(MAILSTACK_KEEP_LAB=1), and the fixtures read what the two `lab up` runs recorded
(.cache/labproof/<distro>.json) instead of running them again.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mailstack.inventory import Inventory

ROOT = Path(__file__).resolve().parents[2]
MAILSTACK = str(Path(sys.executable).parent / "mailstack")


def pytest_addoption(parser):
    parser.addoption("--distro", default=os.environ.get("TEST_DISTRO", "debian12"),
                     help="Debian release of the lab's containers")


def pytest_configure(config):
    config.addinivalue_line("markers", "timed: measures time or loss under load; the bench runs it alone")


LAB_RUNNING = os.environ.get("MAILSTACK_LAB_RUNNING") == "1"
RECORDS = ROOT / ".cache" / "labproof"


def record(distro: str, name: str, value: dict | None = None) -> dict | None:
    """Save (value given) or read back what a `lab up` of this proof found."""
    path = RECORDS / f"{distro}.json"
    saved = json.loads(path.read_text()) if path.exists() else {}
    if value is None:
        return saved.get(name)
    if name == "first":
        saved = {}
    saved[name] = value
    RECORDS.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(saved))
    return value


def inventory() -> Inventory:
    """The lab's inventory, read as the CLI reads it."""
    return Inventory(ROOT / "inventories" / "lab")


def mailstack(*args: str, check: bool = False, progress: bool = False, timeout: float = 1800):
    """Run the mailstack CLI as a user would; progress (stderr) goes to the terminal if asked."""
    proc = subprocess.run([MAILSTACK, *args], cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=None if progress else subprocess.PIPE, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"mailstack {' '.join(args)} exited {proc.returncode}:\n"
                             f"{proc.stdout[-3000:]}\n{(proc.stderr or '')[-3000:]}")
    return proc


def assert_stopped_before_any_host(proc, extra: dict, expected: list[str], play: str) -> None:
    """An operator's playbook run with one bad value failed, said each expected text, never reached
    the tier's play and changed nothing."""
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, (extra, output[-2000:])
    for text in expected:
        assert text in output, f"{extra}: {text!r} not in the failure:\n{output[-3000:]}"
    assert f"PLAY [{play}]" not in output, f"{extra}: a host was reached past the checks"
    assert not re.search(r"changed=[1-9]", output), output[-2000:]


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
    if LAB_RUNNING:
        saved = record(distro, "first")
        assert saved, f"no lab up was recorded for {distro}: run the proof's first step (test_first_up)"
        yield saved
        return
    mailstack("lab", "down", check=True)
    started = time.monotonic()
    proc = mailstack("lab", "up", "--distro", distro, "--json", progress=True)
    seconds = time.monotonic() - started
    assert proc.returncode == 0, f"lab up failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}"
    state = json.loads(proc.stdout)
    print(f"\nMEASURED lab up ({distro}), new containers: {seconds:.0f}s")
    yield record(distro, "first", {"state": state, "containers": containers(), "seconds": seconds})
    if os.environ.get("MAILSTACK_KEEP_LAB") != "1":
        mailstack("lab", "down")


@pytest.fixture(scope="session")
def second_up(first_up, distro):
    """`mailstack lab up` again on the running lab."""
    saved = record(distro, "second") if LAB_RUNNING else None
    if saved:
        return saved
    started = time.monotonic()
    proc = mailstack("lab", "up", "--distro", distro, "--json", progress=True)
    seconds = time.monotonic() - started
    assert proc.returncode == 0, f"second lab up failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}"
    print(f"\nMEASURED lab up ({distro}), running lab: {seconds:.0f}s")
    return record(distro, "second", {"state": json.loads(proc.stdout), "containers": containers(),
                                     "seconds": seconds})


@pytest.fixture()
def lab_exec():
    def run(container: str, command: str) -> subprocess.CompletedProcess:
        return subprocess.run(["podman", "exec", container, "sh", "-c", command], capture_output=True,
                              text=True, timeout=120)
    return run
