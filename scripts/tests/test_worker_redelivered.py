"""A job redelivered after its worker died, handled by the worker's own code against a real Redis and
a real SMTP server: a dead worker's claim is taken over and the message sent once; a key already sent
sends nothing and is acknowledged; a key left committing (the worker died between the commit and the
relay's answer, so nobody knows whether the relay has it) is neither sent again nor dropped: it goes to
the dead queue as "outcome unknown" naming its Message-ID."""

from __future__ import annotations

import json
import types

import pika
import pytest
from redis_support import RedisServer
from worker_support import Relay

from mailstack_worker.config import AmqpSettings, Config, RedisSettings, RetrySettings
from mailstack_worker.ledger import IDEMPOTENCY_KEY
from mailstack_worker.sender import SmtpSession, SmtpSettings
from mailstack_worker.worker import REASON, Worker

JOB = {"idempotency_key": "order-7", "from": "shop@app.example", "to": "ann@example.net",
       "body": {"subject": "Your order", "text": "Hello {{ name }}"}, "variables": {"name": "Ann"}}


class Channel:
    """What the worker calls on a pika channel: acks and publishes are recorded."""

    def __init__(self):
        self.acked, self.published = [], []

    def basic_ack(self, tag):
        self.acked.append(tag)

    def basic_publish(self, exchange, routing_key, body, mandatory, properties):
        self.published.append((exchange, properties.headers))


@pytest.fixture
def setup(tmp_path):
    server = RedisServer(tmp_path)
    server.start()
    with Relay() as relay:
        smtp = SmtpSettings(host="127.0.0.1", port=relay.port, helo="worker.test", tls="none")
        config = Config(amqp=AmqpSettings(urls=[]), redis=RedisSettings(url=server.url), smtp=smtp,
                        retry=RetrySettings(), message_id_domain="mail.app.example",
                        templates_directory=str(tmp_path))
        client = server.client()
        yield types.SimpleNamespace(worker=Worker(config, client), redis=client, relay=relay,
                                    session=SmtpSession(smtp))
    server.stop()


def redeliver(s, state: str | None) -> Channel:
    if state is not None:
        s.redis.set(IDEMPOTENCY_KEY.format(key=JOB["idempotency_key"]), state)
    channel = Channel()
    s.worker.handle(channel, types.SimpleNamespace(delivery_tag=1), pika.BasicProperties(headers={}),
                    json.dumps(JOB).encode(), s.session)
    return channel


def test_a_dead_workers_claim_is_taken_over_and_sent_once(setup):
    channel = redeliver(setup, "claimed:w1:1:aaaa")
    assert channel.acked == [1] and not channel.published
    assert len(setup.relay.messages) == 1
    assert setup.redis.get(IDEMPOTENCY_KEY.format(key="order-7")).startswith(b"sent:")


def test_a_key_already_sent_sends_nothing(setup):
    channel = redeliver(setup, "sent:w1:1:aaaa")
    assert channel.acked == [1] and not channel.published and not setup.relay.messages
    # control: the same job with no state is sent
    setup.redis.delete(IDEMPOTENCY_KEY.format(key="order-7"))
    assert redeliver(setup, None).acked == [1] and len(setup.relay.messages) == 1


def test_a_key_left_committing_goes_to_the_dead_queue_naming_its_message_id(setup):
    channel = redeliver(setup, "committing:relayhost:4242:aaaa")
    assert not setup.relay.messages, "sent again although the relay may have it"
    assert channel.acked == [1], "the job was not settled"
    [(exchange, headers)] = channel.published
    assert exchange == "mail.dead"
    assert "outcome unknown, relayhost:4242 stopped while it handed the message over" in headers[REASON]
    assert "<order-7@mail.app.example>" in headers[REASON]
    # the key is left as it was: a second redelivery does the same, never a send
    assert setup.redis.get(IDEMPOTENCY_KEY.format(key="order-7")) == b"committing:relayhost:4242:aaaa"
