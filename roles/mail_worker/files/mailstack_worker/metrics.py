"""The worker's figures for Prometheus (one registry per process; served on metrics.port)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.consumed = Counter("mailstack_worker_jobs_consumed", "Jobs taken from the send queue.", registry=r)
        self.sent = Counter("mailstack_worker_jobs_sent", "Jobs the relay accepted (250 to the message).", registry=r)
        self.retried = Counter("mailstack_worker_jobs_retried", "Jobs sent to the retry queue.", ["reason"], registry=r)
        self.dead = Counter("mailstack_worker_jobs_dead", "Jobs published to the dead queue.", ["reason"], registry=r)
        self.suppressed = Counter("mailstack_worker_recipients_suppressed",
                                  "Recipients not sent to because they are on the suppression list.", registry=r)
        self.newly_suppressed = Counter("mailstack_worker_recipients_suppressed_new",
                                        "Recipients put on the suppression list after a 5xx.", registry=r)
        self.duplicates = Counter("mailstack_worker_jobs_duplicate",
                                  "Jobs not sent because their idempotency key was already sent or being sent.",
                                  registry=r)
        self.redis_waits = Counter("mailstack_worker_redis_waits",
                                   "Times a job waited in the worker because Redis could not be reached.",
                                   registry=r)
        self.template_lookups = Counter("mailstack_worker_template_lookups",
                                        "Template sources looked up in Redis: hit, or miss (read from the directory).",
                                        ["result"], registry=r)
        self.render_seconds = Histogram("mailstack_worker_render_seconds", "Time to render a job's message.",
                                        buckets=BUCKETS, registry=r)
        self.send_seconds = Histogram("mailstack_worker_send_seconds", "Time of one SMTP transaction with the relay.",
                                      buckets=BUCKETS, registry=r)
        for reason in ("relay", "connection"):
            self.retried.labels(reason=reason)
        for reason in ("invalid", "template", "refused", "budget", "unknown", "error"):
            self.dead.labels(reason=reason)
        for result in ("hit", "miss"):
            self.template_lookups.labels(result=result)

    def serve(self, address: str, port: int) -> None:
        start_http_server(port, addr=address, registry=self.registry)
