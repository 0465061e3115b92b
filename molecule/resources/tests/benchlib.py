"""Shared helpers of the scenarios' testinfra tests.

Hosts are reached with testinfra's ssh backend over the connection Ansible shares with them (a
command costs a few milliseconds; `podman exec` cost 0.13 s), and their variables are read from
the scenario's Ansible inventory, so that tests compare against what the
inventory says instead of repeating it.
"""

from __future__ import annotations

import functools
import json
import os
import shlex
import subprocess
import time
import uuid
from pathlib import Path

import testinfra
import yaml

PROJECT = Path(__file__).resolve().parents[3]


def inventory_dir() -> str:
    return os.path.dirname(os.environ["MOLECULE_INVENTORY_FILE"])


@functools.lru_cache(maxsize=1)
def inventory() -> dict:
    out = subprocess.run(["ansible-inventory", "-i", inventory_dir(), "--list"],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def group(name: str) -> list[str]:
    inv = inventory()
    return sorted(inv.get(name, {}).get("hosts", []))


def hostvars(name: str) -> dict:
    return inventory()["_meta"]["hostvars"][name]


@functools.lru_cache(maxsize=None)
def role_defaults(role: str) -> dict:
    """A role's defaults as written (templated defaults stay unrendered strings)."""
    return yaml.safe_load((PROJECT / "roles" / role / "defaults" / "main.yml").read_text()) or {}


class Node:
    """One container of the scenario."""

    def __init__(self, name: str, role: str | None = None):
        self.name = name
        # What the role runs with: its defaults, overridden by the inventory.
        self.vars = {**(role_defaults(role) if role else {}), **hostvars(name)}
        self.ip = self.vars["bench_ip_of"][name]
        # As Ansible reaches it (create.yml): root over SSH with the bench's key, sharing Ansible's
        # connection to the host. A dead connection is noticed within seconds (ServerAlive), so a
        # command to a container that was killed fails instead of hanging.
        self.host = testinfra.get_host(
            f"ssh://root@{self.ip}", ssh_identity_file=str(PROJECT / ".cache" / "ssh" / "id_ed25519"), timeout=10,
            ssh_extra_args="-o ControlMaster=auto -o ControlPersist=60s -o ControlPath=~/.ansible/cp/%h-%p-%r "
                           "-o UserKnownHostsFile=/dev/null -o StrictHostKeyChecking=no -o LogLevel=ERROR "
                           "-o IdentitiesOnly=yes -o ServerAliveInterval=2 -o ServerAliveCountMax=3")

    def run(self, command: str, check: bool = True):
        try:
            result = self.host.run(command)
        except RuntimeError as exc:
            # testinfra raises on ssh's own failure (exit 255): report it as a failed command.
            result = exc.args[0]
        if check and result.rc != 0:
            raise AssertionError(f"{self.name}: `{command}` exited {result.rc}:\n"
                                 f"{result.stdout}\n{result.stderr}")
        return result

    def probe(self, host: str, **options) -> dict:
        """Run smtpprobe on this node and return its JSON report.

        Options map to its flags: to=[...] (repeatable), mail_from, starttls=True, auth="u:p",
        proxy="v2", proxy_src="10.0.0.1", count=3, port=25, id="x", tls_version="1.1".
        """
        args = ["smtpprobe", "--host", host]
        for key, value in options.items():
            flag = "--" + ("from" if key == "mail_from" else key.replace("_", "-"))
            if value is True:
                args.append(flag)
            elif value is False or value is None:
                continue
            elif isinstance(value, (list, tuple)):
                for v in value:
                    args += [flag, str(v)]
            else:
                args += [flag, str(value)]
        result = self.run(" ".join(shlex.quote(a) for a in args))
        return json.loads(result.stdout)


class Sink(Node):
    """A recording sink (mailsink)."""

    def messages(self) -> list[dict]:
        return json.loads(self.run("mailsink dump").stdout)

    def with_id(self, test_id: str) -> list[dict]:
        return [m for m in self.messages() if (m.get("x_test_id") or "").startswith(test_id)]

    def wait_for(self, test_id: str, count: int = 1, timeout: float = 60) -> list[dict]:
        """Wait until `count` messages whose X-Test-Id starts with test_id have arrived."""
        deadline = time.monotonic() + timeout
        found: list[dict] = []
        while time.monotonic() < deadline:
            found = self.with_id(test_id)
            if len(found) >= count:
                return found
            time.sleep(0.5)
        return found


def new_id(prefix: str = "t") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def code(reply: list | None) -> int:
    return reply[0] if reply else 0


def wait_until(predicate, timeout: float = 30, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


def converge(limit: str, extra_vars: dict | None = None, timeout: float = 600):
    """Run this scenario's converge playbook on `limit` (a host or group), as `molecule converge`
    would, with extra vars."""
    env = dict(os.environ, ANSIBLE_ROLES_PATH=str(PROJECT / "roles"), ANSIBLE_FORCE_COLOR="0")
    playbook = Path(os.environ["MOLECULE_SCENARIO_DIRECTORY"]) / "converge.yml"
    return subprocess.run(
        ["ansible-playbook", "-i", inventory_dir(), str(playbook), "--limit", limit,
         "-e", json.dumps(extra_vars or {})],
        capture_output=True, text=True, env=env, timeout=timeout)


def run_bad_input(node: Node, watched_files: list[str], extra_vars: dict, expected: list[str]):
    """Converge node with bad extra vars: it must fail naming the problem, and change nothing."""
    files = " ".join(watched_files)
    before = node.run(f"sha256sum {files}").stdout
    proc = converge(node.name, extra_vars)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output
    for text in expected:
        assert text in output, f"{text!r} not in the failure:\n{output[-3000:]}"
    assert "changed=0" in output, output[-2000:]
    assert node.run(f"sha256sum {files}").stdout == before, "a file changed although the input was refused"
