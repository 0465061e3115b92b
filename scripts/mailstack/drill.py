"""`mailstack drill failover`: kill the balancer that holds a VIP, measure how long the VIP does not
answer SMTP, send mail all along and count what happened to it, restore the balancer, repeat.
"""

from __future__ import annotations

import dataclasses
import re
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from mailstack.inventory import Inventory
from mailstack.testbench import ROOT, podman_env

MODES = {
    "haproxy": ["systemctl kill --signal=SIGKILL haproxy.service"],
    "keepalived": ["systemctl kill --signal=SIGKILL keepalived.service"],
    "both": ["systemctl kill --signal=SIGKILL keepalived.service haproxy.service"],
    "container": [],  # podman stop --time 0, lab only
}


class DrillError(Exception):
    pass


class Hosts:
    """Runs commands on the inventory's hosts: podman exec for the lab, ansible otherwise."""

    def __init__(self, inv: Inventory):
        self.inv = inv
        self.extra: dict[str, str] = {}  # containers outside the inventory, by a name of their own

    def container(self, host: str) -> str | None:
        if host in self.extra:
            return self.extra[host]
        container = self.inv.value(host, "mailstack_lab_container", None)
        return str(container) if container else None

    def run(self, host: str, command: str, timeout: float = 60) -> subprocess.CompletedProcess:
        container = self.container(host)
        if container:
            cmd = ["podman", "exec", container, "sh", "-c", command]
        else:
            cmd = [str(Path(sys.executable).parent / "ansible"), "-i", str(self.inv.source), host, "-b",
                   "-m", "ansible.builtin.shell", "-a", command, "-o"]
        return subprocess.run(cmd, capture_output=True, text=True, env=podman_env(), timeout=timeout, cwd=ROOT)

    def holders(self, balancers: list[str], vip: str) -> list[str]:
        found = []
        for lb in balancers:
            try:
                proc = self.run(lb, "ip -o addr show", timeout=10)
            except subprocess.TimeoutExpired:
                continue
            if proc.returncode == 0 and vip in re.findall(r"inet6? ([0-9a-fA-F.:]+)/", proc.stdout):
                found.append(lb)
        return found


class Watcher(threading.Thread):
    """Opens a new connection to the VIP every `every` seconds and records when a 220 greeting came
    back. Each attempt runs on its own (up to `timeout` long), so an attempt stuck on a dead
    balancer does not delay the next: the gap is measured to `every`, not to the timeout."""

    def __init__(self, vip: str, port: int, every: float = 0.05, timeout: float = 2.0):
        super().__init__(daemon=True)
        self.vip, self.port, self.every, self.timeout = vip, port, every, timeout
        self.ok_times: list[float] = []
        self._lock = threading.Lock()
        self._stop_event = threading.Event()

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=self.timeout + 5)

    def _attempt(self) -> None:
        try:
            with socket.create_connection((self.vip, self.port), timeout=self.timeout) as sock:
                sock.settimeout(self.timeout)
                if sock.recv(512).startswith(b"220"):
                    answered = time.monotonic()
                    with self._lock:
                        self.ok_times.append(answered)
                sock.sendall(b"QUIT\r\n")
        except OSError:
            pass

    def run(self) -> None:
        in_flight = int(self.timeout / self.every) + 2
        with ThreadPoolExecutor(max_workers=in_flight) as pool:
            while not self._stop_event.is_set():
                pool.submit(self._attempt)
                self._stop_event.wait(self.every)

    def longest_gap(self, start: float, end: float) -> float:
        """The longest time without an answer between start and end."""
        with self._lock:
            times = [start] + sorted(t for t in self.ok_times if start < t <= end) + [end]
        return max(b - a for a, b in zip(times, times[1:]))

    def first_answer_after(self, t0: float) -> float | None:
        with self._lock:
            later = sorted(t for t in self.ok_times if t > t0)
        return later[0] - t0 if later else None


@dataclasses.dataclass
class Round:
    number: int
    killed: str
    took_over: str | None
    moved_after: float | None
    gap: float
    failback_gap: float

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def wait_until(predicate, timeout: float, every: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    return None


def vips_of(inv: Inventory) -> list[tuple[str, str, str]]:
    """(VIP, preferred balancer, VRRP instance) for every VIP of the balancers."""
    if not inv.hosts("balancers"):
        raise DrillError("the inventory has no balancers")
    vips = inv.vips()
    if not vips:
        raise DrillError("the balancers have no VIP")
    return vips


def kill(hosts: Hosts, lb: str, mode: str) -> None:
    if mode == "container":
        container = hosts.container(lb)
        if not container:
            raise DrillError("--mode container works only in the lab (hosts with a mailstack_lab_container)")
        subprocess.run(["podman", "stop", "--time", "0", container], check=True, capture_output=True,
                       env=podman_env())
        return
    for command in MODES[mode]:
        proc = hosts.run(lb, command)
        if proc.returncode != 0:
            raise DrillError(f"{lb}: {command} failed: {(proc.stderr or proc.stdout).strip()[-300:]}")


def restore(hosts: Hosts, lb: str, mode: str) -> None:
    if mode == "container":
        container = hosts.container(lb)
        subprocess.run(["podman", "start", container], check=True, capture_output=True, env=podman_env())
        wait_until(lambda: hosts.run(lb, "systemctl is-system-running --wait").stdout.strip()
                   in ("running", "degraded"), 120, 1)
        return
    proc = hosts.run(lb, "systemctl reset-failed haproxy.service keepalived.service; "
                         "systemctl start haproxy.service keepalived.service")
    if proc.returncode != 0:
        raise DrillError(f"{lb}: could not restart haproxy/keepalived: {proc.stderr.strip()[-300:]}")


def drill(inv: Inventory, vip: str | None, mode: str, rounds: int, port: int, sender_address: str,
          recipient: str, interval: float, settle: float, log=print):
    from mailstack.smoke import lab_sinks
    from mailstack.traffic import Sender, wait_for_delivery

    hosts = Hosts(inv)
    balancers = inv.hosts("balancers")
    known = vips_of(inv)
    vip = vip or known[0][0]
    preferred = {v: master for v, master, _ in known}.get(vip)
    if preferred is None:
        raise DrillError(f"{vip} is not one of the balancers' VIPs ({', '.join(v for v, _, _ in known)})")
    if hosts.holders(balancers, vip) != [preferred]:
        raise DrillError(f"VIP {vip} is not on its preferred balancer {preferred} alone before the drill "
                         f"(held by {hosts.holders(balancers, vip)}); fix that first")
    sender = Sender([vip], port, sender_address, recipient, interval=interval)
    watcher = Watcher(vip, port)
    sender.start()
    watcher.start()
    results: list[Round] = []
    try:
        time.sleep(settle)
        for number in range(1, rounds + 1):
            holder = hosts.holders(balancers, vip)[0]
            t0 = time.monotonic()
            kill(hosts, holder, mode)
            others = [b for b in balancers if b != holder]
            took_over = wait_until(lambda: next(iter(hosts.holders(others, vip)), None), 60)
            moved_after = time.monotonic() - t0 if took_over else None
            wait_until(lambda: watcher.first_answer_after(t0 + (moved_after or 0)), 30)
            time.sleep(settle)
            t1 = time.monotonic()
            gap = watcher.longest_gap(t0, t1)
            restore(hosts, holder, mode)
            back = wait_until(lambda: hosts.holders(balancers, vip) == [preferred], 120, 0.5)
            time.sleep(settle)
            failback_gap = watcher.longest_gap(t1, time.monotonic())
            r = Round(number, holder, took_over, round(moved_after, 2) if moved_after else None,
                      round(gap, 2), round(failback_gap, 2))
            results.append(r)
            log(f"round {number}: killed {mode} on {holder}; VIP on {took_over or 'NOBODY'} after "
                f"{r.moved_after}s; longest time without an SMTP answer {r.gap}s; "
                f"back on {preferred}: {'yes' if back else 'NO'} (gap {r.failback_gap}s)")
            if not back:
                raise DrillError(f"VIP {vip} did not return to {preferred} after the restore")
    finally:
        sender.stop()
        watcher.stop()
    sinks = lab_sinks(inv)
    delivery = wait_for_delivery(sender, sinks[0]) if sinks else None
    gaps = [r.gap for r in results]
    return {
        "vip": vip, "mode": mode, "rounds": [r.as_dict() for r in results],
        "gap_median": round(statistics.median(gaps), 2) if gaps else None,
        "gap_worst": max(gaps) if gaps else None,
        "sent": len(sender.results), "accepted": len(sender.accepted), "refused": len(sender.refused),
        "delivered": delivery.delivered if delivery else None,
        "lost": len(delivery.lost) if delivery else None,
        "duplicated": len(delivery.duplicated) if delivery else None,
        "delivery_checked": bool(delivery),
    }
