"""What a Postfix relay node must do, proven with real clients, a real sink and real SMTP."""

import json
import os
import shlex
import subprocess
import time
from pathlib import Path

import pytest
from benchlib import PROJECT, code, inventory_dir, new_id, wait_until

OUTSIDE_DOMAIN = "elsewhere.test"


def relayed(report: dict) -> bool:
    """True when the relay accepted the message for delivery (250 after DATA)."""
    return bool(report["messages"]) and code(report["messages"][0].get("data")) == 250


# ---------------------------------------------------------------- relaying


def test_mail_from_inside_network_is_relayed_and_delivered(relay, inside, sink):
    test_id = new_id("inside")
    report = inside.probe(relay.ip, to=[f"someone@{OUTSIDE_DOMAIN}"], mail_from="app@inside.test", id=test_id)
    assert relayed(report), report
    got = sink.wait_for(test_id)
    assert len(got) == 1, f"message {test_id} accepted by the relay but not found at the sink"
    assert got[0]["rcpt_tos"] == [f"someone@{OUTSIDE_DOMAIN}"]
    assert got[0]["peer"] == relay.ip


def test_relay_refuses_mail_from_outside_networks(relay, outside, sink):
    test_id = new_id("outside")
    report = outside.probe(relay.ip, to=[f"victim@{OUTSIDE_DOMAIN}"], id=test_id)
    rcpt = report["messages"][0]["rcpt"][0]
    assert 500 <= code(rcpt) < 600, report
    assert "Relay access denied" in rcpt[1]
    time.sleep(2)
    assert sink.with_id(test_id) == []


def test_outside_client_may_send_to_the_domains_the_relay_serves(relay, outside, sink):
    """Control for the open-relay tests: the outside client reaches the relay and can be accepted."""
    test_id = new_id("served")
    domain = relay.vars["postfix_relay_domains"][0]
    report = outside.probe(relay.ip, to=[f"someone@{domain}"], id=test_id)
    assert relayed(report), report
    assert len(sink.wait_for(test_id)) == 1


OPEN_RELAY_TRICKS = [
    "victim@{out}",
    "victim%{out}@{relay}",
    "victim%{out}@{served}",
    "{out}!victim@{relay}",
    "{out}!victim@{served}",
    '"victim@{out}"@{relay}',
    '"victim@{out}"@{served}',
    '"victim%{out}"@{relay}',
    "victim@{out}@{relay}",
    "@{relay}:victim@{out}",
    "@{served},@{relay}:victim@{out}",
    "victim@[{sink_ip}]",
    "victim@{out}.",
]


@pytest.mark.parametrize("pattern", OPEN_RELAY_TRICKS)
def test_open_relay_tricks_from_outside_are_refused(relay, outside, sink, pattern):
    rcpt = pattern.format(out=OUTSIDE_DOMAIN, relay=relay.vars["postfix_myhostname"],
                          served=relay.vars["postfix_relay_domains"][0], sink_ip=sink.ip)
    test_id = new_id("trick")
    report = outside.probe(relay.ip, to=[rcpt], id=test_id)
    assert report["connected"], report
    replies = report["messages"][0]
    refused = 500 <= code(replies["mail"]) < 600 or all(500 <= code(r) < 600 for r in replies["rcpt"])
    assert refused, f"RCPT TO:<{rcpt}> from outside was not refused with a 5xx: {replies}"
    assert "data" not in replies
    time.sleep(1)
    assert sink.with_id(test_id) == []


def test_no_trick_left_anything_in_the_queue(relay):
    queue = relay.run("postqueue -j").stdout.strip()
    recipients = [r["address"] for line in queue.splitlines() for r in json.loads(line)["recipients"]]
    assert not [r for r in recipients if OUTSIDE_DOMAIN in r and "victim" in r], queue


# ---------------------------------------------------------------- SASL


def test_authenticated_outside_client_may_relay(relay, outside, sink):
    user = relay.vars["postfix_sasl_users"][0]
    test_id = new_id("sasl")
    report = outside.probe(relay.ip, to=[f"someone@{OUTSIDE_DOMAIN}"], starttls=True,
                           auth=f"{user['name']}:{user['password']}", id=test_id)
    assert code(report["auth"]) == 235, report
    assert relayed(report), report
    assert len(sink.wait_for(test_id)) == 1


def test_wrong_password_is_refused_and_does_not_relay(relay, outside, sink):
    user = relay.vars["postfix_sasl_users"][0]
    test_id = new_id("badauth")
    report = outside.probe(relay.ip, to=[f"victim@{OUTSIDE_DOMAIN}"], starttls=True,
                           auth=f"{user['name']}:wrong-{user['password']}", id=test_id)
    assert code(report["auth"]) == 535, report
    assert 500 <= code(report["messages"][0]["rcpt"][0]) < 600, report


def test_auth_is_not_offered_before_starttls(relay, outside):
    report = outside.probe(relay.ip, to=[f"someone@{OUTSIDE_DOMAIN}"], no_data=True)
    assert "auth" not in report["esmtp_features"], report["esmtp_features"]
    with_tls = outside.probe(relay.ip, to=[f"someone@{OUTSIDE_DOMAIN}"], no_data=True, starttls=True)
    assert with_tls["tls_version"], with_tls


def test_submission_port_requires_tls_and_authentication(relay, outside):
    plain = outside.probe(relay.ip, port=587, to=[f"victim@{OUTSIDE_DOMAIN}"], no_data=True)
    assert 500 <= code(plain["messages"][0]["mail"]) < 600 or \
        all(500 <= code(r) < 600 for r in plain["messages"][0]["rcpt"]), plain
    user = relay.vars["postfix_sasl_users"][0]
    good = outside.probe(relay.ip, port=587, to=[f"someone@{OUTSIDE_DOMAIN}"], starttls=True,
                         auth=f"{user['name']}:{user['password']}", no_data=True)
    assert code(good["auth"]) == 235 and code(good["messages"][0]["rcpt"][0]) == 250, good


# ---------------------------------------------------------------- TLS


def test_starttls_is_offered_and_negotiates_tls12_or_newer(relay, outside):
    report = outside.probe(relay.ip, to=[f"someone@{OUTSIDE_DOMAIN}"], starttls=True, no_data=True)
    assert report["starttls_offered"], report
    assert code(report["starttls"]) == 220
    assert report["tls_version"] in ("TLSv1.2", "TLSv1.3")


@pytest.fixture(scope="module")
def tls11_server(outside):
    """A TLS 1.1 server on the outside client's loopback: proof that the client speaks TLS 1.1."""
    outside.run("test -f /tmp/t11.pem || openssl req -x509 -newkey rsa:2048 -nodes -days 1 "
                "-subj /CN=t11 -keyout /tmp/t11.key -out /tmp/t11.pem 2>/dev/null")
    outside.run("(setsid openssl s_server -accept 127.0.0.1:4433 -tls1_1 -cipher DEFAULT@SECLEVEL=0 "
                "-cert /tmp/t11.pem -key /tmp/t11.key -quiet </dev/null >/dev/null 2>&1 &) ; sleep 1")
    yield "127.0.0.1:4433"
    outside.run("pkill -f 's_server -accept 127.0.0.1:4433'", check=False)


def s_client(node, target, extra):
    cmd = (f"timeout 15 openssl s_client -connect {target} {extra} -tls1_1 -cipher DEFAULT@SECLEVEL=0 "
           "</dev/null 2>&1")
    return node.run(cmd, check=False)


def test_tls11_is_refused(relay, outside, tls11_server):
    control = s_client(outside, tls11_server, "")
    assert "Protocol  : TLSv1.1" in control.stdout or "TLSv1.1" in control.stdout, \
        f"control failed: this client cannot speak TLS 1.1, so the test would prove nothing:\n{control.stdout}"
    result = s_client(outside, f"{relay.ip}:25", "-starttls smtp")
    assert result.rc != 0, result.stdout
    assert "Cipher is (NONE)" in result.stdout or "alert" in result.stdout.lower(), result.stdout


# ---------------------------------------------------------------- upstream relayhost


def test_relayhost_receives_mail_over_tls_with_the_configured_credentials(relay, inside, sink):
    test_id = new_id("upstream")
    assert relayed(inside.probe(relay.ip, to=[f"someone@{OUTSIDE_DOMAIN}"], id=test_id))
    got = sink.wait_for(test_id)
    assert got and got[0]["tls"], got
    assert got[0]["auth_user"] == relay.vars["postfix_relayhost_username"], got


def test_relayhost_password_file_is_private(relay):
    f = relay.host.file("/etc/postfix/sasl_passwd")
    assert f.user == "root" and f.mode == 0o600


# ---------------------------------------------------------------- throttling and connection reuse


def test_throttled_domain_deliveries_are_spaced_by_rate_delay(relay, inside, sink):
    lane = relay.vars["postfix_throttled_transports"][0]
    delay = float(lane["rate_delay"].rstrip("s"))
    test_id = new_id("slow")
    n = 4
    for i in range(n):
        assert relayed(inside.probe(relay.ip, to=[f"user{i}@{lane['domains'][0]}"], id=f"{test_id}-{i}"))
    got = sink.wait_for(test_id, count=n, timeout=30 + n * delay)
    assert len(got) == n, got
    times = sorted(m["received_at"] for m in got)
    gaps = [b - a for a, b in zip(times, times[1:])]
    # Postfix spaces the starts of deliveries; the sink sees their ends, and the first delivery
    # also pays for connecting, TLS and AUTH. Allow one second for that: unthrottled deliveries
    # of this size arrive a few hundredths of a second apart.
    assert min(gaps) >= delay - 1.0, f"deliveries to a throttled domain {gaps} s apart, rate_delay {delay}s"
    assert times[-1] - times[0] >= (n - 1) * delay - 1.0, gaps


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
    test_id = new_id("reuse")
    n = 6
    report = inside.probe(relay.ip, to=[f"someone@{OUTSIDE_DOMAIN}"], id=test_id, count=n)
    assert all(code(m.get("data")) == 250 for m in report["messages"]), report
    got = sink.wait_for(test_id, count=n)
    assert len(got) == n
    connections = {m["connection"] for m in got}
    assert len(connections) < n, f"{n} messages to one destination used {len(connections)} connections"


def test_client_connection_count_limit_applies_to_outside_clients(relay, outside):
    limit = relay.vars["postfix_smtpd_client_connection_count_limit"]
    script = f"""
import socket, json
socks, banners = [], []
for i in range({limit + 1}):
    s = socket.create_connection(("{relay.ip}", 25), 10)
    socks.append(s)
    banners.append(s.recv(512).decode(errors="replace").strip())
print(json.dumps(banners))
"""
    banners = json.loads(outside.run(f"python3 -c {shlex.quote(script)}").stdout)
    assert all(b.startswith("220") for b in banners[:limit]), banners
    assert banners[limit].startswith("421"), banners


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


# ---------------------------------------------------------------- PROXY protocol


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_proxied_client_inside_the_relay_networks_is_relayed(relay, balancer, inside, sink, version):
    test_id = new_id(f"proxy-in-{version}")
    report = balancer.probe(relay.ip, port=relay.vars["postfix_proxy_port"], proxy=version,
                            proxy_src=inside.ip, to=[f"someone@{OUTSIDE_DOMAIN}"], id=test_id)
    assert relayed(report), report
    got = sink.wait_for(test_id)
    assert got, "accepted through the PROXY listener but not delivered"
    assert f"[{inside.ip}]" in got[0]["received"][-1] or any(f"[{inside.ip}]" in r for r in got[0]["received"])


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_proxied_client_outside_the_relay_networks_is_refused(relay, balancer, outside, sink, version):
    test_id = new_id(f"proxy-out-{version}")
    report = balancer.probe(relay.ip, port=relay.vars["postfix_proxy_port"], proxy=version,
                            proxy_src=outside.ip, to=[f"victim@{OUTSIDE_DOMAIN}"], id=test_id)
    assert report["connected"], report
    assert 500 <= code(report["messages"][0]["rcpt"][0]) < 600, report
    time.sleep(1)
    assert sink.with_id(test_id) == []


def test_balancer_itself_is_not_a_relay_client(relay, balancer):
    """The balancer's own address is not in the relay networks: only what it carries counts."""
    report = balancer.probe(relay.ip, to=[f"victim@{OUTSIDE_DOMAIN}"], no_data=True)
    assert 500 <= code(report["messages"][0]["rcpt"][0]) < 600, report


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_forged_proxy_header_from_untrusted_host_gets_no_connection(relay, outside, inside, sink, version):
    test_id = new_id(f"forged-{version}")
    report = outside.probe(relay.ip, port=relay.vars["postfix_proxy_port"], proxy=version,
                           proxy_src=inside.ip, to=[f"victim@{OUTSIDE_DOMAIN}"], id=test_id, timeout=5)
    assert not report["connected"], f"an untrusted host reached the PROXY listener: {report}"
    time.sleep(1)
    assert sink.with_id(test_id) == []


def test_proxy_firewall_survives_a_restart_of_nftables(relay, outside, inside):
    relay.run("systemctl restart nftables.service")
    assert wait_until(lambda: relay.run("nft list table inet mailstack_postfix_proxy", check=False).rc == 0, 10)
    report = outside.probe(relay.ip, port=relay.vars["postfix_proxy_port"], proxy="v2",
                           proxy_src=inside.ip, to=[f"victim@{OUTSIDE_DOMAIN}"], no_data=True, timeout=5)
    assert not report["connected"], report


# ---------------------------------------------------------------- bad input


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
    before = relay.run("sha256sum /etc/postfix/main.cf /etc/postfix/master.cf /etc/mailstack/postfix-proxy.nft").stdout
    env = dict(os.environ, ANSIBLE_ROLES_PATH=str(PROJECT / "roles"), ANSIBLE_FORCE_COLOR="0")
    proc = subprocess.run(
        ["ansible-playbook", "-i", inventory_dir(), str(PROJECT / "molecule/postfix/converge.yml"),
         "--limit", relay.name, "-e", json.dumps(extra_vars)],
        capture_output=True, text=True, env=env, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output
    for text in expected:
        assert text in output, f"{text!r} not in the failure:\n{output[-3000:]}"
    assert "changed=0" in output, output[-2000:]
    after = relay.run("sha256sum /etc/postfix/main.cf /etc/postfix/master.cf /etc/mailstack/postfix-proxy.nft").stdout
    assert before == after
