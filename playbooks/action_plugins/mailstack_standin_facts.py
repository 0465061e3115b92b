"""Stand-in facts for a check that contacts no host (`mailstack check`).

Some role defaults come from a host's facts (a relay's name is its fqdn, keepalived's interface
and address are those of the default route). When playbooks/check.yml runs offline, this sets
those facts from the inventory instead: fqdn is the inventory name (a bare name gets the reserved
domain .invalid, so the stand-in is plainly not a real name), the default route's address
is mailstack_service_address (or ansible_host when it is an address), its interface eth0. The
CLI reports every role variable whose value came from a stand-in, so nobody mistakes it for the
host's own.
"""

from __future__ import annotations

import ipaddress

from ansible.plugins.action import ActionBase

STANDIN_INTERFACE = "eth0"


def _address(*candidates) -> str | None:
    for value in candidates:
        try:
            return str(ipaddress.ip_address(str(value)))
        except ValueError:
            continue
    return None


class ActionModule(ActionBase):
    TRANSFERS_FILES = False
    _requires_connection = False

    def run(self, tmp=None, task_vars=None):
        result = super().run(tmp, task_vars)
        name = task_vars["inventory_hostname"]
        fqdn = name if "." in name else f"{name}.invalid"
        facts = {"fqdn": fqdn, "hostname": fqdn.split(".")[0], "domain": fqdn.split(".", 1)[1]}
        address = _address(task_vars.get("mailstack_service_address"), task_vars.get("ansible_host"))
        if address:
            facts["default_ipv4"] = {"address": address, "interface": STANDIN_INTERFACE}
        result.update(changed=False, ansible_facts=facts)
        return result
