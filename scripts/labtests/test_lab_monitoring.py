"""Monitoring (roles exporters and monitoring) proven on the lab, what it sees: every exporter,
Prometheus and Alertmanager answer the monitoring host and no outsider; Prometheus scrapes every
target; the mail tier's counts are exact per relay, summed and per domain class; its cost printed."""

from __future__ import annotations

import json
import time

import yaml
from conftest import ROOT, inventory, mailstack
from labprom import FETCH, listeners, metrics, prometheus_counts, prometheus_state, sink_messages

def test_no_outsider_reaches_an_exporter_prometheus_or_alertmanager_and_the_monitoring_host_does(
        second_up, lab_exec):
    # The sink is on the lab network, in no allowed network: the firewalls refuse it, while mon1
    # (group monitoring) reads every page, and finds none of the lab's secrets on any.
    urls = listeners()
    ports = {u.split("/")[2].split(":")[1] for u in urls}
    assert {"9100", "3903", "8404", "9121", "15692", "9090", "9093", "9115"} <= ports, ports
    assert not [u for u in urls if "//127." in u or "//localhost" in u], "a listener only on loopback is not proven"
    vault = yaml.safe_load((ROOT / "inventories" / "lab" / "group_vars" / "all" / "vault.yml").read_text())
    secrets = {name: str(value) for name, value in vault.items() if len(str(value)) >= 8}
    assert "vault_redis_exporter_password" in secrets
    for url, what in urls.items():
        page = lab_exec("lab-mon1", FETCH + f"'{url}'")
        assert page.returncode == 0 and page.stdout.strip(), (what, url, page.stdout[:200])
        assert not [name for name, value in secrets.items() if value in page.stdout], (what, url)
        outsider = lab_exec("lab-sink", FETCH + f"'{url}'")
        assert outsider.returncode == 7 and "REFUSED" in outsider.stdout, (what, url, outsider.stdout[:200])
    print(f"\nMEASURED {len(urls)} listeners on ports {sorted(ports, key=int)}: mon1 read each, the sink none")


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


def test_prometheus_scrapes_every_exporter_and_probe_and_status_is_well(second_up):
    state = prometheus_state(timeout=90)
    assert state["well"], state["remaining"]
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
    # the site's own rule group (monitoring_rule_groups in the lab's inventory) is loaded and evaluated
    from mailstack.status import Prometheus, prometheus_url

    prom = Prometheus(prometheus_url(inv))
    groups = {g["name"]: g for g in prom.get("/api/v1/rules")["groups"]}
    assert groups["lab-site"]["rules"][0]["health"] == "ok", groups["lab-site"]
    assert {"mailstack-relays", "mailstack-balancers", "mailstack-hosts"} <= set(groups)


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
        "classes": "sum by (domain_class, status) (mailstack_mail_deliveries_total)",
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
    at_sink = len(sink_messages(lab_exec))
    expected: dict[str, dict[str, int]] = {r: {"delivered": 0, "deferred": 0, "bounced": 0, "accepted": 0,
                                              "rejects": 0} for r in inv.hosts("mail_relays")}
    mta_of = {r: "postfix" if r in inv.hosts("postfix_relays") else "exim" for r in inv.hosts("mail_relays")}
    for kind, count in mix:
        # at least count messages, and on until a Postfix and an Exim relay have each taken one
        took: set[str] = set()
        i = 0
        while i < count or took != set(mta_of.values()):
            assert i < 40, f"the VIP sent no {kind} message to an MTA of {set(mta_of.values()) - took}"
            with smtplib.SMTP(timeout=30) as smtp:
                _, banner = smtp.connect(vip, 25)
                relay = relay_of[banner.decode().split()[0]]  # "relay1.lab.test ESMTP"
                smtp.sendmail("app@app.lab.test", [f"{kind}-{i}@example.net"],
                              f"Subject: mix {kind} {i}\r\n\r\nknown mix\r\n")
            took.add(mta_of[relay])
            i += 1
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
    # Mail this test did not send but the relays took meanwhile (the alerts the tier mails about
    # itself through the VIP): found at the sink, by the relay that delivered it.
    others = [m for m in sink_messages(lab_exec)[at_sink:]
              if not (m["subject"] or "").startswith("mix ") and m["rcpt_tos"] != ["app@app.lab.test"]]
    for m in others:
        assert m["helo"] in relay_of, m
        expected[relay_of[m["helo"]]]["accepted"] += 1
        expected[relay_of[m["helo"]]]["delivered"] += 1
    try:
        def delta(name: str, instance: str, status: str | None = None) -> float:
            def key(d):
                return tuple(sorted({"instance": instance, **({"status": status} if status else {})}.items()))
            return after[name].get(key(after), 0) - before[name].get(key(before), 0)

        got = {r: {"delivered": delta("deliveries", r, "delivered"), "deferred": delta("deliveries", r, "deferred"),
                   "bounced": delta("deliveries", r, "bounced"), "accepted": delta("accepted", r),
                   "rejects": delta("rejects", r)} for r in expected}
        assert got == expected
        # per domain class (exporters_mail_domain_classes in the lab: example.net is class "example"):
        # the mix and the alerts went to example.net, the bounce notices to app.lab.test ("other")
        def class_delta(c: str, s: str) -> float:
            key = (("domain_class", c), ("status", s))
            return after["classes"].get(key, 0) - before["classes"].get(key, 0)

        classes = {(c, s): class_delta(c, s) for c in ("example", "other") for s in ("delivered", "deferred", "bounced")}
        bounced = sum(e["bounced"] for e in expected.values())
        assert classes == {
            ("example", "delivered"): sum(e["delivered"] for e in expected.values()) - bounced,
            ("example", "deferred"): sum(e["deferred"] for e in expected.values()),
            ("example", "bounced"): bounced,
            ("other", "delivered"): bounced, ("other", "deferred"): 0, ("other", "bounced"): 0}, classes
        for status in ("delivered", "deferred", "bounced", "rejects", "accepted"):
            assert sum(g[status] for g in got.values()) == sum(e[status] for e in expected.values()) > 0, status
        print(f"\nMEASURED known mix per relay: {expected} (with {len(others)} alert mails: "
              f"{[m['subject'] for m in others]})")
    finally:
        # the deferred messages would be retried for days: remove them
        for relay in inv.hosts("postfix_relays"):
            lab_exec(inv.value(relay, "mailstack_lab_container"), "postsuper -d ALL deferred")
        for relay in inv.hosts("exim_relays"):
            lab_exec(inv.value(relay, "mailstack_lab_container"), "exiqgrep -i -r '^defer-' | xargs -r exim -Mrm")


def test_prometheus_cost_in_the_lab_and_for_ten_relays_is_printed(second_up):
    """Printed, not asserted: the lab's series and Prometheus's memory, and from the lab's series per
    relay an estimate for a production inventory of 10 relays (2 balancers, 3 Redis, 3 RabbitMQ)."""
    inv = inventory()

    def one(expr: str) -> float:
        found = prometheus_counts(expr)
        return sum(found.values())

    series = one("prometheus_tsdb_head_series")
    memory = one('process_resident_memory_bytes{job="prometheus"}')
    per_instance = {dict(k).get("instance"): v for k, v in prometheus_counts(
        'count by (instance) ({__name__=~".+", job!~"prometheus|alertmanager"})').items()}
    sizes = {"mail_relays": 10, "balancers": 2, "redis_nodes": 3, "rabbitmq_nodes": 3}
    per_host = {group: sum(per_instance.get(h, 0) for h in inv.hosts(group)) / len(inv.hosts(group))
                for group in sizes}
    # what does not grow with the tiers (mon1's own, the VIPs' probes) stays as in the lab
    estimate = series + sum(per_host[g] * (n - len(inv.hosts(g))) for g, n in sizes.items())
    scrape = inv.value("mon1", "monitoring_scrape_interval")
    samples_per_day = estimate * 86400 / 15  # at the role's default scrape interval, 15 s
    assert series > 0 and memory > 0
    print(f"\nMEASURED Prometheus in the lab: {series:.0f} head series, {memory / 2**20:.0f} MiB resident "
          f"({memory / series / 1024:.1f} KiB per series; scrape every {scrape}); series per host: "
          + ", ".join(f"{g} {v:.0f}" for g, v in per_host.items()))
    print(f"ESTIMATE 10 relays, 2 balancers, 3 Redis, 3 RabbitMQ: about {estimate:.0f} series, "
          f"{estimate * memory / series / 2**20:.0f} MiB at the lab's bytes per series, "
          f"{samples_per_day * 1.5 / 2**20:.0f} MiB of disk a day at 15 s and ~1.5 bytes a sample")
