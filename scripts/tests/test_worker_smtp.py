"""The mail worker's SMTP transaction against a real SMTP server on loopback: what it reports for
each kind of reply, that the commit hook runs before the relay can have the message and hands it
over itself (and that a hook failing before that means the relay never gets it), and that one
connection carries many messages."""

from __future__ import annotations

import pytest
from worker_support import Relay, rcpt_refusal

from mailstack_worker.sender import SmtpSession, SmtpSettings

DATA = b"Subject: t\r\n\r\nline\r\n.\r\n..two dots\r\n"


def hand_it_over(hand_over):
    """A commit hook with nothing to record."""
    hand_over()


def session(relay, **settings):
    return SmtpSession(SmtpSettings(host="127.0.0.1", port=relay.port, helo="worker.test", tls="none", **settings))


def test_a_message_is_sent_once_with_its_dots_intact_and_the_hook_runs_before_the_relay_has_it():
    with Relay() as relay:
        seen_at_commit = []

        def commit(hand_over):
            seen_at_commit.append(len(relay.messages))
            hand_over()

        out = session(relay).send("app@app.example", ["ann@example.net"], DATA, commit)
        assert out.result == "sent" and out.reply.startswith("250") and out.accepted == ("ann@example.net",)
        assert seen_at_commit == [0], "the hook ran once, before the relay had the message"
        assert len(relay.messages) == 1
        assert relay.messages[0][2].splitlines() == [b"Subject: t", b"", b"line", b".", b"..two dots"]


def test_a_hook_that_fails_means_the_relay_never_gets_the_message():
    with Relay() as relay:
        smtp = session(relay)

        def lost(hand_over):
            raise RuntimeError("claim lost")

        with pytest.raises(RuntimeError):
            smtp.send("app@app.example", ["ann@example.net"], DATA, lost)
        assert relay.messages == []
        # control: the session recovers and the next message goes through
        assert smtp.send("app@app.example", ["ann@example.net"], DATA, hand_it_over).result == "sent"
        assert len(relay.messages) == 1


@pytest.mark.parametrize("recipients, result, delivered_to, refused", [
    (["defer-1@example.net"], "retry", None, []),
    (["ann@example.net", "defer-1@example.net"], "retry", None, []),
    (["ann@example.net", "bounce-1@example.net"], "sent", ("ann@example.net",), ["bounce-1@example.net"]),
    (["bounce-1@example.net"], "refused", None, ["bounce-1@example.net"]),
    (["bounce-1@example.net", "defer-2@example.net"], "retry", None, ["bounce-1@example.net"]),
])
def test_replies_at_rcpt_decide_retry_or_refusal_and_name_the_refused_recipients(recipients, result, delivered_to,
                                                                                  refused):
    with Relay() as relay:
        out = session(relay).send("app@app.example", recipients, DATA, hand_it_over)
        assert out.result == result, out
        assert sorted(out.refused_recipients) == refused
        assert [m[1] for m in relay.messages] == ([delivered_to] if delivered_to else [])


def test_a_timed_deferral_is_451_for_its_seconds_then_the_recipient_is_taken():
    assert rcpt_refusal("defer30s-1@example.net", now=1000.0).startswith("451")
    assert rcpt_refusal("DEFER30s-1@example.net", now=1029.0).startswith("451"), "one address, any case"
    assert rcpt_refusal("defer30s-1@example.net", now=1030.0) is None
    # control: another address has its own clock, and the untimed rules still hold
    assert rcpt_refusal("defer30s-2@example.net", now=1030.0).startswith("451")
    assert rcpt_refusal("defer-3@example.net", now=5000.0).startswith("451")
    assert rcpt_refusal("bounce-3@example.net").startswith("550")


@pytest.mark.parametrize("reply, result", [("451 4.3.0 later", "retry"), ("554 5.7.1 content refused", "refused")])
def test_the_reply_to_the_message_itself_decides(reply, result):
    with Relay() as relay:
        relay.data_reply = reply
        out = session(relay).send("app@app.example", ["ann@example.net"], DATA, hand_it_over)
        assert (out.result, out.reply) == (result, reply)


def test_a_connection_lost_after_the_message_went_out_is_unknown_and_before_it_a_retry():
    with Relay() as relay:
        relay.drop_after_data = True
        assert session(relay).send("app@app.example", ["ann@example.net"], DATA, hand_it_over).result == "unknown"
    port = relay.port   # the relay is gone now: nothing listens
    out = SmtpSession(SmtpSettings(host="127.0.0.1", port=port, tls="none", timeout=2)).send(
        "app@app.example", ["ann@example.net"], DATA, hand_it_over)
    assert out.result == "retry" and "connecting" in out.reply


def test_one_connection_carries_many_messages_up_to_its_limit_and_tls_required_is_enforced():
    with Relay() as relay:
        smtp = session(relay, messages_per_connection=3)
        for _ in range(5):
            assert smtp.send("app@app.example", ["ann@example.net"], DATA, hand_it_over).result == "sent"
        assert (len(relay.messages), relay.connections) == (5, 2)
        # the loopback server offers no STARTTLS: with TLS required nothing is sent
        out = SmtpSession(SmtpSettings(host="127.0.0.1", port=relay.port, tls="required")).send(
            "app@app.example", ["ann@example.net"], DATA, hand_it_over)
        assert out.result == "retry" and "no STARTTLS" in out.reply and len(relay.messages) == 5


def test_a_kept_connection_the_relay_closed_or_left_idle_is_replaced_without_a_retry():
    with Relay() as relay:
        smtp = session(relay, idle_seconds=1)
        assert smtp.send("app@app.example", ["ann@example.net"], DATA, hand_it_over).result == "sent"
        smtp._smtp.sock.shutdown(2)   # as a relay's idle timeout or restart leaves it: closed under us
        assert smtp.send("app@app.example", ["bob@example.net"], DATA, hand_it_over).result == "sent"
        smtp._last_used -= 2          # unused longer than idle_seconds: closed and opened again
        assert smtp.send("app@app.example", ["cid@example.net"], DATA, hand_it_over).result == "sent"
        assert (len(relay.messages), relay.connections) == (3, 3)


def test_a_connection_is_closed_between_jobs_once_idle_and_renewed_once_old():
    with Relay() as relay:
        smtp = session(relay, idle_seconds=30, max_age_seconds=60)
        assert smtp.send("app@app.example", ["ann@example.net"], DATA, hand_it_over).result == "sent"
        smtp.close_if_idle()           # control: fresh, so it stays open
        assert smtp._smtp is not None
        smtp._last_used -= 31          # no job for longer than idle_seconds: closed without waiting for one
        smtp.close_if_idle()
        assert smtp._smtp is None
        assert smtp.send("app@app.example", ["bob@example.net"], DATA, hand_it_over).result == "sent"
        smtp._opened -= 61             # busy, but open longer than max_age_seconds: the next job renews it
        assert smtp.send("app@app.example", ["cid@example.net"], DATA, hand_it_over).result == "sent"
        assert (len(relay.messages), relay.connections) == (3, 3)
