"""An Ansible inventory as the mailstack CLI sees it: hosts, groups, and each host's variables as
ansible-playbook would resolve them (group_vars, host_vars, precedence, templating), read through
ansible-core's own inventory and variable managers, with the file each value came from.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Any

import yaml

from mailstack.testbench import ROOT

MISSING = object()

# The tier playbooks' contract: which groups get which roles. playbooks/check.yml holds it.
CHECK_PLAYBOOK = ROOT / "playbooks" / "check.yml"


def tier_roles() -> dict[str, list[str]]:
    """Group -> roles, as playbooks/check.yml (and so site.yml) applies them."""
    plays = yaml.safe_load(CHECK_PLAYBOOK.read_text())
    return dict(plays[0]["vars"]["mailstack_tier_roles"])


class InventoryError(Exception):
    """The inventory cannot be read at all."""


@dataclasses.dataclass
class Undefined(Exception):
    """A variable's value refers to a name that no file defines."""

    name: str
    missing: str

    def __str__(self) -> str:
        return f"refers to {self.missing}, which is not defined"


_DEFAULTS: dict[str, dict] = {}


def role_defaults(role: str) -> dict:
    """A role's defaults/main.yml."""
    if role not in _DEFAULTS:
        path = ROOT / "roles" / role / "defaults" / "main.yml"
        _DEFAULTS[role] = (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}
    return _DEFAULTS[role]


def role_argument_spec(role: str) -> dict:
    """The options of a role's main entry point (meta/argument_specs.yml)."""
    path = ROOT / "roles" / role / "meta" / "argument_specs.yml"
    if not path.is_file():
        return {}
    return yaml.safe_load(path.read_text())["argument_specs"]["main"].get("options", {})


def origin(value: Any) -> str | None:
    """The file (and line) a value was read from, if ansible-core recorded it."""
    try:
        from ansible._internal._datatag._tags import Origin  # ansible-core 2.19+
    except ImportError:  # pragma: no cover - older ansible-core keeps no origin
        return None
    tag = Origin.get_tag(value)
    if tag is None or not tag.path:
        return None
    path = tag.path
    try:
        path = os.path.relpath(path)
    except ValueError:  # pragma: no cover
        pass
    return f"{path}:{tag.line_num}" if tag.line_num else path


class Inventory:
    """Read-only view of one inventory source (a directory or a file)."""

    def __init__(self, source: str | Path, vault_password_file: str | Path | None = None):
        os.environ.setdefault("ANSIBLE_CONFIG", str(ROOT / "ansible.cfg"))
        from ansible.inventory.manager import InventoryManager
        from ansible.parsing.dataloader import DataLoader
        from ansible.vars.manager import VariableManager

        self.source = Path(source)
        if not self.source.exists():
            raise InventoryError(f"inventory {source} does not exist")
        self.loader = DataLoader()
        if vault_password_file:
            from ansible.cli import CLI

            secrets = CLI.setup_vault_secrets(self.loader, vault_ids=[],
                                              vault_password_files=[str(vault_password_file)])
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
        """The file:line that sets this host's variable, or None."""
        value = self._host_vars(host).get(name, MISSING)
        if value is MISSING:
            return None
        return origin(value) or self._find_file(host, name)

    def _find_file(self, host: str, name: str) -> str | None:
        """For values that carry no origin (booleans, None): the most specific vars file setting it."""
        base = self.source if self.source.is_dir() else self.source.parent
        groups = sorted(self.manager.get_host(host).get_groups(), key=lambda g: g.depth, reverse=True)
        places = [base / "host_vars" / host] + [base / "group_vars" / g.name for g in groups]
        for place in places:
            files = sorted(place.rglob("*")) if place.is_dir() else \
                [p for p in (place, place.with_name(place.name + ".yml"), place.with_name(place.name + ".yaml"))
                 if p.is_file()]
            for path in files:
                if not path.is_file() or path.suffix not in ("", ".yml", ".yaml", ".json"):
                    continue
                try:
                    data = yaml.safe_load(path.read_text())
                except yaml.YAMLError:
                    continue
                if isinstance(data, dict) and name in data:
                    return os.path.relpath(path)
        return os.path.relpath(self.source) if self.source.is_file() else None

    def value(self, host: str, name: str, default: Any = MISSING) -> Any:
        """The variable as a play would see it: templated, with native types.

        Raises Undefined naming the missing variable when the value refers to one."""
        if not self.defines(host, name):
            if default is MISSING:
                raise KeyError(name)
            return default
        return self.template(host, self.raw(host, name), name)

    def setting(self, host: str, role: str, name: str) -> Any:
        """A role variable for this host: the inventory's value, else the role's default."""
        if self.defines(host, name):
            return self.value(host, name)
        defaults = role_defaults(role)
        if name not in defaults:
            raise KeyError(name)
        return self.template(host, defaults[name], name)

    def template(self, host: str, raw: Any, name: str = "") -> Any:
        from ansible.errors import AnsibleUndefinedVariable
        from ansible.template import Templar

        templar = Templar(loader=self.loader, variables=self._host_vars(host))
        try:
            return _plain(templar.template(raw))
        except AnsibleUndefinedVariable as exc:
            match = re.search(r"'([^']+)' is undefined", str(exc))
            raise Undefined(name, match.group(1) if match else str(exc)) from None


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
