"""`mailstack bench`: the tier's throughput with Postfix's own load generator, the same load sent
(a) straight to one relay and (b) through a VIP to all relays, interleaved over several rounds.

It prints figures; it is not a test and has no time limit.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import os
import statistics
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

from mailstack import haproxy
from mailstack.drill import Hosts, vips_of
from mailstack.inventory import Inventory
from mailstack.testbench import podman_env


class BenchError(Exception):
    pass


@dataclasses.dataclass
class Run:
    round: int
    target: str  # "direct" or "vip"
    address: str
    messages: int
    seconds: float
    sessions_per_relay: dict[str, int]
    cpu_seconds: dict[str, float] = dataclasses.field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.messages / self.seconds if self.seconds else 0.0

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "messages_per_second": round(self.rate, 1)}


def server_sessions(hosts: Hosts, balancers: list[str], socket: str) -> collections.Counter:
    """Sessions each relay has had, summed over the balancers' backends (HAProxy's stot)."""
    total: collections.Counter = collections.Counter()
    for lb in balancers:
        for server in haproxy.servers(hosts.run(lb, haproxy.command(socket)).stdout, lb):
            total[server["server"]] += server["total_sessions"]
    return total


# CPU time a host has used, in nanoseconds: its own cgroup when it is a container (cgroup v2 or v1),
# the whole machine's /proc/stat otherwise (USER_HZ ticks of 10 ms).
CPU_USAGE = ("if [ -r /sys/fs/cgroup/cpu.stat ]; then awk '/^usage_usec/ {printf \"%.0f\\n\", $2 * 1000}' "
             "/sys/fs/cgroup/cpu.stat; elif [ -r /sys/fs/cgroup/cpuacct/cpuacct.usage ]; then "
             "cat /sys/fs/cgroup/cpuacct/cpuacct.usage; else awk '/^cpu / {printf \"%.0f\\n\", "
             "($2 + $3 + $4 + $7 + $8) * 10000000}' /proc/stat; fi")


def cpu_usage(hosts: Hosts, names: list[str]) -> dict[str, int]:
    """Nanoseconds of CPU each host has used so far (read at once on all hosts)."""
    def one(host: str) -> int:
        out = hosts.run(host, CPU_USAGE).stdout.strip().splitlines()
        return int(out[-1].split()[-1]) if out and out[-1].split()[-1].isdigit() else 0
    with ThreadPoolExecutor(max_workers=8) as pool:
        return dict(zip(names, pool.map(one, names)))


def cpu_profile(runs: list[Run], roles: dict[str, str], target: str) -> dict:
    """Median CPU milliseconds per message for each kind of host, and how busy the machine's CPUs
    were (only meaningful when every host is a container on this machine, as in the lab)."""
    picked = [r for r in runs if r.target == target and r.cpu_seconds]
    if not picked:
        return {}
    per_role = {}
    for role in sorted(set(roles.values())):
        per_role[role] = round(statistics.median(
            1000.0 * sum(s for h, s in r.cpu_seconds.items() if roles[h] == role) / r.messages for r in picked), 3)
    busy = statistics.median(sum(r.cpu_seconds.values()) / (r.seconds * (os.cpu_count() or 1)) for r in picked)
    return {"cpu_ms_per_message": per_role,
            "cpu_ms_per_message_total": round(sum(per_role.values()), 3),
            "machine_busy_percent": round(100.0 * busy, 1)}


def queue_size(hosts: Hosts, inv: Inventory, relay: str) -> int:
    command = "exim -bpc" if "exim_relays" in inv.groups_of(relay) else "postqueue -j | wc -l"
    out = hosts.run(relay, command).stdout.strip()
    return int(out) if out.isdigit() else 0


def wait_queues_empty(hosts: Hosts, inv: Inventory, relays: list[str], timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while True:
        sizes = {r: queue_size(hosts, inv, r) for r in relays}
        if not any(sizes.values()):
            return
        if time.monotonic() > deadline:
            raise BenchError(f"relay queues did not empty in {timeout:.0f}s: {sizes}")
        for r in relays:
            if sizes[r]:
                hosts.run(r, "exim -qf" if "exim_relays" in inv.groups_of(r) else "postqueue -f")
        time.sleep(1)


class Pool:
    """Drain, on every balancer, the relays that are not in the pool while the bench runs; put them
    back (state ready) afterwards, whatever happens."""

    def __init__(self, hosts: Hosts, balancers: list[str], socket: str, out: list[str]):
        self.hosts, self.balancers, self.socket, self.out = hosts, balancers, socket, out

    def _set(self, state: str) -> None:
        for lb in self.balancers:
            for relay in self.out:
                proc = self.hosts.run(lb, haproxy.command(self.socket, relay, state))
                try:
                    haproxy.servers(proc.stdout, lb)
                except haproxy.HAProxyStateError as exc:
                    raise BenchError(f"could not set {relay} to {state}: {exc}") from None

    def __enter__(self):
        if self.out:
            self._set("drain")
        return self

    def __exit__(self, *exc):
        if self.out:
            self._set("ready")


class FastSink:
    """In the lab, swap the recording sink for Postfix's smtp-sink while the bench runs, so that the
    relays' onward delivery is not held back by a Python sink; the recording sink comes back after."""

    def __init__(self, hosts: Hosts, sink: str | None):
        self.hosts, self.sink = hosts, sink

    def __enter__(self):
        if self.sink:
            self.hosts.run(self.sink, "systemctl stop mailsink")
            container = self.hosts.container(self.sink)
            subprocess.run(["podman", "exec", "--detach", container, "smtp-sink", "-u", "nobody", ":25", "1000"],
                           check=True, capture_output=True, env=podman_env())
            time.sleep(0.5)
        return self

    def __exit__(self, *exc):
        if self.sink:
            self.hosts.run(self.sink, "pkill -x smtp-sink; sleep 0.5; systemctl start mailsink")


def vrrp_transitions(hosts: Hosts, balancers: list[str], since: float) -> dict[str, int]:
    """VRRP transitions each balancer's notify script logged since the epoch second `since`."""
    command = f"journalctl -q -o cat -t keepalived-notify --since @{int(since)} | grep -c ' is now ' || true"
    return {lb: int((hosts.run(lb, command).stdout.strip() or "0").splitlines()[-1]) for lb in balancers}


def bench(inv: Inventory, client: str, relay: str | None, vip: str | None, rounds: int, count: int,
          sessions: int, size: int, sender: str, recipient: str, log=print, pool: list[str] | None = None,
          against: str = "vip") -> dict:
    """Send the same load to the relay direct and to `against`: "vip" (through the balancers) or
    "stock" (a stock Debian Postfix beside the relay, see stockrelay.py), in alternating order."""
    from mailstack.stockrelay import StockPostfix

    hosts = Hosts(inv)
    balancers = inv.hosts("balancers")
    relays = inv.hosts("mail_relays")
    if client not in inv.hosts():
        raise BenchError(f"--client {client} is not a host of the inventory")
    if hosts.run(client, "command -v smtp-source").returncode != 0:
        raise BenchError(f"{client} has no smtp-source (Debian package postfix)")
    relay = relay or relays[0]
    if relay not in relays:
        raise BenchError(f"--relay {relay} is not in mail_relays")
    vip = vip or vips_of(inv)[0][0]
    relay_address = inv.value(relay, "mailstack_service_address")
    socket = inv.value(balancers[0], "haproxy_runtime_socket", "/run/haproxy/admin.sock")
    sinks = [h for h in inv.hosts("sinks") if hosts.container(h)]
    unknown = sorted(set(pool or []) - set(relays))
    if unknown:
        raise BenchError(f"--pool {', '.join(unknown)}: not in mail_relays")
    out = [r for r in relays if pool and r not in pool] if against == "vip" else []
    roles = {client: "client", **{b: "balancers" for b in balancers}, **{r: "relays" for r in relays},
             **{s: "sink" for s in sinks}}
    stock = StockPostfix(inv, relay, log) if against == "stock" else contextlib.nullcontext()
    runs: list[Run] = []
    started_at = time.time()
    with stock, FastSink(hosts, sinks[0] if sinks else None), Pool(hosts, balancers, socket, out):
        if against == "stock":
            hosts.extra["stock"] = stock.container
            roles = {client: "client", relay: "relays", "stock": "stock", **{s: "sink" for s in sinks}}
        targets = {"direct": relay_address, "vip": vip, "stock": getattr(stock, "address", "")}
        wait_queues_empty(hosts, inv, relays)
        for number in range(1, rounds + 1):
            order = ["direct", against] if number % 2 else [against, "direct"]
            for target in order:
                address = targets[target]
                before = server_sessions(hosts, balancers, socket)
                cpu_before = cpu_usage(hosts, list(roles))
                command = (f"s=$(date +%s.%N); smtp-source -s {sessions} -l {size} -m {count} "
                           f"-f {sender} -t {recipient} {address}:25 || exit $?; e=$(date +%s.%N); "
                           "echo \"$s $e\"")
                proc = hosts.run(client, command, timeout=1800)
                if proc.returncode != 0:
                    raise BenchError(f"smtp-source to {address} failed: {(proc.stderr or proc.stdout)[-400:]}")
                start, end = map(float, proc.stdout.split()[-2:])
                cpu_after = cpu_usage(hosts, list(roles))
                after = server_sessions(hosts, balancers, socket)
                shares = ({r: after[r] - before[r] for r in relays} if target == "vip"
                          else {relay if target == "direct" else "stock": count})
                cpu = {h: round((cpu_after[h] - cpu_before[h]) / 1e9, 3) for h in roles}
                run = Run(number, target, address, count, round(end - start, 3), shares, cpu)
                runs.append(run)
                log(f"round {number} {target:<6} {address:<15} {count} messages in {run.seconds:.2f}s = "
                    f"{run.rate:.0f} msg/s; CPU s: " + " ".join(f"{h} {c:.1f}" for h, c in cpu.items()))
                wait_queues_empty(hosts, inv, relays)
                if against == "stock":
                    wait_stock_queue_empty(hosts)
    direct = [r.rate for r in runs if r.target == "direct"]
    other = [r.rate for r in runs if r.target == against]
    pairs = [o.rate / d.rate for d, o in zip([r for r in runs if r.target == "direct"],
                                             [r for r in runs if r.target == against]) if d.rate]
    sessions_total: collections.Counter = collections.Counter()
    for r in runs:
        if r.target == "vip":
            sessions_total.update(r.sessions_per_relay)
    all_vip = sum(sessions_total.values())
    return {
        "client": client, "relay": relay, "against": against, "vip": vip if against == "vip" else None,
        "pool": [r for r in relays if r not in out], "rounds": rounds, "count": count, "sessions": sessions,
        "size": size, "cpus": os.cpu_count(), "runs": [r.as_dict() for r in runs],
        "direct_median": round(statistics.median(direct), 1), f"{against}_median": round(statistics.median(other), 1),
        "ratio_of_medians": round(statistics.median(other) / statistics.median(direct), 3),
        "ratio_median_per_round": round(statistics.median(pairs), 3) if pairs else None,
        "vip_share_percent": {r: round(100.0 * n / all_vip, 1) if all_vip else 0.0
                              for r, n in sessions_total.items()},
        "cpu": {"direct": cpu_profile(runs, roles, "direct"), against: cpu_profile(runs, roles, against)},
        "vrrp_transitions": vrrp_transitions(hosts, balancers, started_at),
        "seconds": round(time.time() - started_at),
        "all_hosts_on_this_machine": all(hosts.container(h) for h in roles),
    }


def wait_stock_queue_empty(hosts: Hosts, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while hosts.run("stock", "postqueue -j | wc -l").stdout.strip() not in ("0", ""):
        if time.monotonic() > deadline:
            raise BenchError(f"the stock relay's queue did not empty in {timeout:.0f}s")
        hosts.run("stock", "postqueue -f")
        time.sleep(1)
