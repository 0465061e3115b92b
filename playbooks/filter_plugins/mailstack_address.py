"""The address other tiers reach a host on, the one rule every role reads it by.

    {{ hostvars[name] | mailstack_address }}                     mailstack_service_address, else facts
    {{ hostvars[name] | mailstack_address(haproxy_address_variable) }}
    {{ hostvars[name] | mailstack_address('keepalived_address', 'mailstack_service_address') }}

The first of the named variables the host sets (not empty), else the address of its default IPv4
route from its gathered facts, else "" (no facts: the caller's checks say so). Found by Ansible
next to the playbooks and through ansible.cfg's filter_plugins, so roles played from anywhere in
the project use it.
"""

from __future__ import annotations

from collections.abc import Mapping

DEFAULT_VARIABLES = ("mailstack_service_address",)


def host_address(host_vars: Mapping, *variables: str) -> str:
    for name in variables or DEFAULT_VARIABLES:
        value = host_vars.get(name) if name else None
        if value:
            return str(value)
    facts = host_vars.get("ansible_facts") or {}
    default = facts.get("default_ipv4") or {}
    return str(default.get("address") or "")


class FilterModule:
    def filters(self):
        return {"mailstack_address": host_address}
