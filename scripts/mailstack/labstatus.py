"""`mailstack lab status`: every service of the lab asked how it is (containers, VIPs and who
holds them, HAProxy's view of the relays, queues, Redis, RabbitMQ), as data and as text."""

from __future__ import annotations

import concurrent.futures
import ipaddress
import json
import re

from mailstack import haproxy
from mailstack.inventory import Undefined
from mailstack.lab import LABEL, Lab, LabHost
from mailstack.podman import container_info, pexec


def _addresses(container: str) -> list[str]:
    proc = pexec(container, "ip -o addr show")
    return re.findall(r"inet6? ([0-9a-fA-F.:]+)/", proc.stdout)


def haproxy_servers(container: str, socket: str) -> list[dict]:
    """The relays as a balancer's HAProxy sees them; [] when it cannot tell (haproxy down)."""
    proc = pexec(container, haproxy.command(socket))
    try:
        found = haproxy.servers(proc.stdout, container)
    except haproxy.HAProxyStateError:
        return []
    return [{"backend": s["backend"], "server": s["server"], "state": s["status"], "weight": s["configured_weight"],
             "effective_weight": s["weight"], "sessions": s["sessions"], "check": s["check"]} for s in found]


def relay_queue(container: str, mta: str) -> int | None:
    command = "postqueue -j | wc -l" if mta == "postfix" else "exim -bpc"
    proc = pexec(container, command)
    try:
        return int(proc.stdout.strip())
    except ValueError:
        return None


def redis_health(lab: Lab, h: LabHost) -> dict:
    inv = lab.inventory
    user = inv.setting(h.name, "redis", "redis_admin_user")
    password = inv.setting(h.name, "redis", "redis_admin_password")
    proc = pexec(h.container, "redis-cli --no-auth-warning --user \"$U\" -h 127.0.0.1 ping && "
                 "redis-cli --no-auth-warning --user \"$U\" -h 127.0.0.1 info replication | grep ^role:",
                 env={"U": user, "REDISCLI_AUTH": password})
    lines = proc.stdout.split()
    role = next((line.split(":", 1)[1] for line in lines if line.startswith("role:")), None)
    return {"healthy": bool(lines) and lines[0] == "PONG", "role": role,
            "detail": (proc.stdout + proc.stderr).strip()[-200:] if proc.returncode else ""}


def rabbitmq_health(lab: Lab, h: LabHost) -> dict:
    vhost = lab.inventory.setting(h.name, "rabbitmq", "rabbitmq_mail_vhost")
    proc = pexec(h.container, f"rabbitmqctl -q list_queues -p '{vhost}' name messages --formatter json",
                 timeout=90)
    try:
        queues = {q["name"]: q["messages"] for q in json.loads(proc.stdout)}
    except (ValueError, TypeError, KeyError):
        return {"healthy": False, "queues": {}, "detail": (proc.stderr or proc.stdout).strip()[-200:]}
    return {"healthy": True, "queues": queues, "detail": ""}


def status(lab: Lab | None = None) -> dict:
    """Everything `mailstack lab status` shows, as data."""
    lab = lab or Lab.load()
    inv = lab.inventory
    infos = {h.name: container_info(h.container) for h in lab.hosts}
    hosts = []
    for h in lab.hosts:
        info = infos[h.name]
        hosts.append({"name": h.name, "container": h.container, "address": h.address, "groups": h.groups,
                      "running": bool(info and info["State"]["Running"]),
                      "distro": ((info or {}).get("Config", {}).get("Labels") or {}).get(f"{LABEL}.distro")})
    running = {x["name"] for x in hosts if x["running"]}
    balancers = [h for h in lab.in_group("balancers") if h.name in running]
    relays = [h for h in lab.in_group("mail_relays") if h.name in running]

    def job(fn, *args):
        return pool.submit(fn, *args)

    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        addr_jobs = {h.name: job(_addresses, h.container) for h in balancers}
        socket = {h.name: inv.setting(h.name, "haproxy", "haproxy_runtime_socket") for h in balancers}
        stat_jobs = {h.name: job(haproxy_servers, h.container, socket[h.name]) for h in balancers}
        queue_jobs = {h.name: job(relay_queue, h.container,
                                  "exim" if "exim_relays" in h.groups else "postfix") for h in relays}
        redis_jobs = {h.name: job(redis_health, lab, h) for h in lab.in_group("redis_nodes") if h.name in running}
        rabbit_jobs = {h.name: job(rabbitmq_health, lab, h) for h in lab.in_group("rabbitmq_nodes")
                       if h.name in running}
        held = {name: f.result() for name, f in addr_jobs.items()}
        stats = {name: f.result() for name, f in stat_jobs.items()}
        queues = {name: f.result() for name, f in queue_jobs.items()}
        redis = {name: f.result() for name, f in redis_jobs.items()}
        rabbit = {name: f.result() for name, f in rabbit_jobs.items()}

    vips = []
    lb_names = [h.name for h in lab.in_group("balancers")]
    for ip, preferred, instance in inv.vips():
        holders = [name for name, addrs in held.items() if ip in addrs]
        vips.append({"vip": ip, "instance": instance, "preferred": preferred, "holders": holders,
                     "holder": holders[0] if len(holders) == 1 else None, "on_preferred": holders == [preferred]})
    weight_var = inv.setting(lb_names[0], "haproxy", "haproxy_weight_variable") if lb_names else "mail_relay_weight"
    relay_rows = []
    for h in lab.in_group("mail_relays"):
        try:
            configured = inv.value(h.name, weight_var, 1)
        except Undefined:
            configured = None
        seen = {lb: [s for s in servers if s["server"] == h.name] for lb, servers in stats.items()}
        relay_rows.append({"name": h.name, "address": h.address,
                           "mta": "exim" if "exim_relays" in h.groups else "postfix",
                           "weight": configured, "queue": queues.get(h.name),
                           "backends": {lb: [{k: s[k] for k in ("backend", "state", "weight", "sessions")}
                                             for s in rows] for lb, rows in seen.items()}})
    problems = []
    for x in hosts:
        if not x["running"]:
            problems.append(f"{x['name']}: container {x['container']} is not running")
    for v in vips:
        if len(v["holders"]) != 1:
            problems.append(f"VIP {v['vip']}: held by {len(v['holders'])} balancers ({', '.join(v['holders'])})")
    for lb in lb_names:
        if lb in running and not stats.get(lb):
            problems.append(f"{lb}: HAProxy does not answer on its runtime socket")
    for r in relay_rows:
        for lb, rows in r["backends"].items():
            for s in rows:
                if not s["state"].startswith("UP") and not (s["weight"] == 0 and s["state"].startswith(("UP", "DRAIN"))):
                    problems.append(f"{r['name']}: {s['state']} in {s['backend']} on {lb}")
    for name, st in list(redis.items()) + list(rabbit.items()):
        if not st["healthy"]:
            problems.append(f"{name}: not healthy ({st['detail'] or 'no answer'})")
    return {"healthy": not problems, "problems": problems, "network": lab.network, "subnet": lab.subnet,
            "hosts": hosts, "vips": vips, "relays": relay_rows,
            "redis": [{"name": n, **st} for n, st in redis.items()],
            "rabbitmq": [{"name": n, **st} for n, st in rabbit.items()]}


def format_status(state: dict) -> list[str]:
    out = [f"lab network {state['network']} ({state['subnet']}): "
           + ("healthy" if state["healthy"] else "NOT healthy")]
    out.append("")
    out.append(f"{'host':<11}{'address':<15}{'running':<9}groups")
    for h in state["hosts"]:
        out.append(f"{h['name']:<11}{h['address']:<15}{'yes' if h['running'] else 'NO':<9}{', '.join(h['groups'])}")
    out.append("")
    for v in state["vips"]:
        where = v["holder"] or ("nobody" if not v["holders"] else "several: " + ", ".join(v["holders"]))
        note = "" if v["on_preferred"] else f"  (preferred: {v['preferred']})"
        out.append(f"VIP {v['vip']:<15} on {where}{note}")
    out.append("")
    out.append(f"{'relay':<9}{'mta':<9}{'address':<15}{'weight':>6}{'queue':>7}  HAProxy (backend: state/weight per balancer)")
    for r in state["relays"]:
        seen = "; ".join(f"{lb}: " + ", ".join(f"{s['backend']} {s['state']}/{s['weight']}" for s in rows)
                         for lb, rows in r["backends"].items())
        queue = "?" if r["queue"] is None else str(r["queue"])
        out.append(f"{r['name']:<9}{r['mta']:<9}{r['address']:<15}{str(r['weight']):>6}{queue:>7}  {seen}")
    for x in state["redis"]:
        out.append(f"redis    {x['name']}: {'PONG' if x['healthy'] else 'NOT healthy'}"
                   + (f", role {x['role']}" if x.get("role") else ""))
    for x in state["rabbitmq"]:
        queues = ", ".join(f"{k} {v}" for k, v in sorted(x["queues"].items()))
        out.append(f"rabbitmq {x['name']}: {'running' if x['healthy'] else 'NOT healthy'}"
                   + (f", messages: {queues}" if queues else ""))
    for p in state["problems"]:
        out.append(f"PROBLEM: {p}")
    return out


def format_welcome(state: dict, lab: Lab) -> list[str]:
    inv = lab.inventory
    first_vip = state["vips"][0]["vip"] if state["vips"] else "?"
    gateway = next(ipaddress.ip_network(lab.subnet).hosts())
    sender = inv.value(inv.hosts()[0], "mailstack_smoke_sender", "smoke@lab.test")
    recipient = inv.value(inv.hosts()[0], "mailstack_smoke_recipient", "smoke@example.net")
    lb = lab.in_group("balancers")[0] if lab.in_group("balancers") else None
    stats = ""
    if lb:
        port = inv.setting(lb.name, "haproxy", "haproxy_stats_port")
        user = inv.setting(lb.name, "haproxy", "haproxy_stats_user")
        stats = f"http://{lb.address}:{port}/stats (user {user}, password: vault_haproxy_stats_password " \
                "in inventories/lab/group_vars/all/vault.yml)"
    sink = lab.in_group("sinks")[0] if lab.in_group("sinks") else None
    lines = ["", "The lab is up."] + format_status(state) + ["", "Send a test message through every VIP and find it at the sink:",
             "  .venv/bin/mailstack smoke -i inventories/lab",
             f"or by hand (this machine is {gateway} on the lab network, inside mailstack_relay_networks):",
             f"  swaks --server {first_vip} --from {sender} --to {recipient}"]
    if sink:
        lines.append(f"what arrived: podman exec {sink.container} mailsink dump")
    if stats:
        lines.append(f"HAProxy stats: {stats}")
    mon = lab.in_group("monitoring")[0] if lab.in_group("monitoring") else None
    if mon:
        prometheus = inv.setting(mon.name, "monitoring", "monitoring_prometheus_port")
        alertmanager = inv.setting(mon.name, "monitoring", "monitoring_alertmanager_port")
        lines += [f"Prometheus: http://{mon.address}:{prometheus}  Alertmanager: http://{mon.address}:{alertmanager}"
                  f"  (alerts are mailed to the sink)",
                  "The tiers as Prometheus sees them: .venv/bin/mailstack status -i inventories/lab [--json]"]
    lines += ["Status: .venv/bin/mailstack lab status [--json]",
              "Converge after a change: make lab (keeps the containers)",
              "Tear down: .venv/bin/mailstack lab down"]
    return lines
