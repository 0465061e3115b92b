"""`mailstack status` judges what Prometheus reports: a target that does not answer, a VIP held
by no balancer or two, an alert firing; and says all is well when none is (a stand-in Prometheus
serves the API's answers)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from urllib.parse import parse_qs, urlparse

import pytest
from click.testing import CliRunner

from mailstack.cli import main


def fake_prometheus(targets, alerts, series):
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            url = urlparse(self.path)
            if url.path == "/api/v1/targets":
                data = {"activeTargets": targets}
            elif url.path == "/api/v1/alerts":
                data = {"alerts": alerts}
            else:
                expr = parse_qs(url.query)["query"][0]
                data = {"resultType": "vector", "result": next((r for k, r in series.items() if k in expr), [])}
            body = json.dumps({"status": "success", "data": data}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def target(job, instance, health="up"):
    return {"labels": {"job": job, "instance": instance}, "health": health, "lastError": "" if health == "up" else "refused"}


def sample(value, **labels):
    return {"metric": labels, "value": [0, str(value)]}


HEALTHY = {
    "mailstack_mail_queue_messages": [sample(3, instance="relay1")],
    "mailstack_mail_queue_oldest_seconds": [sample(40, instance="relay1")],
    "mailstack_mail_deliveries_total": [sample(12, instance="relay1", status="delivered")],
    "mailstack_vip_held": [sample(1, instance="lb1", vip="192.0.2.200"), sample(0, instance="lb2", vip="192.0.2.200")],
}


def run(server, *args):
    return CliRunner().invoke(main, ["status", "-i", "unused", "--prometheus",
                                     f"http://127.0.0.1:{server.server_port}", *args])


def test_all_well_exits_0_and_shows_queues_and_vip_holders():
    server = fake_prometheus([target("node", "relay1"), target("mail", "relay1")], [], HEALTHY)
    try:
        result = run(server, "--json")
    finally:
        server.shutdown()
    assert result.exit_code == 0, result.output
    state = json.loads(result.output)
    assert state["healthy"] and state["problems"] == []
    assert state["relays"] == [{"name": "relay1", "queue": 3, "oldest_seconds": 40, "last_hour": {"delivered": 12}}]
    assert state["vips"] == [{"vip": "192.0.2.200", "holders": ["lb1"]}]


@pytest.mark.parametrize("targets, alerts, vip_held, problem", [
    ([target("node", "relay2", "down")], [], [1, 0], "node relay2: does not answer (refused)"),
    ([], [{"labels": {"alertname": "MailQueueOld", "instance": "relay1"}, "state": "firing",
           "annotations": {"summary": "old"}}], [1, 0], "alert MailQueueOld relay1: old"),
    ([], [], [1, 1], "VIP 192.0.2.200: held by 2 balancers (lb1, lb2)"),
    ([], [], [0, 0], "VIP 192.0.2.200: held by 0 balancers ()"),
])
def test_a_problem_is_named_and_exits_1(targets, alerts, vip_held, problem):
    series = dict(HEALTHY, mailstack_vip_held=[sample(vip_held[0], instance="lb1", vip="192.0.2.200"),
                                               sample(vip_held[1], instance="lb2", vip="192.0.2.200")])
    server = fake_prometheus([target("node", "relay1")] + targets, alerts, series)
    try:
        result = run(server)
    finally:
        server.shutdown()
    assert result.exit_code == 1
    assert f"PROBLEM: {problem}" in result.output


def test_a_prometheus_that_does_not_answer_is_an_error_not_a_crash():
    result = CliRunner().invoke(main, ["status", "-i", "unused", "--prometheus", "http://127.0.0.1:9"])
    assert result.exit_code == 1 and "did not answer" in result.output
