"""What `make lab` promises, proven on the lab itself through the mailstack CLI."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, mailstack

from mailstack.inventory import Inventory


def inventory() -> Inventory:
    return Inventory(ROOT / "inventories" / "lab")


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


# ---------------------------------------------------------------- monitoring (issue 17)

FETCH = ("python3 -c 'import sys, urllib.request\n"
         "try:\n"
         "    print(urllib.request.urlopen(sys.argv[1], timeout=3).read().decode())\n"
         "except OSError as e:\n"
         "    print(\"REFUSED\", e); sys.exit(7)' ")


def metrics(lab_exec, container: str, url: str) -> dict[str, float]:
    """One exporter's page as {series: value}, fetched from inside a lab container."""
    proc = lab_exec(container, FETCH + url)
    assert proc.returncode == 0, f"{container} could not read {url}: {proc.stdout} {proc.stderr}"
    found = {}
    for line in proc.stdout.splitlines():
        if line and not line.startswith("#"):
            series, value = line.rsplit(" ", 1)
            found[series] = float(value)
    return found


def exporter_urls() -> dict[str, list[str]]:
    inv = inventory()
    urls = {}
    for host in inv.hosts():
        groups = inv.groups_of(host)
        if set(groups) & {"monitoring", "mail_relays", "balancers", "redis_nodes", "rabbitmq_nodes"}:
            address = inv.value(host, "mailstack_service_address")
            urls[host] = [f"http://{address}:9100/metrics"] + (
                [f"http://{address}:3903/metrics"] if "mail_relays" in groups else [])
    return urls


def test_every_exporter_answers_the_monitoring_host_and_no_outsider(second_up, lab_exec):
    # The sink is on the lab network, in no allowed network: the exporters' firewall refuses it,
    # while mon1 (group monitoring) reads every page.
    urls = exporter_urls()
    inv = inventory()
    assert set(urls) == set(inv.hosts()) - set(inv.hosts("sinks")) - set(inv.hosts("apps"))
    for host, pages in urls.items():
        for url in pages:
            page = metrics(lab_exec, "lab-mon1", url)
            assert any(s.startswith(("node_cpu_seconds_total", "mailstack_mail_smtp_connections_total")) for s in page), url
            outsider = lab_exec("lab-sink", FETCH + url)
            assert outsider.returncode == 7 and "REFUSED" in outsider.stdout, (url, outsider.stdout[:200])


def test_each_balancer_exports_the_vips_it_holds(second_up, lab_exec):
    inv = inventory()
    holders = {v["vip"]: v["holder"] for v in second_up["state"]["vips"]}
    for lb in inv.hosts("balancers"):
        page = metrics(lab_exec, "lab-mon1", f"http://{inv.value(lb, 'mailstack_service_address')}:9100/metrics")
        held = {vip for vip in holders if page.get(f'mailstack_vip_held{{vip="{vip}"}}') == 1}
        assert held == {vip for vip, holder in holders.items() if holder == lb}, (lb, page)


def test_a_message_through_each_vip_is_counted_delivered_by_its_relay(second_up, lab_exec):
    inv = inventory()

    def delivered() -> float:
        total = 0.0
        for relay in inv.hosts("mail_relays"):
            page = metrics(lab_exec, "lab-mon1", f"http://{inv.value(relay, 'mailstack_service_address')}:3903/metrics")
            total += sum(v for s, v in page.items()
                         if s.startswith("mailstack_mail_deliveries_total") and 'status="delivered"' in s)
        return total

    before = delivered()
    proc = mailstack("smoke", "-i", "inventories/lab", "--json")
    assert proc.returncode == 0, proc.stdout
    sent = len(json.loads(proc.stdout)["results"])
    deadline = time.monotonic() + 20
    while delivered() - before < sent and time.monotonic() < deadline:
        time.sleep(1)
    assert delivered() - before == sent


def prometheus_state(timeout: float = 0) -> dict:
    """`mailstack status --json`, once or until it reports healthy within timeout seconds."""
    deadline = time.monotonic() + timeout
    while True:
        proc = mailstack("status", "-i", "inventories/lab", "--json")
        state = json.loads(proc.stdout)
        if proc.returncode == 0 or time.monotonic() >= deadline:
            return state
        time.sleep(2)


def sink_messages(lab_exec) -> list[dict]:
    return json.loads(lab_exec("lab-sink", "mailsink dump").stdout or "[]")


def test_prometheus_scrapes_every_exporter_and_probe_and_status_is_well(second_up):
    state = prometheus_state(timeout=90)
    assert state["healthy"], state["problems"]
    inv = inventory()
    watched = set(inv.hosts()) - set(inv.hosts("sinks")) - set(inv.hosts("apps"))
    by_job: dict[str, set] = {}
    for t in state["targets"]:
        by_job.setdefault(t["job"], set()).add(t["instance"])
    assert by_job["node"] == watched
    assert by_job["mail"] == by_job["smtp_relays"] == set(inv.hosts("mail_relays"))
    assert by_job["haproxy"] == set(inv.hosts("balancers"))
    assert by_job["smtp_vips"] == {v["vip"] for v in second_up["state"]["vips"]}
    assert by_job["rabbitmq"] == by_job["rabbitmq_queues"] == set(inv.hosts("rabbitmq_nodes"))
    assert by_job["redis"] == set(inv.hosts("redis_nodes"))
    assert {v["vip"]: v["holders"] for v in state["vips"]} == {
        v["vip"]: [v["holder"]] for v in second_up["state"]["vips"]}


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
    assert state["healthy"], state["problems"]
    print(f"\nMEASURED relay2 stopped: alert firing after {fired_after:.0f}s, its mail at the sink after "
          f"{mailed_after:.0f}s; resolved {time.monotonic() - started:.0f}s after the stop")


@pytest.mark.timed
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
    assert prometheus_state(timeout=60)["healthy"]


def prometheus_counts(expr: str) -> dict[tuple, float]:
    """An instant query through `mailstack status`'s client: {(label values...): value}."""
    from mailstack.status import Prometheus, prometheus_url

    prom = Prometheus(prometheus_url(inventory()))
    return {tuple(sorted(m.items())): v for m, v in prom.query(expr)}


@pytest.mark.timed
def test_a_known_mix_through_the_vip_is_counted_exactly_per_relay_and_summed(second_up, lab_exec):
    """N delivered, M deferred (the sink answers 451), K bounced (550), L relay attempts from
    outside refused at RCPT: Prometheus reports those counts for each relay that took them (each
    session's greeting names it) and in sum. A bounce makes the relay send its own notice to the
    sender, which the sink accepts: one more accepted and delivered message per bounce."""
    import smtplib

    inv = inventory()
    vip = next(v["vip"] for v in second_up["state"]["vips"])
    # a relay's greeting starts with its host name, <host>.<lab domain>
    relay_of = {f"{r}.{inv.value(r, 'mailstack_lab_domain')}": r for r in inv.hosts("mail_relays")}
    mix = [("ok", 6), ("defer", 3), ("bounce", 3)]
    expr = {
        "deliveries": "sum by (instance, status) (mailstack_mail_deliveries_total)",
        "accepted": "sum by (instance) (mailstack_mail_accepted_total)",
        "rejects": 'sum by (instance) (mailstack_mail_smtp_rejects_total{stage="RCPT", class="5xx"})',
    }

    def snapshot():
        return {name: prometheus_counts(e) for name, e in expr.items()}

    def settled():
        # the mail logs counted and scraped: the same figures twice, a scrape apart
        previous = snapshot()
        while True:
            time.sleep(12)
            current = snapshot()
            if current == previous:
                return current
            previous = current

    before = settled()
    expected: dict[str, dict[str, int]] = {r: {"delivered": 0, "deferred": 0, "bounced": 0, "accepted": 0,
                                              "rejects": 0} for r in inv.hosts("mail_relays")}
    for kind, count in mix:
        for i in range(count):
            with smtplib.SMTP(timeout=30) as smtp:
                _, banner = smtp.connect(vip, 25)
                relay = relay_of[banner.decode().split()[0]]  # "relay1.lab.test ESMTP"
                smtp.sendmail("app@app.lab.test", [f"{kind}-{i}@example.net"],
                              f"Subject: mix {kind} {i}\r\n\r\nknown mix\r\n")
            e = expected[relay]
            e["accepted"] += 1
            e[{"ok": "delivered", "defer": "deferred", "bounce": "bounced"}[kind]] += 1
            if kind == "bounce":
                e["accepted"] += 1  # the relay's notice to the sender ...
                e["delivered"] += 1  # ... which the sink accepts
    for i in range(4):
        proc = lab_exec("lab-sink", f"smtpprobe --host {vip} --from a@outside.test --to victim-{i}@example.org "
                                    f"--id outside-{i}")
        report = json.loads(proc.stdout)
        assert report["messages"][0]["rcpt"][0][0] >= 500, report
        expected[relay_of[report["banner"][1].split()[0]]]["rejects"] += 1
    time.sleep(5)
    after = settled()
    try:
        def delta(name: str, instance: str, status: str | None = None) -> float:
            def key(d):
                return tuple(sorted({"instance": instance, **({"status": status} if status else {})}.items()))
            return after[name].get(key(after), 0) - before[name].get(key(before), 0)

        got = {r: {"delivered": delta("deliveries", r, "delivered"), "deferred": delta("deliveries", r, "deferred"),
                   "bounced": delta("deliveries", r, "bounced"), "accepted": delta("accepted", r),
                   "rejects": delta("rejects", r)} for r in expected}
        assert got == expected
        assert sum(g["delivered"] for g in got.values()) == 6 + 3
        assert sum(g["deferred"] for g in got.values()) == 3
        assert sum(g["bounced"] for g in got.values()) == 3
        assert sum(g["rejects"] for g in got.values()) == 4
        print(f"\nMEASURED known mix per relay: {expected}")
    finally:
        # the deferred messages would be retried for days: remove them
        for relay in inv.hosts("postfix_relays"):
            lab_exec(inv.value(relay, "mailstack_lab_container"), "postsuper -d ALL deferred")
        for relay in inv.hosts("exim_relays"):
            lab_exec(inv.value(relay, "mailstack_lab_container"), "exiqgrep -i | xargs -r exim -Mrm")


@pytest.mark.timed
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
        lab_exec("lab-sink", "systemctl start mailsink")
        time.sleep(1)
        for relay in inv.hosts("postfix_relays"):
            lab_exec(inv.value(relay, "mailstack_lab_container"), "postqueue -f")
        for relay in inv.hosts("exim_relays"):
            lab_exec(inv.value(relay, "mailstack_lab_container"), "exim -qff")
    state = prometheus_state(timeout=120)
    assert state["healthy"], state["problems"]
    assert all(r["queue"] == 0 for r in state["relays"]), state["relays"]
    print(f"\nMEASURED sink stopped: MailQueueLarge firing after {fired_after:.0f}s; resolved "
          f"{time.monotonic() - started:.0f}s after the stop")
