"""A stock Debian Postfix beside the lab's relays, for `mailstack bench --against stock`.

It runs in a container of the same image as the role's relay, on the lab's network, with what
`apt-get install postfix` gives an operator who answers "Internet Site", and only the two settings
a relay cannot do without taken from the role's relay: the relay networks (mynetworks) and the
relayhost. The bench then sends the same load to both, so the ratio says what the role's tuning is
worth. The container is removed when the bench ends.
"""

from __future__ import annotations

import ipaddress
import shlex
import time

from mailstack.inventory import Inventory
from mailstack.podman import container_info, pexec, podman

CONTAINER = "mailstack-bench-stock-postfix"

INSTALL = ("echo 'postfix postfix/main_mailer_type select Internet Site' | debconf-set-selections && "
           "echo 'postfix postfix/mailname string stock.bench.test' | debconf-set-selections && "
           "DEBIAN_FRONTEND=noninteractive apt-get update -q && "
           "DEBIAN_FRONTEND=noninteractive apt-get install -y -q postfix")


# Exits 0 when something on port 25 sends an SMTP greeting.
GREETS = ("python3 -c 'import socket; s = socket.create_connection((\"127.0.0.1\", 25), 2); "
          "assert s.recv(3) == b\"220\"'")


class StockRelayError(Exception):
    pass


def mynetworks(networks: list[str]) -> str:
    """Postfix's mynetworks: loopback and the relay networks, IPv6 written [2001:db8::]/32."""
    out = ["127.0.0.0/8", "[::1]/128"]
    for net in networks:
        n = ipaddress.ip_network(str(net), strict=False)
        out.append(f"[{n.network_address}]/{n.prefixlen}" if n.version == 6 else str(n))
    return " ".join(out)


def free_address(inv: Inventory) -> str:
    """The highest address of the lab's subnet that no host and no VIP uses."""
    first = inv.hosts()[0]
    subnet = ipaddress.ip_network(inv.value(first, "mailstack_lab_subnet"))
    taken = {str(inv.value(h, "mailstack_service_address", "")) for h in inv.hosts()}
    taken |= {vip for vip, _, _ in inv.vips()}
    for address in reversed(list(subnet.hosts())[1:]):
        if str(address) not in taken:
            return str(address)
    raise StockRelayError(f"no free address in {subnet} for the stock relay")


class StockPostfix:
    """Context manager: creates, configures and finally removes the stock relay's container."""

    def __init__(self, inv: Inventory, relay: str, log=print):
        self.inv, self.relay, self.log = inv, relay, log
        self.container = CONTAINER
        self.address = ""

    def __enter__(self) -> "StockPostfix":
        relay_container = self.inv.value(self.relay, "mailstack_lab_container", None)
        info = container_info(str(relay_container)) if relay_container else None
        if not info:
            raise StockRelayError(f"--against stock needs {self.relay} to be a running lab container")
        if "postfix_relays" not in self.inv.groups_of(self.relay):
            raise StockRelayError(f"--against stock compares Postfix with Postfix: {self.relay} is not in postfix_relays")
        self.address = free_address(self.inv)
        network = self.inv.value(self.relay, "mailstack_lab_network")
        podman("rm", "--force", self.container, check=False)
        self.log(f"stock relay: {self.container} at {self.address} from {info['ImageName']} (apt-get install postfix)")
        podman("run", "--detach", "--name", self.container, "--hostname", "stock.bench.test",
               "--network", network, "--ip", self.address, "--privileged", "--systemd", "always",
               info["ImageName"], "/sbin/init")
        try:
            self._configure()
        except BaseException:
            podman("rm", "--force", self.container, check=False)
            raise
        return self

    def _configure(self) -> None:
        self.run("systemctl is-system-running --wait", timeout=120)
        proc = self.run(INSTALL, timeout=600)
        if proc.returncode != 0:
            raise StockRelayError(f"apt-get install postfix failed in {self.container}: {proc.stderr[-600:]}")
        networks = self.inv.value(self.relay, "postfix_relay_networks")
        relayhost = self.inv.value(self.relay, "postfix_relayhost")
        settings = [f"mynetworks = {mynetworks(networks)}", f"relayhost = {relayhost}"]
        proc = self.run("postconf -e " + " ".join(shlex.quote(s) for s in settings) + " && systemctl restart postfix")
        if proc.returncode != 0:
            raise StockRelayError(f"configuring the stock Postfix failed: {proc.stderr[-600:]}")
        deadline = time.monotonic() + 60
        while self.run(GREETS).returncode != 0:
            if time.monotonic() > deadline:
                raise StockRelayError("the stock Postfix does not answer on port 25")
            time.sleep(1)

    def run(self, command: str, timeout: float = 60):
        return pexec(self.container, command, timeout=timeout)

    def __exit__(self, *exc) -> None:
        podman("rm", "--force", "--time", "0", self.container, check=False)
