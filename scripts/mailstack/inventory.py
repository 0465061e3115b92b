"""An Ansible inventory as the mailstack CLI sees it: hosts, groups, and each host's variables as
ansible-playbook would resolve them (group_vars, host_vars, precedence, templating), read through
ansible-core's own inventory and variable managers; a role's settings for a host (its defaults and
vars templated for that host, as the role sees them); and the file and line each value came from.

It judges nothing: the rules are the roles' and playbooks/check.yml's (see mailstack.checks).
"""

from __future__ import annotations

import collections
import dataclasses
import ipaddress
import os
import re
from pathlib import Path
from typing import Any

import yaml

from mailstack.testbench import ROOT

MISSING = object()
ROLES = ROOT / "roles"


class InventoryError(Exception):
    """The inventory cannot be read at all."""


@dataclasses.dataclass
class Undefined(Exception):
    """A variable's value refers to a name that no file defines."""

    name: str
    missing: str

    def __str__(self) -> str:
        return f"refers to {self.missing}, which is not defined"


class Inventory:
    """Read-only view of one inventory source (a directory or a file)."""

    def __init__(self, source: str | Path, vault_password_file: str | Path | None = None):
        os.environ.setdefault("ANSIBLE_CONFIG", str(ROOT / "ansible.cfg"))
        from ansible.inventory.manager import InventoryManager
        from ansible.parsing.dataloader import DataLoader
        from ansible.plugins.loader import init_plugin_loader
        from ansible.vars.manager import VariableManager

        _init_plugins(init_plugin_loader)
        self.source = Path(source)
        if not self.source.exists():
            raise InventoryError(f"inventory {source} does not exist")
        self.loader = DataLoader()
        if vault_password_file:
            from ansible.cli import CLI

            secrets = CLI.setup_vault_secrets(self.loader, vault_ids=[],
                                              vault_password_files=[str(vault_password_file)],
                                              initialize_context=False)
            self.loader.set_vault_secrets(secrets)
        try:
            self.manager = InventoryManager(loader=self.loader, sources=[str(self.source)])
        except Exception as exc:  # ansible raises many kinds here
            raise InventoryError(f"inventory {source} cannot be read: {exc}") from exc
        if not self.manager.hosts:
            raise InventoryError(f"inventory {source} has no hosts (is it an inventory?)")
        self.variables = VariableManager(loader=self.loader, inventory=self.manager)
        from ansible.vars.hostvars import HostVars

        HostVars(inventory=self.manager, variable_manager=self.variables, loader=self.loader)
        self._vars: dict[str, dict] = {}
        self._file_lines: dict[Path, dict[str, int]] = {}
        self._role_files: dict[tuple[str, str], dict] = {}

    # ------------------------------------------------------------------ hosts and groups
    def hosts(self, group: str = "all") -> list[str]:
        """The hosts of a group (with its children), in inventory order; [] for no such group."""
        if group not in self.manager.groups:
            return []
        return [h.name for h in self.manager.groups[group].get_hosts()]

    def has_group(self, group: str) -> bool:
        return group in self.manager.groups

    def groups_of(self, host: str) -> list[str]:
        return sorted(g.name for g in self.manager.get_host(host).get_groups() if g.name != "all")

    # ------------------------------------------------------------------ variables
    def _host_vars(self, host: str) -> dict:
        if host not in self._vars:
            self._vars[host] = self.variables.get_vars(host=self.manager.get_host(host),
                                                       include_hostvars=True)
        return self._vars[host]

    def names(self, host: str) -> list[str]:
        """Every variable a play would see on this host (inventory, magic and connection variables)."""
        return list(self._host_vars(host))

    def defines(self, host: str, name: str) -> bool:
        return name in self._host_vars(host)

    def raw(self, host: str, name: str, default: Any = MISSING) -> Any:
        value = self._host_vars(host).get(name, MISSING)
        if value is MISSING:
            if default is MISSING:
                raise KeyError(name)
            return default
        return value

    def where(self, host: str, name: str) -> str | None:
        """The file:line of the inventory that sets this host's variable (the one that wins, as
        Ansible's precedence goes), or None when the inventory does not set it."""
        if not self.defines(host, name):
            return None
        for path in self._var_files(host):
            line = self._line_of(path, name)
            if line:
                return f"{_rel(path)}:{line}" if line > 0 else _rel(path)
        return _rel(self.source) if self.source.is_file() else None

    def _var_files(self, host: str) -> list[Path]:
        """The files that may set a host's variables, the one that wins first: host_vars, then
        group_vars from the deepest group to all, then the inventory file itself."""
        base = self.source if self.source.is_dir() else self.source.parent
        groups = sorted(self.manager.get_host(host).get_groups(), key=lambda g: (g.depth, g.priority, g.name),
                        reverse=True)
        files: list[Path] = []
        for place in [base / "host_vars" / host] + [base / "group_vars" / g.name for g in groups]:
            if place.is_dir():
                found = sorted(p for p in place.rglob("*") if p.is_file())
                files += reversed(found)  # Ansible reads a directory in order: the last file wins
            else:
                files += [p for p in (place, place.with_name(place.name + ".yml"),
                                      place.with_name(place.name + ".yaml")) if p.is_file()]
        inventory_files = [self.source] if self.source.is_file() else sorted(
            p for p in self.source.iterdir() if p.is_file() and p.suffix in (".yml", ".yaml", ".ini", ""))
        return [p for p in files if p.suffix in ("", ".yml", ".yaml", ".json")] + inventory_files

    def _line_of(self, path: Path, name: str) -> int:
        """The line where a YAML file sets a top-level variable: >0 the line, -1 set somewhere in an
        encrypted file, 0 not set here."""
        if path not in self._file_lines:
            try:
                text = self.loader.get_text_file_contents(str(path))
            except Exception:  # noqa: BLE001 - an encrypted file without the password, unreadable
                self._file_lines[path] = {}
                return 0
            self._file_lines[path] = _top_level_lines(text, encrypted=path.read_bytes().startswith(b"$ANSIBLE_VAULT"))
        return self._file_lines[path].get(name, 0)

    def value(self, host: str, name: str, default: Any = MISSING) -> Any:
        """The variable as a play would see it: templated, with native types.

        Raises Undefined naming the missing variable when the value refers to one."""
        if not self.defines(host, name):
            if default is MISSING:
                raise KeyError(name)
            return default
        return self.template(host, self.raw(host, name), name)

    # ------------------------------------------------------------------ roles
    def role_file(self, role: str, part: str) -> dict:
        """A role's defaults/main.yml or vars/main.yml, its templates trusted as Ansible trusts them."""
        key = (role, part)
        if key not in self._role_files:
            path = ROLES / role / part / "main.yml"
            self._role_files[key] = (self.loader.load_from_file(str(path), trusted_as_template=True) or {}) \
                if path.is_file() else {}
        return self._role_files[key]

    def default_where(self, name: str) -> str:
        """roles/<role>/defaults/main.yml:line of a role variable's default, or ""."""
        for path in sorted(ROLES.glob("*/defaults/main.yml")):
            line = _top_level_lines(path.read_text()).get(name)
            if line:
                return f"{_rel(path)}:{line}"
        return ""

    def setting(self, host: str, role: str, name: str) -> Any:
        """A role variable for this host as the role sees it: the role's vars/main.yml, else the
        inventory's value, else the role's default; templated for the host."""
        defaults, role_vars = self.role_file(role, "defaults"), self.role_file(role, "vars")
        if name in role_vars:
            raw = role_vars[name]
        elif self.defines(host, name):
            return self.value(host, name)
        elif name in defaults:
            raw = defaults[name]
        else:
            raise KeyError(name)
        variables = collections.ChainMap(role_vars, self._host_vars(host), defaults)
        return self.template(host, raw, name, variables)

    def template(self, host: str, raw: Any, name: str = "", variables: Any = None) -> Any:
        from ansible.errors import AnsibleUndefinedVariable
        from ansible.template import Templar

        templar = Templar(loader=self.loader, variables=variables if variables is not None else self._host_vars(host))
        try:
            return _plain(templar.template(raw))
        except AnsibleUndefinedVariable as exc:
            match = re.search(r"'([^']+)' is undefined", str(exc))
            raise Undefined(name, match.group(1) if match else str(exc)) from None

    # ------------------------------------------------------------------ the tiers
    def address(self, host: str) -> str | None:
        """The address other tiers reach the host on (mailstack_service_address), if the inventory says."""
        try:
            value = self.value(host, "mailstack_service_address", None)
        except Undefined:
            return None
        return str(value) if value else None

    def vips(self) -> list[tuple[str, str, str]]:
        """(VIP address, the balancer that should hold it, VRRP instance) of every VIP, as keepalived's
        role works them out (its __keepalived_instances)."""
        balancers = self.hosts("balancers")
        if not balancers:
            return []
        instances = self.setting(balancers[0], "keepalived", "__keepalived_instances") or []
        return [(str(ipaddress.ip_interface(str(vip)).ip), inst.get("master", ""), inst.get("name", ""))
                for inst in instances for vip in inst.get("vips") or []]


_PLUGINS_READY = []


def _init_plugins(init_plugin_loader) -> None:
    """Let templates use collections' filters (community.general, ansible.utils), as a play can."""
    if not _PLUGINS_READY:
        init_plugin_loader()
        _PLUGINS_READY.append(True)


def _rel(path: Path) -> str:
    try:
        return os.path.relpath(path)
    except ValueError:  # pragma: no cover - another drive
        return str(path)


def _top_level_lines(text: str, encrypted: bool = False) -> dict[str, int]:
    """Top-level keys of a YAML mapping and their lines (-1 each for an encrypted file, whose
    lines mean nothing to the reader)."""
    try:
        node = yaml.compose(text)
    except yaml.YAMLError:
        return {}
    if not isinstance(node, yaml.MappingNode):
        return {}
    lines: dict[str, int] = {}
    for key, _ in node.value:
        if isinstance(key, yaml.ScalarNode):
            lines.setdefault(key.value, -1 if encrypted else key.start_mark.line + 1)
    return lines


def _plain(value: Any) -> Any:
    """Strip ansible's tagged types to plain Python ones (JSON and comparisons stay simple)."""
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, str):
        return str(value)
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
