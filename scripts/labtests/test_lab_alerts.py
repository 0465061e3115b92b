"""Monitoring proven on the lab, what it does about it: alerts fire, are mailed through the VIP and
resolve (a stopped relay, held deliveries), the VIP metric follows a killed balancer, and bad input
to the monitoring playbook is refused before any host changes."""

from __future__ import annotations

import json
import subprocess
import time

import pytest
from conftest import ROOT, assert_stopped_before_any_host, inventory
from labprom import prometheus_state, sink_messages

@pytest.mark.timed
def test_a_stopped_relay_fires_an_alert_mailed_through_the_vip_and_resolves(second_up, lab_exec):
    before = len(sink_messages(lab_exec))
    lab_exec("lab-relay2", "systemctl stop postfix")
    started = time.monotonic()
    try:
        while True:
            state = prometheus_state()
            firing = {(a["name"], a["instance"]) for a in state["alerts"] if a["state"] == "firing"}
            if ("MailRelayDown", "relay2") in firing:
                break
            assert time.monotonic() - started < 60, f"no MailRelayDown for relay2 after 60 s: {state['alerts']}"
            time.sleep(2)
        fired_after = time.monotonic() - started
        # control: the relays still running are not alerted
        assert not {i for n, i in firing if n == "MailRelayDown"} - {"relay2"}, firing
        while not any("MailRelayDown" in (m.get("subject") or "") and "relay2" in (m.get("subject") or "")
                      for m in sink_messages(lab_exec)[before:]):
            assert time.monotonic() - started < 120, "the alert's mail did not reach the sink"
            time.sleep(2)
        mailed_after = time.monotonic() - started
    finally:
        lab_exec("lab-relay2", "systemctl start postfix")
    state = prometheus_state(timeout=120)
    assert state["well"], state["remaining"]
    print(f"\nMEASURED relay2 stopped: alert firing after {fired_after:.0f}s, its mail at the sink after "
          f"{mailed_after:.0f}s; resolved {time.monotonic() - started:.0f}s after the stop")


def test_the_vip_metric_follows_a_killed_balancers_vip_to_the_other_and_back(second_up, lab_exec):
    vip = next(v for v in second_up["state"]["vips"] if v["holder"] == "lb1")["vip"]
    subprocess.run(["podman", "kill", "lab-lb1"], check=True, capture_output=True)
    try:
        deadline = time.monotonic() + 60
        while {v["vip"]: v["holders"] for v in prometheus_state()["vips"]}.get(vip) != ["lb2"]:
            assert time.monotonic() < deadline, "Prometheus never saw the VIP on lb2"
            time.sleep(2)
    finally:
        subprocess.run(["podman", "start", "lab-lb1"], check=True, capture_output=True)
    # lb1 back: it takes its VIP again once its haproxy has settled (keepalived_haproxy_settle_seconds)
    deadline = time.monotonic() + 120
    while (holders := {v["vip"]: v["holders"] for v in prometheus_state()["vips"]}).get(vip) != ["lb1"]:
        assert time.monotonic() < deadline, f"Prometheus never saw the VIP back on lb1: {holders}"
        time.sleep(2)
    state = prometheus_state(timeout=60)
    assert state["well"], state["remaining"]


def test_held_deliveries_fire_the_queue_alert_which_resolves_when_they_flow(second_up, lab_exec):
    """The sink stops answering: mail sent through the VIP waits in the relays' queues until the
    queue alert fires; the sink back and the queues flushed, it resolves. Control: no queue alert
    before the sink stops."""
    import smtplib

    inv = inventory()
    vip = next(v["vip"] for v in second_up["state"]["vips"])
    assert not [a for a in prometheus_state()["alerts"] if a["name"] == "MailQueueLarge"]
    lab_exec("lab-sink", "systemctl stop mailsink")
    started = time.monotonic()
    try:
        for i in range(24):
            with smtplib.SMTP(vip, 25, timeout=30) as smtp:
                smtp.sendmail("app@app.lab.test", [f"held-{i}@example.net"], f"Subject: held {i}\r\n\r\nheld\r\n")
        while not [a for a in prometheus_state()["alerts"] if a["name"] == "MailQueueLarge" and a["state"] == "firing"]:
            assert time.monotonic() - started < 120, prometheus_state()["relays"]
            time.sleep(2)
        fired_after = time.monotonic() - started
    finally:
        # The unit is Type=simple: wait until the sink listens, or a flush only defers again (and
        # Exim's retry rules then keep the messages queued long after the sink is back).
        lab_exec("lab-sink", "systemctl start mailsink && python3 -c 'import socket, time\n"
                             "for _ in range(120):\n"
                             "    try: socket.create_connection((\"127.0.0.1\", 25), 1).close(); break\n"
                             "    except OSError: time.sleep(0.5)'")
        for relay in inv.hosts("postfix_relays"):
            lab_exec(inv.value(relay, "mailstack_lab_container"), "postqueue -f")
        for relay in inv.hosts("exim_relays"):
            lab_exec(inv.value(relay, "mailstack_lab_container"), "exim -qff")
    # The alert resolves once the queues are below its threshold; the queue samples (a timer, then
    # a scrape) reach 0 up to two intervals later, so wait for both.
    deadline = time.monotonic() + 120
    while True:
        state = prometheus_state()
        emptied = all(r["queue"] == 0 for r in state["relays"])
        if (state["well"] and emptied) or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert state["well"], state["remaining"]
    assert emptied, state["relays"]
    print(f"\nMEASURED sink stopped: MailQueueLarge firing after {fired_after:.0f}s; resolved "
          f"{time.monotonic() - started:.0f}s after the stop")


# ---------------------------------------------------------------- bad input

BAD_INPUTS = [
    ({"monitoring_relay_group": "relays_nowhere"}, ["monitoring_relay_group", "no group relays_nowhere"]),
    ({"monitoring_retention_time": "0"}, ["monitoring_retention_time must be a positive", '(got "0")']),
    ({"monitoring_alert_bounce_ratio": 1.5}, ["monitoring_alert_bounce_ratio is 1.5", "below 1"]),
    ({"monitoring_alert_email_to": "ops at example.net"},
     ["monitoring_alert_email_to must be an email address", '"ops at example.net"']),
    ({"monitoring_rule_groups": [{"name": "site", "rules": [{"alert": "NoExpression"}]}]},
     ["monitoring_rule_groups: group 0 (site) rule 0"]),
]
WATCHED = ("/etc/prometheus/prometheus.yml /etc/prometheus/alertmanager.yml "
           "/etc/prometheus/rules/mailstack.rules.yml /etc/default/prometheus")


def monitoring_playbook(*args: str) -> subprocess.CompletedProcess:
    from mailstack.lab import ansible_env

    return subprocess.run([str(ROOT / ".venv" / "bin" / "ansible-playbook"), "-i", "inventories/lab",
                           "playbooks/monitoring.yml", *args], cwd=ROOT, env=ansible_env(),
                          capture_output=True, text=True, timeout=900)


def test_bad_monitoring_input_fails_naming_the_variable_before_any_host_changes(second_up, lab_exec):
    """The playbook an operator runs, each bad value alone: it fails naming the variable and what is
    wrong, no host changes and mon1's configuration stays as it was. Control: the lab's own input
    passes the same checks."""
    from concurrent.futures import ThreadPoolExecutor

    before = lab_exec("lab-mon1", f"sha256sum {WATCHED}").stdout
    with ThreadPoolExecutor(2) as pool:
        runs = list(pool.map(lambda bad: monitoring_playbook("-e", json.dumps(bad[0])), BAD_INPUTS))
        control = pool.submit(monitoring_playbook, "--limit", "monitoring", "--tags", "monitoring_check").result()
    for (extra, expected), proc in zip(BAD_INPUTS, runs):
        assert_stopped_before_any_host(proc, extra, expected, "Exporters")
    assert lab_exec("lab-mon1", f"sha256sum {WATCHED}").stdout == before, "mon1's configuration changed"
    assert control.returncode == 0, control.stdout[-3000:]
    assert "assert | Alerts go to an email address" in control.stdout, "the control did not run the role's checks"
