"""What a Postfix relay node must do. The relay contract (relay_contract.py: relaying, open-relay
tricks, authentication, TLS, upstream, limits, PROXY protocol) runs here too; these are the tests
of what only Postfix has."""

import json

import pytest
from relay_contract import *  # noqa: F401,F403  the shared relay contract runs in this scenario
from benchlib import code, converge, new_id, wait_until
from relay_contract import OUTSIDE_DOMAIN, relayed, run_bad_input

WATCHED = ["/etc/postfix/main.cf", "/etc/postfix/master.cf", "/etc/mailstack/postfix-proxy.nft"]


def test_no_trick_left_anything_in_the_queue(relay):
    queue = relay.run("postqueue -j").stdout.strip()
    recipients = [r["address"] for line in queue.splitlines() for r in json.loads(line)["recipients"]]
    assert not [r for r in recipients if OUTSIDE_DOMAIN in r and "victim" in r], queue


def test_relayhost_password_file_is_private(relay):
    f = relay.host.file("/etc/postfix/sasl_passwd")
    assert f.user == "root" and f.mode == 0o600


def test_throttled_transport_settings_are_in_effect(relay):
    lane = relay.vars["postfix_throttled_transports"][0]
    name = lane["name"]
    values = relay.run(f"postconf -h {name}_destination_concurrency_limit {name}_destination_rate_delay "
                       f"{name}_destination_recipient_limit").stdout.split()
    assert values == [str(lane["concurrency_limit"]), lane["rate_delay"], str(lane["recipient_limit"])]
    route = relay.run(f"postmap -q {lane['domains'][0]} texthash:/etc/postfix/transport").stdout.strip()
    assert route == f"{name}:{relay.vars['postfix_relayhost']}"
    assert relay.run(f"postconf -M {name}/unix").stdout.split()[7] == "smtp"


def test_outbound_connections_are_reused(relay, inside, sink):
    """A burst to one destination shares connections (Postfix caches them on demand while the
    destination has a backlog). Six messages sometimes went out on six parallel connections on a
    fast run, so the burst is twenty. Reuse for messages that arrive seconds apart (the relayhost
    is in smtp_connection_cache_destinations) was not seen on Debian 13 and is not claimed here."""
    test_id = new_id("reuse")
    n = 20
    report = inside.probe(relay.ip, to=[f"someone@{OUTSIDE_DOMAIN}"], id=test_id, count=n)
    assert all(code(m.get("data")) == 250 for m in report["messages"]), report
    got = sink.wait_for(test_id, count=n)
    assert len(got) == n
    connections = {m["connection"] for m in got}
    assert len(connections) < n, f"{n} messages to one destination used {len(connections)} connections"


def test_process_limit_is_sized_from_the_host(relay):
    cpus = int(relay.run("nproc").stdout)
    mem_mb = int(relay.run("awk '/MemTotal/ {print int($2/1024)}' /proc/meminfo").stdout)
    expected = min(max(cpus * 100, 100), max(mem_mb // 16, 50))
    assert int(relay.run("postconf -h default_process_limit").stdout) == expected


def test_queue_lifetimes_are_in_effect(relay):
    names = ["maximal_queue_lifetime", "bounce_queue_lifetime", "minimal_backoff_time",
             "maximal_backoff_time", "queue_run_delay"]
    values = relay.run("postconf -h " + " ".join(names)).stdout.split()
    assert values == [str(relay.vars[f"postfix_{n}"]) for n in names]


BAD_INPUTS = [
    ({"postfix_relay_networks": ["10.89.10.33/28"]}, ["postfix_relay_networks", "10.89.10.32/28"]),
    ({"postfix_relay_networks": ["inside-hosts"]}, ["postfix_relay_networks", "inside-hosts"]),
    ({"postfix_tls_private_key": "-----BEGIN PRIVATE KEY-----\nx\n-----END PRIVATE KEY-----"},
     ["postfix_tls_private_key is set but postfix_tls_certificate is empty"]),
    ({"postfix_smtpd_client_connection_count_limit": -1}, ["postfix_smtpd_client_connection_count_limit"]),
    ({"postfix_proxy_trusted_addresses": []}, ["postfix_proxy_trusted_addresses"]),
    ({"postfix_smtpd_tls_min_version": "TLSv1.1"}, ["postfix_smtpd_tls_min_version"]),
    ({"postfix_maximal_queue_lifetime": "five days"}, ["postfix_maximal_queue_lifetime"]),
]


@pytest.mark.parametrize("extra_vars,expected", BAD_INPUTS, ids=[list(b[0])[0] for b in BAD_INPUTS])
def test_bad_input_fails_naming_the_variable_before_anything_changes(relay, extra_vars, expected):
    run_bad_input(relay, "postfix", WATCHED, extra_vars, expected)


GUARD_DROPINS = "/etc/systemd/system/postfix*.service.d/mailstack-proxy-firewall.conf"


def postfix_running(relay) -> bool:
    return relay.run("postfix status", check=False).rc == 0


def test_postfix_does_not_run_without_the_proxy_firewall(relay):
    """Fail closed: the unit that runs Postfix's master (postfix@-.service on Debian 12,
    postfix.service on Debian 13) requires the firewall, so stopping the firewall stops Postfix and
    starting Postfix brings the firewall back first."""
    unit = "mailstack-postfix-proxy-firewall.service"
    dropins = relay.run(f"ls {GUARD_DROPINS}", check=False).stdout.split()
    assert len(dropins) == 1, dropins
    guarded = "postfix@-.service" if "postfix@.service.d" in dropins[0] else "postfix.service"
    relay.run(f"systemctl stop {unit}")
    try:
        assert wait_until(lambda: not postfix_running(relay), 20), "Postfix runs without its PROXY firewall"
    finally:
        relay.run(f"systemctl start {guarded}")
    assert wait_until(lambda: postfix_running(relay), 20)
    assert relay.run(f"systemctl is-active {unit}", check=False).stdout.strip() == "active"


def test_turning_the_proxy_listener_off_removes_it_and_its_firewall_and_keeps_relaying(relay, contract, inside, sink):
    """postfix_proxy_enabled: false takes the PROXY listener, the firewall unit, its drop-in, rules and
    nftables table away (proxy_firewall with state absent) while Postfix keeps running and port 25
    keeps relaying (the MTA's unit required the firewall: removing it must not stop the MTA).
    Keep this test last: it leaves the relay without its PROXY listener (the converge from scratch
    at the start of the scenario proves turning it on)."""
    listening = f"ss -Hltn 'sport = :{contract.proxy_port}' | grep -q LISTEN"
    proc = converge(relay, "postfix", {"postfix_proxy_enabled": False})
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert wait_until(lambda: relay.run(listening, check=False).rc != 0, 20), "the PROXY listener is still open"
    assert relay.run(f"nft list table inet {contract.firewall_table}", check=False).rc != 0, \
        "the firewall's nftables table is still loaded"
    leftovers = relay.run(f"ls /etc/systemd/system/mailstack-postfix-proxy-firewall.service {GUARD_DROPINS} "
                          "/etc/mailstack/postfix-proxy.nft 2>/dev/null", check=False).stdout
    assert leftovers.strip() == "", f"still there: {leftovers}"
    assert "mailstack-proxy-firewall" not in relay.run(
        "systemctl show -p Requires postfix.service postfix@-.service").stdout
    assert postfix_running(relay), "turning PROXY off stopped Postfix"
    test_id = new_id("proxy-off")
    assert relayed(inside.probe(relay.ip, to=[f"someone@{OUTSIDE_DOMAIN}"], id=test_id))
    assert sink.wait_for(test_id), "port 25 stopped relaying when the PROXY listener went away"
