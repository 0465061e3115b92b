"""Unit tests of the suite runner: the gate that lets timed steps run alone, the steps of each job,
the summary, the profile, and that every scenario with timed tests says so."""

import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from mailstack import gate, profile, suite

ROOT = Path(__file__).resolve().parents[2]


def test_a_timed_step_waits_for_running_work_and_runs_alone(tmp_path):
    events = []
    shared_in = threading.Event()
    release_shared = threading.Event()

    def ordinary(name):
        with gate.Gate(tmp_path).shared():
            events.append(f"{name} in")
            shared_in.set()
            release_shared.wait(5)
            events.append(f"{name} out")

    def timed():
        with gate.Gate(tmp_path).exclusive():
            events.append("timed in")
            time.sleep(0.1)
            events.append("timed out")

    first = threading.Thread(target=ordinary, args=("a",))
    first.start()
    shared_in.wait(5)
    alone = threading.Thread(target=timed)
    alone.start()
    time.sleep(0.2)
    # Work that asks after the timed step waits behind it, even though only shared work runs.
    late = threading.Thread(target=ordinary, args=("b",))
    late.start()
    time.sleep(0.2)
    assert events == ["a in"]
    release_shared.set()
    for t in (first, alone, late):
        t.join(5)
    assert events == ["a in", "a out", "timed in", "timed out", "b in", "b out"]


def test_another_process_gives_way_between_two_units_of_work_and_counts_its_wait(tmp_path):
    """The Ansible callback's way: enter() before each task holds the gate until the next one."""
    script = (
        "import sys, time\n"
        "from mailstack import gate\n"
        "g = gate.Gate(sys.argv[1])\n"
        "g.enter(); print('task 1', flush=True); time.sleep(0.5)\n"
        "waited = g.enter(); print(f'task 2 after {waited:.1f}', flush=True)\n"
        "g.leave()\n")
    proc = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "task 1\n"
    timed_ran = []

    def timed():
        with gate.Gate(tmp_path).exclusive():   # waits for task 1 to end, holds off task 2
            timed_ran.append(time.monotonic())
            time.sleep(1.0)

    thread = threading.Thread(target=timed)
    thread.start()
    line = proc.stdout.readline()
    thread.join(5)
    assert proc.wait(10) == 0 and timed_ran
    assert line.startswith("task 2 after") and float(line.split()[-1]) >= 0.8, line


def test_a_task_time_leaves_out_its_wait_and_the_wait_is_recorded(tmp_path, monkeypatch):
    timings = tmp_path / "job.jsonl"
    monkeypatch.setenv("MAILSTACK_TIMINGS", str(timings))
    monkeypatch.setenv("MAILSTACK_STEP", "converge")
    gate.record_wait(12.5, "Install Postfix")
    gate.record_wait(0.01, "too short to note")
    timings.write_text(timings.read_text() + json.dumps(
        {"kind": "step", "step": "converge", "at": 0, "seconds": 100.0, "ok": True, "busy": 0.5,
         "waited": 0.0, "alone": False}) + "\n")
    (job,) = profile.load(tmp_path)
    assert job.steps["converge"] == 87.5 and job.waited == 12.5


def test_each_step_that_does_not_measure_time_gives_way_and_the_timed_ones_do_not(tmp_path):
    job = suite.molecule_job("relay_tier", "debian12")
    lab = suite.lab_job("debian12")
    for j in (job, lab):
        for step in j.steps:
            env = j.env(step)
            if step in suite.TIMED_STEPS:
                assert gate.ENV not in env, step
                assert "pytest_gate" not in env.get("PYTEST_ADDOPTS", ""), step
            else:
                assert suite.GIVES_WAY[step] in ("test", "task", "step"), step
    assert job.env("converge")[gate.ENV] and "mailstack_gate" in job.env("converge")["ANSIBLE_CALLBACKS_ENABLED"]
    assert "-p mailstack.pytest_gate" in job.env("verify")["PYTEST_ADDOPTS"]
    # The lab's first build is one long test: its Ansible tasks give way, not the test.
    assert lab.env("lab-up")[gate.ENV] and "pytest_gate" not in lab.env("lab-up")["PYTEST_ADDOPTS"]


def test_a_scenario_with_timed_tests_verifies_them_in_a_step_of_their_own_before_the_last_ones():
    job = suite.molecule_job("relay_tier", "debian12")
    assert job.steps == ["create", "prepare", "converge", "idempotence",
                         "verify", "verify-timed", "verify-last", "destroy"]
    assert job.command("verify-timed") == ["molecule", "verify", "-s", "relay_tier"]
    assert "-m timed" in job.env("verify-timed")["PYTEST_ADDOPTS"]
    assert "-m 'not timed and not last'" in job.env("verify")["PYTEST_ADDOPTS"]
    assert "-m 'last and not timed'" in job.env("verify-last")["PYTEST_ADDOPTS"]
    assert "verify-timed" in suite.TIMED_STEPS and "verify" not in suite.TIMED_STEPS


def test_a_scenario_without_timed_tests_verifies_in_one_ordinary_step():
    job = suite.molecule_job("redis", "debian13")
    assert "verify-all" in job.steps and "verify-timed" not in job.steps
    assert "-m" not in job.env("verify-all")["PYTEST_ADDOPTS"]
    assert job.env("converge")["MOLECULE_EPHEMERAL_DIRECTORY"].endswith("redis-debian13")


def test_the_lab_proof_runs_its_timed_tests_alone_on_the_lab_it_built(monkeypatch):
    monkeypatch.delenv("MAILSTACK_KEEP_LAB", raising=False)
    job = suite.lab_job("debian12")
    assert job.steps == ["lab-up", "lab-again", "lab-verify", "operations", "down"]
    assert "operations" in suite.TIMED_STEPS and "lab-up" not in suite.TIMED_STEPS
    assert "MAILSTACK_LAB_RUNNING" not in job.env("lab-up")
    for step in ("lab-again", "lab-verify", "operations"):
        assert job.env(step)["MAILSTACK_LAB_RUNNING"] == "1" and job.env(step)["MAILSTACK_KEEP_LAB"] == "1"
    assert "-m timed" in job.env("operations")["PYTEST_ADDOPTS"]
    monkeypatch.setenv("MAILSTACK_KEEP_LAB", "1")
    assert suite.lab_job("debian12").steps[-1] == "operations"


def scenario_has_timed_tests(name: str) -> bool:
    return "@pytest.mark.timed" in suite.scenario_tests_text(name)


@pytest.mark.parametrize("name", suite.all_scenarios())
def test_a_scenario_with_tests_marked_last_also_has_timed_ones(name):
    """Without timed tests the scenario verifies in one step, where bench_fixtures sorts `last` last;
    a scenario whose tests import that sorting declares it in conftest.py."""
    text = suite.scenario_tests_text(name)
    if "@pytest.mark.last" in text:
        conftest = (ROOT / "molecule" / name / "tests" / "conftest.py").read_text()
        assert "pytest_collection_modifyitems" in conftest, f"molecule/{name}: `last` tests are not sorted last"


@pytest.mark.parametrize("name", suite.all_scenarios())
def test_a_scenario_says_it_has_timed_tests_exactly_when_it_has(name):
    declared = bool(suite.scenario_config(name).get("driver", {}).get("bench_measures_time"))
    assert declared == scenario_has_timed_tests(name), \
        f"molecule/{name}: bench_measures_time is {declared}, but its tests say otherwise"


def test_the_summary_counts_tests_and_a_job_that_failed_outside_them(tmp_path):
    ok = suite.Job("molecule", "redis", "debian12", [])
    ok.steps_done = [suite.StepResult("converge", 10, True, 0.5)]
    ok.counts = suite.Counts(passed=5)
    ok.seconds = 10
    broken = suite.Job("molecule", "postfix", "debian12", [])
    broken.steps_done = [suite.StepResult("converge", 3, False, 0.5)]
    broken.ok = False
    lines = suite.summary([ok, broken], 13)
    assert re.search(r"^redis\s+debian12\s+10s\s+5\s+0\s+ok$", lines[1])
    assert re.search(r"^postfix\s+debian12\s+0s\s+0\s+0\s+FAILED$", lines[2])
    assert lines[-1] == "5 passed, 1 failed"


def test_the_summary_names_each_failed_test_and_why_before_the_table(tmp_path):
    path = tmp_path / "relay_tier-debian12.verify.junit.xml"
    path.write_text('<testsuites><testsuite><testcase classname="test_postfix" name="test_a" time="1"/>'
                    '<testcase classname="test_postfix" name="test_b" time="1">'
                    '<failure message="AssertionError: no 250 within 30 s&#10;second line"/></testcase>'
                    '</testsuite></testsuites>')
    job = suite.Job("molecule", "relay_tier", "debian12", [])
    job.steps_done = [suite.StepResult("verify", 10, False, 0.5)]
    job.ok, job.counts = False, suite.Counts.from_junit([path])
    lines = suite.summary([job], 10)
    assert lines[0] == "FAILED relay_tier-debian12 test_postfix::test_b: AssertionError: no 250 within 30 s"
    assert lines[1].startswith("job ")
    assert lines[-1] == "1 passed, 1 failed"


def test_every_step_the_runner_runs_has_its_column_in_the_profile():
    jobs = suite.plan(["debian12"], suite.all_scenarios(), with_lab=True, with_unit=False)
    steps = {step for job in jobs for step in job.steps}
    assert steps - set(profile.COLUMN_OF) == set()


def test_counts_and_the_profile_are_read_back_from_what_the_runner_wrote(tmp_path):
    (tmp_path / "redis-debian12.verify-all.junit.xml").write_text(
        '<testsuites><testsuite><testcase classname="t" name="a" time="1.5"/>'
        '<testcase classname="t" name="b" time="0.1"><failure/></testcase>'
        '<testcase classname="t" name="c" time="0"><skipped/></testcase></testsuite></testsuites>')
    records = [
        {"kind": "task", "step": "converge", "playbook": "converge.yml", "role": "redis", "task": "Install Redis",
         "action": "ansible.builtin.apt", "handler": False, "retries": False, "hosts": 2, "changed": 2, "seconds": 7.0},
        {"kind": "task", "step": "converge", "playbook": "converge.yml", "role": "redis", "task": "Wait",
         "action": "ansible.builtin.command", "handler": False, "retries": True, "hosts": 2, "changed": 0, "seconds": 2.0},
        {"kind": "task", "step": "converge", "playbook": "converge.yml", "role": "redis", "task": "Restart redis",
         "action": "ansible.builtin.systemd_service", "handler": True, "retries": False, "hosts": 2, "changed": 2,
         "seconds": 1.0},
        {"kind": "step", "step": "converge", "seconds": 12.0, "ok": True, "busy": 0.5, "waited": 0.0, "alone": False},
        {"kind": "step", "step": "verify-all", "seconds": 4.0, "ok": True, "busy": 0.25, "waited": 1.0, "alone": False},
    ]
    (tmp_path / "redis-debian12.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    [p] = profile.load(tmp_path)
    assert (p.counts.passed, p.counts.failed, p.counts.skipped) == (1, 1, 1)
    assert p.kinds == {"apt": 7.0, "waits": 2.0, "services": 1.0}
    assert p.steps == {"converge": 12.0, "verify-all": 4.0} and p.waited == 1.0
    text = "\n".join(profile.render([p]))
    assert "redis-debian12" in text and "Install Redis" in text and "t::a" in text


@pytest.mark.parametrize("name", suite.all_scenarios())
def test_every_scenario_states_its_cost_per_release(name):
    cost = suite.scenario_config(name).get("driver", {}).get("bench_cost")
    assert isinstance(cost, int) and cost > 0, f"molecule/{name}/molecule.yml: driver.bench_cost (seconds per release)"


def test_the_costliest_jobs_start_first_after_the_unit_tests():
    jobs = suite.plan(["debian12", "debian13"], suite.all_scenarios(), with_lab=True, with_unit=True)
    assert jobs[0].kind == "unit"
    costs = [j.cost for j in jobs[1:]]
    assert costs == sorted(costs, reverse=True)
    assert suite.pick_next(jobs, set()).kind == "unit"


def test_the_scenario_with_the_most_cost_left_goes_next_so_no_two_releases_of_one_are_left_for_the_end():
    def job(name, distro, cost):
        return suite.Job("molecule", name, distro, [], cost=cost)
    rt13, lab13, rab12, rab13, red12, red13 = (job("rt", "13", 700), job("lab", "13", 470), job("rab", "12", 380),
                                               job("rab", "13", 380), job("red", "12", 260), job("red", "13", 260))
    pending = [rt13, lab13, rab12, rab13, red12, red13]
    # rt runs: of the others, rabbitmq has 760 s left, Redis 520, the lab 470.
    assert suite.pick_next(pending, {"rt"}) is rab12
    pending.remove(rab12)
    # rt and rabbitmq run: Redis (520 left) before the lab's single job (470).
    assert suite.pick_next(pending, {"rt", "rab"}) is red12
    assert suite.pick_next([red13], {"red"}) is None
