"""What an Exim relay node must do. The relay contract (relay_contract.py: relaying, open-relay
tricks, authentication, TLS, upstream, limits, PROXY protocol) runs here too, the same tests
that prove the Postfix role; these are the tests of how Exim does it."""

import collections
import re
import shlex

import pytest
from benchlib import new_id
from conftest import contract_fixtures
from relay_contract import *  # noqa: F401,F403  the shared relay contract runs in this scenario
from relay_contract import OUTSIDE_DOMAIN, RelayContract, check_turning_the_proxy_listener_off, run_bad_input


# The relay the contract runs against: the first Exim relay.
relay, contract = contract_fixtures("exim_relays", RelayContract.for_exim)

WATCHED = ["/etc/exim4/exim4.conf", "/etc/default/exim4", "/etc/mailstack/exim-proxy.nft"]


def test_no_trick_left_anything_in_the_queue(relay):
    queue = relay.run("exim -bp").stdout
    assert f"victim@{OUTSIDE_DOMAIN}" not in queue and "victim%" not in queue, queue


def test_exim_runs_the_role_configuration(relay):
    assert "Configuration file is /etc/exim4/exim4.conf" in relay.run("exim -bV").stdout


# ---------------------------------------------------------------- secrets


def test_secrets_are_readable_by_exim_only_and_not_in_the_configuration(relay):
    for path in ("/etc/exim4/mailstack/smarthost.password", "/etc/exim4/mailstack/passwd",
                 "/etc/exim4/mailstack/tls.key"):
        f = relay.host.file(path)
        assert (f.user, f.group, f.mode) == ("root", "Debian-exim", 0o640), path
    config = relay.run("cat /etc/exim4/exim4.conf").stdout
    assert relay.vars["exim_smarthost_password"] not in config
    for user in relay.vars["exim_auth_users"]:
        assert user["password"] not in config


def test_client_passwords_are_stored_as_sha512_crypt_hashes(relay):
    stored = relay.run("cat /etc/exim4/mailstack/passwd").stdout
    for user in relay.vars["exim_auth_users"]:
        line = [x for x in stored.splitlines() if x.startswith(user["name"] + ":")]
        assert line and line[0].split(": ", 1)[1].startswith("$6$"), stored
        assert user["password"] not in stored


# ---------------------------------------------------------------- throttled destinations


def lane(relay, name):
    return [t for t in relay.vars["exim_throttled_transports"] if t["name"] == name][0]


def test_throttled_destinations_go_through_their_own_transport(relay):
    for spec in relay.vars["exim_throttled_transports"]:
        routed = relay.run(f"exim -bt user@{spec['domains'][0]}").stdout
        assert f"router = throttle_{spec['name']}, transport = remote_smtp_{spec['name']}" in routed, routed
    other = relay.run(f"exim -bt user@{OUTSIDE_DOMAIN}").stdout
    assert "transport = remote_smtp_smarthost" in other, other


def test_throttled_transport_limits_are_in_effect(relay):
    spec = lane(relay, "slowlane")
    shown = relay.run("exim -bP transport remote_smtp_slowlane").stdout
    assert f"max_parallel = {spec['max_parallel']}" in shown, shown
    assert f"max_rcpt = {spec['recipient_limit']}" in shown, shown


def test_queued_mail_shares_connections_up_to_the_messages_per_connection_limit(relay, sink):
    """Queued mail for one destination goes down shared connections, at most N messages each."""
    spec = lane(relay, "bulklane")
    limit = spec["messages_per_connection"]
    test_id = new_id("bulk")
    n = 2 * limit + 1
    for i in range(n):
        message = f"Subject: bulk {i}\nX-Test-Id: {test_id}-{i}\n\nqueued message {i}\n"
        relay.run(f"printf %s {shlex.quote(message)} | exim -odq -f app@{relay.vars['exim_primary_hostname']} user{i}@{spec['domains'][0]}")
    relay.run("exim -qq")
    got = sink.wait_for(test_id, count=n)
    assert len(got) == n, got
    per_connection = collections.Counter(m["connection"] for m in got)
    assert max(per_connection.values()) == limit, \
        f"{n} queued messages, messages per connection {sorted(per_connection.values())}, limit {limit}"


@pytest.mark.timed
def test_delivery_that_waits_too_long_for_its_turn_is_deferred_not_sent(relay):
    """The throttle gives up after exim_throttle_max_wait and the router defers: nothing is sent early."""
    spec = lane(relay, "slowlane")
    script = "/usr/local/sbin/mailstack-exim-throttle"
    # A turn taken now, then one that would have to wait 3 s but may wait only 1 s: refused.
    relay.run(f"runuser -u Debian-exim -- {script} probe-lane 3 1")
    late = relay.run(f"runuser -u Debian-exim -- {script} probe-lane 3 1", check=False)
    assert late.rc == 1, late
    assert spec["rate_delay"] < relay.vars["exim_throttle_max_wait"]


# ---------------------------------------------------------------- queue and sizing


def seconds(exim_time: str) -> int:
    """An Exim time (1w2d, 30m) in seconds; Exim prints times in its own largest units."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
    return sum(int(n) * units[u] for n, u in re.findall(r"([0-9]+)([smhdw])", exim_time))


def test_retry_rules_and_queue_runner_interval_are_in_effect(relay):
    rule = relay.vars["exim_retry_rules"][0]
    shown = relay.run(f"exim -brt {OUTSIDE_DOMAIN}").stdout
    for part in rule["rules"]:
        assert part in shown, shown
    interval = relay.vars["exim_queue_interval"]
    daemon = relay.run("ps -o args= -C exim4").stdout
    assert f"-q{interval}" in daemon.replace(" ", ""), daemon
    for name in ("ignore_bounce_errors_after", "timeout_frozen_after"):
        shown = relay.run(f"exim -bP {name}").stdout.strip()
        assert seconds(shown.split(" = ")[1]) == seconds(relay.vars[f"exim_{name}"]), shown


def test_limits_are_sized_from_the_host(relay):
    cpus = int(relay.run("nproc").stdout)
    mem_mb = int(relay.run("awk '/MemTotal/ {print int($2/1024)}' /proc/meminfo").stdout)
    expected = {
        "smtp_accept_max": min(max(cpus * 100, 100), max(mem_mb // 16, 50)),
        "queue_run_max": max(cpus * 2, 5),
        "remote_max_parallel": min(max(cpus * 4, 4), 16),
    }
    for name, value in expected.items():
        assert relay.run(f"exim -bP {name}").stdout.strip() == f"{name} = {value}"


# ---------------------------------------------------------------- bad input


BAD_INPUTS = [
    ({"exim_relay_networks": ["10.89.20.33/28"]}, ["exim_relay_networks", "10.89.20.32/28"]),
    ({"exim_relay_networks": ["inside-hosts"]}, ["exim_relay_networks", "inside-hosts"]),
    ({"exim_tls_private_key": "-----BEGIN PRIVATE KEY-----\nx\n-----END PRIVATE KEY-----"},
     ["exim_tls_private_key is set but exim_tls_certificate is empty"]),
    ({"exim_client_connection_count_limit": -1}, ["exim_client_connection_count_limit"]),
    ({"exim_proxy_trusted_addresses": []}, ["exim_proxy_trusted_addresses"]),
    ({"exim_tls_min_version": "TLSv1.1"}, ["exim_tls_min_version"]),
    ({"exim_queue_interval": "five minutes"}, ["exim_queue_interval"]),
    ({"exim_dns_retry": 0}, ["exim_dns_retry"]),
    ({"exim_retry_rules": [{"pattern": "*", "error": "*", "rules": ["F,2h"]}]}, ["exim_retry_rules[0]"]),
    ({"exim_throttled_transports": [{"name": "remote_smtp", "domains": ["x.test"]}]},
     ["exim_throttled_transports[0]", "remote_smtp"]),
    # What only Exim's parser knows: the role's check with `exim -bV -C` refuses it before it lands.
    ({"exim_main_extra": {"no_such_option": 1}}, ['option "no_such_option" unknown']),
]


@pytest.mark.parametrize("extra_vars,expected", BAD_INPUTS, ids=[list(b[0])[0] + str(i) for i, b in enumerate(BAD_INPUTS)])
def test_bad_input_fails_naming_the_variable_before_anything_changes(relay, extra_vars, expected):
    run_bad_input(relay, WATCHED, extra_vars, expected)


@pytest.mark.last
def test_turning_the_proxy_listener_off_removes_it_and_its_firewall_and_keeps_relaying(relay, contract, inside, sink):
    """Marked `last`: it leaves the relay without its PROXY listener, so it runs after every other test."""
    check_turning_the_proxy_listener_off(relay, contract, inside, sink)
