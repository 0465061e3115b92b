"""The consumer: `concurrency` threads, each with its own AMQP connection, channel and SMTP session,
taking jobs from the send queue and acknowledging each only once its fate is settled: sent (the
relay's 2xx), in the retry queue or in the dead queue (both published with confirms first). A job
the worker cannot settle now (Redis unreachable, a stop) goes back to the send queue untried.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid

import pika
import pika.exceptions
import redis.exceptions

from . import message
from .config import Config
from .job import InvalidJob, parse
from .ledger import COMMITTING, Ledger, Lost
from .metrics import Metrics
from .sender import SmtpSession
from .templates import TemplateError, TemplateStore

log = logging.getLogger("mailstack_worker")
ATTEMPT = "x-mailstack-attempt"
REASON = "x-mailstack-reason"


class Worker:
    def __init__(self, config: Config, redis_client, metrics: Metrics | None = None):
        self.config = config
        self.metrics = metrics or Metrics()
        self.ledger = Ledger(redis_client, config.idempotency_ttl_seconds, config.suppression_ttl_seconds)
        self.templates = TemplateStore(config.templates_directory, redis_client, config.template_ttl_seconds,
                                       config.template_rescan_seconds, metrics=self.metrics)
        self.stopping = threading.Event()
        self.identity = f"{socket.gethostname()}:{os.getpid()}"
        self._threads: list[threading.Thread] = []

    # ---------------------------------------------------------------- running
    def start(self) -> None:
        for n in range(self.config.concurrency):
            thread = threading.Thread(target=self._consume, name=f"consumer-{n}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout: float | None = None) -> None:
        """Finish the jobs being sent, hand the prefetched ones back, close."""
        self.stopping.set()
        for thread in self._threads:
            thread.join(timeout)

    def _consume(self) -> None:
        urls = self.config.amqp.urls
        n = 0
        session = SmtpSession(self.config.smtp)
        while not self.stopping.is_set():
            params = pika.URLParameters(urls[n % len(urls)])
            params.heartbeat = self.config.amqp.heartbeat
            n += 1
            try:
                connection = pika.BlockingConnection(params)
            except pika.exceptions.AMQPError as exc:
                log.warning("AMQP %s: %r; trying the next node", params.host, exc)
                self.stopping.wait(min(5.0, 0.5 * n) if n % len(urls) == 0 else 0.2)
                continue
            try:
                channel = connection.channel()
                channel.confirm_delivery()
                channel.basic_qos(prefetch_count=self.config.amqp.prefetch)
                log.info("consuming %s on %s", self.config.amqp.queue, params.host)
                n = 0
                for method, properties, body in channel.consume(self.config.amqp.queue, inactivity_timeout=1):
                    if method is not None:
                        self.guarded(channel, method, properties, body, session)
                    else:
                        session.close_if_idle()   # no job this second
                    if self.stopping.is_set():
                        break
                channel.cancel()    # the prefetched jobs go back to the queue
                connection.close()
            except pika.exceptions.AMQPError as exc:
                log.warning("AMQP %s: %r; reconnecting", params.host, exc)
                _close(connection)
        session.close()

    # ---------------------------------------------------------------- one job
    def guarded(self, channel, method, properties, body: bytes, session: SmtpSession) -> None:
        """handle() one delivery until its fate is settled. While Redis cannot be reached nothing may
        be sent: the job stays in this worker's hands (not handed back, which would count against a
        quorum queue's delivery limit) and is tried again once Redis answers; a stop hands it back.
        A job that meets a fault of the worker itself goes to the dead queue with it (never retried
        for ever, never lost); AMQP trouble is left to the consumer loop."""
        self.metrics.consumed.inc()
        while True:
            try:
                self.handle(channel, method, properties, body, session)
                return
            except redis.exceptions.RedisError as exc:
                log.warning("Redis: %s; the job waits in this worker", exc)
                self.metrics.redis_waits.inc()
                if self.stopping.is_set():
                    channel.basic_nack(method.delivery_tag, requeue=True)
                    return
                channel.connection.sleep(self.config.redis_retry_seconds)   # serves AMQP heartbeats
            except pika.exceptions.AMQPError:
                raise
            except Exception as exc:   # noqa: BLE001 - any fault: the job is kept with its reason
                log.exception("a job met a fault of the worker")
                session.close()
                self._dead(channel, method, properties, body, "error",
                           f"worker fault: {type(exc).__name__}: {exc}",
                           int((properties.headers or {}).get(ATTEMPT, 1)))
                return

    def handle(self, channel, method, properties, body: bytes, session: SmtpSession) -> None:
        """One attempt at one job; raises RedisError when the ledger cannot be read or written."""
        headers = dict(properties.headers or {})
        attempt = int(headers.get(ATTEMPT, 1))
        try:
            job = parse(body)
        except InvalidJob as exc:
            self._dead(channel, method, properties, body, "invalid", f"invalid job: {exc}", attempt)
            return
        token = f"{self.identity}:{uuid.uuid4().hex[:12]}"
        try:
            suppressed = self.ledger.suppressed(job.recipients)
            recipients = [r for r in job.recipients if r not in suppressed]
            if suppressed:
                self.metrics.suppressed.inc(len(suppressed))
                log.info("%s: suppressed %s", job.idempotency_key, ", ".join(sorted(suppressed)))
            if not recipients:
                channel.basic_ack(method.delivery_tag)
                return
            state = self.ledger.claim(job.idempotency_key, token)
            if state is not None and state.startswith(COMMITTING):
                # its worker stopped while it handed the message over: before the "." (the relay
                # discarded it) or after (the relay has it). Nothing here can tell which, so the job is
                # neither sent again nor dropped: it goes where an operator sees it, with its Message-ID
                self._dead(channel, method, properties, body, "unknown",
                           f"outcome unknown, {state[len(COMMITTING):].rsplit(':', 1)[0]} stopped while it handed "
                           f"the message over ({message.message_id(job, self.config.message_id_domain)}); "
                           f"the relay may have it", attempt)
                return
            if state is not None:
                self.metrics.duplicates.inc()
                log.info("%s: not sent again (%s)", job.idempotency_key, state.split(":", 1)[0])
                channel.basic_ack(method.delivery_tag)
                return
            try:
                with self.metrics.render_seconds.time():
                    name, rendered = self.templates.render(job)
                    data = message.build(job, rendered, self.config.message_id_domain, name)
            except TemplateError as exc:
                self.ledger.release(job.idempotency_key, token)
                self._dead(channel, method, properties, body, "template", str(exc), attempt)
                return
            with self.metrics.send_seconds.time():
                outcome = session.send(job.sender, recipients, data,
                                       lambda hand_over: self.ledger.commit(job.idempotency_key, token, hand_over))
        except Lost:
            self.metrics.duplicates.inc()
            log.info("%s: another worker took the job over; not sent here", job.idempotency_key)
            channel.basic_ack(method.delivery_tag)
            return
        self._settle(channel, method, properties, body, job, token, outcome, attempt)

    def _settle(self, channel, method, properties, body, job, token, outcome, attempt) -> None:
        key = job.idempotency_key
        for rcpt, reply in outcome.refused_recipients.items():
            self._suppress(rcpt, reply)
        if outcome.result == "sent":
            self._ledger(self.ledger.sent, key, token)
            self.metrics.sent.inc()
            channel.basic_ack(method.delivery_tag)
            return
        if outcome.result == "unknown":
            # the relay may have it: the key stays committed (a redelivery sends nothing) and the
            # job is kept where an operator sees it
            self._dead(channel, method, properties, body, "unknown",
                       f"outcome unknown, connection lost after the message was handed over "
                       f"({message.message_id(job, self.config.message_id_domain)}): {outcome.reply}", attempt)
            return
        self._ledger(self.ledger.release, key, token)
        if outcome.result == "refused":
            self._dead(channel, method, properties, body, "refused", f"refused by the relay: {outcome.reply}", attempt)
            return
        if attempt >= self.config.retry.budget:
            self._dead(channel, method, properties, body, "budget",
                       f"retry budget spent ({attempt} attempts); last: {outcome.reply}", attempt)
            return
        delay = self.config.retry.delay_ms(attempt)
        reason = "relay" if outcome.reply[:1] == "4" else "connection"
        self._publish(channel, self.config.amqp.retry_exchange, self.config.amqp.retry_routing_key, properties, body,
                      {ATTEMPT: attempt + 1, REASON: outcome.reply[:500]}, expiration=str(delay))
        self.metrics.retried.labels(reason=reason).inc()
        log.info("%s: attempt %d: %s; again in %ds", key, attempt, outcome.reply, delay // 1000)
        channel.basic_ack(method.delivery_tag)

    def _suppress(self, rcpt: str, reply: str) -> None:
        try:
            self.ledger.suppress(rcpt, reply, source="worker")
            self.metrics.newly_suppressed.inc()
        except redis.exceptions.RedisError as exc:
            log.error("could not suppress %s (%s): %s", rcpt, reply, exc)

    def _ledger(self, step, key: str, token: str) -> None:
        """A ledger step after the transaction: a failure is logged, the job's fate is already decided."""
        try:
            step(key, token)
        except redis.exceptions.RedisError as exc:
            log.error("%s: Redis: %s (the key keeps its earlier state)", key, exc)

    def _dead(self, channel, method, properties, body, kind: str, reason: str, attempt: int) -> None:
        self._publish(channel, self.config.amqp.dead_exchange, self.config.amqp.dead_routing_key, properties, body,
                      {REASON: reason[:2000], ATTEMPT: attempt, "x-mailstack-worker": self.identity})
        self.metrics.dead.labels(reason=kind).inc()
        log.warning("job to the dead queue: %s", reason)
        channel.basic_ack(method.delivery_tag)

    def _publish(self, channel, exchange, routing_key, properties, body, headers, expiration=None) -> None:
        """Publish with a confirm (mandatory: an unroutable job is an error, not a loss). Raises, and
        the job is not acknowledged, when the broker does not take it."""
        merged = dict(properties.headers or {})
        merged.pop("x-death", None)
        merged.update(headers)
        channel.basic_publish(exchange, routing_key, body, mandatory=True, properties=pika.BasicProperties(
            content_type=properties.content_type or "application/json", delivery_mode=2, headers=merged,
            message_id=properties.message_id, expiration=expiration))


def _close(connection) -> None:
    try:
        if connection.is_open:
            connection.close()
    except Exception:   # noqa: BLE001 - closing a broken connection: nothing left to do
        pass


def run_forever(config: Config, redis_client) -> None:
    import signal

    worker = Worker(config, redis_client)
    if config.metrics_port:
        worker.metrics.serve(config.metrics_address, config.metrics_port)
    signal.signal(signal.SIGTERM, lambda *_: worker.stopping.set())
    signal.signal(signal.SIGINT, lambda *_: worker.stopping.set())
    worker.start()
    while not worker.stopping.wait(1):
        if not any(t.is_alive() for t in worker._threads):
            raise SystemExit("every consumer thread ended")
    worker.stop(timeout=config.smtp.timeout + 10)
