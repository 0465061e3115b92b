"""The lab: the whole mail tier in podman containers on this machine, built from inventories/lab.

The inventory is the lab's only description: each host is a systemd container named by its
mailstack_lab_container, at its mailstack_service_address on one podman network (mailstack_lab_network,
mailstack_lab_subnet), which Ansible reaches over SSH with the bench's key. `up` creates what is missing, keeps what runs, and converges it all with
playbooks/site.yml; `down` removes it; `status` asks every service how it is.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import ipaddress
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import click

from mailstack import haproxy, testbench
from mailstack.inventory import Inventory, Undefined
from mailstack.testbench import CACHE, ROOT, podman_env

LAB_INVENTORY = ROOT / "inventories" / "lab"
PREPARE = ROOT / "molecule" / "resources" / "playbooks" / "prepare.yml"
SITE = ROOT / "playbooks" / "site.yml"
LABEL = "mailstack.lab"


class LabError(click.ClickException):
    """A lab step failed; the message says which and where its log is."""


@dataclasses.dataclass
class LabHost:
    name: str
    container: str
    address: str
    groups: list[str]
    image_kind: str  # base or tools


@dataclasses.dataclass
class Lab:
    inventory: Inventory
    network: str
    subnet: str
    domain: str
    hosts: list[LabHost]

    @classmethod
    def load(cls, source: Path = LAB_INVENTORY) -> "Lab":
        inv = Inventory(source)
        first = inv.hosts()[0]
        network = inv.value(first, "mailstack_lab_network")
        subnet = inv.value(first, "mailstack_lab_subnet")
        domain = inv.value(first, "mailstack_lab_domain", "lab.test")
        tools_groups = set(inv.value(first, "mailstack_lab_tools_groups", []))
        hosts = []
        for name in inv.hosts():
            groups = inv.groups_of(name)
            address = inv.value(name, "mailstack_service_address")
            if ipaddress.ip_address(address) not in ipaddress.ip_network(subnet):
                raise LabError(f"lab host {name}: mailstack_service_address {address} is not in "
                               f"mailstack_lab_subnet {subnet}")
            hosts.append(LabHost(name, inv.value(name, "mailstack_lab_container", name), address, groups,
                                 "tools" if tools_groups & set(groups) else "base"))
        return cls(inv, network, subnet, domain, hosts)

    def host(self, name: str) -> LabHost:
        return next(h for h in self.hosts if h.name == name)

    def in_group(self, group: str) -> list[LabHost]:
        names = self.inventory.hosts(group)
        return [h for h in self.hosts if h.name in names]


# ---------------------------------------------------------------- podman helpers

def podman(*args: str, check: bool = True, timeout: float | None = 120) -> subprocess.CompletedProcess:
    proc = subprocess.run(["podman", *args], capture_output=True, text=True, env=podman_env(),
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise LabError(f"podman {' '.join(args[:3])} ... failed: {(proc.stderr or proc.stdout).strip()[-800:]}")
    return proc


def pexec(container: str, command: str, env: dict[str, str] | None = None,
          timeout: float = 60) -> subprocess.CompletedProcess:
    """Run a shell command in a lab container; never raises on its exit code."""
    args = ["exec"]
    for key, value in (env or {}).items():
        args += ["--env", f"{key}={value}"]
    try:
        return podman(*args, container, "sh", "-c", command, check=False, timeout=timeout)
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(args, 124, "", f"timed out after {timeout}s")


def container_info(name: str) -> dict | None:
    proc = podman("container", "inspect", name, check=False)
    if proc.returncode != 0:
        return None
    return json.loads(proc.stdout)[0]


def network_subnet(name: str) -> str | None:
    proc = podman("network", "inspect", name, check=False)
    if proc.returncode != 0:
        return None
    data = json.loads(proc.stdout)[0]
    subnets = data.get("subnets") or []
    return subnets[0].get("subnet") if subnets else ""


def image_tag(kind: str, distro: str) -> str:
    return f"localhost/mailstack-{kind}:{distro}"


def step(number: int, total: int, text: str) -> float:
    click.echo(f"lab [{number}/{total}] {text}", err=True)
    return time.monotonic()


def done(started: float, text: str = "done") -> None:
    click.echo(f"      {text} in {time.monotonic() - started:.0f}s", err=True)


# ---------------------------------------------------------------- up

def lab_distro(lab: Lab) -> str | None:
    """The Debian release the existing lab runs, from its containers' labels, or None."""
    for h in lab.hosts:
        info = container_info(h.container)
        if info:
            return (info.get("Config", {}).get("Labels") or {}).get(f"{LABEL}.distro")
    return None


def create_containers(lab: Lab, distro: str) -> list[str]:
    """Create the network and the containers that are missing, start stopped ones.

    Returns the names of the containers created or started (they need to boot)."""
    subnet = network_subnet(lab.network)
    if subnet is None:
        podman("network", "create", "--subnet", lab.subnet, lab.network)
    elif subnet != lab.subnet:
        raise LabError(f"podman network {lab.network} exists with subnet {subnet}, not {lab.subnet}: "
                       "run `mailstack lab down` first")
    touched = []
    for h in lab.hosts:
        info = container_info(h.container)
        if info is None:
            podman("run", "--detach", "--name", h.container,
                   "--hostname", f"{h.name}.{lab.domain}",
                   "--network", lab.network, "--ip", h.address,
                   "--privileged", "--systemd", "always",
                   "--volume", f"{testbench.SSH_DIR / 'authorized_keys'}:/root/.ssh/authorized_keys:ro",
                   "--label", f"{LABEL}=1", "--label", f"{LABEL}.distro={distro}",
                   "--label", f"{LABEL}.host={h.name}",
                   image_tag(h.image_kind, distro), "/sbin/init")
            touched.append(h.container)
        elif not any(m.get("Destination") == "/root/.ssh/authorized_keys" for m in info.get("Mounts") or []):
            raise LabError(f"container {h.container} was made before the lab was reached over SSH: "
                           "run `mailstack lab up --recreate`")
        elif not info["State"]["Running"]:
            podman("start", h.container)
            touched.append(h.container)
    return touched


def wait_booted(containers: list[str], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    for name in containers:
        while True:
            proc = pexec(name, "systemctl is-system-running --wait", timeout=timeout)
            state = proc.stdout.strip()
            if state in ("running", "degraded"):
                break
            if time.monotonic() > deadline:
                raise LabError(f"container {name} did not finish booting (systemd says {state!r})")
            time.sleep(1)


def ansible_env() -> dict[str, str]:
    env = podman_env()
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    env["ANSIBLE_CONFIG"] = str(ROOT / "ansible.cfg")
    env["ANSIBLE_FORCE_COLOR"] = "0"
    env["ANSIBLE_NOCOLOR"] = "1"
    env.setdefault("ANSIBLE_CALLBACK_RESULT_FORMAT", "yaml")
    return env


@dataclasses.dataclass
class PlaybookRun:
    ok: bool
    changed: dict[str, int]
    failed_hosts: list[str]
    log: Path
    seconds: float


RECAP = re.compile(r"^(\S+)\s+:\s+ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)")


def run_playbook(playbook: Path, log_name: str, inventory: Path = LAB_INVENTORY,
                 extra: list[str] | None = None, show_tasks: bool = True) -> PlaybookRun:
    """Run ansible-playbook, log everything, and show progress: plays, the task in hand, failures."""
    logs = CACHE / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / log_name
    cmd = [str(Path(sys.executable).parent / "ansible-playbook"), "-i", str(inventory), str(playbook),
           *(extra or [])]
    started = time.monotonic()
    changed: dict[str, int] = {}
    failed: list[str] = []
    tty = sys.stderr.isatty()
    in_recap = False
    with log.open("w") as fh:
        fh.write(f"$ {' '.join(cmd)}\n")
        proc = subprocess.Popen(cmd, cwd=ROOT, env=ansible_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, stdin=subprocess.DEVNULL)
        assert proc.stdout is not None
        for line in proc.stdout:
            fh.write(line)
            fh.flush()
            text = line.rstrip()
            elapsed = f"{time.monotonic() - started:5.0f}s"
            if text.startswith("PLAY RECAP"):
                in_recap = True
            elif in_recap:
                m = RECAP.match(text)
                if m:
                    changed[m.group(1)] = int(m.group(3))
                    if int(m.group(4)) or int(m.group(5)):
                        failed.append(m.group(1))
            if not show_tasks:
                continue
            if text.startswith("PLAY [") and not in_recap:
                if tty:
                    click.echo("\r\033[K", nl=False, err=True)
                click.echo(f"      {elapsed} {text.rstrip('* ')}", err=True)
            elif text.startswith("TASK [") and tty:
                click.echo(f"\r\033[K      {elapsed}   {text.rstrip('* ')[:110]}", nl=False, err=True)
            elif text.startswith(("fatal:", "failed:")) or "FAILED!" in text:
                if tty:
                    click.echo("\r\033[K", nl=False, err=True)
                click.echo(f"      {elapsed}   {text[:300]}", err=True)
        proc.wait()
    if tty and show_tasks:
        click.echo("\r\033[K", nl=False, err=True)
    return PlaybookRun(proc.returncode == 0, changed, failed, log, time.monotonic() - started)


def fail_with_log(what: str, run: PlaybookRun) -> None:
    lines = run.log.read_text(errors="replace").splitlines()
    tail = "\n".join("  | " + line for line in lines[-40:])
    raise LabError(f"{what} failed (hosts: {', '.join(run.failed_hosts) or '?'}); last lines of "
                   f"{run.log}:\n{tail}")


def up(distro: str, recreate: bool = False) -> dict:
    lab = Lab.load()
    total = 5
    t = step(1, total, f"images for {distro} (built once, then reused)")
    for tag, action in testbench.ensure_images(distro):
        click.echo(f"      {tag}: {action}", err=True)
    done(t)

    running = lab_distro(lab)
    if running and (recreate or running != distro):
        if not recreate:
            raise LabError(f"the lab runs {running}, not {distro}: run `mailstack lab down` first, "
                           f"or `mailstack lab up --distro {distro} --recreate`")
        down(lab)
    t = step(2, total, f"containers on podman network {lab.network} ({lab.subnet})")
    touched = create_containers(lab, distro)
    wait_booted(touched)
    done(t, f"{len(touched)} created or started, {len(lab.hosts) - len(touched)} kept")

    t = step(3, total, "the lab's own peers: the sink standing in for the internet, the SMTP/AMQP probes")
    if touched:
        names = [h.name for h in lab.hosts if h.container in touched]
        run = run_playbook(PREPARE, "lab-prepare.log", show_tasks=False, extra=["--limit", ",".join(names)])
        if not run.ok:
            fail_with_log("preparing the lab", run)
        done(t)
    else:
        done(t, "already there")

    t = step(4, total, "ansible-playbook -i inventories/lab playbooks/site.yml "
                       f"(log: {CACHE / 'logs' / 'lab-site.log'})")
    run = run_playbook(SITE, "lab-site.log")
    if not run.ok:
        fail_with_log("playbooks/site.yml", run)
    changed = sum(run.changed.values())
    done(t, f"converged, {changed} change(s)")

    t = step(5, total, "asking every service how it is")
    state = status(lab)
    state["converge"] = {"changed": run.changed, "seconds": round(run.seconds, 1), "distro": distro,
                         "created": touched}
    done(t)
    return state


# ---------------------------------------------------------------- down

def down(lab: Lab | None = None) -> list[str]:
    lab = lab or Lab.load()
    names = [h.container for h in lab.hosts]
    # Also what an older lab left behind under the same label.
    proc = podman("ps", "--all", "--filter", f"label={LABEL}=1", "--format", "{{.Names}}", check=False)
    names += [n for n in proc.stdout.split() if n not in names]
    present = [n for n in names if container_info(n) is not None]
    if present:
        podman("rm", "--force", "--time", "0", *present, timeout=300)
    if network_subnet(lab.network) is not None:
        podman("network", "rm", "--force", lab.network)
    return present


# ---------------------------------------------------------------- status

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
    lines += ["Status: .venv/bin/mailstack lab status [--json]",
              "Converge after a change: make lab (keeps the containers)",
              "Tear down: .venv/bin/mailstack lab down"]
    return lines
