"""What the lab proof's worker tests share: publishing mail jobs (with confirms through app1's
amqpprobe, and the plain way through the Node.js producer), counting them at the sink, reading the
dead queue and the workers' figures."""

from __future__ import annotations

import collections
import json
import os
import subprocess
import time
import urllib.parse

from conftest import ROOT, inventory
from labprom import metrics

from mailstack.traffic import sink_counts

NODE_MODULES = ROOT / ".cache" / "node" / "node_modules"
PRODUCER = ROOT / "scripts" / "labtests" / "nodeproducer" / "producer.js"


def job_body(**changes) -> str:
    """A mail job whose idempotency key and X-Test-Id are {id} (amqpprobe and the producer fill it)."""
    job = {"idempotency_key": "{id}", "from": "app@app.lab.test", "to": "{id}@example.net",
           "template": {"id": "welcome"}, "variables": {"name": "Ann", "account": "{id}"},
           "headers": {"X-Test-Id": "{id}"}}
    job.update(changes)
    return json.dumps(job)


def broker() -> dict:
    """The lab's RabbitMQ as an application sees it: address, port, vhost, exchange, queue."""
    inv = inventory()
    node = inv.hosts("rabbitmq_nodes")[0]
    return {"host": inv.value(node, "mailstack_service_address"),
            "port": inv.setting(node, "rabbitmq", "rabbitmq_amqp_port"),
            "vhost": inv.setting(node, "rabbitmq", "rabbitmq_mail_vhost"),
            "exchange": inv.setting(node, "rabbitmq", "rabbitmq_mail_outgoing_exchange"),
            "queue": inv.setting(node, "rabbitmq", "rabbitmq_mail_send_queue"),
            "dead": inv.setting(node, "rabbitmq", "rabbitmq_mail_dead_exchange"),
            "users": {**{u["name"]: u["password"] for u in inv.setting(node, "rabbitmq", "rabbitmq_users")},
                      inv.setting(node, "rabbitmq", "rabbitmq_admin_user"):
                          inv.setting(node, "rabbitmq", "rabbitmq_admin_password")},
            "admin": inv.setting(node, "rabbitmq", "rabbitmq_admin_user")}


def probe(lab_exec, user: str, *args: str) -> dict:
    b = broker()
    command = ["amqpprobe", "--host", b["host"], "--port", str(b["port"]), "--user", user,
               "--password", b["users"][user], "--vhost", b["vhost"], *args]
    proc = lab_exec("lab-app1", " ".join(_quote(a) for a in command))
    return json.loads(proc.stdout or "{}") if proc.returncode == 0 else {"error": proc.stderr}


def publish(lab_exec, prefix: str, count: int, body: str | None = None, start: int = 1) -> list[str]:
    """Jobs <prefix>-<start..> published by the application user with confirms; the confirmed ids."""
    b = broker()
    report = probe(lab_exec, "mailapp", "publish", "--exchange", b["exchange"], "--routing-key", "send",
                   "--prefix", prefix, "--count", str(count), "--start", str(start), "--retries", "3",
                   "--body", body or job_body())
    assert not report.get("failed") and len(report.get("confirmed", [])) == count, report
    return report["confirmed"]


def node_publish(prefix: str, count: int, body: str | None = None) -> dict:
    """The plain amqplib producer, on this machine, with only its URL set: the nodeapp user."""
    b = broker()
    url = "amqp://{}:{}@{}:{}/{}".format("nodeapp", urllib.parse.quote(b["users"]["nodeapp"], safe=""), b["host"],
                                         b["port"], urllib.parse.quote(b["vhost"], safe=""))
    proc = subprocess.run(["node", str(PRODUCER), b["queue"], prefix, str(count), body or job_body()],
                          capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, AMQP_URL=url, NODE_PATH=str(NODE_MODULES)))
    return json.loads(proc.stdout.strip().splitlines()[-1]) if proc.stdout.strip() else {"error": proc.stderr}


def wait_delivered(prefix: str, want: set[str], timeout: float = 300) -> collections.Counter:
    """The sink's count per test id of this prefix, once every wanted id arrived (or the timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        counts = sink_counts("lab-sink", prefix)
        if want <= set(counts) or time.monotonic() > deadline:
            return counts
        time.sleep(2)


def wait_settled(lab_exec, prefix: str, want: set[str], timeout: float = 300) -> tuple[collections.Counter, dict]:
    """(the sink's count per test id of this prefix, {id: reason} of the wanted jobs the workers put in
    the dead queue), once every wanted id is in one or the other (or the timeout). Takes the dead queue."""
    deadline = time.monotonic() + timeout
    dead: dict[str, str] = {}
    while True:
        for job in dead_jobs(lab_exec):   # waits its --idle seconds when the queue is empty
            try:
                key = json.loads(job["body"]).get("idempotency_key")
            except (ValueError, AttributeError):
                continue
            if key in want:
                dead[key] = job["reason"]
        counts = sink_counts("lab-sink", prefix)
        if want <= set(counts) | set(dead) or time.monotonic() > deadline:
            return counts, dead


def broker_depth(lab_exec) -> int:
    """Jobs in the send queue, ready or being handled, as the broker counts them."""
    b = broker()
    out = lab_exec("lab-" + inventory().hosts("rabbitmq_nodes")[0], "rabbitmqctl list_queues --quiet "
                   f"--no-table-headers -p {b['vhost']} name messages")
    found = [int(fields[1]) for fields in (line.split() for line in out.stdout.splitlines())
             if len(fields) == 2 and fields[0] == b["queue"] and fields[1].isdigit()]
    assert found, f"the broker did not list {b['queue']}: {out.stdout!r} {out.stderr!r}"
    return found[0]


def dead_jobs(lab_exec, most: int = 1000) -> list[dict]:
    """Take every job in the dead queue (acknowledged: they are gone after this), with its reason."""
    b = broker()
    return probe(lab_exec, b["admin"], "consume", "--queue", b["dead"], "--max", str(most),
                 "--idle", "2").get("messages", [])


def worker_figures(lab_exec) -> dict[str, dict[str, float]]:
    """Each worker's metrics page, read from mon1 (the one host besides this machine that may)."""
    inv = inventory()
    return {w: metrics(lab_exec, "lab-mon1", "http://{}:{}/metrics".format(
        inv.value(w, "mailstack_service_address"), inv.setting(w, "mail_worker", "mail_worker_metrics_port")))
        for w in inv.hosts("mail_workers")}


def total(figures: dict, series: str) -> float:
    return sum(v for page in figures.values() for k, v in page.items() if k.split("{")[0] == series)


def _quote(arg: str) -> str:
    return "'" + arg.replace("'", "'\"'\"'") + "'"
