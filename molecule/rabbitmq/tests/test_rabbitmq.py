"""What a RabbitMQ node must do: refuse guest, keep the application user to its vhost and its
rights, keep what it confirmed across a restart, and bring a rejected job back after the retry
delay. Every check is made by an AMQP or HTTP client on another host."""

import json
import shlex
import time

import pytest
from benchlib import new_id, run_bad_input, wait_until


def amqp(client, node, user, password, vhost, *command):
    args = ["amqpprobe", "--host", node.ip, "--user", user, "--password", password, "--vhost", vhost, *command]
    return json.loads(client.run(" ".join(shlex.quote(str(a)) for a in args)).stdout)


def app(node):
    return node.vars["rabbitmq_users"][0]


def as_app(client, node, *command, vhost=None):
    user = app(node)
    return amqp(client, node, user["name"], user["password"], vhost or node.vars["rabbitmq_mail_vhost"], *command)


def queue_depth(client, node, queue):
    """Messages in a queue now, as a passive declare by the admin tells it (no stats delay)."""
    report = amqp(client, node, node.vars["rabbitmq_admin_user"], node.vars["rabbitmq_admin_password"],
                  node.vars["rabbitmq_mail_vhost"], "depth", "--queue", queue)
    return report["messages"][queue]


# ---------------------------------------------------------------- who may connect


@pytest.mark.parametrize("vhost", ["/", "/mail"])
def test_guest_cannot_log_in(client, node, vhost):
    report = amqp(client, node, "guest", "guest", vhost, "check")
    assert not report["connected"], report
    assert "ProbableAuthenticationError" in report["error"] or "ACCESS_REFUSED" in report["error"], report


def test_guest_user_does_not_exist(node):
    users = node.run("rabbitmqctl list_users --quiet --no-table-headers").stdout
    assert "guest" not in users.split(), users


def test_wrong_password_is_refused(client, node):
    report = amqp(client, node, app(node)["name"], "not-the-password", "/mail", "check")
    assert not report["connected"]


def test_application_user_may_only_use_its_vhost(client, node):
    assert as_app(client, node, "check")["connected"]
    for other in ["/", "/other"]:
        report = as_app(client, node, "check", vhost=other)
        assert not report["connected"], f"{app(node)['name']} reached vhost {other}: {report}"


# ---------------------------------------------------------------- publish and consume


def test_application_user_publishes_jobs_and_consumes_them(client, node):
    prefix = new_id("job")
    sent = as_app(client, node, "publish", "--exchange", "mail.outgoing", "--routing-key", "send",
                  "--count", 5, "--prefix", prefix)
    assert len(sent["confirmed"]) == 5, sent
    got = as_app(client, node, "consume", "--queue", "mail.send", "--max", 5)
    assert sorted(m["body"] for m in got["messages"]) == sorted(sent["confirmed"])


def test_application_user_cannot_read_other_queues_or_declare(client, node):
    refused = as_app(client, node, "consume", "--queue", "mail.retry", "--max", 1, "--idle", 1)
    assert "ACCESS_REFUSED" in refused.get("error", ""), refused
    wrong = as_app(client, node, "publish", "--exchange", "mail.retry", "--routing-key", "send", "--prefix", "x")
    assert wrong["failed"] and not wrong["confirmed"], wrong


# ---------------------------------------------------------------- durability


def test_confirmed_persistent_message_survives_a_broker_restart(client, node):
    prefix = new_id("durable")
    sent = as_app(client, node, "publish", "--exchange", "mail.outgoing", "--routing-key", "send",
                  "--count", 3, "--prefix", prefix)
    assert len(sent["confirmed"]) == 3, sent
    node.run("systemctl restart rabbitmq-server && rabbitmqctl await_startup --timeout 120")
    assert wait_until(lambda: as_app(client, node, "check")["connected"], 60)
    got = as_app(client, node, "consume", "--queue", "mail.send", "--max", 3, "--idle", 10)
    assert sorted(m["body"] for m in got["messages"]) == sorted(sent["confirmed"]), got


# ---------------------------------------------------------------- retry topology


def test_rejected_job_waits_in_the_retry_queue_and_comes_back_after_the_delay(client, node):
    delay = node.vars["rabbitmq_mail_retry_delay_ms"] / 1000
    prefix = new_id("retry")
    assert as_app(client, node, "publish", "--exchange", "mail.outgoing", "--routing-key", "send",
                  "--prefix", prefix)["confirmed"]
    rejected = as_app(client, node, "consume", "--queue", "mail.send", "--max", 1, "--reject")
    assert [m["body"] for m in rejected["messages"]] == [f"{prefix}-1"]
    rejected_at = time.monotonic()
    assert wait_until(lambda: queue_depth(client, node, "mail.retry") == 1, 5, 0.2), "the rejected job is not in mail.retry"
    assert queue_depth(client, node, "mail.send") == 0
    back = as_app(client, node, "consume", "--queue", "mail.send", "--max", 1, "--idle", delay + 10)
    waited = time.monotonic() - rejected_at
    assert [m["body"] for m in back["messages"]] == [f"{prefix}-1"], back
    deaths = back["messages"][0]["x_death"]
    assert {"queue": "mail.send", "reason": "rejected", "count": 1} in deaths, deaths
    assert {"queue": "mail.retry", "reason": "expired", "count": 1} in deaths, deaths
    print(f"\nMEASURED rejected job back in mail.send after {waited:.1f}s (retry delay {delay:.0f}s)")
    assert waited >= delay - 0.5


def test_job_given_up_lands_in_the_dead_letter_queue(client, node):
    prefix = new_id("dead")
    assert as_app(client, node, "publish", "--exchange", "mail.dead", "--routing-key", "dead",
                  "--prefix", prefix)["confirmed"]
    assert wait_until(lambda: queue_depth(client, node, "mail.dead") == 1, 5, 0.2)
    node.run(f"rabbitmqctl purge_queue -p {node.vars['rabbitmq_mail_vhost']} mail.dead")


def test_queues_are_durable_and_the_send_queue_is_what_a_plain_declaration_gets(client, node):
    out = node.run(f"rabbitmqctl list_queues --quiet --no-table-headers -p {node.vars['rabbitmq_mail_vhost']} "
                   "name type durable").stdout
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.strip()}
    for queue in ("mail.retry", "mail.dead"):
        assert rows[queue] == ["quorum", "true"], rows
    # a single node: quorum where RabbitMQ (4.0 and newer) makes plain declarations quorum, else classic
    version = node.run("dpkg-query -W -f='${Version}' rabbitmq-server").stdout.split(":")[-1]
    plain = "quorum" if tuple(int(p) for p in version.split(".")[:2]) >= (4, 0) else "classic"
    assert rows["mail.send"] == [plain, "true"], (version, rows)
    # a plain declaration (no arguments, as amqplib's assertQueue) is accepted as the queue is; one
    # asking for the other type is refused, so the first one proves something
    admin = (node.vars["rabbitmq_admin_user"], node.vars["rabbitmq_admin_password"], node.vars["rabbitmq_mail_vhost"])
    assert amqp(client, node, *admin, "declare", "--queue", "mail.send") == {"declared": "mail.send"}
    other = {"quorum": "classic", "classic": "quorum"}[plain]
    refused = amqp(client, node, *admin, "declare", "--queue", "mail.send", "--type", other)
    assert "PRECONDITION_FAILED" in refused.get("error", ""), refused


# ---------------------------------------------------------------- plugins


def test_prometheus_metrics_are_served(client, node):
    out = client.run(f"curl -s http://{node.ip}:15692/metrics").stdout
    assert "rabbitmq_queue_messages" in out or "rabbitmq_" in out, out[:500]


def test_management_api_needs_the_admin_password(client, node):
    url = f"http://{node.ip}:{node.vars['rabbitmq_management_port']}/api/whoami"
    anonymous = client.run(f"curl -s -o /dev/null -w '%{{http_code}}' {url}").stdout
    wrong = client.run(f"curl -s -o /dev/null -w '%{{http_code}}' -u admin:wrong {url}").stdout
    good = client.run(f"curl -s -u {node.vars['rabbitmq_admin_user']}:{shlex.quote(node.vars['rabbitmq_admin_password'])} "
                      f"{url}").stdout
    assert anonymous == "401" and wrong == "401", (anonymous, wrong)
    assert json.loads(good)["name"] == node.vars["rabbitmq_admin_user"]


# ---------------------------------------------------------------- bad input


BAD_INPUTS = [
    ({"rabbitmq_erlang_cookie": "short"}, ["rabbitmq_erlang_cookie"]),
    ({"rabbitmq_admin_password": "x"}, ["rabbitmq_admin_password"]),
    ({"rabbitmq_users": [{"name": "mailapp", "password": "mailapp-secret-0123",
                          "permissions": [{"vhost": "/nowhere", "read": ".*"}]}]}, ["rabbitmq_users[0]", "/nowhere"]),
    ({"rabbitmq_cluster_partition_handling": "hope"}, ["rabbitmq_cluster_partition_handling"]),
]


@pytest.mark.parametrize("extra_vars,expected", BAD_INPUTS, ids=[list(b[0])[0] for b in BAD_INPUTS])
def test_bad_input_fails_naming_the_variable_before_anything_changes(node, extra_vars, expected):
    run_bad_input(node, ["/etc/rabbitmq/rabbitmq.conf", "/etc/rabbitmq/enabled_plugins",
                                     "/var/lib/rabbitmq/.erlang.cookie"], extra_vars, expected)
