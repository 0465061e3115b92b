"""`mailstack check`: what is wrong with an inventory, found before any playbook runs on it.

Every finding names the host(s), the variable and the file that sets it. Errors are things a
run would fail on, or worse, would not fail on (a balancer that is not trusted by the relays, a
relay network that opens the relay to the world); warnings are single points of failure and
values Ansible would fill in silently.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from typing import Any, Callable, Iterable

from mailstack.inventory import Inventory, Undefined, role_argument_spec, tier_roles

ERROR = "error"
WARNING = "warning"


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

    def error(self, message: str, host: str | None = None, variable: str = "", file: str | None = ""):
        self.add(ERROR, message, host, variable, file)

    def warning(self, message: str, host: str | None = None, variable: str = "", file: str | None = ""):
        self.add(WARNING, message, host, variable, file)

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.level == ERROR]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.level == WARNING]


# Secrets each role needs, and when: (variable, condition on the host's settings).
REQUIRED_SECRETS: dict[str, list[tuple[str, Callable[[Callable[[str], Any]], bool]]]] = {
    "haproxy": [("haproxy_stats_password", lambda s: bool(s("haproxy_stats_enabled")))],
    "keepalived": [],
    "redis": [("redis_admin_password", lambda s: True),
              ("redis_replication_password", lambda s: bool(s("redis_replication_group"))),
              ("redis_sentinel_password", lambda s: bool(s("redis_replication_group")))],
    "rabbitmq": [("rabbitmq_erlang_cookie", lambda s: True),
                 ("rabbitmq_admin_password", lambda s: True)],
    "postfix": [("postfix_relayhost_password", lambda s: bool(s("postfix_relayhost_username")))],
    "exim": [("exim_smarthost_password", lambda s: bool(s("exim_smarthost_username")))],
}
# Lists of users whose entries carry a password.
USER_LISTS = {"postfix": "postfix_sasl_users", "exim": "exim_auth_users",
              "redis": "redis_users", "rabbitmq": "rabbitmq_users"}
MTA_GROUPS = {"postfix_relays": "postfix", "exim_relays": "exim"}


def _runtime_name(name: str) -> bool:
    """Names only a play knows (facts, play magic): not an inventory mistake."""
    return name.startswith("ansible_") or name in {"ansible_facts", "play_hosts", "role_path"}


class Checker:
    def __init__(self, inventory: Inventory) -> None:
        self.inv = inventory
        self.report = Report()
        self.tiers = tier_roles()
        self.missing_vault: set[str] = set()

    # ---------------------------------------------------------------- helpers
    def roles_of(self, host: str) -> list[str]:
        groups = set(self.inv.groups_of(host))
        roles: list[str] = []
        for group, names in self.tiers.items():
            if group in groups:
                roles += [r for r in names if r not in roles]
        return roles

    def tier_hosts(self) -> list[str]:
        hosts: list[str] = []
        for group in self.tiers:
            hosts += [h for h in self.inv.hosts(group) if h not in hosts]
        return hosts

    def setting(self, host: str, role: str, name: str, default: Any = None) -> Any:
        """A role variable's value for a host; default when it cannot be known before a run."""
        try:
            return self.inv.setting(host, role, name)
        except (Undefined, KeyError):
            return default

    def where(self, host: str, name: str) -> str:
        return self.inv.where(host, name) or ("role default" if not self.inv.defines(host, name) else "")

    def address(self, host: str) -> str | None:
        try:
            value = self.inv.value(host, "mailstack_service_address", None)
        except Undefined:
            return None
        return str(value) if value else None

    def vault_example_names(self) -> set[str] | None:
        """The variable names group_vars/all/vault.yml.example lists, or None without one."""
        import yaml

        base = self.inv.source if self.inv.source.is_dir() else self.inv.source.parent
        example = base / "group_vars" / "all" / "vault.yml.example"
        if not example.is_file():
            return None
        return set((yaml.safe_load(example.read_text()) or {}).keys())

    # ---------------------------------------------------------------- checks
    def run(self) -> Report:
        self.check_groups()
        self.check_templates()
        self.check_argument_specs()
        self.check_secrets()
        self.check_weights()
        self.check_vrrp()
        self.check_relay_contract()
        self.check_single_points_of_failure()
        if self.missing_vault:
            listed = self.vault_example_names()
            text = ("vault variables not defined: " + ", ".join(sorted(self.missing_vault))
                    + " (define them in an encrypted vault file, e.g. group_vars/all/vault.yml")
            if listed is not None:
                text += "; group_vars/all/vault.yml.example lists what it needs"
                unlisted = sorted(self.missing_vault - listed)
                if unlisted:
                    text += "; NOT in the example, a typo?: " + ", ".join(unlisted)
            self.report.error(text + ")")
        return self.report

    def check_groups(self) -> None:
        r = self.report
        if not self.inv.hosts("balancers"):
            r.error("group balancers is missing or empty: nothing would receive mail on a VIP")
        if not self.inv.hosts("mail_relays"):
            r.error("group mail_relays is missing or empty: the balancers would have no relay")
        for group, what in (("redis_nodes", "Redis (cache tier)"), ("rabbitmq_nodes", "RabbitMQ (queue tier)")):
            if not self.inv.hosts(group):
                r.warning(f"group {group} is missing or empty: site.yml sets up no {what}")
        for host in self.inv.hosts("mail_relays"):
            mtas = [g for g in MTA_GROUPS if g in self.inv.groups_of(host)]
            if len(mtas) != 1:
                r.error("a relay must be in exactly one of postfix_relays and exim_relays (it is in "
                        + (", ".join(mtas) or "neither") + ")", host)
        for group in MTA_GROUPS:
            for host in self.inv.hosts(group):
                if host not in self.inv.hosts("mail_relays"):
                    r.warning(f"in {group} but not in mail_relays: the balancers will not send to it", host)
        for host in set(self.inv.hosts("balancers")) & set(self.inv.hosts("mail_relays")):
            r.error("both a balancer and a relay: HAProxy and the MTA would both listen on port 25", host)
        for host in self.tier_hosts():
            if not self.inv.defines(host, "mailstack_service_address"):
                r.warning("mailstack_service_address is not set: the roles fall back to the address of "
                          "the default route, which this check cannot see", host, "mailstack_service_address")

    def check_templates(self) -> None:
        """Every variable the inventory sets on a role's host must resolve."""
        for host in self.tier_hosts():
            for name in self.inv._host_vars(host):
                where = self.inv.where(host, name)
                if where is None or name.startswith("ansible_"):
                    continue  # not from the inventory's files, or connection settings
                try:
                    self.inv.value(host, name)
                except Undefined as exc:
                    if _runtime_name(exc.missing):
                        continue
                    if exc.missing.startswith("vault_"):
                        self.missing_vault.add(exc.missing)
                        self.report.error(f"refers to {exc.missing}, a vault secret that is not defined",
                                          host, name, where)
                    else:
                        self.report.error(f"refers to {exc.missing}, which is not defined", host, name, where)

    def check_argument_specs(self) -> None:
        """Types and choices, as the roles' argument_specs would reject them at run time."""
        from ansible.module_utils.common.arg_spec import ArgumentSpecValidator

        for host in self.tier_hosts():
            for role in self.roles_of(host):
                spec = role_argument_spec(role)
                for name, option in spec.items():
                    if not self.inv.defines(host, name):
                        continue
                    try:
                        value = self.inv.value(host, name)
                    except Undefined:
                        continue  # reported by check_templates
                    result = ArgumentSpecValidator({name: option}).validate({name: value})
                    for error in result.error_messages:
                        self.report.error(f"{role} role: {error}", host, name, self.where(host, name))

    def check_secrets(self) -> None:
        for host in self.tier_hosts():
            for role in self.roles_of(host):
                def s(name: str, _host=host, _role=role) -> Any:
                    return self.setting(_host, _role, name)

                for name, needed in REQUIRED_SECRETS.get(role, []):
                    if not needed(s):
                        continue
                    if not self.inv.defines(host, name):
                        self.report.error(f"{role} role needs this secret and it has no usable default: "
                                          "set it from the vault", host, name)
                        continue
                    try:
                        value = self.inv.value(host, name)
                    except Undefined:
                        continue  # reported by check_templates
                    if not value:
                        self.report.error("is empty; it is a secret the role needs", host, name,
                                          self.where(host, name))
                users_var = USER_LISTS.get(role)
                users = self.setting(host, role, users_var, []) if users_var else []
                for user in users or []:
                    if isinstance(user, dict) and not user.get("password"):
                        self.report.error(f"user {user.get('name')!r} has no password", host, users_var,
                                          self.where(host, users_var))

    def check_weights(self) -> None:
        r = self.report
        balancers = self.inv.hosts("balancers")
        if not balancers:
            return
        lb = balancers[0]
        group = self.setting(lb, "haproxy", "haproxy_backend_group", "mail_relays")
        weight_var = self.setting(lb, "haproxy", "haproxy_weight_variable", "mail_relay_weight")
        relays = self.inv.hosts(group)
        if not relays:
            r.error(f"haproxy_backend_group is {group!r}, a group that is missing or empty", lb,
                    "haproxy_backend_group", self.where(lb, "haproxy_backend_group"))
            return
        total = 0
        for host in relays:
            if not self.inv.defines(host, weight_var):
                r.warning("not set: HAProxy gives this relay weight 1; set it (0 to 256) so the share "
                          "is a decision", host, weight_var)
                total += 1
                continue
            try:
                weight = self.inv.value(host, weight_var)
            except Undefined:
                continue
            where = self.where(host, weight_var)
            if isinstance(weight, bool) or not isinstance(weight, int):
                r.error(f"must be a whole number from 0 to 256 (got {weight!r})", host, weight_var, where)
            elif not 0 <= weight <= 256:
                r.error(f"must be from 0 to 256 (got {weight})", host, weight_var, where)
            else:
                total += weight
                if weight == 0:
                    r.warning("is 0: the relay is drained and gets no new sessions", host, weight_var, where)
        if total == 0:
            r.error(f"every relay of {group} has weight 0: nothing would receive mail", None, weight_var)

    def vrrp_instances(self, host: str) -> list[dict]:
        """keepalived's instances for this balancer, as roles/keepalived/tasks/instances.yml makes them."""
        s = lambda name, default=None: self.setting(host, "keepalived", name, default)  # noqa: E731
        preset = s("keepalived_preset", "active_passive")
        vips = s("keepalived_vips", []) or []
        ids = s("keepalived_router_ids", []) or []
        members = self.inv.hosts(s("keepalived_group", "balancers"))
        if preset == "custom":
            return list(s("keepalived_instances", []) or [])
        if preset == "active_passive":
            return [{"name": "VI_1", "virtual_router_id": ids[0] if ids else None, "vips": vips,
                     "master": members[0] if members else ""}]
        return [{"name": f"VI_{i + 1}", "virtual_router_id": ids[i] if i < len(ids) else None,
                 "vips": [vip], "master": members[i % max(len(members), 1)] if members else ""}
                for i, vip in enumerate(vips)]

    def vips(self) -> list[tuple[str, str, str]]:
        """(VIP address, preferred balancer, VRRP instance) of every VIP of the balancers."""
        balancers = self.inv.hosts("balancers")
        if not balancers:
            return []
        return [(str(ipaddress.ip_interface(str(vip)).ip), inst.get("master"), inst.get("name"))
                for inst in self.vrrp_instances(balancers[0]) for vip in inst.get("vips") or []]

    def check_vrrp(self) -> None:
        r = self.report
        balancers = self.inv.hosts("balancers")
        if not balancers:
            return
        plans = {h: self.vrrp_instances(h) for h in balancers}
        first = balancers[0]
        for host in balancers[1:]:
            for name in ("keepalived_preset", "keepalived_vips", "keepalived_router_ids", "keepalived_instances"):
                if self.setting(host, "keepalived", name) != self.setting(first, "keepalived", name):
                    r.error(f"differs from {first}'s: the balancers of one pair must agree on it", host, name,
                            self.where(host, name))
        addresses = {h: self.address(h) for h in self.inv.hosts("all")}
        lb_addresses = {h: addresses[h] for h in balancers if addresses.get(h)}
        ids_seen: dict[int, str] = {}
        vips_seen: dict[str, str] = {}
        instances = plans[first]
        if not instances or not any(i.get("vips") for i in instances):
            r.error("no VIP: keepalived_vips (or keepalived_instances) is empty", first, "keepalived_vips",
                    self.where(first, "keepalived_vips"))
        for inst in instances:
            rid = inst.get("virtual_router_id")
            ids_var = "keepalived_router_ids" if self.setting(first, "keepalived", "keepalived_preset") != "custom" \
                else "keepalived_instances"
            if isinstance(rid, bool) or not isinstance(rid, int) or not 1 <= rid <= 255:
                r.error(f"VRRP instance {inst.get('name')}: router id must be a whole number from 1 to 255 "
                        f"(got {rid!r}); one per VIP with the active_active preset", first, ids_var,
                        self.where(first, ids_var))
            elif rid in ids_seen:
                r.error(f"router id {rid} is used by {ids_seen[rid]} and {inst.get('name')}: each VRRP "
                        "instance needs its own", first, ids_var, self.where(first, ids_var))
            else:
                ids_seen[rid] = inst.get("name")
            for vip in inst.get("vips") or []:
                self._check_vip(str(vip), inst, first, lb_addresses, addresses, vips_seen)
        for host in balancers:
            master = self.setting(host, "keepalived", "keepalived_priority_master", 150)
            backup = self.setting(host, "keepalived", "keepalived_priority_backup", 100)
            for name, value in (("keepalived_priority_master", master), ("keepalived_priority_backup", backup)):
                if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 254:
                    r.error(f"must be a whole number from 1 to 254 (got {value!r}; 255 is for an address "
                            "owner)", host, name, self.where(host, name))
            if isinstance(master, int) and isinstance(backup, int) and master <= backup:
                r.error(f"keepalived_priority_master ({master}) must be higher than keepalived_priority_backup "
                        f"({backup}), or no balancer is preferred and the VIPs flap", host,
                        "keepalived_priority_master", self.where(host, "keepalived_priority_master"))

    def _check_vip(self, vip: str, inst: dict, host: str, lb_addresses: dict, addresses: dict,
                   seen: dict) -> None:
        r = self.report
        var = "keepalived_vips"
        where = self.where(host, var)
        try:
            iface = ipaddress.ip_interface(vip)
        except ValueError:
            r.error(f"VIP {vip!r} is not an IP address (with an optional /prefix)", host, var, where)
            return
        ip = str(iface.ip)
        if ip in seen:
            r.error(f"VIP {ip} is in two VRRP instances ({seen[ip]} and {inst.get('name')})", host, var, where)
        seen[ip] = inst.get("name")
        owners = [h for h, a in addresses.items() if a == ip]
        if owners:
            r.error(f"VIP {ip} is the address of {', '.join(owners)}: a VIP must be an address no host has",
                    host, var, where)
        if "/" not in vip:
            r.warning(f"VIP {vip} has no prefix length: keepalived adds it as /32, and this check cannot "
                      "tell whether it is in the balancers' network", host, var, where)
            return
        outside = [h for h, a in lb_addresses.items()
                   if ipaddress.ip_address(a) not in iface.network]
        if outside:
            r.error(f"VIP {vip} is not in the network of balancer(s) {', '.join(outside)} "
                    f"({', '.join(lb_addresses[h] for h in outside)}): VRRP cannot move it there",
                    host, var, where)

    def check_relay_contract(self) -> None:
        """The balancers must be the only hosts whose PROXY headers a relay believes, and no relay
        network may open a relay to everyone."""
        r = self.report
        balancers = self.inv.hosts("balancers")
        lb_addresses = {self.address(h) for h in balancers} - {None}
        proxy_on_lbs = any(self.setting(h, "haproxy", "haproxy_proxy_protocol_enabled", True) for h in balancers)
        for host in self.inv.hosts("mail_relays"):
            for group, mta in MTA_GROUPS.items():
                if group not in self.inv.groups_of(host):
                    continue
                enabled_var, trusted_var, nets_var = (f"{mta}_proxy_enabled", f"{mta}_proxy_trusted_addresses",
                                                      f"{mta}_relay_networks")
                enabled = self.setting(host, mta, enabled_var, False)
                if balancers and proxy_on_lbs and not enabled:
                    r.error(f"is false, but the balancers send PROXY protocol: the relay would refuse them (or, "
                            f"without PROXY, judge every client as the balancer). Set {enabled_var}: true",
                            host, enabled_var, self.where(host, enabled_var))
                trusted = self.setting(host, mta, trusted_var, []) or []
                if enabled:
                    missing = sorted(lb_addresses - set(map(str, trusted)))
                    extra = sorted(set(map(str, trusted)) - lb_addresses)
                    if missing:
                        r.error(f"lacks the balancer address(es) {', '.join(missing)}: the relay would refuse "
                                "their PROXY connections", host, trusted_var, self.where(host, trusted_var))
                    if extra:
                        r.error(f"trusts {', '.join(extra)}, which is not a balancer: that host could claim any "
                                "client address and relay as if it were inside", host, trusted_var,
                                self.where(host, trusted_var))
                nets = self.setting(host, mta, nets_var, []) or []
                for net in nets:
                    try:
                        network = ipaddress.ip_network(str(net), strict=False)
                    except ValueError:
                        r.error(f"{net!r} is not a network (address/prefix)", host, nets_var,
                                self.where(host, nets_var))
                        continue
                    if network.prefixlen == 0:
                        r.error(f"{net} lets every address relay: an open relay", host, nets_var,
                                self.where(host, nets_var))
                    inside = sorted(a for a in lb_addresses if ipaddress.ip_address(a) in network)
                    if inside:
                        r.error(f"{net} contains the balancer address(es) {', '.join(inside)}: every client "
                                "the balancer passes on without PROXY would be allowed to relay", host,
                                nets_var, self.where(host, nets_var))

    def check_single_points_of_failure(self) -> None:
        r = self.report
        balancers = self.inv.hosts("balancers")
        if len(balancers) == 1:
            r.warning("single point of failure: one balancer; its VIPs have nowhere to move", balancers[0])
        relays = self.inv.hosts("mail_relays")
        if balancers:
            weight_var = self.setting(balancers[0], "haproxy", "haproxy_weight_variable", "mail_relay_weight")
            taking = []
            for h in relays:
                try:
                    w = self.inv.value(h, weight_var, 1)
                except Undefined:
                    w = 1
                if not isinstance(w, int) or w > 0:
                    taking.append(h)
            if len(taking) == 1:
                r.warning("single point of failure: one relay takes traffic (a relay group of one)", taking[0])
        for group, role, var, name, unjoined in (
                ("redis_nodes", "redis", "redis_replication_group", "Redis",
                 "each is on its own, none replicates"),
                ("rabbitmq_nodes", "rabbitmq", "rabbitmq_cluster_group", "RabbitMQ", "they do not form a cluster")):
            nodes = self.inv.hosts(group)
            if len(nodes) == 1:
                r.warning(f"single point of failure: one {name} node", nodes[0])
            elif len(nodes) > 1 and not any(self.setting(h, role, var, "") for h in nodes):
                r.warning(f"several {name} nodes but no {var}: {unjoined}", nodes[0], var)

def check(inventory: Inventory) -> Report:
    return Checker(inventory).run()


def format_report(report: Report, source: str) -> Iterable[str]:
    for f in report.errors + report.warnings:
        who = ", ".join(f.hosts) if f.hosts else "-"
        what = f.variable or "-"
        where = f" ({f.file})" if f.file else ""
        yield f"{f.level.upper():7} {who}: {what}{where}: {f.message}"
    yield (f"{source}: {len(report.errors)} error(s), {len(report.warnings)} warning(s)")
