"""`mailstack check`: what is wrong with an inventory, found before any playbook runs on it.

The rules are not here. This runs playbooks/check.yml, the play site.yml and the tier playbooks
run first on real hosts, without contacting any host (mailstack_check_offline: no facts gathered,
the CLI's stand-ins instead; every check runs and its failure is recorded instead of stopping the
run), and turns what it recorded (callback mailstack_findings) into findings that name the host,
the variable, the file:line that sets it and what is wrong, merged when one group_vars file makes
the same mistake on several hosts. So the playbooks and the CLI cannot disagree: they run the
same rules (each role's argument_specs and tasks/assert.yml, the project's inventory variables, the
inventory-wide checks of playbooks/action_plugins/mailstack_inventory_check.py).

Errors are what a run would stop on; warnings what it would print and go on with (single points
of failure, self-signed certificates outside the lab); notes the role variables this check could
only judge with a stand-in for a fact of the host.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterable

import yaml

from mailstack.inventory import Inventory, Undefined
from mailstack.testbench import ROOT

ERROR, WARNING, NOTE = "error", "warning", "note"
CHECK_PLAYBOOK = ROOT / "playbooks" / "check.yml"
CALLBACKS = Path(__file__).parent / "ansible_callbacks"
UNDEFINED = re.compile(r"'([A-Za-z_][A-Za-z0-9_]*)' is undefined")
ARGUMENT = re.compile(r"argument '([A-Za-z_][A-Za-z0-9_]*)'|^([A-Za-z_][A-Za-z0-9_]*)\b")


class CheckError(Exception):
    """The check play could not run at all (its output says why)."""


@dataclasses.dataclass
class Finding:
    level: str
    message: str
    variable: str = ""
    file: str = ""
    hosts: list[str] = dataclasses.field(default_factory=list)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


class Report:
    """Findings, merged when the same problem shows on several hosts (a group_vars file)."""

    def __init__(self) -> None:
        self.findings: list[Finding] = []
        self._index: dict[tuple, Finding] = {}

    def add(self, level: str, message: str, host: str | None = None, variable: str = "",
            file: str | None = "") -> None:
        key = (level, message, variable, file or "")
        found = self._index.get(key)
        if found is None:
            found = Finding(level, message, variable, file or "")
            self._index[key] = found
            self.findings.append(found)
        if host and host not in found.hosts:
            found.hosts.append(host)

    def of(self, level: str) -> list[Finding]:
        return [f for f in self.findings if f.level == level]

    @property
    def errors(self) -> list[Finding]:
        return self.of(ERROR)

    @property
    def warnings(self) -> list[Finding]:
        return self.of(WARNING)

    @property
    def notes(self) -> list[Finding]:
        return self.of(NOTE)


def run_check_play(inventory: str | Path, vault_password_file: str | Path | None = None) -> dict:
    """Run playbooks/check.yml offline against the inventory; what its callback recorded."""
    with tempfile.TemporaryDirectory(prefix="mailstack-check-") as tmp:
        out = Path(tmp) / "findings.json"
        env = dict(os.environ, ANSIBLE_CONFIG=str(ROOT / "ansible.cfg"), ANSIBLE_CALLBACK_PLUGINS=str(CALLBACKS),
                   ANSIBLE_CALLBACKS_ENABLED="mailstack_findings", MAILSTACK_FINDINGS=str(out),
                   ANSIBLE_RETRY_FILES_ENABLED="false", ANSIBLE_NOCOLOR="1")
        command = [str(Path(sys.executable).with_name("ansible-playbook")), "-i", str(inventory),
                   str(CHECK_PLAYBOOK), "-e", json.dumps({"mailstack_check_offline": True,
                                                          "ansible_connection": "local"})]
        if vault_password_file:
            command += ["--vault-password-file", str(vault_password_file)]
        proc = subprocess.run(command, env=env, capture_output=True, text=True, cwd=ROOT)
        if not out.is_file():
            raise CheckError(f"playbooks/check.yml did not run (exit {proc.returncode}):\n"
                             + (proc.stderr or proc.stdout).strip()[-3000:])
        return json.loads(out.read_text())


class Presenter:
    """Turns the play's records into findings with file:line."""

    def __init__(self, inv: Inventory, declared: set[str]) -> None:
        self.inv = inv
        self.report = Report()
        self.declared = declared  # the variables the roles and the inventory declare, as the play read them
        self.missing_vault: set[str] = set()

    def where(self, host: str, variable: str) -> str:
        if not host or not variable:
            return ""
        if host in self.inv.hosts() and self.inv.defines(host, variable):
            return self.inv.where(host, variable) or ""
        return self.inv.default_where(variable)

    def variable_in(self, host: str, text: str) -> str:
        """The first variable a message names: a declared one, or one the inventory sets."""
        for token in re.findall(r"[A-Za-z_][A-Za-z0-9_]*", text):
            if token in self.declared or (host and self.inv.defines(host, token) and "_" in token):
                return token
        return ""

    def add(self, level: str, message: str, host: str, variable: str) -> None:
        self.report.add(level, message, host or None, variable, self.where(host, variable))

    def record(self, rec: dict) -> None:
        host = rec["host"]
        for finding in rec.get("findings", []):
            self.add(finding["level"], finding["message"], finding["host"], finding["variable"])
        role = f"{rec['role']} role: " if rec.get("role") else ""
        for error in rec.get("argument_errors", []):
            match = ARGUMENT.search(error)
            variable = (match.group(1) or match.group(2)) if match else self.variable_in(host, error)
            spec = re.search(r"argument_specs for (\w+)", rec["task"])
            self.add(ERROR, f"{spec.group(1) + ' role: ' if spec else role}{error}", host, variable)
        if "msg" in rec:
            self.failure(host, rec["msg"], role)

    def failure(self, host: str, msg: str, role: str) -> None:
        missing = UNDEFINED.search(msg)
        if missing:
            self.undefined(host, missing.group(1))
            return
        msg = re.sub(r"^Task failed: (Action failed: )?", "", msg).strip()
        variable = self.variable_in(host, msg)
        group = re.match(r"([A-Za-z_][A-Za-z0-9_]*):", msg)
        if not variable and group and self.inv.has_group(group.group(1)):
            self.report.add(ERROR, msg, host, group.group(1), self.inventory_file())
            return
        self.add(ERROR, msg, self.subject(host, msg, variable), variable)

    def subject(self, host: str, msg: str, variable: str) -> str:
        """The host a finding is about: a balancer's check of a relay's weight is about the relay."""
        if variable and not self.inv.defines(host, variable):
            for other in self.inv.hosts():
                if other != host and re.search(rf"(?<![\w.-]){re.escape(other)}(?![\w.-])", msg) \
                        and self.inv.defines(other, variable):
                    return other
        return host

    def inventory_file(self) -> str:
        source = self.inv.source
        if source.is_file():
            return str(source)
        hosts = [p for p in (source / "hosts.yml", source / "hosts.yaml", source / "hosts") if p.is_file()]
        return os.path.relpath(hosts[0]) if hosts else str(source)

    def undefined(self, host: str, missing: str) -> None:
        """A value refers to a variable nobody defines: name the inventory variables that do."""
        referring = [name for name in self.inv.names(host)
                     if self.inv.where(host, name) and re.search(rf"\b{re.escape(missing)}\b",
                                                                 str(self.inv.raw(host, name)))]
        if missing.startswith("vault_"):
            self.missing_vault.add(missing)
            text = f"refers to {missing}, a vault secret that is not defined"
        else:
            text = f"refers to {missing}, which is not defined"
        for name in referring or [""]:
            self.add(ERROR, text, host, name)

    def notes(self, roles: dict[str, list[str]]) -> None:
        """Role variables the inventory leaves to a fact of the host, which the check stood in for."""
        for host, names in roles.items():
            for role in names:
                for name, raw in self.inv.role_file(role, "defaults").items():
                    if isinstance(raw, str) and "ansible_facts" in raw and not self.inv.defines(host, name):
                        fact = re.search(r"ansible_facts\[?'?\.?([a-z0-9_]+)", raw)
                        self.report.add(NOTE, f"not set: on the host it comes from the fact "
                                        f"{fact.group(1) if fact else 'ansible_facts'}, which `check` stands in "
                                        "for from the inventory; set it to check the real value", host, name,
                                        self.inv.default_where(name))

    def vault_summary(self) -> None:
        if not self.missing_vault:
            return
        text = ("vault variables not defined: " + ", ".join(sorted(self.missing_vault))
                + " (define them in an encrypted vault file, e.g. group_vars/all/vault.yml")
        base = self.inv.source if self.inv.source.is_dir() else self.inv.source.parent
        example = base / "group_vars" / "all" / "vault.yml.example"
        if example.is_file():
            listed = set((yaml.safe_load(example.read_text()) or {}).keys())
            text += "; group_vars/all/vault.yml.example lists what it needs"
            unlisted = sorted(self.missing_vault - listed)
            if unlisted:
                text += "; NOT in the example, a typo?: " + ", ".join(unlisted)
        self.report.add(ERROR, text + ")")


    def unresolved(self) -> None:
        """Every inventory value that refers to a variable nobody defines. The play stops a host's
        checks at the first one; a user fixing a vault wants them all at once."""
        for host in self.inv.hosts():
            for name in self.inv.names(host):
                if name.startswith("ansible_") or not self.inv.where(host, name):
                    continue
                try:
                    self.inv.value(host, name)
                except Undefined as exc:
                    if not exc.missing.startswith(("ansible_", "hostvars")):
                        self.undefined(host, exc.missing)
                    # templating stops at the first: a list of users may name several vault secrets
                    for other in sorted(set(re.findall(r"\bvault_\w+", str(self.inv.raw(host, name))))
                                        - {exc.missing}):
                        if not self.inv.defines(host, other):
                            self.undefined(host, other)

    def clear_vaults(self) -> None:
        from mailstack.vaultguard import clear_vaults

        base = self.inv.source if self.inv.source.is_dir() else self.inv.source.parent
        files = sorted(p for d in ("group_vars", "host_vars") for p in (base / d).rglob("*") if p.is_file())
        for path in clear_vaults(files):
            self.report.add(WARNING, "is not encrypted: secrets in clear text on disk, one `git add` from being "
                            f"published (ansible-vault encrypt {os.path.relpath(path)})", None, "", os.path.relpath(path))

    def sort_hosts(self) -> None:
        order = {h: i for i, h in enumerate(self.inv.hosts())}
        for finding in self.report.findings:
            finding.hosts.sort(key=lambda h: order.get(h, len(order)))


def check(inv: Inventory, vault_password_file: str | Path | None = None) -> Report:
    recorded = run_check_play(inv.source, vault_password_file)
    presenter = Presenter(inv, set(recorded.get("declared", [])))
    for rec in recorded["records"]:
        presenter.record(rec)
    presenter.unresolved()
    presenter.notes(recorded.get("roles", {}))
    presenter.vault_summary()
    presenter.clear_vaults()
    presenter.sort_hosts()
    return presenter.report


def format_report(report: Report, source: str) -> Iterable[str]:
    for f in report.errors + report.warnings + report.notes:
        who = ", ".join(f.hosts) if f.hosts else "-"
        what = f.variable or "-"
        where = f" ({f.file})" if f.file else ""
        yield f"{f.level.upper():7} {who}: {what}{where}: {f.message}"
    yield (f"{source}: {len(report.errors)} error(s), {len(report.warnings)} warning(s)"
           + (f", {len(report.notes)} note(s)" if report.notes else ""))
