"""The worker's ledger on a real Redis (its Lua scripts run where they will run): a claim sends once,
a redelivered job takes a dead worker's claim over, a committed or sent key sends nothing again, the
commit and the final "." go out back to back (the "." is written before Redis's answer is read), a
worker that lost its claim hands nothing over, and sent() records a message whose commit got no
answer."""

from __future__ import annotations

import pytest
from redis_support import RedisServer
from worker_support import DictRedis  # noqa: F401  (puts the worker's package on the path)

from mailstack_worker.ledger import IDEMPOTENCY_KEY, Ledger, Lost


@pytest.fixture
def redis(tmp_path):
    server = RedisServer(tmp_path)
    server.start()
    yield server
    if server.process.poll() is None:
        server.stop()


def state(client, key):
    value = client.get(IDEMPOTENCY_KEY.format(key=key))
    return value.decode() if value else None


def test_a_key_is_sent_once_and_a_dead_workers_claim_is_taken_over(redis):
    client = redis.client()
    ledger = Ledger(client, idempotency_ttl=60)
    assert ledger.claim("k1", "w1:a") is None
    # w1 died before the commit: the redelivered job is w2's to send
    assert ledger.claim("k1", "w2:b") is None
    with pytest.raises(Lost):
        ledger.commit("k1", "w1:a", lambda: pytest.fail("a worker that lost its claim handed the message over"))
    handed = []
    ledger.commit("k1", "w2:b", lambda: handed.append(state(client, "k1")))
    assert len(handed) == 1 and state(client, "k1") == "committing:w2:b"
    # w2 died after the ".": the relay may have it, a redelivery sends nothing
    assert ledger.claim("k1", "w3:c") == "committing:w2:b"
    ledger.sent("k1", "w2:b")
    assert ledger.claim("k1", "w3:c") == "sent:w2:b"


def test_the_commit_is_written_before_the_dot_and_its_answer_read_after(redis):
    """hand_over() runs while the commit's answer is still unread: Redis has the command (written
    first) whatever a SIGKILL does next; the answer is read once the "." is out."""
    client = redis.client()
    ledger = Ledger(client, idempotency_ttl=60)
    ledger.claim("k2", "w1:a")
    seen = []

    def hand_over():
        # another connection sees the commit as soon as Redis ran it: it was written before this
        for _ in range(100):
            if state(redis.client(), "k2") == "committing:w1:a":
                break
        seen.append(state(redis.client(), "k2"))

    ledger.commit("k2", "w1:a", hand_over)
    assert seen == ["committing:w1:a"]


def test_sent_records_a_message_whose_commit_got_no_answer(redis):
    client = redis.client()
    ledger = Ledger(client, idempotency_ttl=60)
    ledger.claim("k3", "w1:a")
    # the commit never reached Redis (as when Redis went away as the "." went out): still claimed
    ledger.sent("k3", "w1:a")
    assert state(client, "k3") == "sent:w1:a"
    # control: another worker's token records nothing
    ledger.claim("k4", "w1:a")
    ledger.sent("k4", "w9:z")
    assert state(client, "k4") == "claimed:w1:a"


def test_redis_away_before_the_commit_hands_nothing_over(redis):
    client = redis.client()
    ledger = Ledger(client, idempotency_ttl=60)
    ledger.claim("k5", "w1:a")
    redis.stop()
    import redis as redis_py

    with pytest.raises(redis_py.exceptions.RedisError):
        ledger.commit("k5", "w1:a", lambda: pytest.fail("handed over without a commit"))
