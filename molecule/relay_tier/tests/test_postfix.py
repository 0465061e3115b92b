"""What a Postfix relay node must do. The relay contract (relay_contract.py: relaying, open-relay
tricks, authentication, TLS, upstream, limits, PROXY protocol) runs here too; these are the tests
of what only Postfix has."""

import json
import time

import pytest
from benchlib import code, new_id
from conftest import contract_fixtures
from relay_contract import *  # noqa: F401,F403  the shared relay contract runs in this scenario
from relay_contract import (OUTSIDE_DOMAIN, RelayContract, check_turning_the_proxy_listener_off, relayed,
                            run_bad_input)


# The relay the contract runs against: the first Postfix relay.
relay, contract = contract_fixtures("postfix_relays", RelayContract.for_postfix)

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


@pytest.mark.timed
def test_a_burst_to_one_destination_shares_connections(relay, inside, sink):
    """Postfix caches connections on demand while a destination has a backlog. Six messages
    sometimes went out on six parallel connections on a fast run, so the burst is twenty."""
    test_id = new_id("burst")
    n = 20
    report = inside.probe(relay.ip, to=[f"someone@{OUTSIDE_DOMAIN}"], id=test_id, count=n)
    assert all(code(m.get("data")) == 250 for m in report["messages"]), report
    got = sink.wait_for(test_id, count=n)
    assert len(got) == n
    connections = {m["connection"] for m in got}
    assert len(connections) < n, f"{n} messages to one destination used {len(connections)} connections"


@pytest.mark.timed
def test_messages_that_follow_each_other_to_the_relayhost_share_its_connection(relay, inside, sink):
    """The relayhost is always cached (smtp_connection_cache_destinations), so a message that comes
    after the previous one was delivered goes down the connection that one left open, as long as
    it comes within postfix_connection_cache_time_limit. Each message here is sent only when the
    previous one has reached the sink (deliveries that overlap open parallel connections, which is
    concurrency, not a missing cache). Postfix matches that list against the bare next-hop name:
    written like the relayhost ([host]:25) it never matched, and every such message opened a
    connection of its own."""
    limit = relay.run("postconf -h smtp_connection_cache_time_limit").stdout.strip()
    # Let the connections earlier tests left in the cache expire: each message may take any cached
    # connection, so with leftovers five messages went down three connections, all of them reused.
    time.sleep(int(limit.rstrip("s")) + 1)
    test_id = new_id("reuse")
    n = 5
    for i in range(n):
        assert relayed(inside.probe(relay.ip, to=[f"someone@{OUTSIDE_DOMAIN}"], id=f"{test_id}-{i}"))
        assert sink.wait_for(f"{test_id}-{i}"), f"message {i} did not arrive"
    got = sorted(sink.with_id(test_id), key=lambda m: m["received_at"])
    gaps = [round(b["received_at"] - a["received_at"], 2) for a, b in zip(got, got[1:])]
    connections = [m["connection"] for m in got]
    # One more connection is allowed for a gap that outlasted the cache time on a slow machine.
    assert len(set(connections)) <= 2, \
        f"{n} messages one after another used connections {connections} (gaps {gaps} s, cache time {limit})"


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
    ({"postfix_relay_networks": ["10.89.20.33/28"]}, ["postfix_relay_networks", "10.89.20.32/28"]),
    ({"postfix_relay_networks": ["inside-hosts"]}, ["postfix_relay_networks", "inside-hosts"]),
    ({"postfix_tls_private_key": "-----BEGIN PRIVATE KEY-----\nx\n-----END PRIVATE KEY-----"},
     ["postfix_tls_private_key is set but postfix_tls_certificate is empty"]),
    ({"postfix_smtpd_client_connection_count_limit": -1}, ["postfix_smtpd_client_connection_count_limit"]),
    ({"postfix_proxy_trusted_addresses": []}, ["postfix_proxy_trusted_addresses"]),
    ({"postfix_smtpd_tls_min_version": "TLSv1.1"}, ["postfix_smtpd_tls_min_version"]),
    ({"postfix_maximal_queue_lifetime": "five days"}, ["postfix_maximal_queue_lifetime"]),
    ({"postfix_connection_cache_destinations": ["[mx.example.net]:587"]},
     ["postfix_connection_cache_destinations", '(write "mx.example.net")']),
]


@pytest.mark.parametrize("extra_vars,expected", BAD_INPUTS, ids=[list(b[0])[0] for b in BAD_INPUTS])
def test_bad_input_fails_naming_the_variable_before_anything_changes(relay, extra_vars, expected):
    run_bad_input(relay, WATCHED, extra_vars, expected)


@pytest.mark.last
def test_turning_the_proxy_listener_off_removes_it_and_its_firewall_and_keeps_relaying(relay, contract, inside, sink):
    """Marked `last`: it leaves the relay without its PROXY listener, so it runs after every other test."""
    check_turning_the_proxy_listener_off(relay, contract, inside, sink)
