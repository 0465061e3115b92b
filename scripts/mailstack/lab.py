"""The lab: the whole mail tier in podman containers on this machine, built from inventories/lab.

The inventory is the lab's only description: each host is a systemd container named by its
mailstack_lab_container, at its mailstack_service_address on one podman network (mailstack_lab_network,
mailstack_lab_subnet), which Ansible reaches over SSH with the bench's key. `up` creates what is missing, keeps what runs, and converges it all with
playbooks/site.yml; `down` removes it; `status` asks every service how it is.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import click

from mailstack import testbench
from mailstack.inventory import Inventory
from mailstack.podman import container_info, image_tag, network_subnet, pexec, podman
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
    from mailstack.labstatus import status

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
