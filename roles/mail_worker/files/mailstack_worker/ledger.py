"""What the worker keeps in Redis: who is sending which message (idempotency) and who must never get
mail (suppression). Key names are defined here only; the relay policy reads the same suppression keys.

Idempotency: a job's key moves through
    (none) -> claimed:<token> -> committing:<token> -> sent:<token>
claim() before anything is sent; commit() as the message's final "." goes to the relay; sent() after
its 250. A redelivered job (its first worker died) finds claimed:<other> and takes the claim over: the
broker redelivers only when the first consumer's channel is gone, and a first worker that is still
alive loses its commit() and gives way. release() after a definite refusal lets a retry claim again.

A redelivered job that finds committing:<other> met the one moment no ledger can settle: its worker
died between writing the commit and the relay's answer, so the "." may or may not have reached the
relay (commit() writes both back to back, but a worker descheduled or waiting for the GIL between the
two writes and then SIGKILLed has written only the first; the lab proof met it about once in 1,500
jobs). The worker neither sends it again nor drops it: it goes to the dead queue as "outcome unknown"
with its Message-ID, like a connection lost after the ".".
"""

from __future__ import annotations

import json
import logging
import time

log = logging.getLogger(__name__)

IDEMPOTENCY_KEY = "mail:idem:{key}"
COMMITTING = "committing:"                   # the state whose outcome nobody knows
SUPPRESSED_KEY = "mail:suppressed:{entry}"   # entry: an address (lower case) or @domain

CLAIM = """
local v = redis.call('GET', KEYS[1])
if v and string.sub(v, 1, 8) ~= 'claimed:' then return v end
redis.call('SET', KEYS[1], 'claimed:' .. ARGV[1], 'EX', ARGV[2])
if v then return 'taken-over' end
return 'claimed'
"""
# claimed:<token> -> <state>:<token>, only by the claim's owner.
ADVANCE = """
local v = redis.call('GET', KEYS[1])
if v ~= ARGV[1] .. ':' .. ARGV[2] then return 0 end
redis.call('SET', KEYS[1], ARGV[3] .. ':' .. ARGV[2], 'EX', ARGV[4])
return 1
"""
RELEASE = """
local v = redis.call('GET', KEYS[1])
if v == 'claimed:' .. ARGV[1] or v == 'committing:' .. ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class Lost(Exception):
    """The claim was taken over by another worker: this one must not send."""


class Ledger:
    def __init__(self, redis, idempotency_ttl: int, suppression_ttl: int = 0):
        self.redis = redis
        self.ttl = idempotency_ttl
        self.suppression_ttl = suppression_ttl
        self._claim = redis.register_script(CLAIM)
        self._advance = redis.register_script(ADVANCE)
        self._release = redis.register_script(RELEASE)

    # ---------------------------------------------------------------- idempotency
    def claim(self, key: str, token: str) -> str | None:
        """None when this worker may send; else the state that says it was sent (or is being sent)."""
        state = _text(self._claim(keys=[IDEMPOTENCY_KEY.format(key=key)], args=[token, self.ttl]))
        return None if state in ("claimed", "taken-over") else state

    def commit(self, key: str, token: str, hand_over) -> None:
        """claimed -> committing, with hand_over() (the final ".") written right after the command
        and before its answer is read. Lost, and no hand_over(), when the claim is no longer this
        worker's. Once hand_over() ran, a Redis error is logged, not raised: the message is the
        relay's, and sent() records it from either state."""
        name = IDEMPOTENCY_KEY.format(key=key)
        if _text(self.redis.get(name)) != f"claimed:{token}":
            raise Lost(key)
        pool = self.redis.connection_pool
        conn = pool.get_connection("EVAL")
        try:
            conn.send_command("EVAL", ADVANCE, 1, name, "claimed", token, "committing", self.ttl)
        except BaseException:
            conn.disconnect()
            pool.release(conn)
            raise
        try:
            hand_over()
        finally:
            try:
                if not conn.read_response():
                    log.warning("%s: taken over while the message was handed over: it may be sent twice", key)
            except Exception as exc:  # the "." may be out: nothing to undo, sent() writes the state
                conn.disconnect()
                log.warning("%s: Redis did not answer the commit (%s)", key, exc)
            finally:
                pool.release(conn)

    def sent(self, key: str, token: str) -> None:
        name = IDEMPOTENCY_KEY.format(key=key)
        if not self._advance(keys=[name], args=["committing", token, "sent", self.ttl]):
            self._advance(keys=[name], args=["claimed", token, "sent", self.ttl])

    def release(self, key: str, token: str) -> None:
        self._release(keys=[IDEMPOTENCY_KEY.format(key=key)], args=[token])

    def state(self, key: str) -> str | None:
        return _text(self.redis.get(IDEMPOTENCY_KEY.format(key=key)))

    # ---------------------------------------------------------------- suppression
    def suppressed(self, recipients) -> dict[str, dict]:
        """{recipient: why} for those on the list by address or by domain."""
        recipients = list(recipients)
        if not recipients:
            return {}
        keys = []
        for rcpt in recipients:
            keys += [SUPPRESSED_KEY.format(entry=rcpt.lower()),
                     SUPPRESSED_KEY.format(entry="@" + rcpt.rsplit("@", 1)[-1].lower())]
        values = self.redis.mget(keys)
        found = {}
        for i, rcpt in enumerate(recipients):
            value = values[2 * i] or values[2 * i + 1]
            if value is not None:
                found[rcpt] = _entry(value)
        return found

    def suppress(self, entry: str, reason: str, source: str, ttl: int | None = None) -> None:
        """Put an address (or @domain) on the list; ttl None: the worker's default (0: for ever)."""
        ttl = self.suppression_ttl if ttl is None else ttl
        value = json.dumps({"reason": reason, "source": source, "at": int(time.time())})
        self.redis.set(SUPPRESSED_KEY.format(entry=entry.lower()), value, ex=ttl or None)

    def unsuppress(self, entry: str) -> bool:
        return bool(self.redis.delete(SUPPRESSED_KEY.format(entry=entry.lower())))


def _text(value) -> str | None:
    return value.decode() if isinstance(value, bytes) else value


def _entry(value) -> dict:
    try:
        found = json.loads(_text(value))
        return found if isinstance(found, dict) else {"reason": str(found)}
    except ValueError:
        return {"reason": _text(value)}
