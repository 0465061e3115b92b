"""One SMTP session to the relays' VIP, kept open between jobs, and the transaction of one message with
a hook called just before the final "." (the point from which the relay may have the message).

The outcome of a transaction is one of:
  sent        the relay answered 2xx to the message
  retry       a 4xx, or the connection failed before the message was handed over
  refused     a 5xx for the whole message (MAIL, DATA or the message itself): never retried
  unknown     the connection failed after the "." went out: the relay may have the message
Recipients answered 5xx at RCPT are returned as `refused_recipients` whatever the outcome.
"""

from __future__ import annotations

import dataclasses
import re
import smtplib
import socket
import ssl
import time

TRANSIENT_ERRORS = (smtplib.SMTPServerDisconnected, smtplib.SMTPConnectError, socket.timeout, OSError)


@dataclasses.dataclass
class Outcome:
    result: str                      # sent, retry, refused, unknown
    reply: str = ""                  # the relay's reply (code and text) or the error
    accepted: tuple = ()
    refused_recipients: dict = dataclasses.field(default_factory=dict)   # rcpt -> reply
    deferred_recipients: dict = dataclasses.field(default_factory=dict)  # rcpt -> reply


@dataclasses.dataclass
class SmtpSettings:
    host: str
    port: int = 25
    helo: str = ""
    tls: str = "required"            # required, opportunistic, none
    tls_verify: bool = True
    ca_file: str = ""
    username: str = ""
    password: str = ""
    timeout: float = 30.0
    messages_per_connection: int = 100
    idle_seconds: float = 30.0       # a connection unused this long is closed
    max_age_seconds: float = 60.0    # a connection open this long is renewed before the next message


class SmtpSession:
    """Not thread-safe: one per consumer thread."""

    def __init__(self, settings: SmtpSettings):
        self.settings = settings
        self._smtp: smtplib.SMTP | None = None
        self._sent_on_connection = 0
        self._last_used = 0.0
        self._opened = 0.0

    def close(self) -> None:
        if self._smtp is not None:
            try:
                self._smtp.quit()
            except (smtplib.SMTPException, OSError):
                pass
            self._drop()

    def _drop(self) -> None:
        if self._smtp is not None:
            try:
                self._smtp.close()
            except OSError:
                pass
        self._smtp = None

    def _connect(self) -> smtplib.SMTP:
        s = self.settings
        smtp = smtplib.SMTP(s.host, s.port, local_hostname=s.helo or None, timeout=s.timeout)
        try:
            smtp.ehlo()
            if s.tls != "none" and smtp.has_extn("starttls"):
                context = ssl.create_default_context(cafile=s.ca_file or None)
                if not s.tls_verify:
                    context.check_hostname = False
                    context.verify_mode = ssl.CERT_NONE
                smtp.starttls(context=context)
                smtp.ehlo()
            elif s.tls == "required":
                raise smtplib.SMTPNotSupportedError(f"{s.host}:{s.port} offers no STARTTLS and TLS is required")
            if s.username:
                smtp.login(s.username, s.password)
        except BaseException:
            smtp.close()
            raise
        self._sent_on_connection = 0
        self._last_used = self._opened = time.monotonic()
        return smtp

    def _worn(self) -> bool:
        """Used enough: its message count, its age or its idle time is up. A connection is not kept
        for ever, so that a relay drained on the balancers sees the worker's sessions leave."""
        now = time.monotonic()
        return (self._sent_on_connection >= self.settings.messages_per_connection
                or now - self._opened > self.settings.max_age_seconds
                or now - self._last_used > self.settings.idle_seconds)

    def close_if_idle(self) -> None:
        """Between jobs: close the connection once it has been unused idle_seconds or open max_age_seconds."""
        if self._smtp is not None and self._worn():
            self.close()

    def send(self, sender: str, recipients, data: bytes, commit) -> Outcome:
        """One transaction. commit(hand_over) runs once every recipient is known and the body is
        written, and calls hand_over() to write the final "." (the ledger writes its commit and the
        "." back to back); if it raises before hand_over(), the connection is dropped without the "."
        (the relay discards the message) and the exception propagates."""
        recipients = list(recipients)
        try:
            if self._smtp is not None and self._worn():
                self.close()
            if self._smtp is not None and not self._still_open():
                self._drop()     # the relay closed a kept connection: a new one, not a retry
            if self._smtp is None:
                self._smtp = self._connect()
        except smtplib.SMTPNotSupportedError as exc:
            self._drop()
            return Outcome("retry", str(exc))
        except smtplib.SMTPResponseException as exc:
            # a refused greeting, STARTTLS or AUTH is the session's trouble, never the message's
            self._drop()
            return Outcome("retry", _reply(exc.smtp_code, exc.smtp_error))
        except (*TRANSIENT_ERRORS, smtplib.SMTPException) as exc:
            self._drop()
            return Outcome("retry", f"connecting: {exc}")
        smtp = self._smtp
        handed_over = False
        try:
            code, reply = smtp.mail(sender)
            if code != 250:
                self._rset()
                return _by_code(code, _reply(code, reply), ())
            accepted, refused, deferred = [], {}, {}
            for rcpt in recipients:
                code, reply = smtp.rcpt(rcpt)
                if code in (250, 251):
                    accepted.append(rcpt)
                elif 500 <= code < 600:
                    refused[rcpt] = _reply(code, reply)
                else:
                    deferred[rcpt] = _reply(code, reply)
            if deferred or not accepted:
                # a recipient to try again: the whole message waits (the refused ones stay out of it)
                self._rset()
                result = "retry" if deferred else "refused"
                first = next(iter((deferred or refused).values()))
                return Outcome(result, first, (), refused, deferred)
            code, reply = smtp.docmd("DATA")
            if code != 354:
                self._rset()
                return _by_code(code, _reply(code, reply), (), refused)
            smtp.send(_dot_stuffed(data))

            def hand_over() -> None:
                nonlocal handed_over
                handed_over = True
                smtp.send(b".\r\n")

            commit(hand_over)
            if not handed_over:
                raise RuntimeError("the commit did not hand the message over")
            code, reply = smtp.getreply()
            self._sent_on_connection += 1
            self._last_used = time.monotonic()
            outcome = _by_code(code, _reply(code, reply), tuple(accepted), refused)
            return outcome
        except TRANSIENT_ERRORS + (smtplib.SMTPException,) as exc:
            self._drop()
            return Outcome("unknown" if handed_over else "retry", f"{type(exc).__name__}: {exc}", (), {}, {})
        except BaseException:
            self._drop()
            raise

    def _still_open(self) -> bool:
        """RSET on a kept connection: 250, or the relay has closed it."""
        try:
            code, _ = self._smtp.rset()
            return code == 250
        except (smtplib.SMTPException, OSError):
            return False

    def _rset(self) -> None:
        try:
            self._smtp.rset()
        except (smtplib.SMTPException, OSError):
            self._drop()


def _by_code(code: int, reply: str, accepted: tuple, refused: dict | None = None) -> Outcome:
    refused = refused or {}
    if 200 <= code < 300:
        return Outcome("sent", reply, accepted, refused)
    if 500 <= code < 600:
        return Outcome("refused", reply, (), refused)
    return Outcome("retry", reply, (), refused)


def _reply(code: int, text) -> str:
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    return f"{code} {' '.join(str(text).split())}"


_LEADING_DOT = re.compile(rb"(?m)^\.")


def _dot_stuffed(data: bytes) -> bytes:
    """The DATA payload without its terminator: CRLF line ends, leading dots doubled (RFC 5321 4.5.2)."""
    data = re.sub(rb"\r\n|\r|\n", b"\r\n", data)
    data = _LEADING_DOT.sub(b"..", data)
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    return data
