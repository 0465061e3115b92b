"""The state of every tier as Prometheus sees it (`mailstack status -i INV`), for any inventory
with a monitoring host: which targets answer, which alerts fire, each relay's queue and recent
deliveries, each VIP's holder. It reads Prometheus's HTTP API only; the judgement is the alert
rules' (roles/monitoring), plus "a target that does not answer" and "a VIP not held by one"."""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request

from mailstack.inventory import Inventory


class StatusError(Exception):
    """Prometheus cannot be asked."""


def prometheus_url(inv: Inventory) -> str:
    hosts = inv.hosts("monitoring")
    if not hosts:
        raise StatusError("the inventory has no monitoring host (group monitoring)")
    host = hosts[0]
    address = inv.address(host)
    if not address:
        raise StatusError(f"{host} has no mailstack_service_address: give --prometheus URL")
    return f"http://{address}:{inv.setting(host, 'monitoring', 'monitoring_prometheus_port')}"


class Prometheus:
    def __init__(self, url: str, timeout: float = 10):
        self.url, self.timeout = url.rstrip("/"), timeout

    def get(self, path: str, **params) -> object:
        url = f"{self.url}{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
        try:
            with urllib.request.urlopen(url, timeout=self.timeout) as reply:
                body = json.load(reply)
        except (OSError, ValueError) as exc:
            raise StatusError(f"Prometheus at {self.url} did not answer: {exc}") from None
        if body.get("status") != "success":
            raise StatusError(f"Prometheus refused {path}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str) -> list[tuple[dict, float]]:
        return [(r["metric"], float(r["value"][1])) for r in self.get("/api/v1/query", query=expr)["result"]]


def status(prom: Prometheus) -> dict:
    targets = [{"job": t["labels"].get("job"), "instance": t["labels"].get("instance"), "health": t["health"],
                "error": t.get("lastError") or ""}
               for t in prom.get("/api/v1/targets", state="active")["activeTargets"]]
    alerts = [{"name": a["labels"].get("alertname"), "instance": a["labels"].get("instance", a["labels"].get("vip", "")),
               "severity": a["labels"].get("severity", ""), "state": a["state"],
               "summary": a.get("annotations", {}).get("summary", "")}
              for a in prom.get("/api/v1/alerts")["alerts"]]

    def by_instance(expr: str) -> dict[str, float]:
        return {m.get("instance", ""): v for m, v in prom.query(expr)}

    queue = by_instance("sum by (instance) (mailstack_mail_queue_messages)")
    oldest = by_instance("max by (instance) (mailstack_mail_queue_oldest_seconds)")
    deliveries: dict[str, dict[str, float]] = {}
    for m, v in prom.query("sum by (instance, status) (increase(mailstack_mail_deliveries_total[1h]))"):
        deliveries.setdefault(m.get("instance", ""), {})[m.get("status", "")] = round(v)
    relays = [{"name": name, "queue": int(queue.get(name, 0)), "oldest_seconds": int(oldest.get(name, 0)),
               "last_hour": deliveries.get(name, {})}
              for name in sorted(set(queue) | set(deliveries))]
    holders: dict[str, list[str]] = {}
    for m, v in prom.query("mailstack_vip_held"):
        holders.setdefault(m.get("vip", ""), [])
        if v == 1:
            holders[m.get("vip", "")].append(m.get("instance", ""))
    vips = [{"vip": vip, "holders": sorted(h)} for vip, h in sorted(holders.items())]

    problems = [f"{t['job']} {t['instance']}: does not answer ({t['error']})" for t in targets if t["health"] != "up"]
    problems += [f"VIP {v['vip']}: held by {len(v['holders'])} balancers ({', '.join(v['holders'])})"
                 for v in vips if len(v["holders"]) != 1]
    problems += [f"alert {a['name']} {a['instance']}: {a['summary']}" for a in alerts if a["state"] == "firing"]
    return {"prometheus": prom.url, "healthy": not problems, "problems": problems, "targets": targets,
            "alerts": alerts, "relays": relays, "vips": vips}


def render(state: dict) -> str:
    lines = [f"Prometheus {state['prometheus']}"]
    up = sum(t["health"] == "up" for t in state["targets"])
    lines.append(f"targets: {up} of {len(state['targets'])} answer")
    for r in state["relays"]:
        last = ", ".join(f"{k} {v}" for k, v in sorted(r["last_hour"].items())) or "none"
        lines.append(f"relay {r['name']}: queue {r['queue']} (oldest {r['oldest_seconds']}s); last hour: {last}")
    for v in state["vips"]:
        lines.append(f"VIP {v['vip']}: {', '.join(v['holders']) or 'no balancer'}")
    pending = [a for a in state["alerts"] if a["state"] != "firing"]
    if pending:
        lines.append("pending: " + ", ".join(f"{a['name']} {a['instance']}" for a in pending))
    lines += [f"PROBLEM: {p}" for p in state["problems"]] or ["all well"]
    return "\n".join(lines)
