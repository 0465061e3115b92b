"""The test suite's profile: where each job's time went, from what the runner recorded.

The runner writes one JSON-lines file per job to .cache/timings/: a record per step (its wall
time, how busy the machine's CPUs were, how long it waited for a timed step elsewhere), a record
per Ansible task from the mailstack_timings callback, a record per test or task that gave way to a
timed step elsewhere (mailstack.gate: left out of its step's time, counted as waited), and
pytest's JUnit XML of the tests. This
reads them back and prints two tables: the steps of every job, and what the playbook steps spent
their time on (apt, waiting loops, service starts and handlers, fact gathering, other tasks),
then the slowest tasks and tests.
"""

from __future__ import annotations

import collections
import dataclasses
import json
from pathlib import Path

from mailstack.suite import TIMINGS, Counts

STEP_COLUMNS = ["create", "prepare", "converge", "idempotence", "verify", "timed", "destroy"]
# Which column a step's time goes to: the timed column holds the steps that ran alone.
COLUMN_OF = {"create": "create", "prepare": "prepare", "converge": "converge", "idempotence": "idempotence",
             "verify": "verify", "verify-all": "verify", "verify-last": "verify",
             "verify-timed": "timed", "operations": "timed",
             "destroy": "destroy", "down": "destroy",
             # the lab proof: its first lab up builds and converges, the second must change nothing
             "lab-up": "converge", "lab-again": "idempotence", "lab-verify": "verify"}
KIND_COLUMNS = ["apt", "waits", "services", "facts", "other"]
APT_ACTIONS = {"apt", "package", "apt_key", "apt_repository", "deb822_repository"}
WAIT_ACTIONS = {"wait_for", "wait_for_connection", "pause", "uri"}
SERVICE_ACTIONS = {"systemd", "systemd_service", "service"}


def kind_of(task: dict) -> str:
    action = task["action"].rsplit(".", 1)[-1]
    if action in APT_ACTIONS:
        return "apt"
    if task.get("retries") or action in WAIT_ACTIONS:
        return "waits"
    if task.get("handler") or action in SERVICE_ACTIONS:
        return "services"
    if action in ("gather_facts", "setup"):
        return "facts"
    return "other"


@dataclasses.dataclass
class JobProfile:
    key: str
    steps: dict[str, float]
    busy: dict[str, float]
    waited: float
    kinds: dict[str, float]
    tasks: list[dict]
    counts: Counts

    @property
    def total(self) -> float:
        return sum(self.steps.values())


def load(directory: Path = TIMINGS) -> list[JobProfile]:
    profiles = []
    for path in sorted(directory.glob("*.jsonl")):
        steps: dict[str, float] = collections.defaultdict(float)
        busy_weighted: dict[str, float] = collections.defaultdict(float)
        kinds: dict[str, float] = collections.defaultdict(float)
        tasks, waited = [], 0.0
        gave_way: dict[str, float] = collections.defaultdict(float)
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if record["kind"] == "step":
                steps[record["step"]] += record["seconds"]
                busy_weighted[record["step"]] += record["busy"] * record["seconds"]
                waited += record.get("waited", 0.0)
            elif record["kind"] == "wait":    # a test or task of the step gave way (mailstack.gate)
                gave_way[record["step"]] += record["seconds"]
                waited += record["seconds"]
            elif record["kind"] == "task":
                if record["step"] in ("converge", "idempotence", "prepare", "create", "destroy", "lab-up", "lab-again"):
                    kinds[kind_of(record)] += record["seconds"]
                tasks.append(record)
        busy = {s: busy_weighted[s] / steps[s] for s in steps if steps[s]}
        for step, seconds in gave_way.items():   # a step's time is its work, not its waits
            if step in steps:
                steps[step] = max(0.0, steps[step] - seconds)
        key = path.name[:-len(".jsonl")]
        profiles.append(JobProfile(key, dict(steps), busy, waited, dict(kinds), tasks,
                                   Counts.from_junit(sorted(directory.glob(f"{key}.*.junit.xml")))))
    return profiles


def render(profiles: list[JobProfile], top: int = 15) -> list[str]:
    out = ["Steps (seconds; timed: the tests that ran alone; the lab's first lab up is under converge, its second",
           "under idempotence; cpu: share of the machine's CPU busy while the job's steps ran; waited: for a",
           "timed step elsewhere to start or end)"]
    head = f"{'job':<26}" + "".join(f"{c[:8]:>9}" for c in STEP_COLUMNS) + f"{'other':>8}{'total':>8}{'cpu':>6}" \
        + f"{'waited':>8}{'passed':>8}{'failed':>8}"
    out.append(head)
    totals: dict[str, float] = collections.defaultdict(float)
    for p in profiles:
        columns: dict[str, float] = collections.defaultdict(float)
        for step, seconds in p.steps.items():
            columns[COLUMN_OF.get(step, "other")] += seconds
        cpu = sum(p.busy.get(s, 0) * p.steps[s] for s in p.steps) / max(p.total, 1e-9)
        row = f"{p.key:<26}" + "".join(f"{columns[c]:9.0f}" for c in STEP_COLUMNS)
        row += f"{columns['other']:8.0f}{p.total:8.0f}{cpu:6.0%}{p.waited:8.0f}{p.counts.passed:8d}{p.counts.failed:8d}"
        out.append(row)
        for c in [*STEP_COLUMNS, "other"]:
            totals[c] += columns[c]
        totals["total"] += p.total
    out.append(f"{'all':<26}" + "".join(f"{totals[c]:9.0f}" for c in STEP_COLUMNS)
               + f"{totals['other']:8.0f}{totals['total']:8.0f}")
    out.append("")
    out.append("Inside the playbook steps (seconds of play time by kind of task)")
    out.append(f"{'job':<26}" + "".join(f"{c:>10}" for c in KIND_COLUMNS))
    sums: dict[str, float] = collections.defaultdict(float)
    for p in profiles:
        out.append(f"{p.key:<26}" + "".join(f"{p.kinds.get(c, 0):10.0f}" for c in KIND_COLUMNS))
        for c in KIND_COLUMNS:
            sums[c] += p.kinds.get(c, 0)
    out.append(f"{'all':<26}" + "".join(f"{sums[c]:10.0f}" for c in KIND_COLUMNS))
    out.append("")
    out.append(f"The {top} slowest tasks (job, step, role: task [action])")
    tasks = sorted(((t, p.key) for p in profiles for t in p.tasks), key=lambda x: -x[0]["seconds"])
    for t, key in tasks[:top]:
        out.append(f"{t['seconds']:8.1f}s  {key} {t['step']} {t['role'] or '-'}: {t['task']} [{t['action']}]")
    out.append("")
    out.append(f"The {top} slowest tests")
    tests = sorted(((name, s, p.key) for p in profiles for name, s, _ in p.counts.tests), key=lambda x: -x[1])
    for name, seconds, key in tests[:top]:
        out.append(f"{seconds:8.1f}s  {key} {name}")
    return out
