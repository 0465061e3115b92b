"""Other hosts' role settings, as their roles would see them: the inventory's value, else the
role's default templated for that host.

A role that talks to other tiers (the monitoring role scrapes every exporter, probes every relay
and VIP) must use the ports and VIPs those tiers' roles use, not a second copy of their defaults.
This reads them where they are defined, with the same reader as the inventory check
(mailstack_inventory_check.View), so a host's override in the inventory is followed too.

  - mailstack_peer_settings:
      settings:                       # group -> [{role, name}]
        balancers: [{role: haproxy, name: haproxy_stats_port}]
        redis_nodes: [{role: redis, name: redis_exporter_password, present: true}]   # true/false
        senders: [{role: keepalived, name: vips}]   # the VIPs of balancers in any group
        rabbitmq_nodes: [{role: rabbitmq, name: rabbitmq_users, secret: true}]
      only: "{{ inventory_hostname }}"   # optional: this host's settings only
    register: peers                   # peers.hosts[host][name] = value; peers.hosts[host].vips for balancers

A setting marked secret that cannot be worked out offline (`mailstack check` without the vault) is
left out and named in peers.hosts[host].unknown; on a real run it is an error as any other.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from ansible.errors import AnsibleActionFail
from ansible.plugins.action import ActionBase


def _check_module():
    path = Path(__file__).with_name("mailstack_inventory_check.py")
    spec = importlib.util.spec_from_file_location("mailstack_inventory_check_shared", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class ActionModule(ActionBase):
    TRANSFERS_FILES = False
    _requires_connection = False

    def run(self, tmp=None, task_vars=None):
        result = super().run(tmp, task_vars)
        check = _check_module()
        # The project's root: this file is playbooks/action_plugins/ in it.
        root = Path(self._task.args.get("root") or Path(__file__).resolve().parents[2])
        view = check.View(self, task_vars, root)
        wanted = self._task.args.get("settings") or {}
        only = self._task.args.get("only")
        hosts: dict[str, dict] = {}
        for group, settings in wanted.items():
            for host in view.hosts(group):
                if only and host != only:
                    continue
                found = hosts.setdefault(host, {"address": view.address(host)})
                for setting in settings:
                    try:
                        if (setting["role"], setting["name"]) == ("keepalived", "vips"):
                            found["vips"] = [v.split("/")[0] for v in check.vip_list(view, host)]
                            continue
                        value = view.setting(host, setting["role"], setting["name"])
                        # a secret's presence, not its value, for roles that only need to know
                        found[setting["name"]] = bool(value) if setting.get("present") else value
                    except check.Unknown as exc:
                        if setting.get("secret") and task_vars.get("mailstack_check_offline"):
                            # `mailstack check` without the vault: the finding that names the missing
                            # vault variable says it; the settings that read this one are not checked
                            found.setdefault("unknown", []).append(setting["name"])
                            continue
                        raise AnsibleActionFail(f"{host}: cannot work out {setting['name']} of role "
                                                f"{setting['role']}: {exc}") from None
                if group == "balancers":
                    found["vips"] = [v.split("/")[0] for v in check.vip_list(view, host)]
        result["hosts"] = hosts
        result["changed"] = False
        return result
