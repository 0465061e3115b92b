"""Forged VRRP adverts, sent from a test node: what another host on the balancers' segment could
send to take a VIP (VRRPv3 has no authentication)."""

import shlex

from benchlib import Node

# Sends VRRPv3 adverts (RFC 5798) for one router id from this host's own address to the VRRP
# multicast group, with the TTL of 255 that receivers insist on, for SECONDS; prints how many.
FORGE = r'''
import socket, struct, sys, time
src, vrid, priority, vip, seconds, every = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], \
    float(sys.argv[5]), float(sys.argv[6])
group = "224.0.0.18"
def checksum(data):
    data += b"\0" * (len(data) % 2)
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF
body = struct.pack("!BBBBHH", 0x31, vrid, priority, 1, 20, 0) + socket.inet_aton(vip)
pseudo = socket.inet_aton(src) + socket.inet_aton(group) + struct.pack("!BBH", 0, 112, len(body))
packet = body[:6] + struct.pack("!H", checksum(pseudo + body)) + body[8:]
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, 112)
s.bind((src, 0))
s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 255)
s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(src))
s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 0)
sent, end = 0, time.monotonic() + seconds
while time.monotonic() < end:
    s.sendto(packet, (group, 0))
    sent += 1
    time.sleep(every)
print(sent)
'''


def start_forging(node: Node, vrid: int, vip: str, seconds: float, priority: int = 254,
                  every: float = 0.1, outfile: str = "/tmp/vrrp-forge.out") -> None:
    """Start sending forged adverts from node in the background; the count lands in outfile."""
    node.run(f"printf %s {shlex.quote(FORGE)} > /tmp/vrrp_forge.py")
    args = " ".join(str(a) for a in (node.ip, vrid, priority, vip, seconds, every))
    node.run(f"rm -f {outfile}; (setsid sh -c 'python3 /tmp/vrrp_forge.py {args} > {outfile}.tmp 2>&1; "
             f"mv {outfile}.tmp {outfile}' </dev/null >/dev/null 2>&1 &)")


def dropped_adverts(balancer: Node) -> int:
    """VRRP packets the balancer's VRRP firewall (keepalived_firewall) has dropped so far."""
    out = balancer.run("nft list table inet mailstack_keepalived_vrrp").stdout
    for line in out.splitlines():
        if "counter packets" in line and "drop" in line:
            return int(line.split("counter packets")[1].split()[0])
    raise AssertionError(f"no drop counter in the VRRP firewall of {balancer.name}:\n{out}")
