"""Checks of the inventory as a whole: the rules no single host's role can judge alone.

A rule on one host's variables lives with its role (meta/argument_specs.yml, tasks/assert.yml).
The rules here look across hosts and tiers: the groups the tiers need, addresses used twice,
typos of variable names, the relays' trust in the balancers and the ports both sides must agree
on, the balancers' VIPs and router ids, and single points of failure. playbooks/check.yml runs
them once per run, on the controller; `mailstack check` runs that same play without contacting a
host, so the playbooks and the CLI judge an inventory by the same rules.

Every finding names a host, a variable and what to write instead; errors fail the task, warnings
are printed as Ansible warnings. The whole list is also returned as `findings`.
"""

from __future__ import annotations

import collections
import difflib
import functools
import ipaddress
from pathlib import Path

from ansible.errors import AnsibleError
from ansible.plugins.action import ActionBase
from ansible.vars.reserved import get_reserved_names

ERROR, WARNING = "error", "warning"
MTA_ROLES = {"postfix_relays": "postfix", "exim_relays": "exim"}


class Unknown(Exception):
    """A value that cannot be known on the controller (it needs facts, or a secret that is missing)."""


class View:
    """The inventory as the play sees it: groups, hostvars, and each host's role settings (the
    inventory's value, else the role's default templated for that host)."""

    def __init__(self, action: ActionBase, task_vars: dict, root: Path):
        self.hostvars = task_vars["hostvars"]
        self.groups = task_vars["groups"]
        self.root = root
        self._templar = action._templar
        self._loader = action._loader
        self._defaults: dict[str, dict] = {}

    def hosts(self, group: str) -> list[str]:
        return list(self.groups.get(group, []))

    def groups_of(self, host: str) -> set[str]:
        return {g for g, members in self.groups.items() if host in members and g not in ("all", "ungrouped")}

    def defines(self, host: str, name: str) -> bool:
        return name in self.hostvars.raw_get(host)

    def var(self, host: str, name: str, default=None):
        """The host's inventory value, templated as a play on that host would see it."""
        if not self.defines(host, name):
            return default
        return self._template(host, self.hostvars.raw_get(host)[name], {})

    def role_defaults(self, role: str) -> dict:
        if role not in self._defaults:
            path = self.root / "roles" / role / "defaults" / "main.yml"
            self._defaults[role] = (self._loader.load_from_file(str(path)) or {}) if path.is_file() else {}
        return self._defaults[role]

    def setting(self, host: str, role: str, name: str):
        """The role variable for this host; Unknown when it cannot be worked out here."""
        if self.defines(host, name):
            return self.var(host, name)
        defaults = self.role_defaults(role)
        if name not in defaults:
            raise Unknown(f"{role} has no variable {name}")
        return self._template(host, defaults[name], defaults)

    def _template(self, host: str, raw, defaults: dict):
        # hostvars[...] of another host does not template values that read hostvars themselves
        # (mailstack_relay_proxy_trusted does), so template with the host's own raw variables.
        variables = collections.ChainMap(dict(self.hostvars.raw_get(host)), {"hostvars": self.hostvars}, defaults)
        try:
            return self._templar.copy_with_new_env(available_variables=variables).template(raw)
        except AnsibleError as exc:
            raise Unknown(str(exc)) from None

    def address(self, host: str) -> str | None:
        try:
            value = self.var(host, "mailstack_service_address")
        except Unknown:
            return None
        return str(value) if value else None


class Findings(list):
    def add(self, level: str, host: str | None, variable: str, message: str) -> None:
        self.append({"level": level, "host": host or "", "variable": variable, "message": message})

    def error(self, host, variable, message):
        self.add(ERROR, host, variable, message)

    def warning(self, host, variable, message):
        self.add(WARNING, host, variable, message)


def check_groups(v: View, f: Findings) -> None:
    if not v.hosts("balancers"):
        f.error(None, "balancers", "group balancers is missing or empty: nothing would receive mail on a VIP")
    if not v.hosts("mail_relays"):
        f.error(None, "mail_relays", "group mail_relays is missing or empty: the balancers would have no relay")
    for group, what in (("redis_nodes", "Redis (cache tier)"), ("rabbitmq_nodes", "RabbitMQ (queue tier)")):
        if not v.hosts(group):
            f.warning(None, group, f"group {group} is missing or empty: site.yml sets up no {what}")
    relays = set(v.hosts("mail_relays"))
    for group in MTA_ROLES:
        for host in v.hosts(group):
            if host not in relays:
                f.warning(host, group, f"in {group} but not in mail_relays: the balancers will not send to it "
                          "(put it under mail_relays' children)")
    for host in sorted(set(v.hosts("balancers")) & relays):
        f.error(host, "balancers", "both a balancer and a relay: HAProxy and the MTA would both listen on port 25; "
                "give each tier its own hosts")


def check_addresses(v: View, f: Findings, hosts: list[str]) -> None:
    """Two hosts with one service address: the balancers would send one relay's share to the other."""
    owners: dict[str, list[str]] = collections.defaultdict(list)
    for host in hosts:
        address = v.address(host)
        if address:
            owners[address].append(host)
    for address, names in owners.items():
        for host in names if len(names) > 1 else []:
            others = ", ".join(n for n in names if n != host)
            f.error(host, "mailstack_service_address",
                    f"{address} is also the address of {others}: each host needs its own "
                    "(write this host's own address)")


def edits(a: str, b: str) -> int:
    """Levenshtein distance: how many letters to add, drop or change to turn a into b."""
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


@functools.lru_cache(maxsize=None)
def closest(name: str, declared: frozenset[str], most: int) -> str | None:
    """The declared name at most `most` edits away, if any (the nearest, then the first)."""
    candidates = difflib.get_close_matches(name, declared, n=5, cutoff=0.6)
    best = min(candidates, key=lambda d: (edits(name, d), d), default=None)
    return best if best is not None and edits(name, best) <= most else None


def check_names(v: View, f: Findings, hosts: list[str], declared: set[str], roles: list[str]) -> None:
    """A variable no role declares that is a letter or two away from one that is, or that carries
    a role's prefix (its name and _): a typo whose value every role would ignore."""
    prefixes = tuple(f"{role}_" for role in roles)
    reserved = get_reserved_names()
    declared = frozenset(declared)
    # Names the inventory's own values refer to ("{{ mailstack_relay_networks }}") are its helpers.
    referenced = " ".join(str(value) for host in hosts for value in v.hostvars.raw_get(host).values())
    for host in hosts:
        for name in v.hostvars.raw_get(host):
            if (name in declared or name in reserved or name.startswith(("ansible_", "vault_", "_"))
                    or name.startswith("mailstack_check")):
                continue
            prefixed = name.startswith(prefixes)
            near = closest(name, declared, 2 if len(name) < 16 else 3)
            if not prefixed and (near is None or name in referenced):
                continue  # a helper of the inventory's own, not a misspelt setting
            if prefixed and near is None:
                near = closest(name, frozenset(d for d in declared if d.split("_")[0] == name.split("_")[0]),
                               len(name) // 2)
            hint = f" (did you mean {near}?)" if near else ""
            f.error(host, name, f"is not a variable of any role, so its value would be ignored{hint}")


def relay_mtas(v: View, host: str) -> list[str]:
    """The MTA roles a relay gets (two is a mistake check.yml names; both are judged meanwhile)."""
    return [role for group, role in MTA_ROLES.items() if group in v.groups_of(host)]


def frontends(v: View, lb: str) -> list[dict]:
    try:
        return [fe for fe in (v.setting(lb, "haproxy", "haproxy_frontends") or []) if isinstance(fe, dict)]
    except Unknown:
        return []


def check_relay_contract(v: View, f: Findings) -> None:
    """The relays believe the PROXY headers of the balancers and nobody else's, listen where the
    balancers send, and no relay network opens a relay to everyone or to the balancers."""
    balancers = v.hosts("balancers")
    lb_addresses = {a for a in (v.address(h) for h in balancers) if a}
    lb = balancers[0] if balancers else None
    try:
        proxy_on = bool(lb) and bool(v.setting(lb, "haproxy", "haproxy_proxy_protocol_enabled"))
        group = v.setting(lb, "haproxy", "haproxy_backend_group") if lb else "mail_relays"
    except Unknown:
        return
    for host, mta in ((h, m) for h in v.hosts(group) for m in relay_mtas(v, h)):
        try:
            enabled = bool(v.setting(host, mta, f"{mta}_proxy_enabled"))
            trusted = {str(a) for a in v.setting(host, mta, f"{mta}_proxy_trusted_addresses") or []}
            nets = v.setting(host, mta, f"{mta}_relay_networks") or []
            ports = {"smtp": v.setting(host, mta, f"{mta}_proxy_port"),
                     "submission": v.setting(host, mta, f"{mta}_submission_proxy_port")}
            submission = bool(v.setting(host, mta, f"{mta}_submission_enabled"))
        except Unknown:
            continue
        if lb and proxy_on and not enabled:
            f.error(host, f"{mta}_proxy_enabled",
                    "is false, but the balancers send PROXY protocol (haproxy_proxy_protocol_enabled): the relay "
                    f"would refuse them, or judge every client as the balancer (write {mta}_proxy_enabled: true)")
        if enabled and lb_addresses:
            missing, extra = sorted(lb_addresses - trusted), sorted(trusted - lb_addresses)
            if missing:
                f.error(host, f"{mta}_proxy_trusted_addresses",
                        f"lacks the balancer address(es) {', '.join(missing)}: the relay would refuse their PROXY "
                        "connections (list every balancer's mailstack_service_address)")
            if extra:
                f.error(host, f"{mta}_proxy_trusted_addresses",
                        f"trusts {', '.join(extra)}, which is not a balancer: that host could claim any client "
                        "address and relay as if it were inside (list only the balancers' addresses)")
        for net in nets:
            try:
                network = ipaddress.ip_network(str(net), strict=False)
            except ValueError:
                continue  # the role's own check names it
            if network.prefixlen == 0:
                f.error(host, f"{mta}_relay_networks",
                        f"{net} lets every address relay: an open relay (list the applications' networks)")
            inside = sorted(a for a in lb_addresses if ipaddress.ip_address(a) in network)
            if inside:
                f.error(host, f"{mta}_relay_networks",
                        f"{net} contains the balancer address(es) {', '.join(inside)}: every client the balancer "
                        "passes on without PROXY would be allowed to relay (leave the balancers out)")
        if lb and enabled and proxy_on:
            for fe in frontends(v, lb):
                name, port = fe.get("name"), fe.get("proxy_backend_port")
                if name not in ports or port is None:
                    continue
                if name == "submission" and not submission:
                    f.warning(host, f"{mta}_submission_enabled",
                              f"is false, but the balancers' frontend submission sends to port {port} of this relay, "
                              f"where nothing listens: port {fe.get('port')} on the VIPs would refuse every client "
                              f"(write {mta}_submission_enabled: true, or remove the submission frontend from "
                              "haproxy_frontends)")
                elif port != ports[name]:
                    var = f"{mta}_proxy_port" if name == "smtp" else f"{mta}_submission_proxy_port"
                    f.error(host, var,
                            f"is {ports[name]}, but the balancers' frontend {name} sends PROXY connections to port "
                            f"{port} (haproxy_frontends' proxy_backend_port): write {var}: {port}, or change the "
                            "frontend")


def vip_list(v: View, lb: str) -> list[str]:
    preset = v.setting(lb, "keepalived", "keepalived_preset")
    if preset == "custom":
        return [str(vip) for inst in v.setting(lb, "keepalived", "keepalived_instances") or []
                for vip in (inst.get("vips") or [] if isinstance(inst, dict) else [])]
    return [str(vip) for vip in v.setting(lb, "keepalived", "keepalived_vips") or []]


def check_vrrp(v: View, f: Findings, hosts: list[str]) -> None:
    balancers = v.hosts("balancers")
    if not balancers:
        return
    first = balancers[0]
    try:
        agreed = {name: v.setting(first, "keepalived", name) for name in
                  ("keepalived_preset", "keepalived_vips", "keepalived_router_ids", "keepalived_instances",
                   "keepalived_vrrp_version", "keepalived_advert_int")}
        vips = vip_list(v, first)
    except Unknown:
        return
    for host in balancers[1:]:
        for name, value in agreed.items():
            try:
                if v.setting(host, "keepalived", name) != value:
                    f.error(host, name, f"differs from {first}'s: the balancers of one pair must agree on it "
                            f"(write {value!r} on both, in group_vars/balancers)")
            except Unknown:
                continue
    addresses = {h: v.address(h) for h in hosts}
    lb_addresses = {h: addresses[h] for h in balancers if addresses.get(h)}
    for vip in vips:
        try:
            iface = ipaddress.ip_interface(vip)
        except ValueError:
            continue  # keepalived's own check names it
        owners = sorted(h for h, a in addresses.items() if a == str(iface.ip))
        if owners:
            f.error(first, "keepalived_vips", f"VIP {iface.ip} is the address of {', '.join(owners)}: a VIP must be "
                    "an address no host has (pick a free address in the balancers' network)")
        if "/" not in vip:
            f.warning(first, "keepalived_vips", f"VIP {vip} has no prefix length: keepalived adds it as /32, and "
                      "`check` cannot tell whether it is in the balancers' network (write it as address/prefix)")
            continue
        outside = sorted(h for h, a in lb_addresses.items() if ipaddress.ip_address(a) not in iface.network)
        if outside:
            f.error(first, "keepalived_vips",
                    f"VIP {vip} is not in the network of balancer(s) {', '.join(outside)} "
                    f"({', '.join(lb_addresses[h] for h in outside)}): VRRP cannot move it there "
                    "(pick a VIP in the balancers' own network)")


def check_weights(v: View, f: Findings) -> None:
    balancers = v.hosts("balancers")
    if not balancers:
        return
    try:
        group = v.setting(balancers[0], "haproxy", "haproxy_backend_group")
        weight_var = v.setting(balancers[0], "haproxy", "haproxy_weight_variable")
    except Unknown:
        return
    taking = []
    for host in v.hosts(group):
        if not v.defines(host, weight_var):
            f.warning(host, weight_var, "not set: HAProxy gives this relay weight 1; set it (0 to 256) so its "
                      "share is a decision")
            taking.append(host)
            continue
        try:
            weight = v.var(host, weight_var)
        except Unknown:
            continue
        if weight == 0:
            f.warning(host, weight_var, "is 0: the relay is drained and gets no new sessions")
        elif isinstance(weight, int):
            taking.append(host)
    if len(balancers) == 1:
        f.warning(balancers[0], "balancers", "single point of failure: one balancer; its VIPs have nowhere to move "
                  "(add a second host to balancers)")
    if len(taking) == 1:
        f.warning(taking[0], weight_var, "single point of failure: one relay takes traffic (give a second relay "
                  "a weight above 0)")


def check_clusters(v: View, f: Findings) -> None:
    for group, role, var, name, unjoined in (
            ("redis_nodes", "redis", "redis_replication_group", "Redis", "each is on its own, none replicates"),
            ("rabbitmq_nodes", "rabbitmq", "rabbitmq_cluster_group", "RabbitMQ", "they do not form a cluster")):
        nodes = v.hosts(group)
        if len(nodes) == 1:
            f.warning(nodes[0], group, f"single point of failure: one {name} node (add two more to {group}, "
                      f"and set {var})")
        elif len(nodes) > 1:
            try:
                joined = [h for h in nodes if v.setting(h, role, var)]
            except Unknown:
                continue
            if not joined:
                f.warning(nodes[0], var, f"several {name} nodes but no {var}: {unjoined} (write {var}: {group})")


def check_certificates(v: View, f: Findings) -> None:
    """Outside the lab, a relay serves a certificate the operator gave, not one the role makes up."""
    for host, mta in ((h, m) for h in v.hosts("mail_relays") for m in relay_mtas(v, h)):
        try:
            environment = v.var(host, "mailstack_environment", "production")
            certificate = v.setting(host, mta, f"{mta}_tls_certificate")
        except Unknown:
            continue
        if environment != "lab" and not certificate:
            f.warning(host, f"{mta}_tls_certificate",
                      f"is empty, so the relay would serve a self-signed certificate in {environment}: clients "
                      f"that verify cannot trust it (set {mta}_tls_certificate and {mta}_tls_private_key from "
                      "the vault)")


class ActionModule(ActionBase):
    TRANSFERS_FILES = False
    _requires_connection = False

    def run(self, tmp=None, task_vars=None):
        result = super().run(tmp, task_vars)
        root = Path(self._task.args.get("root") or Path(task_vars["playbook_dir"]).parent)
        view = View(self, task_vars, root)
        roles = sorted(p.parent.parent.name for p in root.glob("roles/*/meta/argument_specs.yml"))
        declared = self._declared_names(root, roles)
        hosts = sorted(view.hosts("all"))
        findings = Findings()
        check_groups(view, findings)
        check_addresses(view, findings, hosts)
        check_names(view, findings, hosts, declared | self._pointed_names(view), roles)
        check_relay_contract(view, findings)
        check_vrrp(view, findings, hosts)
        check_weights(view, findings)
        check_clusters(view, findings)
        check_certificates(view, findings)
        errors = [x for x in findings if x["level"] == ERROR]
        result["findings"] = findings
        result["declared"] = sorted(declared)  # what `mailstack check` reads variable names in messages by
        result["warnings"] = [self._line(x) for x in findings if x["level"] == WARNING]
        result["changed"] = False
        if errors:
            result["failed"] = True
            result["msg"] = "the inventory as a whole is wrong:\n" + "\n".join(self._line(x) for x in errors)
        else:
            result["msg"] = f"{len(hosts)} hosts, no inventory-wide error"
        return result

    @staticmethod
    def _line(finding: dict) -> str:
        return f"{finding['host'] or '-'}: {finding['variable']}: {finding['message']}"

    def _declared_names(self, root: Path, roles: list[str]) -> set[str]:
        """Every variable a role's argument_specs or the project's inventory_variables.yml declares."""
        names: set[str] = set()
        for path in [root / "roles" / role / "meta" / "argument_specs.yml" for role in roles] + [
                root / "playbooks" / "vars" / "inventory_variables.yml"]:
            specs = (self._loader.load_from_file(str(path)) or {}).get("argument_specs", {})
            for entry in specs.values():
                names |= set(entry.get("options") or {})
        return names

    @staticmethod
    def _pointed_names(view: View) -> set[str]:
        """Names haproxy reads on the relays because a variable names them (haproxy_weight_variable)."""
        names = set()
        for lb in view.hosts("balancers"):
            for var in ("haproxy_weight_variable", "haproxy_address_variable"):
                try:
                    names.add(str(view.setting(lb, "haproxy", var)))
                except Unknown:
                    pass
        return names
