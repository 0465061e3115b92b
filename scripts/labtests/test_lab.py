"""What `make lab` promises, proven on the lab itself through the mailstack CLI."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, inventory, mailstack


def test_first_up_builds_a_healthy_lab_with_each_vip_on_its_preferred_balancer(first_up):
    state = first_up["state"]
    assert state["healthy"], state["problems"]
    assert state["vips"], "the lab has no VIP"
    for vip in state["vips"]:
        assert vip["holders"] == [vip["preferred"]], vip
    inv = inventory()
    for relay in state["relays"]:
        assert relay["weight"] == inv.value(relay["name"], "mail_relay_weight")
        for lb, rows in relay["backends"].items():
            assert rows and all(r["state"] == "UP" and r["weight"] == relay["weight"] for r in rows), (lb, rows)


def test_second_up_keeps_the_containers_and_changes_nothing(first_up, second_up):
    assert second_up["containers"] == first_up["containers"], "containers were rebuilt"
    assert second_up["state"]["converge"]["created"] == []
    changed = {h: n for h, n in second_up["state"]["converge"]["changed"].items() if n}
    assert changed == {}, f"the second converge changed something: {changed}"
    assert second_up["state"]["healthy"], second_up["state"]["problems"]


def test_smoke_delivers_through_every_vip_to_the_sink(second_up):
    proc = mailstack("smoke", "-i", "inventories/lab", "--json")
    report = json.loads(proc.stdout)
    assert proc.returncode == 0, report
    vips = sorted(v["vip"] for v in second_up["state"]["vips"])
    assert sorted(r["vip"] for r in report["results"]) == vips
    for r in report["results"]:
        assert r["accepted"] and r["code"] == 250 and r["tls"], r
        assert r["delivered"] is True, r
    print("MEASURED smoke: " + ", ".join(f"{r['vip']} delivered after {r['delivered_after']}s"
                                         for r in report["results"]))


def test_status_json_names_every_host_and_shows_each_vip_on_its_balancer(second_up):
    proc = mailstack("lab", "status", "--json")
    assert proc.returncode == 0, proc.stdout
    state = json.loads(proc.stdout)
    inv = inventory()
    by_name = {h["name"]: h for h in state["hosts"]}
    assert sorted(by_name) == sorted(inv.hosts())
    for name, h in by_name.items():
        assert h["running"], h
        assert h["address"] == inv.value(name, "mailstack_service_address")
        assert h["groups"] == inv.groups_of(name)
    lbs = inv.hosts("balancers")
    keepalived = yaml.safe_load((ROOT / "inventories/lab/group_vars/balancers/keepalived.yml").read_text())
    expected = {vip.split("/")[0]: lbs[i % len(lbs)] for i, vip in enumerate(keepalived["keepalived_vips"])}
    assert {v["vip"]: v["holder"] for v in state["vips"]} == expected
    assert all(r["queue"] == 0 for r in state["relays"]), state["relays"]
    assert state["redis"] and all(x["healthy"] for x in state["redis"])
    assert state["rabbitmq"] and all(x["healthy"] and "mail.send" in x["queues"] for x in state["rabbitmq"])


def test_a_client_outside_the_relay_networks_cannot_relay_through_a_vip(second_up, lab_exec):
    # The sink is on the lab network but not in mailstack_relay_networks: the balancer passes its
    # real address to the relays, which must refuse it.
    for vip in (v["vip"] for v in second_up["state"]["vips"]):
        proc = lab_exec("lab-sink", f"smtpprobe --host {vip} --from a@outside.test --to victim@example.org "
                                    "--id outside-relay-attempt")
        report = json.loads(proc.stdout)
        rcpt = report["messages"][0]["rcpt"][0]
        assert report["connected"] and 500 <= rcpt[0] < 600, report
    time.sleep(1)
    found = lab_exec("lab-sink", "grep -rl outside-relay-attempt /var/lib/mailsink || true")
    assert found.stdout.strip() == ""


def test_status_sees_a_stopped_relay_down_and_well_again(second_up, lab_exec):
    lab_exec("lab-relay2", "systemctl stop postfix")
    try:
        deadline = time.monotonic() + 30
        while True:
            proc = mailstack("lab", "status", "--json")
            state = json.loads(proc.stdout)
            relay2 = next(r for r in state["relays"] if r["name"] == "relay2")
            states = [row["state"] for rows in relay2["backends"].values() for row in rows]
            if all(s.startswith("DOWN") for s in states):
                break
            assert time.monotonic() < deadline, f"relay2 not seen down: {states}"
            time.sleep(1)
        assert proc.returncode == 1 and not state["healthy"]
        assert any("relay2" in p for p in state["problems"])
    finally:
        lab_exec("lab-relay2", "systemctl start postfix")
    deadline = time.monotonic() + 30
    while True:
        proc = mailstack("lab", "status", "--json")
        if proc.returncode == 0:
            break
        assert time.monotonic() < deadline, json.loads(proc.stdout)["problems"]
        time.sleep(1)


# ---------------------------------------------------------------- operations (issue: maintenance)

def relay_pids(lab_exec) -> dict[str, str]:
    inv = inventory()
    pids = {}
    for relay in inv.hosts("mail_relays"):
        unit = "exim4" if "exim_relays" in inv.groups_of(relay) else "postfix"
        # Both units are wrappers (postfix.service a oneshot, exim4.service a SysV script): the
        # daemons' own pid files say whether the MTA really restarted.
        if unit == "postfix":
            command = "cat /var/spool/postfix/pid/master.pid"
        else:
            command = "cat /run/exim4/exim.pid"
        pids[relay] = lab_exec(inv.value(relay, "mailstack_lab_container"), command).stdout.strip()
    return pids


@pytest.mark.timed
def test_rolling_relay_maintenance_loses_and_refuses_no_mail(second_up, lab_exec):
    from mailstack.traffic import Sender, wait_for_delivery

    inv = inventory()
    vips = [v["vip"] for v in second_up["state"]["vips"]]
    before = relay_pids(lab_exec)
    sender = Sender(vips, 25, inv.value("lb1", "mailstack_smoke_sender"),
                    inv.value("lb1", "mailstack_smoke_recipient"), prefix="maint", interval=0.1)
    sender.start()
    started = time.monotonic()
    try:
        proc = subprocess.run([str(Path(sys.executable).parent / "ansible-playbook"), "-i", "inventories/lab",
                               "playbooks/relay_maintenance.yml"], cwd=ROOT, capture_output=True, text=True,
                              timeout=1800)
    finally:
        sender.stop()
    seconds = time.monotonic() - started
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    after = relay_pids(lab_exec)
    assert all(after[r] and after[r] != before[r] for r in before), (before, after)
    outcome = wait_for_delivery(sender, "lab-sink")
    print(f"MEASURED rolling maintenance of {len(before)} relays in {seconds:.0f}s: sent {outcome.sent}, "
          f"accepted {outcome.accepted}, refused {outcome.refused}, delivered {outcome.delivered}, "
          f"lost {len(outcome.lost)}, duplicated {len(outcome.duplicated)}")
    assert outcome.sent > 100
    assert outcome.refused == 0, [r for r in sender.refused][:10]
    assert outcome.lost == [] and outcome.duplicated == []
    state = json.loads(mailstack("lab", "status", "--json").stdout)
    assert state["healthy"], state["problems"]


@pytest.mark.timed
@pytest.mark.parametrize("mode,rounds", [("both", 1), ("container", 1)])
def test_failover_drill_moves_the_vip_and_loses_no_accepted_mail(second_up, mode, rounds):
    proc = mailstack("drill", "failover", "-i", "inventories/lab", "--mode", mode, "--rounds", str(rounds),
                     "--json", timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + (proc.stderr or "")[-3000:]
    report = json.loads(proc.stdout)
    assert len(report["rounds"]) == rounds
    for r in report["rounds"]:
        assert r["took_over"] and r["took_over"] != r["killed"], r
    assert report["delivery_checked"] and report["accepted"] > 0
    assert report["lost"] == 0 and report["duplicated"] == 0, report
    print(f"MEASURED drill {mode}: gaps {[r['gap'] for r in report['rounds']]}s (median {report['gap_median']}s, "
          f"worst {report['gap_worst']}s), VIP moved after {[r['moved_after'] for r in report['rounds']]}s; "
          f"sent {report['sent']}, accepted {report['accepted']}, refused {report['refused']}, "
          f"delivered {report['delivered']}, lost {report['lost']}, duplicated {report['duplicated']}")
    state = json.loads(mailstack("lab", "status", "--json").stdout)
    assert state["healthy"] and all(v["on_preferred"] for v in state["vips"]), state["problems"]
