"""The test suite runner: every Molecule scenario and the lab proof on one or more Debian releases.

Each Molecule scenario runs step by step (`molecule create`, `molecule converge`, ...), so that
every step is timed and recorded (.cache/timings/, read by `mailstack-testbench profile`), and so
that the tests that measure time can run alone. Jobs (a scenario or the lab proof on one release)
run `--jobs` at a time. Tests that measure time or loss under load are marked `timed`; a
scenario that has such tests says so in its molecule.yml (`bench_measures_time: true`) and runs
them in a step of their own (verify-timed, between its ordinary tests and those marked `last`), as
the lab proof does (operations). Such a step runs alone: the other jobs give way to it between two
tests or two Ansible tasks (mailstack.gate), so it starts once the tests and tasks running
elsewhere have ended, and none starts until it is done.
The same scenario never runs twice at once (its containers and network have fixed names). At the
end one table gives each job's time and its tests passed and failed, and a last line the totals.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import subprocess
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import click
import yaml

from mailstack.gate import ENV as GATE_ENV
from mailstack.gate import Gate
from mailstack.testbench import CACHE, ROOT, BenchError, podman_env, write_containers_conf

TIMINGS = CACHE / "timings"
GATE = CACHE / "gate"
LOGS = CACHE / "logs"
CALLBACKS = ROOT / "scripts" / "testbench" / "callback_plugins"


def all_scenarios() -> list[str]:
    return sorted(p.parent.name for p in (ROOT / "molecule").glob("*/molecule.yml"))


def scenario_config(name: str) -> dict:
    """The scenario's molecule.yml merged over the shared base config, as Molecule merges them."""
    base_file = ROOT / ".config" / "molecule" / "config.yml"
    base = yaml.safe_load(base_file.read_text()) if base_file.exists() else {}
    own = yaml.safe_load((ROOT / "molecule" / name / "molecule.yml").read_text())
    return merge(base or {}, own or {})


def merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def cpu_times() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


# ---------------------------------------------------------------- jobs

@dataclasses.dataclass
class StepResult:
    name: str
    seconds: float
    ok: bool
    busy: float          # share of the machine's CPU time that was busy while the step ran
    waited: float = 0.0  # seconds spent waiting for the gate before the step started


@dataclasses.dataclass
class Counts:
    passed: int = 0
    failed: int = 0
    skipped: int = 0
    tests: list[tuple[str, float, str]] = dataclasses.field(default_factory=list)  # (id, seconds, outcome)
    reasons: dict[str, str] = dataclasses.field(default_factory=dict)  # failed test id -> first line of why

    @classmethod
    def from_junit(cls, paths: list[Path]) -> "Counts":
        counts = cls()
        cases = [case for path in paths if path.exists() for case in ET.parse(path).getroot().iter("testcase")]
        for case in cases:
            name = f"{case.get('classname', '')}::{case.get('name', '')}"
            outcome = "passed"
            problem = case.find("failure") if case.find("failure") is not None else case.find("error")
            if problem is not None:
                outcome = "failed"
                why = (problem.get("message") or problem.text or "").strip().splitlines()
                counts.reasons[name] = why[0][:160] if why else ""
            elif case.find("skipped") is not None:
                outcome = "skipped"
            setattr(counts, outcome, getattr(counts, outcome) + 1)
            counts.tests.append((name, float(case.get("time") or 0), outcome))
        return counts


@dataclasses.dataclass
class Job:
    kind: str            # molecule, lab or unit
    name: str
    distro: str
    steps: list[str]
    steps_done: list[StepResult] = dataclasses.field(default_factory=list)
    counts: Counts = dataclasses.field(default_factory=Counts)
    seconds: float = 0.0
    ok: bool = True
    failed_step: str = ""
    cost: float = 0.0    # its stated cost per release in seconds (the order jobs start in)

    @property
    def key(self) -> str:
        return f"{self.name}-{self.distro}" if self.distro else self.name

    @property
    def log(self) -> Path:
        prefix = "molecule-" if self.kind == "molecule" else ""
        return LOGS / f"{prefix}{self.key}.log"

    @property
    def timings(self) -> Path:
        return TIMINGS / f"{self.key}.jsonl"

    @property
    def state_dir(self) -> Path:
        """Molecule's state for this scenario and release (its ephemeral directory)."""
        return CACHE / "molecule" / self.key

    def junit(self, step: str) -> Path:
        return TIMINGS / f"{self.key}.{step}.junit.xml"

    def junits(self) -> list[Path]:
        return sorted(TIMINGS.glob(f"{self.key}.*.junit.xml"))

    def env(self, step: str) -> dict[str, str]:
        env = podman_env()
        env.update({
            "TEST_DISTRO": self.distro, "ANSIBLE_FORCE_COLOR": "0", "PY_COLORS": "0",
            "ANSIBLE_CALLBACK_PLUGINS": str(CALLBACKS),
            "ANSIBLE_CALLBACKS_ENABLED": "mailstack_gate,mailstack_timings",
            "MAILSTACK_TIMINGS": str(self.timings), "MAILSTACK_STEP": step,
            # One state directory per scenario and release: both releases can be on the go at once.
            "MOLECULE_EPHEMERAL_DIRECTORY": str(self.state_dir),
        })
        addopts = [f"--junitxml={self.junit(step)}", PYTEST_STEPS.get(step, "")]
        # How this step gives way to a timed step elsewhere: between tests, between Ansible tasks
        # (the lab's first two steps are one long test each), or not at all (it is the timed one,
        # or the runner holds the gate for the whole of a short step).
        if GIVES_WAY.get(step) in ("test", "task"):
            env[GATE_ENV] = str(GATE)
        if GIVES_WAY.get(step) == "test":
            addopts.append("-p mailstack.pytest_gate")
        if step in PYTEST_STEPS:
            env["PYTEST_ADDOPTS"] = " ".join(a for a in addopts if a)
        if self.kind == "lab" and step != "down":
            env["MAILSTACK_KEEP_LAB"] = "1"       # the steps after this one need it
        if self.kind == "lab" and step not in ("lab-up", "down"):
            env["MAILSTACK_LAB_RUNNING"] = "1"    # built by the first step, recorded by the first two
        return env

    def command(self, step: str) -> list[str]:
        if self.kind == "molecule":
            return ["molecule", step.split("-")[0], "-s", self.name]
        if self.kind == "lab":
            if step == "down":
                return ["mailstack", "lab", "down"]
            return ["pytest", "-q", "-s", "-p", "no:cacheprovider", "--durations=10",
                    "scripts/labtests", "--distro", self.distro]
        return ["pytest", "-q", "-p", "no:cacheprovider", "scripts/tests"]


# The steps that run pytest, and the tests each runs: the tests marked `timed` measure time or loss
# under load, and run in a step of their own while nothing else runs.
PYTEST_STEPS = {
    # A scenario with timed tests: the ordinary ones, the timed ones, those that leave it changed.
    "verify": "-m 'not timed and not last'", "verify-timed": "-m timed",
    "verify-last": "-m 'last and not timed'",
    "verify-all": "",                                            # a scenario without
    # The lab proof: the first lab up, the second, the other tests, the timed ones.
    "lab-up": "-k test_first_up", "lab-again": "-k test_second_up",
    "lab-verify": "-m 'not timed' -k 'not test_first_up and not test_second_up'", "operations": "-m timed",
    "unit": "",
}
TIMED_STEPS = frozenset({"verify-timed", "operations"})
# Where each step that does not measure time gives way to one that does (mailstack.gate): "test"
# (the pytest plugin), "task" (the Ansible callback), "step" (the runner holds the gate while the
# whole step runs: the unit tests and removing the lab, both short).
GIVES_WAY = {
    "create": "task", "prepare": "task", "converge": "task", "idempotence": "task", "destroy": "task",
    "verify": "test", "verify-last": "test", "verify-all": "test", "lab-verify": "test",
    "lab-up": "task", "lab-again": "task", "down": "step", "unit": "step",
}


def scenario_tests_text(name: str) -> str:
    """The source of a scenario's tests, with the shared relay contract when they import it."""
    text = "".join(p.read_text() for p in sorted((ROOT / "molecule" / name / "tests").glob("*.py")))
    if "from relay_contract import *" in text:
        text += (ROOT / "molecule" / "resources" / "tests" / "relay_contract.py").read_text()
    return text


def molecule_job(name: str, distro: str) -> Job:
    """The scenario's test sequence, its verify step in parts when it has tests that measure time:
    the ordinary tests, then those that measure time, alone, then the tests marked `last`, which
    leave the scenario changed for good (a relay without its PROXY listener). In this order the
    ordinary tests meet nothing the timed ones leave behind: after a failover test, a balancer
    that had lost a VIP still held a session to a relay, and a rolling-maintenance test that came
    next waited its whole drain timeout for it (seen in two runs)."""
    config = scenario_config(name)
    verify = ["verify-all"]
    if config.get("driver", {}).get("bench_measures_time"):
        verify = ["verify", "verify-timed"]
        if "@pytest.mark.last" in scenario_tests_text(name):
            verify.append("verify-last")
    steps = [s2 for s in config["scenario"]["test_sequence"] for s2 in (verify if s == "verify" else [s])]
    # The job starts from an empty state directory (run_job), and create.yml removes containers
    # and connections an earlier run left: a destroy first would only repeat that.
    if steps[:1] == ["destroy"]:
        steps = steps[1:]
    return Job("molecule", name, distro, steps, cost=float(config.get("driver", {}).get("bench_cost", 0)))


# What the lab proof costs per release on the project's 2-core machine (measured with the mail
# workers' tests, about 1,450-1,550 s: see the README); the longest chain, so it starts first.
LAB_COST = 1500


def lab_job(distro: str) -> Job:
    """The lab proof in steps (scripts/labtests/conftest.py): the first lab up, the second, the other
    tests, the operations that measure time and loss (rolling maintenance, failover drills: marked
    `timed`) alone, the lab removed."""
    steps = ["lab-up", "lab-again", "lab-verify", "operations", "down"]
    if os.environ.get("MAILSTACK_KEEP_LAB") == "1":
        steps.remove("down")
    return Job("lab", "lab", distro, steps, cost=LAB_COST)


def unit_job() -> Job:
    return Job("unit", "unit", "", ["unit"])


# ---------------------------------------------------------------- running

class Runner:
    def __init__(self, jobs: list[Job], slots: int, echo=click.echo) -> None:
        self.pending = list(jobs)
        self.jobs = list(jobs)
        self.slots = max(1, slots)
        self.gate = Gate(GATE)
        self.echo = echo
        self._lock = threading.Lock()
        self._busy_names: set[str] = set()
        self._wake = threading.Condition(self._lock)

    def say(self, text: str) -> None:
        with self._lock:
            self.echo(text)

    def next_job(self) -> Job | None:
        """The next job to start (pick_next) among those whose scenario is not running now; None
        when all are taken."""
        with self._wake:
            while True:
                if not self.pending:
                    return None
                job = pick_next(self.pending, self._busy_names)
                if job is not None:
                    self.pending.remove(job)
                    self._busy_names.add(job.name)
                    return job
                self._wake.wait()

    def release(self, job: Job) -> None:
        with self._wake:
            self._busy_names.discard(job.name)
            self._wake.notify_all()

    def run_step(self, job: Job, step: str) -> StepResult:
        timed = step in TIMED_STEPS
        asked = time.monotonic()
        hold = self.gate.exclusive() if timed else (
            self.gate.shared() if GIVES_WAY.get(step) == "step" else contextlib.nullcontext())
        with hold:
            waited = time.monotonic() - asked
            busy0, total0 = cpu_times()
            started, started_at = time.monotonic(), time.time()
            with job.log.open("a") as fh:
                fh.write(f"\n#### mailstack-testbench: step {step}{' (alone: it measures time)' if timed else ''}\n")
                fh.flush()
                proc = subprocess.run(job.command(step), cwd=ROOT, env=job.env(step), stdout=fh,
                                      stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            seconds = time.monotonic() - started
            busy1, total1 = cpu_times()
        busy = (busy1 - busy0) / max(1, total1 - total0)
        result = StepResult(step, seconds, proc.returncode == 0, busy, waited)
        with job.timings.open("a") as fh:
            fh.write(json.dumps({"kind": "step", "step": step, "at": round(started_at, 1), "seconds": round(seconds, 2),
                                 "ok": result.ok, "busy": round(busy, 3), "waited": round(waited, 2),
                                 "alone": timed}) + "\n")
        return result

    def run_job(self, job: Job) -> None:
        LOGS.mkdir(parents=True, exist_ok=True)
        TIMINGS.mkdir(parents=True, exist_ok=True)
        for path in (job.log, job.timings, *job.junits()):
            path.unlink(missing_ok=True)
        if job.kind == "molecule":
            shutil.rmtree(job.state_dir, ignore_errors=True)
        job.log.touch()
        self.say(f"testbench: {job.key} started, log: {job.log.relative_to(ROOT)}")
        started = time.monotonic()
        steps = list(job.steps)
        while steps:
            step = steps.pop(0)
            result = self.run_step(job, step)
            job.steps_done.append(result)
            if not result.ok:
                job.ok, job.failed_step = False, step
                # As `molecule test` does: whatever failed, the containers go.
                cleanup = {"molecule": "destroy", "lab": "down"}.get(job.kind)
                if cleanup in job.steps and step != cleanup:
                    job.steps_done.append(self.run_step(job, cleanup))
                break
        job.seconds = time.monotonic() - started
        job.counts = Counts.from_junit(job.junits())
        state = "passed" if job.ok else f"FAILED in step {job.failed_step or '?'}"
        self.say(f"testbench: {job.key} {state} in {job.seconds:.0f}s "
                 f"({job.counts.passed} tests passed, {job.counts.failed} failed)")
        if not job.ok:
            lines = job.log.read_text(errors="replace").splitlines()
            self.say(f"testbench: last lines of {job.log.relative_to(ROOT)}:\n"
                     + "\n".join(f"  | {line}" for line in lines[-40:]))

    def worker(self) -> None:
        while True:
            job = self.next_job()
            if job is None:
                return
            try:
                self.run_job(job)
            except Exception as exc:  # noqa: BLE001  a broken job must not stop the others
                job.ok = False
                self.say(f"testbench: {job.key} could not run: {exc}")
            finally:
                self.release(job)

    def run(self) -> float:
        started = time.monotonic()
        threads = [threading.Thread(target=self.worker, daemon=True) for _ in range(self.slots)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return time.monotonic() - started


def short_test_id(name: str) -> str:
    """`molecule.relay_tier.tests.test_postfix::test_x[a.b]` -> `test_postfix::test_x[a.b]`."""
    module, _, test = name.partition("::")
    return f"{module.rsplit('.', 1)[-1]}::{test}"


def summary(jobs: list[Job], seconds: float) -> list[str]:
    # The failed tests first, one line each, so that even the tail of a CI log says which and why.
    lines = [f"FAILED {job.key} {short_test_id(name)}: {job.counts.reasons.get(name, '')}"
             for job in jobs for name, _, outcome in job.counts.tests if outcome == "failed"]
    lines += [f"{'job':<22} {'release':<9} {'time':>7} {'passed':>7} {'failed':>7}  result"]
    for job in jobs:
        if not job.steps_done and job.ok:
            continue
        lines.append(f"{job.name:<22} {job.distro or '-':<9} {job.seconds:6.0f}s {job.counts.passed:>7} "
                     f"{job.counts.failed:>7}  {'ok' if job.ok else 'FAILED'}")
    passed = sum(j.counts.passed for j in jobs)
    failed = sum(j.counts.failed for j in jobs)
    failed_jobs = [j for j in jobs if not j.ok]
    # A job that failed outside its tests (a converge, say) counts as one failure.
    failed += sum(1 for j in failed_jobs if j.counts.failed == 0)
    lines.append(f"wall time {seconds:.0f}s, {len(jobs)} job(s), {len(failed_jobs)} failed")
    lines.append(f"{passed} passed, {failed} failed")
    return lines


def pick_next(pending: list[Job], running: set[str]) -> Job | None:
    """The unit tests first; then, of the jobs whose scenario is not running, the one whose scenario
    has the most stated cost left to run, the costliest of those. The releases of one scenario run
    one after the other, so a scenario's jobs left pending are a chain: starting the longest chain
    first keeps two short jobs of one scenario from being left for the end, where they would run one
    after the other while the other slot has nothing to do (seen: the two Redis jobs, 270 s)."""
    free = [j for j in pending if j.name not in running]
    if not free:
        return None
    left: dict[str, float] = {}
    for job in pending:
        left[job.name] = left.get(job.name, 0.0) + job.cost
    return max(free, key=lambda j: (j.kind == "unit", left[j.name], j.cost))


def plan(distros: list[str], names: list[str], with_lab: bool, with_unit: bool) -> list[Job]:
    known = all_scenarios()
    unknown = sorted(set(names) - set(known))
    if unknown:
        raise BenchError(f"no such scenario: {', '.join(unknown)} (known: {', '.join(known)})")
    jobs = []
    for distro in distros:
        jobs += [molecule_job(n, distro) for n in names]
        if with_lab:
            jobs.append(lab_job(distro))
    # The longest first, so that the short ones fill the gaps at the end; the unit tests before all.
    jobs.sort(key=lambda j: -j.cost)
    return ([unit_job()] if with_unit else []) + jobs


def run_suite(distros: list[str], names: list[str], with_lab: bool, with_unit: bool, slots: int) -> bool:
    write_containers_conf()
    jobs = plan(distros, names, with_lab, with_unit)
    runner = Runner(jobs, slots)
    seconds = runner.run()
    for line in summary(jobs, seconds):
        click.echo(line)
    return all(j.ok for j in jobs)
