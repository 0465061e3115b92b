"""The destination's answer reaches the mail worker through the VIP: the relays check recipients at
the lab's verified domain with the sink before they take a message, so the sink's 4xx is the
worker's 4xx (retried with back-off until the sink takes it) and the sink's 5xx the worker's 5xx (the
job dead-lettered with the reply, the recipient suppressed, a later job to it not sent)."""

from __future__ import annotations

import json
import time

from conftest import inventory
from labprom import prometheus_state
from labworker import dead_jobs, job_body, publish, total, wait_delivered, worker_figures

from mailstack.traffic import sink_counts


def verified_domain() -> str:
    """The domain every relay of the lab verifies recipients of, Postfix and Exim alike."""
    inv = inventory()
    by_relay = {}
    for group, role in (("postfix_relays", "postfix"), ("exim_relays", "exim")):
        for relay in inv.hosts(group):
            by_relay[relay] = inv.setting(relay, role, f"{role}_verify_recipient_domains")
    domains = {tuple(d) for d in by_relay.values()}
    assert len(domains) == 1 and next(iter(domains)), f"the relays do not verify one set of domains: {by_relay}"
    return next(iter(domains))[0]


def wait_for(figure: str, at_least: float, timeout: float, lab_exec) -> float:
    deadline = time.monotonic() + timeout
    while (value := total(worker_figures(lab_exec), figure)) < at_least and time.monotonic() < deadline:
        time.sleep(1)
    return value


def arrival_times(lab_exec, prefix: str) -> list[float]:
    records = json.loads(lab_exec("lab-sink", "mailsink dump").stdout or "[]")
    return [m["received_at"] for m in records if (m.get("x_test_id") or "").startswith(prefix + "-")]


def test_a_recipient_deferred_for_30s_is_delivered_once_after_the_workers_retry(second_up, lab_exec):
    domain = verified_domain()
    prefix = f"tmpfail{int(time.time())}"
    retried_before = total(worker_figures(lab_exec), "mailstack_worker_jobs_retried_total")
    published = time.time()
    deferred = set(publish(lab_exec, prefix + "d", 5, body=job_body(to=f"defer30s-{{id}}@{domain}")))
    control = set(publish(lab_exec, prefix + "ok", 5, body=job_body(to=f"{{id}}@{domain}")))
    # control: recipients the sink takes pass the relays' check and arrive at once
    assert set(wait_delivered(prefix + "ok", control, timeout=60)) == control, "verified recipients not delivered"
    assert not sink_counts("lab-sink", prefix + "d"), "a deferred recipient was delivered while the sink said 451"
    assert wait_for("mailstack_worker_jobs_retried_total", retried_before + len(deferred), 60, lab_exec) \
        >= retried_before + len(deferred), "the workers did not retry the deferred jobs: the 451 did not reach them"
    counts = wait_delivered(prefix + "d", deferred, timeout=240)
    missing = sorted(deferred - set(counts))
    twice = sorted(i for i in deferred if counts.get(i, 0) > 1)
    assert not missing and not twice, f"after the deferral: missing {missing}, delivered twice {twice}"
    first = min(arrival_times(lab_exec, prefix + "d")) - published
    assert first >= 25, f"a deferred job arrived {first:.0f}s after publishing, before the sink stopped deferring"
    retried = total(worker_figures(lab_exec), "mailstack_worker_jobs_retried_total") - retried_before
    leftover = [d for d in dead_jobs(lab_exec) if prefix in d["body"]]
    assert not leftover, f"deferred jobs went to the dead queue: {[d['reason'] for d in leftover]}"
    print(f"\nMEASURED 5 recipients deferred by the sink for 30 s: first delivered {first:.0f}s after publishing, "
          f"all once; {retried:.0f} retries by the workers")


def test_a_recipient_refused_is_dead_lettered_suppressed_and_not_sent_again(second_up, lab_exec):
    domain = verified_domain()
    prefix = f"hardfail{int(time.time())}"
    recipient = f"bounce-{prefix}@{domain}"
    dead_jobs(lab_exec)   # the dead queue starts empty
    figures = worker_figures(lab_exec)
    new_before = total(figures, "mailstack_worker_recipients_suppressed_new_total")
    skipped_before = total(figures, "mailstack_worker_recipients_suppressed_total")
    publish(lab_exec, prefix + "a", 1, body=job_body(to=recipient))
    deadline = time.monotonic() + 60
    dead: list[dict] = []
    while not dead and time.monotonic() < deadline:
        dead = [d for d in dead_jobs(lab_exec) if prefix + "a-1" in d["body"]]
    assert dead, "the refused job is not in the dead queue"
    assert "refused by the relay" in dead[0]["reason"] and "550" in dead[0]["reason"], dead[0]["reason"]
    assert wait_for("mailstack_worker_recipients_suppressed_new_total", new_before + 1, 30, lab_exec) \
        >= new_before + 1, "the refused recipient was not put on the suppression list"
    # a later job to the same recipient is not sent; one to a good recipient at that domain is
    publish(lab_exec, prefix + "b", 1, body=job_body(to=recipient))
    control = set(publish(lab_exec, prefix + "ok", 1, body=job_body(to=f"{{id}}@{domain}")))
    assert set(wait_delivered(prefix + "ok", control, timeout=60)) == control, "the control job was not delivered"
    assert wait_for("mailstack_worker_recipients_suppressed_total", skipped_before + 1, 30, lab_exec) \
        >= skipped_before + 1, "the later job to the suppressed recipient was not skipped"
    assert not sink_counts("lab-sink", prefix + "a") and not sink_counts("lab-sink", prefix + "b"), \
        "mail to the refused recipient reached the sink"
    later_dead = [d for d in dead_jobs(lab_exec) if prefix + "b-1" in d["body"]]
    assert not later_dead, f"the later job was sent and refused again: {later_dead[0]['reason']}"
    # and the operators hear of the dead job: Prometheus's MailJobsDead fires, naming the reason
    deadline = time.monotonic() + 60
    while not any(a["name"] == "MailJobsDead" and a["state"] == "firing" and "(refused)" in a["summary"]
                  for a in prometheus_state()["alerts"]):
        assert time.monotonic() < deadline, "MailJobsDead did not fire for the refused job within 60 s"
        time.sleep(2)
