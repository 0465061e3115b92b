"""The application path proven on the lab: jobs published to RabbitMQ (with confirms, and by a
Node.js amqplib producer written the plain way) are rendered by the two mail workers and sent through
the VIP, each exactly once; a worker killed while it sends and Redis restarted while jobs flow lose
and repeat nothing; a new template version is used without a restart; a malformed job goes to the
dead queue with its reason; bad input to the role fails naming the variable."""

from __future__ import annotations

import json
import subprocess
import threading
import time

import pytest
from conftest import ROOT, assert_stopped_before_any_host, inventory
from labworker import (broker_depth, dead_jobs, job_body, node_publish, publish, total, wait_delivered, wait_settled,
                       worker_figures)


def once_each(counts, want) -> tuple[list, list]:
    """(lost, sent more than once) among the wanted ids."""
    return sorted(set(want) - set(counts)), sorted(i for i in want if counts.get(i, 0) > 1)


@pytest.mark.timed
def test_a_thousand_jobs_are_each_delivered_once_and_the_worker_is_not_what_limits(second_up, lab_exec):
    prefix = f"jobs{int(time.time())}"
    sent_before = total(worker_figures(lab_exec), "mailstack_worker_jobs_sent_total")
    started = time.monotonic()
    confirmed = publish(lab_exec, prefix, 800)
    plain = node_publish(prefix + "n", 200)
    assert plain == {"sent": 200}, f"the plain amqplib producer could not publish: {plain}"
    want = set(confirmed)
    deadline = started + 300
    while total(worker_figures(lab_exec), "mailstack_worker_jobs_sent_total") - sent_before < 1000:
        assert time.monotonic() < deadline, "the workers did not send 1000 jobs in 300 s"
        time.sleep(0.5)
    took = time.monotonic() - started   # published, rendered, and accepted by the relays
    # the sink is asked per prefix: an id of the plain producer (<prefix>n-<n>) is not <prefix>-<n>, and
    # waiting for both under one prefix waited out the whole timeout
    plain_want = {f"{prefix}n-{n}" for n in range(1, 201)}
    counts = wait_delivered(prefix, want)
    plain_counts = wait_delivered(prefix + "n", plain_want)
    delivered = time.monotonic() - started
    lost, twice = once_each(counts, want)
    plain_lost, plain_twice = once_each(plain_counts, plain_want)
    assert not lost and not twice, f"confirmed jobs lost: {lost[:5]} ({len(lost)}), sent twice: {twice[:5]}"
    assert not plain_lost and not plain_twice, f"plain jobs lost: {plain_lost[:5]}, twice: {plain_twice[:5]}"
    # control: the mail at the sink is the rendered template, from both workers
    figures = worker_figures(lab_exec)
    assert all(total({w: page}, "mailstack_worker_jobs_sent_total") > 0 for w, page in figures.items()), figures
    # the same number of messages straight to the VIP with smtp-source, as many at once as the
    # workers' threads
    inv = inventory()
    vip = inv.vips()[0][0]
    threads = sum(inv.setting(w, "mail_worker", "mail_worker_concurrency") for w in inv.hosts("mail_workers"))
    t0 = time.monotonic()
    lab_exec("lab-app1", f"smtp-source -s {threads} -m 1000 -f app@app.lab.test -t smtpsource@example.net "
                         f"-c {vip}:25 >/dev/null 2>&1")
    direct = time.monotonic() - t0
    print(f"\nMEASURED 1000 jobs (800 with confirms, 200 from the plain amqplib producer) published and "
          f"accepted by the relays in {took:.1f}s: {1000 / took:.0f} jobs/s through 2 workers x {threads // 2} "
          f"threads and the VIP (all at the sink after {delivered:.1f}s); smtp-source straight to the VIP with "
          f"{threads} connections: 1000 accepted in {direct:.1f}s ({1000 / direct:.0f}/s); workers / "
          f"smtp-source {direct / took:.2f}")


@pytest.mark.timed
def test_a_worker_killed_while_it_sends_loses_and_repeats_nothing(second_up, lab_exec):
    prefix = f"kill{int(time.time())}"
    sent_before = total(worker_figures(lab_exec), "mailstack_worker_jobs_sent_total")
    want = set(publish(lab_exec, prefix, 1500))
    deadline = time.monotonic() + 60
    while (sent := total(worker_figures(lab_exec), "mailstack_worker_jobs_sent_total") - sent_before) < 150:
        assert time.monotonic() < deadline, "the workers sent nothing"
    killed = lab_exec("lab-worker1", "systemctl show -p MainPID --value mailstack-worker.service").stdout.strip()
    lab_exec("lab-worker1", "systemctl kill -s SIGKILL mailstack-worker.service")
    in_queue = broker_depth(lab_exec)   # worker1's counters died with it: the broker counts what is left
    assert in_queue > 0, "every job was sent before the kill: the test proves nothing"
    counts, dead = wait_settled(lab_exec, prefix, want)
    lost, twice = once_each(counts, set(want) - set(dead))
    assert not lost and not twice, f"lost: {lost[:5]} ({len(lost)}), sent twice: {twice[:5]} ({len(twice)})"
    # a job whose worker died between its commit and the relay's answer is nobody's to send again: it is
    # in the dead queue naming the killed worker, sent at most once, and there are no more of them than
    # the killed worker had threads
    threads = inventory().setting("worker1", "mail_worker", "mail_worker_concurrency")
    assert len(dead) <= threads, f"{len(dead)} jobs dead after one kill: {dead}"
    for key, reason in dead.items():
        assert f":{killed} stopped while it handed the message over" in reason, (key, reason)
        assert counts.get(key, 0) <= 1, f"{key} sent twice"
    after = lab_exec("lab-worker1", "systemctl show -p MainPID --value mailstack-worker.service").stdout.strip()
    assert after and after != killed, "systemd did not start the killed worker again"
    print(f"\nMEASURED worker1 SIGKILLed after about {sent:.0f} of 1500 jobs were sent, {in_queue} still queued: "
          f"{len(want) - len(dead)} delivered once, {len(dead)} in the dead queue as outcome unknown (of which "
          f"{sum(1 for k in dead if counts.get(k))} had reached the relay), none lost, none twice; jobs not sent "
          f"again because their key was taken (since the kill, by worker2 and the new worker1): "
          f"{total(worker_figures(lab_exec), 'mailstack_worker_jobs_duplicate_total'):.0f}")


def test_redis_restarted_while_jobs_flow_loses_and_repeats_nothing(second_up, lab_exec):
    prefix = f"redis{int(time.time())}"
    figures = worker_figures(lab_exec)
    sent_before = total(figures, "mailstack_worker_jobs_sent_total")
    waits_before = total(figures, "mailstack_worker_redis_waits_total")
    want = set(publish(lab_exec, prefix, 1500))
    deadline = time.monotonic() + 60
    while total(worker_figures(lab_exec), "mailstack_worker_jobs_sent_total") - sent_before < 150:
        assert time.monotonic() < deadline, "the workers sent nothing"
    assert lab_exec("lab-redis1", "systemctl restart redis-server").returncode == 0
    sent = total(worker_figures(lab_exec), "mailstack_worker_jobs_sent_total") - sent_before
    in_queue = 1500 - sent
    assert in_queue > 0, "every job was sent before Redis restarted: the test proves nothing"
    counts = wait_delivered(prefix, want)
    lost, twice = once_each(counts, want)
    assert not lost and not twice, f"lost: {lost[:5]} ({len(lost)}), sent twice: {twice[:5]}"
    waits = total(worker_figures(lab_exec), "mailstack_worker_redis_waits_total") - waits_before
    print(f"\nMEASURED Redis restarted with {in_queue:.0f} jobs not yet sent: all 1500 delivered once; jobs that waited "
          f"in a worker for Redis: {waits:.0f}")


def test_a_malformed_job_is_dead_lettered_with_its_reason_and_the_good_one_sent(second_up, lab_exec):
    prefix = f"bad{int(time.time())}"
    dead_jobs(lab_exec)   # the dead queue starts empty
    publish(lab_exec, prefix + "a", 1, body="{ not json")
    publish(lab_exec, prefix + "b", 1, body=job_body(**{"from": "nobody"}))
    publish(lab_exec, prefix + "c", 1, body=job_body(headers={"Message-ID": "<forged@example.net>"}))
    publish(lab_exec, prefix + "d", 1, body=job_body(template={"id": "nonesuch"}))
    good = set(publish(lab_exec, prefix + "ok", 1))
    assert set(wait_delivered(prefix + "ok", good, timeout=60)) == good, "the good job was not delivered"
    deadline = time.monotonic() + 30
    dead: list[dict] = []
    while len(dead) < 4 and time.monotonic() < deadline:
        dead += dead_jobs(lab_exec)
    reasons = sorted(d["reason"] for d in dead)
    assert len(dead) == 4, reasons
    for expected in ("invalid job: not JSON", "invalid job: from: 'nobody' does not match",
                     "invalid job: headers: Message-ID written by the worker",
                     "template nonesuch: none deployed"):
        assert any(expected in r for r in reasons), f"{expected!r} not among {reasons}"


def worker_playbook(*args: str) -> subprocess.CompletedProcess:
    from mailstack.lab import ansible_env

    return subprocess.run([str(ROOT / ".venv" / "bin" / "ansible-playbook"), "-i", "inventories/lab",
                           "playbooks/workers.yml", *args], cwd=ROOT, env=ansible_env(),
                          capture_output=True, text=True, timeout=900)


def templates_file(templates: list[dict], directory) -> object:
    """mail_worker_templates as extra vars, each string !unsafe (Ansible leaves their {{ }} alone)."""
    lines = ["mail_worker_templates:"]
    for t in templates:
        first = True
        for key, value in t.items():
            text = f"!unsafe {json.dumps(value)}" if isinstance(value, str) else json.dumps(value)
            lines.append(f"  {'- ' if first else '  '}{key}: {text}")
            first = False
    path = directory / "templates.yml"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_a_new_template_version_is_used_without_a_restart(second_up, lab_exec, tmp_path):
    inv = inventory()
    templates = inv.setting("worker1", "mail_worker", "mail_worker_templates")
    v2 = dict(templates[-1], version=int(templates[-1]["version"]) + 1, subject="Welcome aboard, {{ name }}")
    pids = {w: lab_exec(f"lab-{w}", "systemctl show -p MainPID --value mailstack-worker.service").stdout.strip()
            for w in inv.hosts("mail_workers")}
    prefix = f"tpl{int(time.time())}"
    flowing = threading.Thread(target=lambda: publish(lab_exec, prefix, 60), daemon=True)
    flowing.start()
    deploy = worker_playbook("--tags", "mail_worker", "-e", "@" + str(templates_file(templates + [v2], tmp_path)))
    assert deploy.returncode == 0, deploy.stdout[-3000:]
    flowing.join(120)
    late = set(publish(lab_exec, prefix + "late", 20))
    assert set(wait_delivered(prefix + "late", late, timeout=120)) == late
    subjects = json.loads(lab_exec("lab-sink", "mailsink dump").stdout or "[]")
    late_subjects = {m["subject"] for m in subjects if (m.get("x_test_id") or "").startswith(prefix + "late-")}
    assert late_subjects == {"Welcome aboard, Ann"}, late_subjects
    assert {w: lab_exec(f"lab-{w}", "systemctl show -p MainPID --value mailstack-worker.service").stdout.strip()
            for w in pids} == pids, "a worker was restarted"
    figures = worker_figures(lab_exec)
    hits = total({w: {k: v for k, v in p.items() if 'result="hit"' in k} for w, p in figures.items()},
                 "mailstack_worker_template_lookups_total")
    misses = total({w: {k: v for k, v in p.items() if 'result="miss"' in k} for w, p in figures.items()},
                   "mailstack_worker_template_lookups_total")
    print(f"\nMEASURED template cache in Redis: {hits:.0f} hits, {misses:.0f} misses "
          f"({hits / max(1, hits + misses):.0%} hit ratio; each worker also keeps what it compiled)")


BAD_INPUTS = [
    ({"mail_worker_balancer_group": "mail_relays"}, ["mail_worker_smtp_host is empty", "have no VIP"]),
    ({"mail_worker_prefetch": 0}, ["mail_worker_prefetch must be 1 to 1000 (got 0)"]),
    ({"mail_worker_amqp_user": "nodeapp"}, ["mail_worker_amqp_user: nodeapp may not read mail.send"]),
]
WATCHED = "/etc/mailstack-worker/worker.json /etc/systemd/system/mailstack-worker.service"


def test_bad_worker_input_fails_naming_the_variable_before_any_host_changes(second_up, lab_exec):
    before = lab_exec("lab-worker1", f"sha256sum {WATCHED}").stdout
    for extra, expected in BAD_INPUTS:
        assert_stopped_before_any_host(worker_playbook("-e", json.dumps(extra)), extra, expected, "Mail workers")
    assert lab_exec("lab-worker1", f"sha256sum {WATCHED}").stdout == before, "worker1's configuration changed"
    control = worker_playbook("--tags", "mail_worker_check")
    assert control.returncode == 0, control.stdout[-3000:]
    assert "assert | There is a VIP (or a host) to send to" in control.stdout
