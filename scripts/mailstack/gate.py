"""The test bench's gate: a step that measures time runs alone; everything else gives way to it.

A timed step (failover gaps, throttle spacing, loss under load) must not share the machine's two
cores with another job's converge. Waiting for the other job's whole step to end cost minutes (a
lab build or a relay scenario's verify runs for five), so the other jobs give way at a finer grain:
between two tests (a pytest plugin, mailstack.pytest_gate) and between two Ansible tasks (the
callback scripts/testbench/callback_plugins/mailstack_gate.py). The runner holds the gate
exclusively for a timed step; a process in any other step holds it shared for one test or task at
a time, and the name of the gate's directory reaches it in MAILSTACK_GATE.

The lock is a turnstile over flock(2), so that it works across processes and favours the timed
step: the writer takes the turnstile, then waits for the room to empty; a reader passes the
turnstile (blocked while a writer holds it) and then enters the room. A process that dies
releases what it held.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from pathlib import Path

ENV = "MAILSTACK_GATE"
_waited_in_process = 0.0   # every Gate of this process: what a task's time must leave out


def waited_in_process() -> float:
    """Seconds this process has spent giving way so far."""
    return _waited_in_process


class Gate:
    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._turnstile = self.directory / "turnstile"
        self._room = self.directory / "room"
        self._held: int | None = None    # the room's descriptor between enter() and leave()

    def _open(self, path: Path) -> int:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)

    @staticmethod
    def _release(fd: int) -> None:
        # Unlock before closing: a process forked meanwhile (an Ansible worker) shares the
        # descriptor, and closing ours alone would leave the lock held until it exits.
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    @contextlib.contextmanager
    def exclusive(self):
        """Hold the machine alone: no test or task elsewhere starts, and those running have ended."""
        turnstile, room = self._open(self._turnstile), self._open(self._room)
        try:
            fcntl.flock(turnstile, fcntl.LOCK_EX)
            fcntl.flock(room, fcntl.LOCK_EX)
            yield
        finally:
            self._release(room)
            self._release(turnstile)

    def _pass(self) -> tuple[int, float]:
        """Pass the turnstile and enter the room shared: (the room's descriptor, seconds waited)."""
        global _waited_in_process
        started = time.monotonic()
        turnstile, room = self._open(self._turnstile), self._open(self._room)
        try:
            fcntl.flock(turnstile, fcntl.LOCK_SH)
            fcntl.flock(room, fcntl.LOCK_SH)
        except BaseException:
            self._release(room)
            raise
        finally:
            self._release(turnstile)
        waited = time.monotonic() - started
        _waited_in_process += waited
        return room, waited

    @contextlib.contextmanager
    def shared(self):
        """One unit of work that gives way to a timed step; yields the seconds it gave way."""
        room, waited = self._pass()
        try:
            yield waited
        finally:
            self._release(room)

    def enter(self) -> float:
        """As shared(), for a caller that cannot wrap its work (an Ansible callback): hold the gate
        until leave() or the next enter(); returns the seconds spent giving way."""
        self.leave()
        self._held, waited = self._pass()
        return waited

    def leave(self) -> None:
        if self._held is not None:
            self._release(self._held)
            self._held = None


def from_environment() -> Gate | None:
    """The gate this process must give way at, or None when it runs alone or outside the bench."""
    directory = os.environ.get(ENV)
    return Gate(directory) if directory else None


def record_wait(seconds: float, where: str) -> None:
    """Add a wait to the job's timings file (MAILSTACK_TIMINGS), for the profile's `waited` column."""
    path = os.environ.get("MAILSTACK_TIMINGS")
    if path and seconds >= 0.05:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"kind": "wait", "step": os.environ.get("MAILSTACK_STEP", ""),
                                 "where": where, "seconds": round(seconds, 2)}) + "\n")
