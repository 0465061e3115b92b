"""What the monitoring tests of the lab proof share: reading an exporter's page from inside a lab
container, every listener Prometheus scrapes, `mailstack status` until it is well, instant
queries, the sink's messages."""

from __future__ import annotations

import json
import time

from conftest import inventory, mailstack

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


def listeners() -> dict[str, str]:
    """Every HTTP listener of the monitoring path, {url: what}: each URL Prometheus scrapes (its own
    target list: exporters, HAProxy's and RabbitMQ's built-in pages, the blackbox probes) and
    Prometheus's and Alertmanager's own pages."""
    from mailstack.status import Prometheus, prometheus_url

    prom_url = prometheus_url(inventory())
    # Prometheus reads its own, Alertmanager's and the probes' pages on loopback: ask for them
    # at the monitoring host's address, where others could
    mon = prom_url.split("//")[1].split(":")[0]
    urls = {t["scrapeUrl"].replace("//127.0.0.1:", f"//{mon}:"): f'{t["labels"]["job"]} {t["labels"]["instance"]}'
            for t in Prometheus(prom_url).get("/api/v1/targets", state="active")["activeTargets"]}
    alertmanagers = Prometheus(prom_url).get("/api/v1/alertmanagers")["activeAlertmanagers"]
    urls[f"{prom_url}/-/healthy"] = "prometheus"
    urls.update({a["url"].replace("//127.0.0.1:", f"//{mon}:").replace("/api/v2/alerts", "/-/healthy"): "alertmanager"
                 for a in alertmanagers})
    return urls


# The alerts that judge the mail itself over a window (30 minutes by default; dead jobs 10 minutes):
# the tests defer, bounce and refuse mail on purpose (the sink answers 4xx and 5xx, outsiders are
# refused, the sink is stopped, malformed and refused jobs go to the dead queue), so these may fire
# and stay firing after them. Every other problem must clear.
TRAFFIC_ALERTS = ("MailDeferredRatioHigh", "MailBounceRatioHigh", "MailSmtpRejectsSpiking", "MailJobsDead")


def prometheus_state(timeout: float = 0) -> dict:
    """`mailstack status --json`, once or until nothing is wrong within timeout seconds but the
    TRAFFIC_ALERTS; "well" says whether that was reached, "remaining" what else is wrong."""
    deadline = time.monotonic() + timeout
    while True:
        proc = mailstack("status", "-i", "inventories/lab", "--json")
        state = json.loads(proc.stdout)
        state["remaining"] = [p for p in state["problems"]
                              if not p.startswith(tuple(f"alert {name} " for name in TRAFFIC_ALERTS))]
        state["well"] = not state["remaining"]
        if state["well"] or time.monotonic() >= deadline:
            return state
        time.sleep(2)


def sink_messages(lab_exec) -> list[dict]:
    return json.loads(lab_exec("lab-sink", "mailsink dump").stdout or "[]")


def prometheus_counts(expr: str) -> dict[tuple, float]:
    """An instant query through `mailstack status`'s client: {(label values...): value}."""
    from mailstack.status import Prometheus, prometheus_url

    prom = Prometheus(prometheus_url(inventory()))
    return {tuple(sorted(m.items())): v for m, v in prom.query(expr)}
